"""Figures of a comparison of reports (``lightning-attn compare``): arrays in, ``Figure`` out (no pyplot)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from lightning_attn.plots._common import as_array

__all__ = ["plot_grouped_bars", "plot_head_difference", "plot_metric_intervals"]

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def plot_metric_intervals(
    labels: Sequence[str],
    values: Mapping[str, Sequence[float | None]],
    intervals: Mapping[str, Sequence[tuple[float, float] | None]],
    *,
    title: str = "Dataset measures",
) -> Figure:
    """One panel per measure: a bar per report, with its 95% interval as an error bar where one is given."""
    names = list(values)
    fig = Figure(figsize=(2.6 * len(names) + 0.6, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    positions = np.arange(len(labels))
    for ax, name in zip(axes, names, strict=True):
        heights = as_array(values[name], none_as_nan=True)
        colours = [COLOURS[i % len(COLOURS)] for i in range(len(labels))]
        ax.bar(positions, np.nan_to_num(heights), color=colours)
        for i, interval in enumerate(intervals.get(name, [None] * len(labels))):
            if interval is not None and np.isfinite(heights[i]):
                low, high = interval
                ax.errorbar(i, heights[i], yerr=[[heights[i] - low], [high - heights[i]]], color="black", capsize=4)
        for i, height in enumerate(heights):
            if np.isfinite(height):
                ax.text(i, height, f"{height:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(positions, labels, rotation=20, fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_grouped_bars(
    groups: Sequence[str], labels: Sequence[str], values: Sequence[Sequence[float | None]], *, ylabel: str, title: str
) -> Figure:
    """Bars of ``values[report][group]``, grouped by ``groups`` (classes), one colour per report."""
    matrix = np.array([as_array(row, none_as_nan=True) for row in values], dtype=float)
    fig = Figure(figsize=(max(5.0, 0.5 * len(groups) * len(labels) + 1.5), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(labels), 1)
    base = np.arange(len(groups))
    for r, label in enumerate(labels):
        ax.bar(
            base + (r - (len(labels) - 1) / 2) * width,
            np.nan_to_num(matrix[r]),
            width,
            label=label,
            color=COLOURS[r % len(COLOURS)],
        )
    ax.set_xticks(base, list(groups), rotation=30 if len(groups) > 8 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=10)
    return fig


def plot_head_difference(
    sites: Sequence[str],
    first: np.ndarray,
    last: np.ndarray,
    *,
    labels: tuple[str, str],
    title: str = "Mean attention entropy per head",
) -> Figure:
    """Per-head matrices (sites x heads) of two reports and their difference (last minus first)."""
    fig = Figure(figsize=(11, 0.45 * len(sites) + 1.8), layout="constrained")
    axes = fig.subplots(1, 3)
    difference = last - first
    bound = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 1.0
    panels = (
        (first, labels[0], "viridis", 0.0, 1.0),
        (last, labels[1], "viridis", 0.0, 1.0),
        (difference, f"{labels[1]} - {labels[0]}", "coolwarm", -bound or -1.0, bound or 1.0),
    )
    for ax, (matrix, name, cmap, low, high) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        ax.set_yticks(range(len(sites)), [s if len(s) <= 24 else "…" + s[-23:] for s in sites], fontsize=7)
        ax.set_xticks(range(matrix.shape[1]), [f"h{h}" for h in range(matrix.shape[1])], fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig
