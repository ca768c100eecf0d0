"""Figures of the explainability report: arrays in, ``matplotlib.figure.Figure`` out (no pyplot).

Every function builds a standalone :class:`~matplotlib.figure.Figure`; nothing here computes statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_attn.plots._common import as_array

__all__ = [
    "names_or_indices",
    "plot_batch_accuracy",
    "plot_classwise",
    "plot_effect_sizes",
    "plot_feature_saliency",
    "plot_head_matrix",
    "plot_position_saliency",
    "plot_rollout_relevance",
]

MAX_LABELS = 40


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def plot_effect_sizes(
    names: Sequence[str], effect: Sequence[float | None], title: str = "Correct vs. incorrect"
) -> Figure:
    """Horizontal bars of each measure's standardized difference (correct minus incorrect, Cohen's d)."""
    names = list(names)
    values = as_array(effect, none_as_nan=True)
    fig = Figure(figsize=(6.5, max(2.0, 0.32 * len(names) + 1.2)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    colors = ["#55a868" if v >= 0 else "#c44e52" for v in np.nan_to_num(values)]
    ax.barh(y, np.nan_to_num(values), color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [_short(n, 40) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("effect size: (mean correct - mean incorrect) / pooled std")
    ax.set_title(title, fontsize=10)
    return fig


def plot_classwise(
    names: Sequence[str],
    support: Sequence[int],
    recall: Sequence[float | None],
    precision: Sequence[float | None],
    title: str = "Class-wise accuracy",
) -> Figure:
    """Per class: recall (accuracy on the class), precision, and support as text."""
    fig = Figure(figsize=(max(4.5, 0.55 * len(names) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    rec = as_array(recall, none_as_nan=True)
    prec = as_array(precision, none_as_nan=True)
    ax.bar(x - 0.2, np.nan_to_num(rec), width=0.4, color="#4c72b0", label="recall")
    ax.bar(x + 0.2, np.nan_to_num(prec), width=0.4, color="#dd8452", label="precision")
    for xi, n in zip(x, support, strict=False):
        ax.text(float(xi), 1.02, f"n={n}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.12)
    ax.set_xticks(x, [_short(str(n), 14) for n in names], rotation=30 if len(names) > 6 else 0, fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return fig


def plot_head_matrix(
    sites: Sequence[str],
    matrix: Any,
    *,
    title: str,
    label: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Site x head heatmap (NaN where a site has fewer heads), values annotated when small enough."""
    data = as_array(matrix)
    if data.ndim == 1:
        data = data[None]
    rows, cols = data.shape
    fig = Figure(figsize=(min(2.5 + 0.6 * cols, 14), min(1.5 + 0.42 * rows, 12)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(
        np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set_xticks(np.arange(cols), [f"h{h}" for h in range(cols)], fontsize=7)
    ax.set_yticks(np.arange(rows), [_short(s, 36) for s in sites], fontsize=7)
    if rows * cols <= 160:
        low, high = image.get_clim()
        for r in range(rows):
            for c in range(cols):
                if np.isfinite(data[r, c]):
                    level = (data[r, c] - low) / (high - low) if high > low else 0.0
                    ax.text(
                        c,
                        r,
                        f"{data[r, c]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if level > 0.6 else "white",
                    )
    fig.colorbar(image, ax=ax, label=label, shrink=0.9)
    ax.set_title(title, fontsize=10)
    return fig


def plot_feature_saliency(
    feature_names: Sequence[str], shares: Any, *, sample_labels: Sequence[str], title: str
) -> Figure:
    """Probe x feature heatmap of gradient x input shares (each row sums to 1), with the mean share as bars."""
    data = as_array(shares)
    names = list(feature_names)
    fig = Figure(figsize=(min(3 + 0.35 * len(names), 16), 2.2 + 0.35 * data.shape[0]), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1, max(1, data.shape[0] / 3)], sharex=True)
    x = np.arange(len(names))
    top.bar(x, data.mean(0), color="#4c72b0")
    top.set_ylabel("mean share", fontsize=8)
    top.set_title(title, fontsize=10)
    bottom.imshow(
        data, aspect="auto", cmap="magma", vmin=0, vmax=max(float(data.max(initial=0)), 1e-12), interpolation="nearest"
    )
    bottom.set_yticks(np.arange(data.shape[0]), list(sample_labels), fontsize=7)
    step = max(1, len(names) // MAX_LABELS)
    bottom.set_xticks(x[::step], [_short(str(n), 16) for n in names[::step]], rotation=60, ha="right", fontsize=7)
    return fig


def plot_position_saliency(
    maps: Any, *, feature_names: Sequence[str] | None, sample_labels: Sequence[str], title: str, pooled: bool = False
) -> Figure:
    """Per probe, the ``|gradient x input|`` map over positions (rows) and features (columns)."""
    data = as_array(maps)
    count = data.shape[0]
    fig = Figure(figsize=(min(3.2 * count, 16), 3.6), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False)[0]
    for index, ax in enumerate(axes):
        ax.imshow(data[index], aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(sample_labels[index], fontsize=8)
        ax.set_ylabel("position" + (" (pooled)" if pooled else ""), fontsize=7)
        if feature_names is not None and len(feature_names) == data.shape[-1] and len(feature_names) <= MAX_LABELS:
            ax.set_xticks(
                np.arange(len(feature_names)),
                [_short(str(n), 12) for n in feature_names],
                rotation=60,
                ha="right",
                fontsize=6,
            )
        else:
            ax.set_xlabel("feature", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_rollout_relevance(
    relevance: Any, *, sample_labels: Sequence[str], token_labels: Sequence[str] | None = None, title: str
) -> Figure:
    """Probe x token heatmap of gradient-weighted rollout relevance."""
    data = as_array(relevance)
    fig = Figure(figsize=(min(3 + 0.22 * data.shape[1], 16), 1.6 + 0.4 * data.shape[0]), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(data.shape[0]), list(sample_labels), fontsize=7)
    if token_labels is not None and len(token_labels) == data.shape[1] and len(token_labels) <= MAX_LABELS:
        ax.set_xticks(
            np.arange(data.shape[1]), [_short(str(t), 10) for t in token_labels], rotation=60, ha="right", fontsize=6
        )
    else:
        ax.set_xlabel("token", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.9)
    ax.set_title(title, fontsize=10)
    return fig


def plot_batch_accuracy(
    accuracy: Sequence[float], confidence: Sequence[float], title: str = "Per-batch accuracy and confidence"
) -> Figure:
    """Accuracy and mean confidence of each evaluated batch."""
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(accuracy))
    ax.plot(x, as_array(accuracy), marker="o", markersize=3, label="accuracy", color="#4c72b0")
    ax.plot(x, as_array(confidence), marker="s", markersize=3, label="mean confidence", color="#dd8452")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("batch")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def names_or_indices(names: Sequence[str] | None, count: int, prefix: str = "f") -> list[str]:
    """``names`` when it has ``count`` entries, else ``f0, f1, ...``."""
    if names is not None and len(names) == count:
        return [str(n) for n in names]
    return [f"{prefix}{i}" for i in range(count)]
