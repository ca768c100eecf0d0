"""lightning_attn: attention, calibration and head-specialization callbacks for PyTorch Lightning.

The public names are imported on first use (PEP 562), so that ``import lightning_attn.cli`` and
``lightning-attn --help`` do not pay for torch, Lightning and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_attn.callbacks.attention_logger import AttentionLogger
    from lightning_attn.callbacks.calibration import CalibrationMonitor
    from lightning_attn.callbacks.head_specialization import HeadSpecializationTracker
    from lightning_attn.callbacks.module_probe import ModuleProbe
    from lightning_attn.capture import AttentionCapture, AttentionRecorder, SiteInfo
    from lightning_attn.report import ExplainabilityReport, build_report

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "AttentionCapture": "lightning_attn.capture",
    "AttentionLogger": "lightning_attn.callbacks.attention_logger",
    "AttentionRecorder": "lightning_attn.capture",
    "CalibrationMonitor": "lightning_attn.callbacks.calibration",
    "ExplainabilityReport": "lightning_attn.report",
    "HeadSpecializationTracker": "lightning_attn.callbacks.head_specialization",
    "ModuleProbe": "lightning_attn.callbacks.module_probe",
    "SiteInfo": "lightning_attn.capture",
    "build_report": "lightning_attn.report",
}

__all__ = [
    "AttentionCapture",
    "AttentionLogger",
    "AttentionRecorder",
    "CalibrationMonitor",
    "ExplainabilityReport",
    "HeadSpecializationTracker",
    "ModuleProbe",
    "SiteInfo",
    "__version__",
    "build_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_attn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
