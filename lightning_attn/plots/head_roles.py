"""Head importance and head-role figures: host values in, ``matplotlib.figure.Figure`` out (no pyplot).

Used by :class:`~lightning_attn.HeadSpecializationTracker` (``importance``, ``timeline``); heads are named
``<site>/h<k>`` as in :mod:`lightning_attn.plots.heads`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lightning_attn.plots._common import as_array, fixed_layout, text_inches
from lightning_attn.plots.heads import _label_inches, _ticks, short_head_names

__all__ = ["plot_head_importance", "plot_head_timeline"]


def plot_head_importance(importance: Any, sites: Sequence[str], title: str = "") -> Figure:
    """``layers x heads`` heatmap of normalized head importance (Michel et al. 2019) in ``[0, 1]``, the value
    written in each cell (blank: a head a layer lacks, or undefined)."""
    data = np.ma.masked_invalid(as_array(importance, none_as_nan=True).reshape(len(sites), -1))
    heads = data.shape[1]
    layer_names = (
        [n.rsplit("/", 1)[0] or s for n, s in zip(short_head_names([f"{s}/h0" for s in sites]), sites, strict=True)]
        if len(sites) > 1
        else list(sites)
    )
    fig = Figure(figsize=(max(4.0, 0.45 * heads + 2.5), max(2.6, 0.35 * len(sites) + 1.6)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if data.size <= 400:
        for (row, column), value in np.ndenumerate(data.filled(np.nan)):
            if math.isfinite(value):
                ax.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > 0.6 else "white",
                )
    _ticks(ax, [str(h) for h in range(heads)], "x")
    _ticks(ax, layer_names, "y")
    ax.set_xlabel("head", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="normalized importance")
    ax.set_title(title or "Head importance (Michel et al. 2019)", fontsize=10)
    return fig


def plot_head_timeline(
    epochs: Sequence[int],
    labels: Sequence[Sequence[str | None]],
    heads: Sequence[str],
    events: Sequence[Mapping[str, Any]] = (),
    title: str = "",
) -> Figure:
    """Head roles over epochs: a ``heads x epochs`` grid coloured by label (``labels[e][n]`` of head ``n`` at
    epoch ``epochs[e]``, ``None``: not evaluated), one colour per label in the legend, and a black dot on each
    event (a ``{"epoch", "head"}`` of :func:`~lightning_attn.metrics.head_roles.role_events`)."""
    names = sorted({label for row in labels for label in row if label is not None})
    index = {label: k for k, label in enumerate(names)}
    grid = np.full((len(heads), len(epochs)), np.nan)
    for column, row in enumerate(labels):
        for n, label in enumerate(row):
            if label is not None:
                grid[n, column] = index[label]
    # tab10's distinct colours first, then tab20's light shades of them
    palette = [colormaps["tab10"](k) if k < 10 else colormaps["tab20"]((2 * k - 19) % 20) for k in range(len(names))]
    head_names, epoch_names = short_head_names(heads), [str(e) for e in epochs]
    # fixed margins (no constrained layout): head names left, the legend right (6 pt labels after 0.35 inch
    # handles), the epochs and "epoch" below
    left, right = _label_inches(head_names) + 0.2, text_inches([*names, "role change"], 6) + 0.55
    bottom = _label_inches(epoch_names) + 0.4
    title = title or "Head roles over epochs (dots: role changes)"
    # one column is a snapshot, not a timeline: say so rather than pose as a history
    title = f"{title}: epoch {epochs[0]} only" if len(epochs) == 1 else title
    # wide enough for the title, centred over the axes (between unequal margins)
    width = max(5.0, 0.5 * len(epochs) + 1.0 + left + right, text_inches([title], 10) + abs(left - right) + 0.2)
    fig = Figure(figsize=(width, max(2.5, min(0.22 * len(heads) + 1.5, 30.0))))
    ax = fig.subplots()
    fixed_layout(fig, left=left, right=right, top=0.4, bottom=bottom)
    ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=ListedColormap(palette or ["white"]),
        vmin=-0.5,
        vmax=max(len(names), 1) - 0.5,
        aspect="auto",
        interpolation="nearest",
        gid="categorical",  # colours name labels (legend), not values: no colour bar
    )
    column_of = {e: c for c, e in enumerate(epochs)}
    row_of = {h: n for n, h in enumerate(heads)}
    marks = [
        (column_of[e["epoch"]], row_of[e["head"]]) for e in events if e["epoch"] in column_of and e["head"] in row_of
    ]
    if marks:
        ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=14, color="black", marker="o", label="role change")
    _ticks(ax, epoch_names, "x")
    _ticks(ax, head_names, "y")
    ax.set_xlabel("epoch", fontsize=8)
    handles = [Patch(color=palette[k], label=label) for k, label in enumerate(names)]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    return fig
