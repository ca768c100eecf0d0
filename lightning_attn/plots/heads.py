"""Head-specialization figures: host arrays in, ``matplotlib.figure.Figure`` out (no pyplot).

Used by :class:`~lightning_attn.HeadSpecializationTracker`; every function also works on the values of a
head-function registry. Heads are named ``<site>/h<k>``; figure labels drop the sites' common prefix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_attn.plots._common import (
    MAX_LINES,
    as_array,
    distinct_colours,
    fixed_layout,
    say_no_data,
    side_colorbar,
    text_inches,
)
from lightning_attn.plots.attention import short_site_names

__all__ = [
    "plot_feature_correlations",
    "plot_head_evolution",
    "plot_head_redundancy",
    "plot_head_type_scores",
    "plot_hsi",
    "short_head_names",
]

MAX_TICK_LABELS = 64
#: Above this many heads the redundancy matrix names sites, not heads (72 x 72 named cells do not read at a glance)
_NAMED_REDUNDANCY_HEADS = 32
#: Why a head-type panel is empty when none of its scores is defined: these types compare token identities.
NO_DATA_REASONS: dict[str, str] = {"duplicate_token": "needs token ids", "induction": "needs token ids"}


def short_head_names(heads: Sequence[str]) -> list[str]:
    """``<site>/h<k>`` ids without the sites' common dotted prefix (``model.layers.0/h1`` -> ``0/h1``)."""
    sites = [h.rsplit("/", 1)[0] for h in heads]
    unique = list(dict.fromkeys(sites))
    if len(unique) < 2:
        return [h.rsplit("/", 1)[-1] if len(unique) == 1 else h for h in heads]
    prefix = len(os.path.commonprefix([s.split(".") for s in unique]))  # noqa: RUF071 (lists of path components)
    return [
        ".".join(site.split(".")[prefix:]) + "/" + head.rsplit("/", 1)[1]
        for site, head in zip(sites, heads, strict=False)
    ]


def _tick_texts(labels: Sequence[str]) -> tuple[list[int], list[str], int]:
    """Positions, texts and font size of an axis' tick labels: every one up to :data:`MAX_TICK_LABELS`, else every
    k-th."""
    length = len(labels)
    step = 1 if length <= MAX_TICK_LABELS else math.ceil(length / MAX_TICK_LABELS)
    positions = list(range(0, length, step))
    return positions, [labels[p] for p in positions], 7 if len(positions) <= 32 else 5


def _label_inches(labels: Sequence[str]) -> float:
    """Width in inches of the widest tick label :func:`_ticks` writes for ``labels``."""
    _, texts, size = _tick_texts(labels)
    return text_inches(texts, size)


def _ticks(axis: Any, labels: Sequence[str], which: str) -> None:
    positions, texts, size = _tick_texts(labels)
    if which == "x":
        axis.set_xticks(positions)
        axis.set_xticklabels(texts, rotation=90, fontsize=size)
    else:
        axis.set_yticks(positions)
        axis.set_yticklabels(texts, fontsize=size)


def plot_hsi(
    hsi: Sequence[float | None],
    heads: Sequence[str],
    labels: Sequence[str] | None = None,
    threshold: float = 0.3,
    title: str = "",
) -> Figure:
    """Bars of the Head Specialization Index of every head, the threshold as a dashed line; bars at or above
    it coloured, with the head's label written on them."""
    values = np.nan_to_num(as_array(hsi, none_as_nan=True), nan=0.0)
    count = len(values)
    fig = Figure(figsize=(min(max(5.0, 0.35 * count + 1.5), 40.0), 4.0), layout="constrained")
    ax = fig.subplots()
    colours = ["tab:red" if v >= threshold else "tab:gray" for v in values]
    ax.bar(np.arange(count), values, color=colours)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    if labels is not None and count <= MAX_TICK_LABELS:
        for index, (value, label) in enumerate(zip(values, labels, strict=False)):
            if value >= threshold:
                ax.text(index, value, f" {label}", rotation=90, va="bottom", ha="center", fontsize=6)
    _ticks(ax, short_head_names(heads), "x")
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("HSI = max |corr|", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "Head Specialization Index", fontsize=10)
    return fig


