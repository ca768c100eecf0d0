"""lightning_attn: attention, calibration and head-specialization callbacks for PyTorch Lightning."""

from lightning_attn.capture import AttentionCapture, AttentionRecorder, SiteInfo

__version__ = "0.1.0"

__all__ = ["AttentionCapture", "AttentionRecorder", "SiteInfo", "__version__"]
