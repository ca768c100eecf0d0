"""The HeadSpecializationTracker's figures of one stage: data in (its history records and role events), Figures out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from lightning_attn.metrics.heads import TYPE_SCORES
from lightning_attn.plots.head_roles import plot_head_importance, plot_head_timeline
from lightning_attn.plots.heads import (
    plot_feature_correlations,
    plot_head_evolution,
    plot_head_redundancy,
    plot_head_type_scores,
    plot_hsi,
)

__all__ = ["tracker_figures"]


def tracker_figures(
    records: Sequence[dict[str, Any]],
    events: Sequence[dict[str, Any]],
    *,
    stage: str,
    features: Sequence[str],
    hsi_threshold: float,
    redundancy_threshold: float,
    redundancy: dict[str, Any] | None = None,
) -> dict[str, Figure]:
    """The figures of the latest of ``records`` (one stage's history, oldest first): ``hsi`` and
    ``feature_correlation`` (with ``features``), ``type_scores``, ``redundancy`` (given the probe's result),
    ``evolution`` and ``timeline`` (labels and the role-change ``events``; from the second evaluated epoch on),
    ``importance`` (when the record has head importance)."""
    if not records:
        return {}
    entry = records[-1]
    sites = [s["name"] for s in entry["sites"]]
    heads = [f"{s['name']}/h{h}" for s in entry["sites"] for h in range(s["num_heads"])]
    per_head = lambda table: [value for site in sites for value in table[site]]  # noqa: E731
    figures: dict[str, Figure] = {}
    title = f"{stage}, epoch {entry['epoch']}"
    if features:
        figures["hsi"] = plot_hsi(
            per_head(entry["hsi"]),
            heads,
            per_head(entry["labels"]),
            hsi_threshold,
            title=f"Head Specialization Index ({title})",
        )
        matrix = [
            [entry["correlations"][site][f][h] for f in features]
            for site in sites
            for h in range(len(entry["hsi"][site]))
        ]
        figures["feature_correlation"] = plot_feature_correlations(
            matrix, heads, list(features), title=f"Head x feature correlation ({title})"
        )
    width = max(s["num_heads"] for s in entry["sites"])
    scores = {}
    for name in (*TYPE_SCORES, "sink", "broad"):
        table = [
            list(entry["type_scores"][site][name]) + [math.nan] * (width - len(entry["type_scores"][site][name]))
            for site in sites
        ]
        scores[name] = table
    figures["type_scores"] = plot_head_type_scores(scores, sites, title=f"Head-type scores ({title})")
    if redundancy is not None:
        figures["redundancy"] = plot_head_redundancy(
            redundancy["distance"],
            redundancy["heads"],
            redundancy["clusters"],
            redundancy_threshold,
            title=f"Head redundancy, JS divergence ({title})",
        )
    ordered = sorted(records, key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in ordered]
    series = {"entropy": [_flat(r, heads, "entropy") for r in ordered]}
    if features:
        series["hsi"] = [_flat(r, heads, "hsi") for r in ordered]
    if len(epochs) >= 2:  # one evaluation has no evolution: its per-head values are in the figures above
        figures["evolution"] = plot_head_evolution(epochs, series, heads, title=f"Per-head evolution ({stage})")
        labels = [[_label_at(r, head) for head in heads] for r in ordered]
        figures["timeline"] = plot_head_timeline(epochs, labels, heads, events, title=f"Head roles ({stage})")
    if "importance" in entry:
        normalized = entry["importance_normalized"]
        table = [normalized[site] + [math.nan] * (width - len(normalized[site])) for site in sites]
        figures["importance"] = plot_head_importance(table, sites, title=f"Head importance ({title})")
    return figures


def _label_at(record: dict[str, Any], head: str) -> str | None:
    site, k = head.rsplit("/h", 1)
    labels = record["labels"].get(site, [])
    return labels[int(k)] if int(k) < len(labels) else None


def _flat(record: dict[str, Any], heads: Sequence[str], what: str) -> list[float]:
    """Per-head values of ``what`` (``"hsi"`` or a row statistic) in ``heads`` order, NaN where absent."""
    out = []
    for head in heads:
        site, k = head.rsplit("/h", 1)
        values = record["hsi"].get(site) if what == "hsi" else record["statistics"].get(site, {}).get(what)
        value = values[int(k)] if values is not None and int(k) < len(values) else None
        out.append(math.nan if value is None else float(value))
    return out