def plot_feature_correlations(
    correlations: Any, heads: Sequence[str], features: Sequence[str], title: str = ""
) -> Figure:
    """Head x feature Pearson correlations ``[N, F]`` on a diverging scale ``[-1, 1]`` (blank: undefined)."""
    data = np.ma.masked_invalid(as_array(correlations, none_as_nan=True).reshape(len(heads), len(features)))
    fig = Figure(
        figsize=(max(3.5, 0.9 * len(features) + 2.5), max(3.0, min(0.22 * len(heads) + 1.5, 30.0))),
        layout="constrained",
    )
    ax = fig.subplots()
    image = ax.imshow(data, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    _ticks(ax, list(features), "x")
    _ticks(ax, short_head_names(heads), "y")
    if len(heads) * len(features) <= 400:
        for (row, column), value in np.ndenumerate(data.filled(np.nan)):
            if math.isfinite(value):
                ax.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if abs(value) > 0.6 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Pearson r")
    ax.set_title(title or "Head x feature correlation", fontsize=10)
    return fig


def plot_head_type_scores(
    scores: Mapping[str, Any], sites: Sequence[str], title: str = "", reasons: Mapping[str, str] | None = None
) -> Figure:
    """One ``layers x heads`` heatmap per head type, ``scores[type]`` ``[sites, max_heads]`` in ``[0, 1]``
    (blank where undefined: a head a site lacks, a cross-attention site, no token ids). A panel with no defined
    score says why: ``reasons[type]``, by default "needs token ids" for the token-identity types."""
    names = list(scores)
    why = {**NO_DATA_REASONS, **(reasons or {})}
    heads = max((as_array(v, none_as_nan=True).shape[1] for v in scores.values()), default=1)
    layer_names = short_head_names([f"{s}/h0" for s in sites])
    layer_names = (
        [n.rsplit("/", 1)[0] or s for n, s in zip(layer_names, sites, strict=False)] if len(sites) > 1 else list(sites)
    )
    columns = max(len(names), 1)
    left, right = _label_inches(layer_names) + 0.2, 0.75
    fig = Figure(figsize=(max(2.7 * columns, 3.7) + left + right - 0.6, max(2.6, 0.3 * len(sites) + 1.6)))
    axes = fig.subplots(1, columns, squeeze=False)[0]
    # margins fixed up front (no constrained layout): suptitle over the panel titles, "head" under its tick labels
    fixed_layout(fig, left=left, right=right, top=0.6, bottom=0.55, columns=columns, wgap=0.2)
    image = None
    for ax, name in zip(axes, names, strict=False):
        data = np.ma.masked_invalid(as_array(scores[name], none_as_nan=True))
        image = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        if data.count() == 0:
            say_no_data(ax, why.get(name, "no data"))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        _ticks(ax, [str(h) for h in range(heads)], "x")
        _ticks(ax, layer_names if ax is axes[0] else [""] * len(sites), "y")
    if image is not None:
        side_colorbar(fig, image, axes)
    fig.suptitle(title or "Head-type scores (layers x heads)", fontsize=10)
    return fig


def plot_head_redundancy(
    distance: Any,
    heads: Sequence[str],
    clusters: Sequence[Sequence[str]] = (),
    threshold: float | None = None,
    title: str = "",
) -> Figure:
    """Pairwise Jensen-Shannon distance between heads ``[N, N]`` (nats; blank: not comparable), with the
    clusters of near-duplicate heads listed below."""
    data = np.ma.masked_invalid(as_array(distance, none_as_nan=True))
    names = short_head_names(heads)
    sites = [h.rsplit("/", 1)[0] for h in heads]
    by_site = len(heads) > _NAMED_REDUNDANCY_HEADS and len(set(sites)) > 1
    if by_site:  # too many heads to name each: one label per site's block, lines between blocks
        starts = [i for i, site in enumerate(sites) if i == 0 or site != sites[i - 1]]
        ends = [*starts[1:], len(heads)]
        tick_names = short_site_names([sites[i] for i in starts])
        ticks = [(a + b - 1) / 2 for a, b in zip(starts, ends, strict=True)]
        size = min(max(4.0, 0.08 * len(heads) + 3.0), 12.0)
    else:
        tick_names, ticks = names, list(range(len(heads)))
        size = min(max(4.0, 0.18 * len(heads) + 2.5), 30.0)
    short = dict(zip(heads, names, strict=False))
    lines = [", ".join(short.get(h, h) for h in cluster) for cluster in clusters[:8]]
    if len(clusters) > 8:
        lines.append(f"... {len(clusters) - 8} more")
    labels = _label_inches(tick_names) + 0.15
    # fixed margins (no constrained layout): tick labels, the cluster lines under them (7 pt), the colour bar's
    # labels; the axes (square cells) stay the size they had
    side, bottom = size - labels - 0.4, labels + 0.2 + 0.14 * (len(lines) + 1)
    fig = Figure(figsize=(side + labels + 1.2, side + bottom + 0.4))
    ax = fig.subplots()
    fixed_layout(fig, left=labels + 0.1, right=1.1, top=0.4, bottom=bottom)
    image = ax.imshow(data, cmap="magma_r", vmin=0, vmax=math.log(2), aspect="equal", interpolation="nearest")
    if by_site:
        ax.set_xticks(ticks)
        ax.set_xticklabels(tick_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks)
        ax.set_yticklabels(tick_names, fontsize=7)
        for boundary in starts[1:]:
            ax.axhline(boundary - 0.5, color="white", linewidth=0.6)
            ax.axvline(boundary - 0.5, color="white", linewidth=0.6)
    else:
        _ticks(ax, names, "x")
        _ticks(ax, names, "y")
    side_colorbar(fig, image, ax, label="JS divergence (nats)")
    caption = "near-duplicate clusters" + (f" (JS <= {threshold:g})" if threshold is not None else "") + ": "
    ax.set_xlabel(caption + ("none" if not lines else "\n" + "\n".join(lines)), fontsize=7)
    ax.set_title(title or "Head redundancy (Clark et al. 2019 JS distance)", fontsize=10)
    return fig


def plot_head_evolution(
    epochs: Sequence[int], series: Mapping[str, Any], heads: Sequence[str], title: str = ""
) -> Figure:
    """Per-head values over epochs: one ``heads x epochs`` heatmap per series (``series[name]`` ``[E, N]``),
    plus line plots when there are at most :data:`MAX_LINES` heads (beyond, colours would repeat). With one
    epoch there is no evolution to show: bars of that epoch's values, titled so."""
    title = title or "Per-head evolution over epochs"
    if len(epochs) == 1:
        return _plot_one_epoch(epochs[0], series, heads, title)
    names = list(series)
    lines = len(heads) <= MAX_LINES
    rows = 2 if lines else 1
    fig = Figure(
        figsize=(max(4.0 * len(names), 5.0), (3.0 if lines else 0.0) + max(2.5, min(0.2 * len(heads) + 1.5, 30.0))),
        layout="constrained",
    )
    axes = fig.subplots(rows, max(len(names), 1), squeeze=False)
    labels = short_head_names(heads)
    epoch_labels = [str(e) for e in epochs]
    colours = distinct_colours(len(heads))
    for column, name in enumerate(names):
        data = as_array(series[name], none_as_nan=True).reshape(len(epochs), len(heads))
        ax = axes[0, column]
        image = ax.imshow(
            np.ma.masked_invalid(data.T), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest"
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        _ticks(ax, epoch_labels, "x")
        _ticks(ax, labels if column == 0 else [""] * len(heads), "y")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if lines:
            ax = axes[1, column]
            for index, label in enumerate(labels):
                ax.plot(list(epochs), data[:, index], marker="o", markersize=3, label=label, color=colours[index])
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel(name, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if column == len(names) - 1:
                ax.legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle(title, fontsize=10)
    return fig


def _plot_one_epoch(epoch: int, series: Mapping[str, Any], heads: Sequence[str], title: str) -> Figure:
    """Bars per head of each series at the only epoch (a one-column heatmap would pose as a trend)."""
    names = list(series)
    labels = short_head_names(heads)
    rows, bottom = max(len(names), 1), _label_inches(labels) + 0.25
    fig = Figure(figsize=(min(max(5.0, 0.3 * len(heads) + 2.0), 40.0), 2.2 * rows + 0.2 * (rows - 1) + 0.5 + bottom))
    axes = fig.subplots(rows, 1, squeeze=False, sharex=True)[:, 0]
    fixed_layout(fig, left=0.8, right=0.2, top=0.5, bottom=bottom, rows=rows, hgap=0.2)
    for ax, name in zip(axes, names, strict=False):
        values = as_array(series[name], none_as_nan=True).reshape(-1)
        ax.bar(np.arange(len(heads)), np.nan_to_num(values, nan=0.0), color="tab:blue")
        ax.set_ylabel(name, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    _ticks(axes[-1], labels, "x")
    fig.suptitle(f"{title}: epoch {epoch} only (one evaluation, no evolution yet)", fontsize=10)
    return fig
