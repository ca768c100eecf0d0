"""Attention figures: arrays in, ``matplotlib.figure.Figure`` out.

No pyplot: every function builds a standalone :class:`~matplotlib.figure.Figure` (no global figure registry,
nothing to close, garbage-collected with its last reference), drawn by the Agg canvas of
:mod:`lightning_attn.sinks`. Inputs are tensors or arrays on the host; nothing here computes statistics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_attn.plots._common import as_array, distinct_colours, fixed_layout, side_colorbar, text_inches

__all__ = [
    "plot_attention_heads",
    "plot_attention_maps",
    "plot_head_contributions",
    "plot_head_statistics",
    "plot_layer_evolution",
    "plot_modality_pair",
    "plot_rollout",
    "plot_top_positions",
    "short_site_names",
]

#: Colormaps: sequential for probabilities, diverging (centred on 0) for differences.
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
MAX_TICK_LABELS = 48


def short_site_names(sites: Sequence[str]) -> list[str]:
    """Site names without their common dotted prefix (``model.encoder.layers.0.self_attn`` -> ``0.self_attn``)."""
    if len(sites) < 2:
        return [s.rsplit(".", 2)[-2] + "." + s.rsplit(".", 1)[-1] if s.count(".") >= 2 else s for s in sites]
    prefix = os.path.commonprefix([s.split(".") for s in sites])  # noqa: RUF071 (lists of path components)
    cut = len(prefix)
    names = [".".join(s.split(".")[cut:]) or s for s in sites]
    return names


def _tick_texts(labels: Sequence[str] | None, length: int) -> tuple[list[int], list[str], int]:
    """Positions, texts and font size of an axis' tick labels: every label up to :data:`MAX_TICK_LABELS`, else
    about 12 evenly spaced ones."""
    if labels is not None and len(labels) == length and length <= MAX_TICK_LABELS:
        positions, texts = list(range(length)), [str(label) for label in labels]
    else:
        step = max(1, math.ceil(length / 12))
        positions = list(range(0, length, step))
        texts = [str(labels[p]) if labels is not None and len(labels) == length else str(p) for p in positions]
    return positions, texts, 7 if len(positions) <= 24 else 5


def _ticks(axis: Any, labels: Sequence[str] | None, length: int, which: str) -> None:
    positions, texts, size = _tick_texts(labels, length)
    if which == "x":
        axis.set_xticks(positions)
        axis.set_xticklabels(texts, rotation=90, fontsize=size)
    else:
        axis.set_yticks(positions)
        axis.set_yticklabels(texts, fontsize=size)


def _heatmap(
    fig: Figure,
    ax: Any,
    data: np.ndarray,
    *,
    title: str = "",
    cmap: str = SEQUENTIAL,
    vmin: float | None = None,
    vmax: float | None = None,
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
    xlabel: str = "key",
    ylabel: str = "query",
    colorbar: bool = True,
) -> None:
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    _ticks(ax, xlabels, data.shape[1], "x")
    _ticks(ax, ylabels, data.shape[0], "y")
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def plot_head_statistics(values: Mapping[str, Any], sites: Sequence[str], title: str | None = None) -> Figure:
    """Site x head heatmap per statistic: ``values[stat]`` is ``[sites, heads]`` (NaN where a site has fewer heads)."""
    names = list(values)
    columns = len(names)
    rows = len(sites)
    heads = max((as_array(v).shape[1] for v in values.values()), default=1)
    labels = short_site_names(sites)
    width = max(3.2 * columns, 4)
    height = max(2.6, 0.3 * rows + 1.6)
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, columns, squeeze=False)[0]
    left = min(0.4, (0.07 * max((len(label) for label in labels), default=4) + 0.35) / width)
    fig.subplots_adjust(left=left, right=1 - 0.45 / width, bottom=0.9 / height, top=1 - 0.55 / height, wspace=0.4)
    for ax, name in zip(axes, names, strict=False):
        data = np.ma.masked_invalid(as_array(values[name]))
        _heatmap(
            fig,
            ax,
            data,
            title=name,
            xlabels=[f"h{h}" for h in range(heads)],
            ylabels=labels,
            xlabel="head",
            ylabel="site" if ax is axes[0] else "",
        )
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.suptitle(title or "Per-head attention statistics", fontsize=10)
    return fig


def plot_attention_maps(
    maps: Any,
    *,
    titles: Sequence[str] | None = None,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Head-averaged maps ``[n, Q, K]`` side by side (one per probe sample)."""
    data = as_array(maps)
    if data.ndim == 2:
        data = data[None]
    count = data.shape[0]
    fig = Figure(figsize=(4.2 * count, 3.8))
    axes = fig.subplots(1, count, squeeze=False)[0]
    fig.subplots_adjust(left=0.5 / (4.2 * count), right=1 - 0.5 / (4.2 * count), bottom=0.16, top=0.86, wspace=0.35)
    for index, ax in enumerate(axes):
        name = titles[index] if titles is not None and index < len(titles) else f"sample {index}"
        _heatmap(fig, ax, data[index], title=name, vmin=0.0, xlabels=key_labels, ylabels=query_labels)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_heads(
    maps: Any,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str = "",
    max_columns: int = 4,
) -> Figure:
    """Per-head maps ``[H, Q, K]`` of one sample in a grid, on a shared colour scale."""
    data = as_array(maps)
    heads = data.shape[0]
    columns = min(max_columns, heads)
    rows = math.ceil(heads / columns)
    # Fixed margins sized from the tick labels (constrained layout would measure every label twice per draw): the
    # top holds the suptitle above the first row's head titles, each row gap the next row's titles.
    _, x_texts, x_size = _tick_texts(key_labels, data.shape[2])
    _, y_texts, y_size = _tick_texts(query_labels, data.shape[1])
    left, bottom = text_inches(y_texts, y_size) + 0.2, text_inches(x_texts, x_size) + 0.2
    right, top = 0.75, 0.6
    fig = Figure(figsize=(2.5 * columns + left + right, 2.25 * rows + 0.35 * (rows - 1) + top + bottom))
    axes = fig.subplots(rows, columns, squeeze=False)
    fixed_layout(fig, left=left, right=right, top=top, bottom=bottom, rows=rows, columns=columns, wgap=0.15, hgap=0.35)
    vmax = float(np.nanmax(data)) if data.size else 1.0
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= heads:
            ax.set_visible(False)
            continue
        image = ax.imshow(data[index], cmap=SEQUENTIAL, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"head {index}", fontsize=8)
        # tick labels on the outer axes only: the bottom of each column, the left column
        if index + columns >= heads:
            _ticks(ax, key_labels, data.shape[2], "x")
        else:
            ax.set_xticks([])
        if index % columns == 0:
            _ticks(ax, query_labels, data.shape[1], "y")
        else:
            ax.set_yticks([])
    if image is not None:
        side_colorbar(fig, image, axes)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_rollout(
    rollout: Any, *, labels: Sequence[str] | None = None, titles: Sequence[str] | None = None, title: str = ""
) -> Figure:
    """Attention rollout ``[n, L, L]`` per probe sample (row ``i``: contribution of each input token to output ``i``)
    with, below, the contribution of each input token to the first output token ([CLS])."""
    data = as_array(rollout)
    if data.ndim == 2:
        data = data[None]
    count = data.shape[0]
    fig = Figure(figsize=(4.2 * count, 5.6))
    axes = fig.subplots(2, count, squeeze=False, height_ratios=[3, 1])
    fig.subplots_adjust(
        left=0.5 / (4.2 * count), right=1 - 0.5 / (4.2 * count), bottom=0.1, top=0.9, wspace=0.35, hspace=0.45
    )
    for index in range(count):
        name = titles[index] if titles is not None and index < len(titles) else f"sample {index}"
        _heatmap(
            fig,
            axes[0, index],
            data[index],
            title=name,
            vmin=0.0,
            xlabels=labels,
            ylabels=labels,
            xlabel="input token",
            ylabel="output token",
        )
        axes[1, index].fill_between(np.arange(data.shape[2]), data[index, 0], step="mid", color="tab:blue")
        axes[1, index].set_title("contribution to output token 0", fontsize=8)
        axes[1, index].set_xlim(-0.5, data.shape[2] - 0.5)
        _ticks(axes[1, index], labels, data.shape[2], "x")
    fig.suptitle(title or "Attention rollout", fontsize=10)
    return fig


