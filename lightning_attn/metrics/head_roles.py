"""Head roles over training: label-change events, label histories, and head importance in the records.

Works on the analysed per-epoch records of :class:`~lightning_attn.HeadSpecializationTracker` (plain Python values,
see :func:`~lightning_attn.metrics.heads.analyze_heads`), so that everything here survives ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_attn.functional.importance import normalize_head_importance, pruning_order

__all__ = [
    "EVENT_COLUMNS",
    "PRUNABLE_COLUMNS",
    "add_head_history",
    "event_rows",
    "importance_record",
    "previous_record",
    "prunable_heads",
    "role_events",
]

#: Columns of the per-epoch ``role_events`` table.
EVENT_COLUMNS = (
    "epoch",
    "since_epoch",
    "head",
    "label_from",
    "label_to",
    "types_from",
    "types_to",
    "hsi_from",
    "hsi_to",
)

#: Columns of the ``prunable_heads`` table.
PRUNABLE_COLUMNS = ("rank", "head", "label", "importance", "normalized", "cumulative_share")


def _specialized(hsi: float | None, threshold: float) -> bool:
    return hsi is not None and math.isfinite(hsi) and hsi >= threshold


def previous_record(records: Sequence[Mapping[str, Any]], epoch: int) -> Mapping[str, Any] | None:
    """The latest of ``records`` (one stage's) evaluated before ``epoch``, if any."""
    earlier = [r for r in records if r["epoch"] < epoch]
    return max(earlier, key=lambda r: r["epoch"]) if earlier else None


def role_events(
    previous: Mapping[str, Any] | None, entry: Mapping[str, Any], hsi_threshold: float
) -> list[dict[str, Any]]:
    """The heads whose role changed between the ``previous`` record of the stage and ``entry``.

    A change is a new label, a new set of structural types (e.g. a head reaching the previous-token threshold), or
    the HSI crossing ``hsi_threshold`` in either direction. Heads absent from ``previous`` (a new site) give none.

    Returns:
        One event per changed head: ``{"epoch", "since_epoch", "head": "<site>/h<k>", "label_from", "label_to",
        "types_from", "types_to", "hsi_from", "hsi_to"}``.
    """
    if previous is None:
        return []
    events = []
    for site_info in entry["sites"]:
        site = site_info["name"]
        old_labels = previous["labels"].get(site, [])
        for h in range(min(site_info["num_heads"], len(old_labels))):
            before = (old_labels[h], previous["types"][site][h], previous["hsi"][site][h])
            after = (entry["labels"][site][h], entry["types"][site][h], entry["hsi"][site][h])
            if (
                before[0] == after[0]
                and set(before[1]) == set(after[1])
                and _specialized(before[2], hsi_threshold) == _specialized(after[2], hsi_threshold)
            ):
                continue
            events.append(
                {
                    "epoch": entry["epoch"],
                    "since_epoch": previous["epoch"],
                    "head": f"{site}/h{h}",
                    "label_from": before[0],
                    "label_to": after[0],
                    "types_from": list(before[1]),
                    "types_to": list(after[1]),
                    "hsi_from": before[2],
                    "hsi_to": after[2],
                }
            )
    return events


def event_rows(events: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Table rows (:data:`EVENT_COLUMNS`) of ``events``."""
    return [[", ".join(e[c]) if c.startswith("types") else e[c] for c in EVENT_COLUMNS] for e in events]


def importance_record(
    raw: Mapping[str, Tensor], sites: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, list[float]]]:
    """``{"importance": {site: [raw]}, "importance_normalized": {site: [normalized]}}`` in ``sites`` order,
    normalized by :func:`~lightning_attn.functional.importance.normalize_head_importance` over the sites that have
    a defined importance (NaN elsewhere)."""
    names = [s["name"] for s in sites]
    scored = [n for n in names if n in raw and not torch.isnan(raw[n]).any()]
    normalized = dict(zip(scored, normalize_head_importance([raw[n] for n in scored]), strict=True))
    nan_row = lambda n: [math.nan] * next(s["num_heads"] for s in sites if s["name"] == n)  # noqa: E731
    return {
        "importance": {n: raw[n].double().tolist() if n in raw else nan_row(n) for n in names},
        "importance_normalized": {n: normalized[n].tolist() if n in normalized else nan_row(n) for n in names},
    }


def prunable_heads(entry: Mapping[str, Any]) -> list[list[Any]]:
    """Rows (:data:`PRUNABLE_COLUMNS`) of the heads with a defined importance, least important first, with the
    cumulative share of the model's normalized importance that pruning them up to that row removes."""
    heads, raw, normalized, labels = [], [], [], []
    for site_info in entry["sites"]:
        site = site_info["name"]
        for h, value in enumerate(entry["importance_normalized"][site]):
            if math.isfinite(value):
                heads.append(f"{site}/h{h}")
                raw.append(entry["importance"][site][h])
                normalized.append(value)
                labels.append(entry["labels"][site][h])
    order, share = pruning_order(torch.tensor(normalized, dtype=torch.float64))
    return [
        [rank + 1, heads[i], labels[i], raw[i], normalized[i], float(share[rank])]
        for rank, i in enumerate(order.tolist())
    ]


def add_head_history(registry: dict[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add to each head of ``registry`` its ``label_history`` (``[{"epoch", "label", "types"}]`` over ``records``,
    oldest first) and, when the registry's record has it, ``importance`` (``{"raw", "normalized"}``)."""
    ordered = sorted(records, key=lambda r: r["epoch"])
    latest = next((r for r in ordered if r["epoch"] == registry["epoch"]), ordered[-1])
    for layer in registry["layers"]:
        site = layer["site"]
        for head in layer["heads"]:
            h = head["head"]
            head["label_history"] = [
                {"epoch": r["epoch"], "label": r["labels"][site][h], "types": list(r["types"][site][h])}
                for r in ordered
                if h < len(r["labels"].get(site, []))
            ]
            if "importance" in latest:
                raw, normalized = latest["importance"][site][h], latest["importance_normalized"][site][h]
                head["importance"] = {
                    "raw": raw if math.isfinite(raw) else None,
                    "normalized": normalized if math.isfinite(normalized) else None,
                }
    return registry
