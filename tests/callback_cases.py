"""The callbacks that stream per-site states, each in a small configuration, and what they hold about a run.

Shared by the life-cycle tests (reuse on a new model, resume, faults, long runs); not collected by pytest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl

from lightning_attn import AttentionLogger, HeadSpecializationTracker, ModuleProbe

#: name -> a new callback (figures off: the life-cycle tests compare states, not pixels).
FACTORIES: dict[str, Callable[[], Any]] = {
    "attn": lambda: AttentionLogger(probe_samples=1, log_figures=False, log_per_head=True),
    "heads": lambda: HeadSpecializationTracker(
        probe_samples=2, log_figures=False, export_registry=False, log_per_head=True
    ),
    "probe": lambda: ModuleProbe(
        probes={"ff": ("encoder.layers.*.linear1", "activation")}, probe_samples=1, log_figures=False
    ),
}


def model(layers: int = 2, heads: int = 4) -> models.CrossModalModule:
    """A seeded CrossModalModule: the same weights for the same shape."""
    pl.seed_everything(layers * 10 + heads, verbose=False)
    return models.CrossModalModule(layers=layers, heads=heads)


def outcome(callback: Any) -> str:
    """Everything the callback holds about its runs (results or history, checkpoint state), as JSON."""
    if isinstance(callback, HeadSpecializationTracker):
        held: Any = {"history": callback.history, "state": callback.state_dict()}
    else:
        held = {"results": {k: v.to_dict() for k, v in callback.results.items()}, "state": callback.state_dict()}
    return json.dumps(held, sort_keys=True, default=repr)


def logged(trainer: pl.Trainer) -> dict[str, float]:
    """The callbacks' logged scalars (the module's losses left out)."""
    return {key: float(value) for key, value in trainer.callback_metrics.items() if not key.endswith("loss")}
