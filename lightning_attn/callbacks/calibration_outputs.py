"""What the CalibrationMonitor makes of a computed epoch: the plain result record (host arrays, JSON-ready) and its
publication (figures, the per-bin table and the JSON summary), kept apart from the callback's hook wiring."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lightning_attn.plots.calibration import (
    plot_calibration_trend,
    plot_classwise_reliability,
    plot_confidence_histogram,
    plot_reliability_diagram,
)
from lightning_attn.sinks import publish_figures, publish_json, publish_table

__all__ = ["epoch_result", "publish_calibration"]


def epoch_result(
    values: dict[str, Tensor],
    scalars: dict[str, float],
    *,
    stage: str,
    task: str,
    num_classes: int,
    evaluation: int,
    epoch: int,
    step: int,
    bootstrap: bool,
    scaling: dict[str, Any] | None,
) -> dict[str, Any]:
    """The record of one computed epoch: ``CalibrationMetric.compute()``'s ``values`` as host arrays grouped by
    binning, the logged ``scalars``, the temperature ``scaling`` (if fitted) and where it was measured."""

    def arr(name: str) -> np.ndarray:
        return values[name].detach().cpu().numpy()

    result: dict[str, Any] = {
        "stage": stage,
        "task": task,
        "num_classes": num_classes,
        "evaluation": evaluation,
        "epoch": epoch,
        "step": step,
        "metrics": scalars,
        "bins": {
            "edges": arr("bin_edges"),
            "count": arr("bin_count"),
            "accuracy": arr("bin_accuracy"),
            "confidence": arr("bin_confidence"),
        },
        "adaptive_bins": {
            "edges": arr("adaptive_edges"),
            "count": arr("adaptive_count"),
            "accuracy": arr("adaptive_accuracy"),
            "confidence": arr("adaptive_confidence"),
        },
        "classwise_bins": {
            "edges": arr("class_edges"),
            "count": arr("class_count"),
            "accuracy": arr("class_accuracy"),
            "confidence": arr("class_confidence"),
        },
        "confidence_histogram": {
            "edges": arr("hist_edges"),
            "correct": arr("hist_correct"),
            "incorrect": arr("hist_incorrect"),
        },
        "n_at_one": float(values["n_at_one"]),
        "n_ignored": float(values["n_ignored"]),
    }
    if bootstrap:
        result["bins"]["accuracy_ci_low"] = arr("bin_accuracy_ci_low")
        result["bins"]["accuracy_ci_high"] = arr("bin_accuracy_ci_high")
    if scaling is not None:
        result["temperature_scaling"] = scaling
    return result


def publish_calibration(
    trainer: Any,
    namespace: str,
    result: dict[str, Any],
    history: Sequence[dict[str, Any]],
    *,
    label: str,
    binary: bool,
    plot: bool,
    class_names: list[str] | None,
    plot_classes: int,
    save_dir: str | Path | None,
) -> None:
    """Publish one epoch's ``result`` under ``namespace`` (``calibration/<stage key>``): the figures (``plot``: the
    reliability diagram, with bootstrap error bars when the result has them, the confidence histogram, the class-wise
    diagrams and, from two evaluations on, the trend of ``history``), the per-bin table and the JSON summary."""
    key = namespace.rsplit("/", 1)[-1]
    step = trainer.global_step
    if plot:
        bins, scalars = result["bins"], result["metrics"]
        classwise = result["classwise_bins"]
        hist = result["confidence_histogram"]
        figures = {
            "reliability": plot_reliability_diagram(
                bins["edges"],
                bins["accuracy"],
                bins["confidence"],
                bins["count"],
                ece=scalars["ece"],
                title=label,
                binary=binary,
                accuracy_low=bins.get("accuracy_ci_low"),
                accuracy_high=bins.get("accuracy_ci_high"),
                ece_interval=(scalars["ece_ci_low"], scalars["ece_ci_high"]) if "ece_ci_low" in scalars else None,
            ),
            "confidence_histogram": plot_confidence_histogram(
                hist["edges"],
                hist["correct"],
                hist["incorrect"],
                accuracy=scalars["accuracy"],
                confidence=scalars["confidence"],
                title=label,
            ),
            "classwise_reliability": plot_classwise_reliability(
                classwise["edges"],
                classwise["accuracy"],
                classwise["confidence"],
                classwise["count"],
                class_names=class_names,
                max_classes=plot_classes,
                title=label,
            ),
        }
        if len(history) >= 2:
            epochs = [h["epoch"] for h in history]
            x = "epoch" if all(a < b for a, b in itertools.pairwise(epochs)) else "evaluation"
            figures["trend"] = plot_calibration_trend(history, x=x, title=f"{key}: calibration over {x}s")
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
    summary = {**result, "history": list(history)}
    publish_json(trainer, "summary", summary, namespace=namespace, save_dir=save_dir)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
