"""Module-probe figures: arrays in, ``matplotlib.figure.Figure`` out (never pyplot).

- :func:`plot_channel_heatmaps`: an activation (a gate) over time for its most variable channels, per site and
  probe sample;
- :func:`plot_over_time`: one line per site (e.g. the mean gate of every layer, overlaid) with a band;
- :func:`plot_weights_over_time`: a distribution over positions (pooling weights) per site: the mean across
  samples with a +- std band and the probe samples' own weights;
- :func:`plot_weight_statistics`: entropy, max weight, ... of those distributions per site and head;
- :func:`plot_weight_histograms`: per-head histograms of attention weights on ``[0, 1]``, per site (the
  distribution view of attention: mass piled at 0 with a tail towards 1 = a focused head, a bump near ``1/L``
  = a uniform one);
- :func:`probe_figures`: every figure of one :class:`~lightning_attn.metrics.probe_results.ProbeResults`, named
  as :class:`~lightning_attn.ModuleProbe` publishes them.

Inputs are host tensors or arrays; nothing here computes statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lightning_attn.metrics.probe_results import ProbeResults, position_labels
from lightning_attn.plots._common import MAX_LINES, as_array, distinct_colours
from lightning_attn.plots.attention import _heatmap, _ticks, plot_top_positions, short_site_names

__all__ = [
    "plot_channel_heatmaps",
    "plot_over_time",
    "plot_weight_histograms",
    "plot_weight_statistics",
    "plot_weights_over_time",
    "probe_figures",
]


def plot_channel_heatmaps(
    maps: Mapping[str, Any],
    *,
    channel_labels: Mapping[str, Sequence[str]] | None = None,
    position_labels: Sequence[str] | None = None,
    sample_titles: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
) -> Figure:
    """Heatmaps channel x position: one row of panels per site, one column per sample.

    Args:
        maps: site to ``[n, C', L]`` (``[C', L]`` for one sample): the values of ``C'`` chosen channels.
        channel_labels: site to the labels of its ``C'`` rows (e.g. ``ch 17``).
        position_labels: labels of the ``L`` positions (time steps).
        sample_titles: column titles.
        vmin, vmax: shared colour range (``None``: from the data).
    """
    sites = list(maps)
    data = {site: as_array(maps[site]) for site in sites}
    data = {site: values[None] if values.ndim == 2 else values for site, values in data.items()}
    columns = max((values.shape[0] for values in data.values()), default=1)
    rows = max(1, len(sites))
    tallest = max((values.shape[1] for values in data.values()), default=1)
    panel_height = max(1.8, 0.16 * tallest + 1.0)
    width, height = 4.4 * columns + 1.4, panel_height * rows + 0.9
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.6 / width,
        bottom=0.7 / height,
        top=1 - 0.6 / height,
        wspace=0.35,
        hspace=1.1 / panel_height,
    )
    finite = [v[np.isfinite(v)] for v in data.values()]
    low = vmin if vmin is not None else min((float(v.min()) for v in finite if v.size), default=0.0)
    high = vmax if vmax is not None else max((float(v.max()) for v in finite if v.size), default=1.0)
    names = short_site_names(sites) if sites else []
    for row, site in enumerate(sites):
        values = data[site]
        for column in range(columns):
            ax = axes[row, column]
            if column >= values.shape[0]:
                ax.set_visible(False)
                continue
            sample = (
                sample_titles[column]
                if sample_titles is not None and column < len(sample_titles)
                else f"sample {column}"
            )
            labels = list(channel_labels[site]) if channel_labels and site in channel_labels else None
            _heatmap(
                fig,
                ax,
                values[column],
                title=f"{names[row]}, {sample}",
                vmin=low,
                vmax=high,
                xlabels=position_labels,
                ylabels=labels,
                xlabel="position",
                ylabel="channel" if column == 0 else "",
                colorbar=column == columns - 1,
            )
    fig.suptitle(title or "Activations over time (most variable channels)", fontsize=10)
    return fig


def plot_over_time(
    means: Mapping[str, Any],
    spreads: Mapping[str, Any] | None = None,
    *,
    position_labels: Sequence[str] | None = None,
    ylabel: str = "mean",
    ylim: tuple[float, float] | None = None,
    title: str = "",
) -> Figure:
    """One line per site over positions (all overlaid, forward order = colour order), each ``[L]``, with an
    optional band ``mean +- spread`` (e.g. the standard deviation over samples and channels). Beyond
    :data:`MAX_LINES` sites: a site x position heatmap with the sites as row labels (lines would share colours)."""
    sites = list(means)
    length = max((as_array(v).shape[0] for v in means.values()), default=1)
    if len(sites) > MAX_LINES:
        return _over_time_heatmap(means, sites, length, position_labels, ylabel, ylim, title)
    width = max(6.0, 0.18 * length + 3.0)
    fig = Figure(figsize=(width, 4.0))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.8 / width, right=1 - 1.6 / width, bottom=0.2, top=0.9)
    names = short_site_names(sites) if sites else []
    colours = distinct_colours(len(sites))
    for index, site in enumerate(sites):
        y = as_array(means[site])
        x = np.arange(y.shape[0])
        (line,) = ax.plot(x, y, marker="." if y.shape[0] <= 64 else None, label=names[index], color=colours[index])
        if spreads is not None and site in spreads:
            s = as_array(spreads[site])
            ax.fill_between(x, y - s, y + s, alpha=0.15, color=line.get_color())
    ax.set_xlim(-0.5, length - 0.5)
    _ticks(ax, position_labels, length, "x")
    ax.set_xlabel("position", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Mean over time per site (band: std)", fontsize=10)
    return fig


def _over_time_heatmap(
    means: Mapping[str, Any],
    sites: Sequence[str],
    length: int,
    position_labels: Sequence[str] | None,
    ylabel: str,
    ylim: tuple[float, float] | None,
    title: str,
) -> Figure:
    """:func:`plot_over_time` for many sites: row ``i`` is site ``i``'s mean over positions (NaN-padded)."""
    grid = np.full((len(sites), length), np.nan)
    for row, site in enumerate(sites):
        values = as_array(means[site])
        grid[row, : values.shape[0]] = values
    width = max(6.0, 0.18 * length + 3.0)
    fig = Figure(figsize=(width, max(3.0, 0.22 * len(sites) + 1.6)), layout="constrained")
    ax = fig.subplots()
    low, high = ylim if ylim is not None else (None, None)
    _heatmap(
        fig,
        ax,
        np.ma.masked_invalid(grid),
        vmin=low,
        vmax=high,
        xlabels=position_labels,
        ylabels=short_site_names(sites),
        xlabel="position",
        ylabel="site",
        colorbar=False,
    )
    fig.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.04).set_label(ylabel, fontsize=8)
    ax.set_title(title or f"{ylabel} over time per site", fontsize=10)
    return fig


