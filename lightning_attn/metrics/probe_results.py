"""The results of one ModuleProbe evaluation epoch (host tensors, JSON-ready) and the top attended positions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_attn.metrics.attention import SiteStatistics
from lightning_attn.metrics.probes import ActivationSummary

__all__ = ["ProbeResults", "top_weight_positions"]


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

    def probe_sites(self, probe: str) -> list[str]:
        """The sites of a probe that produced statistics, ``#k`` repeated calls included, in forward order."""
        modules = self.probes[probe]["sites"]
        seen = list(self.weights) if self.probes[probe]["kind"] == "weights" else list(self.activations)
        return [s for s in seen if s.split("#", 1)[0] in modules]

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
