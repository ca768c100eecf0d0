"""The results of one ModuleProbe evaluation epoch (host tensors, JSON-ready): built from the streamed states
(:func:`probe_results`), the top attended positions, the logged scalars and the summary table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_attn.metrics.attention import SiteStatistics
from lightning_attn.metrics.probes import ActivationSummary, ProbeStatistics

__all__ = ["ProbeResults", "position_labels", "probe_results", "probe_scalars", "summary_table", "top_weight_positions"]


@dataclass
class ProbeResults:
    """One evaluation epoch's probe statistics (host tensors).

    Attributes:
        stage: ``val``/``test`` (``_dl<k>`` for the k-th dataloader, k >= 1); ``epoch``, ``global_step``.
        probes: probe name to ``{"pattern", "kind", "sites"}`` (the matched module names, forward order).
        activations: site to :class:`ActivationSummary`: ``"activation"`` probes per position and channel;
            ``"weights"`` probes with ``[B, L]``/``[B, H, L]`` outputs per position (mean and spread across
            samples and heads) and per head ("channel").
        weights: ``"weights"`` site to per-head :class:`~lightning_attn.metrics.attention.SiteStatistics`
            (entropy, max_weight, sparsity, distance = mean position, first_token = weight on position 0).
        top_positions: ``"weights"`` site to ``[(position name or index, mean weight)]``, highest first.
        histograms: site (``"weights"`` probes and attention sites) to per-head counts ``[H, bins]``;
            ``histogram_edges``: ``[bins + 1]``.
        samples: site to the probe samples' outputs (``[n, L, C]`` activations, ``[n, H, L]`` weights).
    """

    stage: str
    epoch: int
    global_step: int
    probes: dict[str, dict[str, Any]]
    activations: dict[str, ActivationSummary]
    weights: dict[str, SiteStatistics]
    top_positions: dict[str, list[tuple[str | int, float]]]
    histograms: dict[str, Tensor]
    histogram_edges: Tensor
    samples: dict[str, Tensor] = field(default_factory=dict)

    def kind(self, site: str) -> str:
        return "weights" if site in self.weights else "activation" if site in self.activations else "attention"

    def probe_of(self, site: str) -> str:
        """The probe whose hook produced ``site`` (the first probe listing its module), ``""`` for attention sites."""
        module = site.split("#", 1)[0]
        return next((name for name, info in self.probes.items() if module in info["sites"]), "")

    def probe_sites(self, probe: str) -> list[str]:
        """The sites of a probe that produced statistics, ``#k`` repeated calls included, in forward order."""
        modules = self.probes[probe]["sites"]
        seen = list(self.weights) if self.probes[probe]["kind"] == "weights" else list(self.activations)
        return [s for s in seen if s.split("#", 1)[0] in modules]

    def rows_by_site(self) -> dict[str, Tensor]:
        """Site -> rows counted: per head for ``"weights"`` sites, per channel (samples x positions) for activation
        sites (for :func:`~lightning_attn.metrics.coverage.coverage_record`)."""
        rows = {site: summary.channel_count for site, summary in self.activations.items()}
        return {**rows, **{site: stats.rows for site, stats in self.weights.items()}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per probe its sites, per site the activation summary and/or the per-head attention
        measures and top positions, and the histograms."""
        sites: dict[str, Any] = {}
        for site in dict.fromkeys([*self.activations, *self.weights]):
            entry: dict[str, Any] = {"kind": self.kind(site)}
            if site in self.activations:
                entry["activation" if entry["kind"] == "activation" else "over_positions"] = self.activations[
                    site
                ].to_dict()
            if site in self.weights:
                stats = self.weights[site]
                entry["num_heads"] = int(stats.rows.numel())
                entry["rows_per_head"] = stats.rows.tolist()
                entry["statistics"] = {
                    name: {
                        "mean": float(stats.mean[name].mean()),
                        "per_head_mean": stats.mean[name].tolist(),
                        "per_head_std": stats.std[name].tolist(),
                    }
                    for name in stats.mean
                }
                entry["top_positions"] = [[label, value] for label, value in self.top_positions.get(site, [])]
            sites[site] = entry
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "probes": {
                name: {"pattern": info["pattern"], "kind": info["kind"], "sites": list(info["sites"])}
                for name, info in self.probes.items()
            },
            "sites": sites,
            "histogram_edges": self.histogram_edges.tolist(),
            "histograms": {
                site: {"kind": self.kind(site), "per_head_counts": counts.tolist()}
                for site, counts in self.histograms.items()
            },
        }


def top_weight_positions(
    received: Tensor, k: int, labels: Sequence[str] | None = None
) -> list[tuple[str | int, float]]:
    """The ``k`` positions with the highest mean weight (``received`` from
    :meth:`~lightning_attn.metrics.attention.AttentionPositions.compute`, NaN where never seen)."""
    valid = ~torch.isnan(received)
    count = int(valid.sum())
    if not count:
        return []
    names = [str(label) for label in labels] if labels is not None and len(labels) == received.numel() else None
    values, index = torch.where(valid, received, -math.inf).topk(min(k, count))
    return [(i if names is None else names[i], float(v)) for i, v in zip(index.tolist(), values.tolist(), strict=False)]


def position_labels(names: Sequence[str] | None, length: int) -> list[str] | None:
    """``names`` when there is one per position of a ``length``-position axis, else ``None`` (plain indices)."""
    return list(names) if names is not None and len(names) == length else None


def probe_results(
    statistics: ProbeStatistics,
    *,
    stage: str,
    epoch: int,
    global_step: int,
    probes: dict[str, dict[str, Any]],
    top_k: int,
    position_names: Sequence[str] | None = None,
    samples: dict[str, Tensor] | None = None,
) -> ProbeResults:
    """Compute ``statistics`` (a collective under DDP: every rank calls it) into host :class:`ProbeResults`, with the
    ``top_k`` positions of every weights site by mean weight, named by ``position_names`` where the length matches.

    Args:
        statistics: the streamed states of one (stage, dataloader).
        stage: the stage key (``val``, ``test``, ``val_dl1``, ...); ``epoch``, ``global_step``: the position.
        probes: probe name to ``{"pattern", "kind", "sites"}``.
        top_k: positions reported per weights site.
        position_names: labels of the positions (time steps).
        samples: the probe samples' outputs by site (host tensors).
    """
    activations, weights, positions, histograms = statistics.compute()
    weights = {
        site: type(s)(
            mean={n: v.detach().to("cpu", torch.float64) for n, v in s.mean.items()},
            std={n: v.detach().to("cpu", torch.float64) for n, v in s.std.items()},
            rows=s.rows.detach().to("cpu", torch.float64),
        )
        for site, s in weights.items()
    }
    top = {}
    for site in weights:
        received = positions[site][0].detach().to("cpu", torch.float64)
        top[site] = top_weight_positions(received, top_k, position_labels(position_names, received.numel()))
    return ProbeResults(
        stage=stage,
        epoch=epoch,
        global_step=global_step,
        probes=probes,
        activations=activations,
        weights=weights,
        top_positions=top,
        histograms=histograms,
        histogram_edges=statistics.histograms.edges,
        samples=samples or {},
    )


def probe_scalars(results: ProbeResults, prefix: str) -> dict[str, float]:
    """The logged scalars under ``prefix`` (``<name>/<stage>``): ``<site>/{mean,std,saturation_low,saturation_high}``
    of activation sites and ``<site>/<statistic>`` (mean over heads) of weights sites."""
    values: dict[str, float] = {}
    for site, summary in results.activations.items():
        if site in results.weights:
            continue
        values.update(
            {
                f"{prefix}/{site}/mean": summary.mean,
                f"{prefix}/{site}/std": summary.std,
                f"{prefix}/{site}/saturation_low": summary.saturation_low,
                f"{prefix}/{site}/saturation_high": summary.saturation_high,
            }
        )
    for site, stats in results.weights.items():
        for name, per_head in stats.mean.items():
            values[f"{prefix}/{site}/{name}"] = float(per_head.mean())
    return values


def summary_table(results: ProbeResults) -> tuple[list[str], list[list[Any]]]:
    """The summary table's columns and one row per site: its probe, kind, activation summary (activation sites)
    and the mean over heads of every attention measure (weights sites); ``None`` where a column does not apply."""
    statistic_names = list(next(iter(results.weights.values())).mean) if results.weights else []
    columns = ["probe", "site", "kind", "mean", "std", "saturation_low", "saturation_high", *statistic_names]
    rows = []
    for site in dict.fromkeys([*results.activations, *results.weights]):
        kind = results.kind(site)
        summary = results.activations.get(site)
        row: list[Any] = [results.probe_of(site), site, kind]
        row += (
            [summary.mean, summary.std, summary.saturation_low, summary.saturation_high]
            if summary is not None and kind == "activation"
            else [None] * 4
        )
        stats = results.weights.get(site)
        row += [float(stats.mean[n].mean()) if stats is not None else None for n in statistic_names]
        rows.append(row)
    return columns, rows