def plot_weights_over_time(
    means: Mapping[str, Any],
    stds: Mapping[str, Any] | None = None,
    samples: Mapping[str, Any] | None = None,
    *,
    position_labels: Sequence[str] | None = None,
    sample_titles: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Weights over positions, one panel per site: the mean across samples ``[L]`` with a +- std band, the
    uniform level ``1/L`` dashed, and the probe samples' weights (``samples[site]``: ``[n, L]``) as thin lines."""
    sites = list(means)
    count = max(1, len(sites))
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    length = max((as_array(v).shape[0] for v in means.values()), default=1)
    width = max(5.5, 0.14 * length + 3.0)
    height = 3.2 * rows + 0.6
    fig = Figure(figsize=(width * columns, height))
    # one weight scale for every site: the panels are compared by height
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True)
    fig.subplots_adjust(
        left=0.7 / (width * columns),
        right=1 - 0.2 / (width * columns),
        bottom=0.8 / height,
        top=1 - 0.6 / height,
        wspace=0.7 / width + 0.05,
        hspace=1.0 / 3.2,
    )
    names = short_site_names(sites) if sites else []
    for index, ax in enumerate(axes.flat):
        if index >= len(sites):
            ax.set_visible(False)
            continue
        site = sites[index]
        y = as_array(means[site])
        x = np.arange(y.shape[0])
        ax.plot(x, y, color="black", linewidth=2, label="mean over samples")
        if stds is not None and site in stds:
            s = as_array(stds[site])
            ax.fill_between(x, np.clip(y - s, 0, None), y + s, color="tab:blue", alpha=0.2, label="+- std")
        if samples is not None and site in samples:
            values = as_array(samples[site])
            values = values[None] if values.ndim == 1 else values
            for n, (row, colour) in enumerate(zip(values, distinct_colours(len(values)), strict=True)):
                label = sample_titles[n] if sample_titles is not None and n < len(sample_titles) else f"sample {n}"
                ax.plot(np.arange(row.shape[0]), row, linewidth=0.9, alpha=0.8, label=label, color=colour)
        if y.shape[0]:
            ax.axhline(1.0 / y.shape[0], color="gray", linestyle="--", linewidth=0.8, label="uniform 1/L")
        ax.set_xlim(-0.5, y.shape[0] - 0.5)
        _ticks(
            ax,
            position_labels if position_labels is not None and len(position_labels) == y.shape[0] else None,
            y.shape[0],
            "x",
        )
        ax.set_title(names[index], fontsize=8)
        ax.set_xlabel("position", fontsize=8)
        ax.set_ylabel("weight", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    # set once for the shared axis: a per-panel limit would freeze the scale at the first panel's data
    top = max((ax.dataLim.ymax for ax in axes.flat if ax.get_visible()), default=1.0)
    axes[0, 0].set_ylim(0, 1.05 * top if math.isfinite(top) and top > 0 else 1.0)
    fig.suptitle(title or "Weights over positions (mean and spread across samples)", fontsize=10)
    return fig


def plot_weight_histograms(
    counts: Mapping[str, Any],
    edges: Any,
    *,
    log: bool = True,
    title: str = "",
) -> Figure:
    """Per-head histograms of attention weights, one panel per site: ``counts[site]`` is ``[H, bins]`` over the
    bin ``edges`` (``[bins + 1]`` on ``[0, 1]``), drawn as per-head step lines of the share of weights per bin
    (each head's shares sum to 1), on a log scale by default (most weights of a long row are near 0). A site with
    more than :data:`MAX_LINES` heads is drawn as a head x bin heatmap of the shares instead."""
    sites = list(counts)
    edge = as_array(edges)
    count = max(1, len(sites))
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    width, height = 5.2 * columns, 3.0 * rows + 0.6
    fig = Figure(figsize=(width, height))
    # one share scale for every site: the layers' histograms are compared by height (heatmap panels have heads
    # on y, so sharing holds only when every site is drawn as lines)
    as_lines = all(as_array(values).reshape(-1, edge.size - 1).shape[0] <= MAX_LINES for values in counts.values())
    axes = fig.subplots(rows, columns, squeeze=False, sharey=as_lines)
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.2 / width,
        bottom=0.6 / height,
        top=1 - 0.6 / height,
        wspace=0.3,
        hspace=0.9 / 3.0,
    )
    names = short_site_names(sites) if sites else []
    for index, ax in enumerate(axes.flat):
        if index >= len(sites):
            ax.set_visible(False)
            continue
        data = as_array(counts[sites[index]])
        data = data[None] if data.ndim == 1 else data
        totals = data.sum(1, keepdims=True)
        shares = np.divide(data, totals, out=np.zeros_like(data), where=totals > 0)
        if data.shape[0] > MAX_LINES:
            _histogram_heatmap(fig, ax, shares, edge, log=log)
            ax.set_title(names[index], fontsize=8)
            continue
        for head, (row, colour) in enumerate(zip(shares, distinct_colours(data.shape[0]), strict=True)):
            ax.stairs(row, edge, label=f"h{head}", color=colour, linewidth=1.1)
        if log:
            ax.set_yscale("log")
        ax.set_xlim(0, 1)
        ax.set_title(names[index], fontsize=8)
        ax.set_xlabel("attention weight", fontsize=8)
        ax.set_ylabel("share of weights", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title or "Per-head histograms of attention weights", fontsize=10)
    return fig


