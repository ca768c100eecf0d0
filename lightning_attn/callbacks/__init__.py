"""Lightning callbacks: thin wiring of hooks to metrics and sinks."""

from lightning_attn.callbacks.attention_logger import AttentionLogger
from lightning_attn.callbacks.base import EvaluationCallback
from lightning_attn.callbacks.calibration import CalibrationMonitor
from lightning_attn.callbacks.head_specialization import HeadSpecializationTracker
from lightning_attn.callbacks.module_probe import ModuleProbe

__all__ = ["AttentionLogger", "CalibrationMonitor", "EvaluationCallback", "HeadSpecializationTracker", "ModuleProbe"]
