"""Lightning callbacks: thin wiring of hooks to metrics and sinks."""

from lightning_attn.callbacks.base import EvaluationCallback

__all__ = ["EvaluationCallback"]
