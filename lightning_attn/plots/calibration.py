"""Calibration figures: per-bin arrays in, ``matplotlib.figure.Figure`` out (never pyplot).

- :func:`plot_reliability_diagram`: accuracy against confidence per bin, the gap to the diagonal, the
  number of samples per bin, ECE in the title (Guo et al. 2017, figure 1), bootstrap intervals of each
  bin's accuracy as error bars;
- :func:`plot_confidence_histogram`: top-label confidence, correct and incorrect stacked;
- :func:`plot_classwise_reliability`: one small reliability diagram per class (the first ``max_classes``);
- :func:`plot_calibration_trend`: chosen measures over epochs, with their bootstrap intervals as bands;
- :func:`calibration_figures`: all of them for one epoch's record of the CalibrationMonitor.

Inputs are arrays (NumPy, tensors or lists; empty bins as NaN) as produced by
:class:`lightning_attn.metrics.CalibrationMetric`; nothing here computes statistics.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_attn.plots._common import as_array, fixed_layout

__all__ = [
    "calibration_figures",
    "plot_calibration_trend",
    "plot_classwise_reliability",
    "plot_confidence_histogram",
    "plot_reliability_diagram",
]

_ACC = "#3b75af"
_UNDER = "#a9c9e8"  # a light tone of the accuracy blue: accuracy above the confidence
_GAP = "#d62728"
_CORRECT = "#2ca02c"
_WRONG = "#d62728"


def _reliability_axes(
    ax: Any, edges: np.ndarray, accuracy: np.ndarray, confidence: np.ndarray, *, small: bool = False
) -> None:
    lower, upper = edges[:-1], edges[1:]
    width = upper - lower
    filled = np.isfinite(accuracy)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    ax.bar(
        lower[filled],
        accuracy[filled],
        width=width[filled],
        align="edge",
        color=_ACC,
        edgecolor="black",
        linewidth=0.5 if small else 0.8,
        label="accuracy",
    )
    # the gap on the side it lies: over-confidence above the accuracy bar, under-confidence as a light top part
    # of it (a translucent red over the blue bar would read as a third colour)
    gap = confidence - accuracy
    for side, colour, label in ((gap > 0, _GAP, "over-confidence"), (gap < 0, _UNDER, "under-confidence")):
        shown = filled & side
        if not shown.any():
            continue
        ax.bar(
            lower[shown],
            np.abs(gap[shown]),
            bottom=np.minimum(accuracy, confidence)[shown],
            width=width[shown],
            align="edge",
            color=colour,
            alpha=0.35 if colour == _GAP else 1.0,
            edgecolor=_GAP if colour == _GAP else "white",
            hatch=None if small else ("//" if colour == _GAP else "\\\\"),
            linewidth=0.5,
            label=f"{label} gap |confidence - accuracy|",
        )
    ax.plot(
        confidence[filled],
        accuracy[filled],
        "o",
        color="black",
        markersize=2 if small else 3,
        label="(confidence, accuracy)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)


def plot_reliability_diagram(
    edges: Any,
    accuracy: Any,
    confidence: Any,
    count: Any,
    *,
    ece: float | None = None,
    title: str | None = None,
    binary: bool = False,
    accuracy_low: Any = None,
    accuracy_high: Any = None,
    ece_interval: tuple[float, float] | None = None,
) -> Figure:
    """Reliability diagram with a histogram of samples per bin underneath.

    Args:
        edges: ``n_bins + 1`` bin edges on ``[0, 1]``.
        accuracy: per-bin accuracy (fraction of positives for ``binary``); NaN for empty bins.
        confidence: per-bin mean confidence (mean ``P(y = 1)`` for ``binary``).
        count: samples per bin.
        ece: shown in the title.
        title: title prefix (e.g. the stage and epoch).
        binary: label the axes for ``P(y = 1)`` against the observed frequency of positives.
        accuracy_low: per-bin lower bound of the accuracy (e.g. a bootstrap percentile), with
            ``accuracy_high``: drawn as error bars at each bin's mean confidence.
        accuracy_high: per-bin upper bound of the accuracy.
        ece_interval: ``(low, high)`` of the ECE, shown in the title.
    """
    edges, accuracy, confidence, count = (as_array(a) for a in (edges, accuracy, confidence, count))
    fig = Figure(figsize=(5.2, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    fixed_layout(fig, left=0.8, right=0.2, top=0.35, bottom=0.55, rows=2, hgap=0.15)
    _reliability_axes(top, edges, accuracy, confidence)
    if accuracy_low is not None and accuracy_high is not None:
        low, high = as_array(accuracy_low), as_array(accuracy_high)
        shown = np.isfinite(accuracy) & np.isfinite(low) & np.isfinite(high)
        below = np.clip(accuracy - low, 0, None)[shown]  # a percentile may sit on the wrong side of a skewed bin
        above = np.clip(high - accuracy, 0, None)[shown]
        top.errorbar(
            confidence[shown],
            accuracy[shown],
            yerr=np.vstack([below, above]),
            fmt="none",
            ecolor="black",
            elinewidth=0.8,
            capsize=2,
            label="95% bootstrap interval",
        )
    top.set_ylabel("fraction of positives" if binary else "accuracy")
    top.legend(loc="upper left", fontsize=7)
    parts = [title] if title else []
    if ece is not None and math.isfinite(ece):
        interval = ""
        if ece_interval is not None and all(math.isfinite(v) for v in ece_interval):
            interval = f" [{ece_interval[0]:.4f}, {ece_interval[1]:.4f}]"
        parts.append(f"ECE = {ece:.4f}{interval}")
    parts.append(f"n = {int(count.sum())}")
    top.set_title(" | ".join(parts), fontsize=9)
    lower, upper = edges[:-1], edges[1:]
    bottom.bar(lower, count, width=upper - lower, align="edge", color="0.6", edgecolor="black", linewidth=0.5)
    if count.max(initial=0) > 0 and count[count > 0].min() * 100 < count.max():
        bottom.set_yscale("log")
    bottom.set_ylabel("samples")
    bottom.set_xlabel("predicted P(y = 1)" if binary else "confidence (top-label probability)")
    return fig


def plot_confidence_histogram(
    edges: Any,
    correct: Any,
    incorrect: Any,
    *,
    accuracy: float | None = None,
    confidence: float | None = None,
    title: str | None = None,
) -> Figure:
    """Top-label confidence histogram, correct and incorrect predictions stacked, with the mean
    confidence and the accuracy as vertical lines (their distance is the over-confidence gap)."""
    edges, correct, incorrect = (as_array(a) for a in (edges, correct, incorrect))
    lower, upper = edges[:-1], edges[1:]
    total = correct.sum() + incorrect.sum()
    scale = 1.0 / total if total > 0 else 1.0
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.subplots()
    fixed_layout(fig, left=0.8, right=0.2, top=0.35, bottom=0.55)
    ax.bar(lower, correct * scale, width=upper - lower, align="edge", color=_CORRECT, alpha=0.8, label="correct")
    ax.bar(
        lower,
        incorrect * scale,
        bottom=correct * scale,
        width=upper - lower,
        align="edge",
        color=_WRONG,
        alpha=0.8,
        label="incorrect",
    )
    if confidence is not None and math.isfinite(confidence):
        ax.axvline(confidence, color="black", linestyle="--", linewidth=1, label=f"mean confidence {confidence:.3f}")
    if accuracy is not None and math.isfinite(accuracy):
        ax.axvline(accuracy, color="black", linestyle=":", linewidth=1.2, label=f"accuracy {accuracy:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("fraction of samples")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title or "confidence", fontsize=9)
    return fig


def plot_classwise_reliability(
    edges: Any,
    accuracy: Any,
    confidence: Any,
    count: Any,
    *,
    class_names: Sequence[str] | None = None,
    max_classes: int = 9,
    title: str | None = None,
) -> Figure:
    """Grid of per-class reliability diagrams (``p_k`` against the fraction with label ``k``) for
    the first ``max_classes`` classes (the title says how many more there are); ``accuracy``/``confidence``/``count``
    are ``[K, n_bins]``."""
    edges, accuracy, confidence, count = (as_array(a) for a in (edges, accuracy, confidence, count))
    shown = max(1, min(max_classes, accuracy.shape[0]))
    cols = min(3, shown) if shown <= 9 else math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / cols)
    fig = Figure(figsize=(2.1 * cols + 0.15 * (cols - 1) + 0.85, 1.85 * rows + 0.35 * (rows - 1) + 1.05))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    # fixed margins (no constrained layout): suptitle over the class titles, each row gap the next row's titles
    fixed_layout(fig, left=0.65, right=0.2, top=0.6, bottom=0.45, rows=rows, columns=cols, wgap=0.15, hgap=0.35)
    for k, ax in enumerate(axes):
        if k >= shown:
            ax.set_axis_off()
            continue
        _reliability_axes(ax, edges, accuracy[k], confidence[k], small=True)
        w = count[k]
        filled = np.isfinite(accuracy[k])
        ce = float(np.sum(w[filled] * np.abs(accuracy[k][filled] - confidence[k][filled])) / max(w.sum(), 1))
        name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
        ax.set_title(f"{name}: ECE$_k$ {ce:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("predicted probability of the class", fontsize=8)
    fig.supylabel("fraction with that label", fontsize=8)
    hidden = accuracy.shape[0] - shown  # never dropped silently: the title counts them
    suffix = f" (first {shown} of {accuracy.shape[0]}, +{hidden} more)" if hidden > 0 else ""
    fig.suptitle((title + " | " if title else "") + "classwise reliability" + suffix, fontsize=9)
    return fig


def plot_calibration_trend(
    history: Sequence[Mapping[str, Any]],
    *,
    errors: Sequence[str] = ("ece", "smece", "adaptive_ece", "classwise_ece", "mce"),
    scores: Sequence[str] = ("nll", "brier", "overconfidence"),
    x: str = "epoch",
    title: str | None = None,
) -> Figure:
    """Calibration errors (left) and proper scores with the over-confidence gap (right) over ``x``.

    ``history``: one mapping per evaluation with ``x`` and the measures (missing ones are skipped);
    a measure with ``<name>_ci_low``/``<name>_ci_high`` entries gets its interval as a band.
    """
    fig = Figure(figsize=(8.4, 3.4))
    left, right = fig.subplots(1, 2)
    fixed_layout(fig, left=0.8, right=0.2, top=0.4, bottom=0.55, columns=2, wgap=0.6)
    xs = np.asarray([float(h.get(x, i)) for i, h in enumerate(history)])
    for ax, names in ((left, errors), (right, scores)):
        for name in names:
            ys = np.asarray([float(h[name]) if h.get(name) is not None else np.nan for h in history])
            if np.isfinite(ys).any():
                (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
                bounds = [[float(h.get(f"{name}_ci_{side}", np.nan)) for h in history] for side in ("low", "high")]
                if np.isfinite(bounds).any():
                    ax.fill_between(xs, *bounds, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    left.set_ylabel("calibration error")
    right.axhline(0.0, color="0.6", linewidth=0.8)
    fig.suptitle(title or "calibration over time", fontsize=9)
    return fig


def calibration_figures(
    result: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    stage_key: str,
    *,
    label: str,
    binary: bool,
    class_names: Sequence[str] | None,
    plot_classes: int,
) -> dict[str, Figure]:
    """The figures of one epoch's ``result`` (:func:`~lightning_attn.metrics.calibration_results.epoch_result`).

    Args:
        result: the epoch's record: ``bins`` (with bootstrap bounds when it has them), ``classwise_bins``,
            ``confidence_histogram`` and the ``metrics``.
        history: one mapping per evaluation of this stage key, the latest last; from two on, a ``trend`` figure
            over epochs (over evaluations when the epochs repeat).
        stage_key: ``val``, ``test``, ``val_dl1``, ..., in the trend's title.
        label: title of the epoch's figures.
        binary: label the reliability diagram for ``P(y = 1)``.
        class_names: names of the classes in the classwise grid.
        plot_classes: classes shown in the classwise grid (the first ones).

    Returns:
        ``reliability``, ``confidence_histogram``, ``classwise_reliability`` and, from two evaluations, ``trend``.
    """
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
        figures["trend"] = plot_calibration_trend(history, x=x, title=f"{stage_key}: calibration over {x}s")
    return figures
