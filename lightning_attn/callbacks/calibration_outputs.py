"""The CalibrationMonitor's publication of one computed epoch's record (``metrics.calibration_results.epoch_result``):
the figures, the per-bin table and the JSON summary, kept apart from the callback's hook wiring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from lightning_attn.plots.calibration import calibration_figures
from lightning_attn.sinks import publish_figures, publish_json, publish_table

__all__ = ["PublishSettings", "publish_calibration"]


class PublishSettings(Protocol):
    """What :func:`publish_calibration` reads of its monitor."""

    name: str
    plot: bool
    class_names: list[str] | None
    plot_classes: int
    save_dir: Path | None


def publish_calibration(
    trainer: Any, monitor: PublishSettings, key: str, result: dict[str, Any], history: Sequence[dict[str, Any]]
) -> None:
    """Publish one epoch's ``result`` of stage key ``key`` under ``<monitor name>/<key>``: the figures (``plot``: the
    reliability diagram, with bootstrap error bars when the result has them, the confidence histogram, the class-wise
    diagrams and, from two evaluations on, the trend of the key's ``history``), the per-bin table and the JSON
    summary, in the monitor's ``save_dir`` (``None``: the run folder) and the dashboards."""
    namespace, save_dir = f"{monitor.name}/{key}", monitor.save_dir
    step = trainer.global_step
    own = [h for h in history if h["stage"] == key]
    label = f"{key} epoch {result['epoch']}"
    if any(h["epoch"] == result["epoch"] for h in own[:-1]):  # a repeated validate of one epoch
        label += f" (evaluation {result['evaluation']})"
    if monitor.plot:
        binary = result["task"] == "binary"
        names, shown = monitor.class_names, monitor.plot_classes
        figures = calibration_figures(
            result, own, key, label=label, binary=binary, class_names=names, plot_classes=shown
        )
        publish_figures(trainer, figures, namespace=namespace, step=step, save_dir=save_dir)
    bins = result["bins"]
    rows = [
        [float(lo), float(hi), int(n), _finite(acc), _finite(conf), _finite(conf - acc)]
        for lo, hi, n, acc, conf in zip(
            bins["edges"][:-1], bins["edges"][1:], bins["count"], bins["accuracy"], bins["confidence"], strict=False
        )
    ]
    publish_table(
        trainer,
        "bins",
        ["lower", "upper", "count", "accuracy", "confidence", "gap"],
        rows,
        namespace=namespace,
        step=step,
        save_dir=save_dir,
    )
    summary = {**result, "history": own}
    publish_json(trainer, "summary", summary, namespace=namespace, save_dir=save_dir)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