def _histogram_heatmap(fig: Figure, ax: Any, shares: np.ndarray, edges: np.ndarray, *, log: bool) -> None:
    """Heads as rows, weight bins as columns, the share as colour (log-scaled like the lines it replaces)."""
    from matplotlib.colors import LogNorm

    positive = shares[shares > 0]
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if log and positive.size else None
    image = ax.pcolormesh(
        edges, np.arange(shares.shape[0] + 1) - 0.5, np.ma.masked_less_equal(shares, 0), norm=norm, cmap="viridis"
    )
    ax.set_yticks(np.arange(shares.shape[0]))
    ax.set_yticklabels([f"h{h}" for h in range(shares.shape[0])], fontsize=5 if shares.shape[0] > 24 else 7)
    ax.tick_params(axis="y", labelleft=True)  # sharey hides the labels of a right-hand column
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("attention weight", fontsize=8)
    ax.set_ylabel("head", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of weights")


def plot_weight_statistics(
    means: Mapping[str, Mapping[str, Any]],
    stds: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    title: str = "",
) -> Figure:
    """The attention measures of distributions over positions: one panel per statistic, one group of bars per
    site with one bar per head (``means[site][statistic]``: ``[H]``), error bars the std over samples; ``labels``
    renames panels."""
    sites = list(means)
    statistics = list(next(iter(means.values()))) if means else []
    columns = max(1, len(statistics))
    fig = Figure(figsize=(2.9 * columns + 0.4, 3.4))
    axes = fig.subplots(1, columns, squeeze=False)[0]
    fig.subplots_adjust(left=0.5 / (2.9 * columns + 0.4), right=0.99, bottom=0.3, top=0.82, wspace=0.4)
    names = short_site_names(sites) if sites else []
    heads = max((int(as_array(means[s][statistics[0]]).size) for s in sites), default=1) if statistics else 1
    width = 0.8 / max(1, heads)
    colors = distinct_colours(heads)
    for ax, statistic in zip(axes, statistics, strict=False):
        for index, site in enumerate(sites):
            values = as_array(means[site][statistic]).reshape(-1)
            errors = None if stds is None else as_array(stds[site][statistic]).reshape(-1)
            for head, value in enumerate(values):
                ax.bar(
                    index + (head - (values.size - 1) / 2) * width,
                    value,
                    width=width,
                    yerr=None if errors is None else errors[head],
                    capsize=2,
                    color=colors[head],
                    label=f"h{head}" if index == 0 and len(values) > 1 else None,
                )
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title((labels or {}).get(statistic, statistic), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if heads > 1 and ax is axes[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title or "Attention measures of the weights (error bars: std over samples)", fontsize=10)
    return fig


# -- one epoch's figures ----------------------------------------------------------------------------------------


def probe_figures(
    results: ProbeResults,
    *,
    figure_sites: Callable[[Sequence[str]], list[str]],
    max_channels: int,
    position_names: Sequence[str] | None = None,
) -> dict[str, Figure]:
    """The figures of one evaluation epoch by published name (``<stage>/<probe>/...``, ``<stage>/histograms``).

    Per activation probe, the mean over time of every site overlaid (``over_time``, band: std) and a heatmap over
    time of the ``max_channels`` channels with the largest std for each probe sample (``heatmap``); per weights
    probe, the weights over time (``over_time``), the attention measures (``statistics``) and the top positions
    (``top_positions``); the per-head histograms of every histogrammed site (``histograms``).

    Args:
        results: the epoch's results.
        figure_sites: picks the sites drawn in one figure from a probe's sites (e.g. evenly spaced over depth).
        max_channels: channels shown in the activation heatmaps.
        position_names: labels of the positions, used where the length matches.
    """
    key, when = results.stage, f"{results.stage}, epoch {results.epoch}"
    figures: dict[str, Figure] = {}
    sample_titles = [f"probe {i}" for i in range(max((v.shape[0] for v in results.samples.values()), default=0))]
    for probe, info in results.probes.items():
        sites = figure_sites(results.probe_sites(probe))
        if not sites:
            continue
        if info["kind"] == "activation":
            figures.update(
                _activation_figures(results, probe, sites, sample_titles, when, max_channels, position_names)
            )
        else:
            figures.update(_weights_figures(results, probe, sites, sample_titles, when, position_names))
    histogram_sites = figure_sites(list(results.histograms))
    if histogram_sites:
        figures[f"{key}/histograms"] = plot_weight_histograms(
            {s: results.histograms[s] for s in histogram_sites},
            results.histogram_edges,
            title=f"Per-head histograms of attention weights ({key}, epoch {results.epoch})",
        )
    return figures


def _activation_figures(
    results: ProbeResults,
    probe: str,
    sites: list[str],
    sample_titles: list[str],
    when: str,
    max_channels: int,
    position_names: Sequence[str] | None,
) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    summaries = {s: results.activations[s] for s in sites}
    length = max(int(s.position_mean.numel()) for s in summaries.values())
    unit = all(_within_unit(s.position_mean) for s in summaries.values()) and all(
        _within_unit(results.samples[s]) for s in sites if s in results.samples
    )
    figures[f"{results.stage}/{probe}/over_time"] = plot_over_time(
        {s: v.position_mean for s, v in summaries.items()},
        {s: v.position_std for s, v in summaries.items()},
        position_labels=position_labels(position_names, length),
        ylabel=f"{probe}: mean over samples and channels",
        ylim=(0.0, 1.0) if unit else None,
        title=f"{probe}: mean over time per site ({when}; band: std)",
    )
    maps, labels = {}, {}
    for site in sites:
        values = results.samples.get(site)
        if values is None:
            continue
        channel_std = torch.nan_to_num(summaries[site].channel_std, nan=-1.0)
        chosen = channel_std.topk(min(max_channels, channel_std.numel())).indices
        maps[site] = values[:, :, chosen].transpose(1, 2)  # [n, C', L]
        labels[site] = [f"ch {int(c)}" for c in chosen]
    if maps:
        length = max(int(m.shape[-1]) for m in maps.values())
        figures[f"{results.stage}/{probe}/heatmap"] = plot_channel_heatmaps(
            maps,
            channel_labels=labels,
            position_labels=position_labels(position_names, length),
            sample_titles=sample_titles,
            vmin=0.0 if unit else None,
            vmax=1.0 if unit else None,
            title=f"{probe} over time, the {max(len(v) for v in labels.values())} channels of largest std ({when})",
        )
    return figures


def _weights_figures(
    results: ProbeResults,
    probe: str,
    sites: list[str],
    sample_titles: list[str],
    when: str,
    position_names: Sequence[str] | None,
) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    means, stds, samples = {}, {}, {}
    for site in sites:
        summary = results.activations.get(site)
        if summary is None:  # a [B, H, Q, K] map: no position view
            continue
        values = results.samples.get(site)  # [n, H, L]
        joint_mean, joint_std = summary.joint_mean, summary.joint_std
        if joint_mean is None or joint_std is None:
            means[site], stds[site] = summary.position_mean, summary.position_std
            if values is not None:
                samples[site] = values[:, 0]
            continue
        heads = joint_mean.shape[1]
        for head in range(heads):
            panel = site if heads == 1 else f"{site} h{head}"
            means[panel] = summary.position_mean if heads == 1 else joint_mean[:, head]
            stds[panel] = summary.position_std if heads == 1 else joint_std[:, head]
            if values is not None:
                samples[panel] = values[:, head]
    if means:
        length = max(int(m.numel()) for m in means.values())
        figures[f"{results.stage}/{probe}/over_time"] = plot_weights_over_time(
            means,
            stds,
            samples,
            position_labels=position_labels(position_names, length),
            sample_titles=sample_titles,
            title=f"{probe}: weights over positions ({when}; band: std across samples)",
        )
    stats = {s: results.weights[s] for s in sites}
    figures[f"{results.stage}/{probe}/statistics"] = plot_weight_statistics(
        {s: v.mean for s, v in stats.items()},
        {s: v.std for s, v in stats.items()},
        labels={"distance": "distance (mean position)", "first_token": "first_token (weight on pos. 0)"},
        title=f"{probe}: attention measures of the weights ({when}; error bars: std over samples)",
    )
    top = {s: results.top_positions[s] for s in sites if results.top_positions.get(s)}
    if top:
        figures[f"{results.stage}/{probe}/top_positions"] = plot_top_positions(
            top, title=f"{probe}: top positions ({when})", xlabel="mean weight"
        )
    return figures


def _within_unit(values: Tensor) -> bool:
    """Whether every finite value lies in ``[0, 1]`` (a gate, a probability): such axes are pinned to ``[0, 1]``."""
    finite = values[torch.isfinite(values)]
    return bool(finite.numel() == 0 or (finite.min() >= 0 and finite.max() <= 1))
