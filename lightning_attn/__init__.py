"""lightning_attn: attention, calibration and head-specialization callbacks for PyTorch Lightning."""

from lightning_attn.callbacks.attention_logger import AttentionLogger
from lightning_attn.callbacks.calibration import CalibrationMonitor
from lightning_attn.callbacks.head_specialization import HeadSpecializationTracker
from lightning_attn.callbacks.module_probe import ModuleProbe
from lightning_attn.capture import AttentionCapture, AttentionRecorder, SiteInfo
from lightning_attn.report import ExplainabilityReport, build_report

__version__ = "0.1.0"

__all__ = ["AttentionCapture", "AttentionLogger", "AttentionRecorder", "CalibrationMonitor", "ExplainabilityReport", "HeadSpecializationTracker", "SiteInfo", "__version__", "build_report", "ModuleProbe"]
