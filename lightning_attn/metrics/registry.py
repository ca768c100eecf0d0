"""The head-function registry: one analyzed epoch as the JSON document of
``lightning_attn/report/head_functions.schema.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_attn.metrics.head_labels import FeatureLabel, specialization_level
from lightning_attn.metrics.head_types import TYPE_SCORES

#: Version of the registry layout (``lightning_attn/report/head_functions.schema.json``).
REGISTRY_SCHEMA_VERSION = 1

#: The registry's JSON schema (draft 2020-12), shipped with the package.
REGISTRY_SCHEMA_PATH = Path(__file__).resolve().parent.parent / "report" / "head_functions.schema.json"


def registry_schema() -> dict[str, Any]:
    """The head-function registry's JSON schema, for ``jsonschema.validate(registry, registry_schema())``."""
    return json.loads(REGISTRY_SCHEMA_PATH.read_text())


def build_registry(
    entry: Mapping[str, Any],
    *,
    hsi_threshold: float,
    thresholds: Mapping[str, float],
    feature_labels: Mapping[str, FeatureLabel | Sequence[Any]],
    features: Sequence[str],
    summary: str,
) -> dict[str, Any]:
    """The head-function registry of an analyzed epoch ``entry`` (see :func:`analyze_heads`), JSON-ready.

    Layout (``lightning_attn/report/head_functions.schema.json``)::

        {"schema_version": 1, "generator": "lightning_attn.HeadSpecializationTracker",
         "stage": "val", "epoch": 3, "global_step": 120, "summary": "auto",
         "coverage": {"batches": 8, "batches_seen": 48, "rows": {site: rows}},
         "hsi_threshold": 0.3, "thresholds": {type: threshold},
         "features": {name: {"label", "description", "expected_sign"}},
         "layers": [{"layer": 0, "site": "...", "kind": "self", "num_heads": H, "heads": [
             {"id": "<site>/h<k>", "head": k, "label", "description", "hsi", "specialization",
              "primary_feature", "correlation", "correlations": {feature: r},
              "type_scores": {type: score}, "types": [type], "statistics": {stat: value},
              "redundant_with": [id]}]}],
         "clusters": [[id]]}

    ``coverage`` (:func:`~lightning_attn.metrics.coverage.coverage_record`) only when ``entry`` has one. Undefined
    numbers (NaN) are ``null``.
    """
    from lightning_attn.sinks import to_jsonable

    labels_by_feature = {name: FeatureLabel(*value) for name, value in feature_labels.items()}
    clusters = [list(c) for c in entry.get("clusters") or []]
    partners: dict[str, list[str]] = {}
    for cluster in clusters:
        for member in cluster:
            partners[member] = [m for m in cluster if m != member]
    layers = []
    for index, site_info in enumerate(entry["sites"]):
        site = site_info["name"]
        heads = []
        for h in range(site_info["num_heads"]):
            head_id = f"{site}/h{h}"
            hsi = entry["hsi"][site][h]
            heads.append(
                {
                    "id": head_id,
                    "head": h,
                    "label": entry["labels"][site][h],
                    "description": entry["descriptions"][site][h],
                    "hsi": hsi,
                    "specialization": specialization_level(hsi),
                    "primary_feature": entry["primary_feature"][site][h],
                    "correlation": entry["correlation"][site][h],
                    "correlations": {f: values[h] for f, values in entry["correlations"].get(site, {}).items()},
                    "type_scores": {t: entry["type_scores"][site][t][h] for t in (*TYPE_SCORES, "sink", "broad")},
                    "types": list(entry["types"][site][h]),
                    "statistics": {s: values[h] for s, values in entry["statistics"][site].items()},
                    "redundant_with": partners.get(head_id, []),
                }
            )
        layers.append(
            {
                "layer": index,
                "site": site,
                "kind": site_info["kind"],
                "num_heads": site_info["num_heads"],
                "heads": heads,
            }
        )
    registry = {
        "schema_version": REGISTRY_SCHEMA_VERSION,
        "generator": "lightning_attn.HeadSpecializationTracker",
        "stage": entry.get("stage"),
        "epoch": entry.get("epoch"),
        "global_step": entry.get("global_step"),
        "summary": summary,
        "hsi_threshold": hsi_threshold,
        "thresholds": dict(thresholds),
        "features": {
            f: (
                {
                    "label": labels_by_feature[f].label,
                    "description": labels_by_feature[f].description,
                    "expected_sign": labels_by_feature[f].expected_sign,
                }
                if f in labels_by_feature
                else {"label": None, "description": None, "expected_sign": 0}
            )
            for f in features
        },
        "layers": layers,
        "clusters": clusters,
    }
    if entry.get("coverage") is not None:
        registry["coverage"] = {**entry["coverage"], "rows": dict(entry["coverage"].get("rows", {}))}
    return to_jsonable(registry)


def registry_table(registry: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The registry as one row per head, every column sortable in a W&B table: who it is (site, head), what it does
    (label, types, HSI, primary feature and its correlation) and its row statistics."""
    statistics = list(registry["layers"][0]["heads"][0]["statistics"]) if registry["layers"] else []
    columns = ["site", "head", "label", "types", "hsi", "primary_feature", "correlation", *statistics]
    rows = [
        [
            layer["site"],
            head["head"],
            head["label"],
            ", ".join(head["types"]),
            head["hsi"],
            head["primary_feature"],
            head["correlation"],
            *(head["statistics"].get(name) for name in statistics),
        ]
        for layer in registry["layers"]
        for head in layer["heads"]
    ]
    return columns, rows
