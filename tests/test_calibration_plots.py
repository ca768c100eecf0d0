"""Calibration figures: Figure objects (no pyplot), rendered by the sinks, also from degenerate data."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from matplotlib.figure import Figure

from lightning_attn.metrics import CalibrationMetric
from lightning_attn.plots import (
    plot_calibration_trend,
    plot_classwise_reliability,
    plot_confidence_histogram,
    plot_reliability_diagram,
)
from lightning_attn.sinks import render_png


def figures(values: dict, history: list[dict]) -> list[Figure]:
    return [
        plot_reliability_diagram(
            values["bin_edges"],
            values["bin_accuracy"],
            values["bin_confidence"],
            values["bin_count"],
            ece=float(values["ece"]),
            title="t",
        ),
        plot_confidence_histogram(
            values["hist_edges"],
            values["hist_correct"],
            values["hist_incorrect"],
            accuracy=float(values["accuracy"]),
            confidence=float(values["confidence"]),
        ),
        plot_classwise_reliability(
            values["class_edges"],
            values["class_accuracy"],
            values["class_confidence"],
            values["class_count"],
            class_names=["a", "b"],
            max_classes=4,
        ),
        plot_calibration_trend(history),
    ]


def test_figures_render_for_normal_and_empty_epochs() -> None:
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    g = torch.Generator().manual_seed(0)
    metric = CalibrationMetric("multiclass", 12, "logits")
    metric.update(torch.randn(300, 12, generator=g) * 2, torch.randint(0, 12, (300,), generator=g))
    values = metric.compute()
    history = [{"epoch": e, "ece": 0.1 / (e + 1), "nll": 1.0, "brier": None} for e in range(3)]
    for fig in figures(values, history):
        assert isinstance(fig, Figure)
        png, rgb = render_png(fig)
        assert png[:4] == b"\x89PNG" and rgb.ndim == 3 and rgb.std() > 0
    # classwise grid: the first max_classes classes only
    grid = plot_classwise_reliability(
        values["class_edges"],
        values["class_accuracy"],
        values["class_confidence"],
        values["class_count"],
        max_classes=4,
    )
    assert sum(ax.get_visible() and ax.axison for ax in grid.axes) == 4

    empty = CalibrationMetric("multiclass", 3, "logits", ignore_index=-1)
    empty.update(torch.randn(5, 3), torch.full((5,), -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nothing = empty.compute()
    assert float(nothing["n_samples"]) == 0 and np.isnan(float(nothing["ece"]))
    for fig in figures(nothing, history[:1]):
        render_png(fig)
    assert plt.get_fignums() == open_before  # no pyplot figure was ever opened