def plot_layer_evolution(
    sites: Sequence[str], means: Mapping[str, Any], spreads: Mapping[str, Any] | None = None, title: str = ""
) -> Figure:
    """One line per statistic by depth (sites in forward order), each ``[sites]``, with an optional band
    ``mean +- spread`` (e.g. the standard deviation across heads)."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(sites) + 2.5), 4.0))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.32, top=0.9)
    depth = np.arange(len(sites))
    for (name, values), colour in zip(means.items(), distinct_colours(len(means)), strict=True):
        y = as_array(values)
        ax.plot(depth, y, marker="o", label=name, color=colour)
        if spreads is not None and name in spreads:
            s = as_array(spreads[name])
            ax.fill_between(depth, y - s, y + s, alpha=0.2, color=colour)
    ax.set_xticks(depth)
    ax.set_xticklabels(short_site_names(sites), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("site (forward order)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Layer evolution (mean over heads, band: std across heads)", fontsize=10)
    return fig


def plot_head_contributions(
    sites: Sequence[str], values: Any, errors: Any | None = None, *, statistic: str = "max_weight", title: str = ""
) -> Figure:
    """Bars per head for each site (``values``, ``errors``: ``[sites, heads]``, NaN beyond a site's heads)."""
    data = as_array(values)
    err = None if errors is None else as_array(errors)
    count = len(sites)
    columns = min(count, 2)
    rows = max(1, math.ceil(count / columns))
    fig = Figure(figsize=(5.0 * columns, 2.6 * rows + 0.6))
    # one y scale for every site: bars of different layers are compared by height
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    fig.subplots_adjust(
        left=0.1,
        right=0.98,
        bottom=0.45 / (2.6 * rows + 0.6),
        top=1 - 0.6 / (2.6 * rows + 0.6),
        wspace=0.25,
        hspace=0.55,
    )
    names = short_site_names(sites)
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.set_visible(False)
            continue
        row = data[index]
        heads = int(np.sum(~np.isnan(row)))
        ax.bar(
            np.arange(heads),
            row[:heads],
            yerr=None if err is None else err[index, :heads],
            color="tab:orange",
            capsize=2,
        )
        ax.set_xticks(np.arange(heads))
        ax.set_xticklabels([f"h{h}" for h in range(heads)], fontsize=7)
        ax.set_title(names[index], fontsize=8)
        ax.set_ylabel(statistic, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or f"Head contributions ({statistic}, error bars: std over rows)", fontsize=10)
    return fig


def plot_modality_pair(
    a_to_b: Any,
    b_to_a: Any,
    *,
    names: tuple[str, str] = ("A", "B"),
    agreement: float | None = None,
    sample_agreement: float | None = None,
    a_labels: Sequence[str] | None = None,
    b_labels: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """A->B map ``[La, Lb]``, B->A transposed (``[Lb, La]`` shown as ``[La, Lb]``) and their difference."""
    forward = as_array(a_to_b)
    backward = as_array(b_to_a).T
    difference = forward - backward
    a, b = names
    fig = Figure(figsize=(13.0, 4.2))
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.2, top=0.86, wspace=0.4)
    vmax = float(np.nanmax([forward.max(initial=0), backward.max(initial=0)]))
    _heatmap(
        fig,
        axes[0],
        forward,
        title=f"{a} -> {b}",
        vmin=0,
        vmax=vmax,
        xlabels=b_labels,
        ylabels=a_labels,
        xlabel=f"{b} (key)",
        ylabel=f"{a} (query)",
    )
    _heatmap(
        fig,
        axes[1],
        backward,
        title=f"({b} -> {a})ᵀ",
        vmin=0,
        vmax=vmax,
        xlabels=b_labels,
        ylabels=a_labels,
        xlabel=f"{b} (query)",
        ylabel=f"{a} (key)",
    )
    bound = float(np.nanmax(np.abs(difference))) if difference.size else 1.0
    _heatmap(
        fig,
        axes[2],
        difference,
        title="difference",
        cmap=DIVERGING,
        vmin=-bound,
        vmax=bound,
        xlabels=b_labels,
        ylabels=a_labels,
        xlabel=b,
        ylabel=a,
    )
    parts = []
    if agreement is not None and math.isfinite(agreement):
        parts.append(f"agreement {agreement:.3f} (epoch mean)")
    if sample_agreement is not None and math.isfinite(sample_agreement):
        parts.append(f"{sample_agreement:.3f} (this sample)")
    fig.suptitle((title or f"{a} <-> {b}") + (": " + ", ".join(parts) if parts else ""), fontsize=10)
    return fig


def plot_top_positions(
    entries: Mapping[str, Sequence[tuple[Any, float]]], *, title: str = "", xlabel: str = "share of attention received"
) -> Figure:
    """Horizontal bars of the top positions of each site: ``entries[site] = [(label, value), ...]``."""
    sites = list(entries)
    count = max(1, len(sites))
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    longest = max((len(pairs) for pairs in entries.values()), default=1)
    height = (0.22 * longest + 1.0) * rows + 0.5
    fig = Figure(figsize=(5.0 * columns, height))
    # one value scale for every site (bars compared across layers); labels differ per site, so y stays free
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True)
    label_width = max((len(str(label)) for pairs in entries.values() for label, _ in pairs), default=3)
    fig.subplots_adjust(
        left=min(0.35, (0.07 * label_width + 0.3) / (5.0 * columns)),
        right=0.97,
        bottom=0.55 / height,
        top=1 - 0.5 / height,
        wspace=0.2 + min(0.5, 0.07 * label_width / 5.0),
        hspace=0.6,
    )
    names = short_site_names(sites) if sites else []
    for index, ax in enumerate(axes.flat):
        if index >= len(sites):
            ax.set_visible(False)
            continue
        pairs = list(entries[sites[index]])[::-1]
        ax.barh(np.arange(len(pairs)), [float(v) for _, v in pairs], color="tab:green")
        ax.set_yticks(np.arange(len(pairs)))
        ax.set_yticklabels([str(label) for label, _ in pairs], fontsize=7)
        ax.set_title(names[index], fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title or "Top attended positions", fontsize=10)
    return fig
