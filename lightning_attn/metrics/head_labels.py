"""Head labels: structural head types, feature labels, the HSI reading and :func:`analyze_heads`, which turns
one epoch's computed sums into HSI, primary features, types and labels."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

#: Structural head types, in the priority order used for labels (first match wins).
HEAD_TYPES: tuple[str, ...] = ("induction", "duplicate_token", "previous_token", "sink", "broad")

#: ``type -> (label, description)`` of the structural labels.
STRUCTURAL_LABELS: dict[str, tuple[str, str]] = {
    "induction": (
        "Induction head",
        "Attends to the token right after an earlier occurrence of the current token (A B ... A -> B)",
    ),
    "duplicate_token": ("Duplicate-token head", "Attends to earlier occurrences of the current token"),
    "previous_token": ("Previous-token head", "Attends to the immediately preceding token"),
    "sink": ("Sink head", "Puts most of its attention on the first token (attention sink / [CLS] / BOS)"),
    "broad": ("Broad head", "Spreads its attention almost uniformly over the keys (bag-of-context)"),
}

#: Label of a head with no feature correlation above the HSI threshold and no structural type.
GENERAL_LABEL: tuple[str, str] = ("General context", "Diffuse or mixed attention, no clear specialization")


class FeatureLabel(NamedTuple):
    """What a head that tracks a feature is called: ``label``, ``description`` and the ``expected_sign`` of the
    correlation (``-1``, ``+1``, or ``0`` for either)."""

    label: str
    description: str
    expected_sign: int


def specialization_level(hsi: float | None) -> str:
    """The notebook's reading of an HSI: ``strong`` (> 0.7), ``moderate`` (0.5-0.7), ``weak`` (0.3-0.5),
    ``none`` (< 0.3 or undefined)."""
    if hsi is None or not math.isfinite(hsi) or hsi < 0.3:
        return "none"
    return "strong" if hsi > 0.7 else "moderate" if hsi >= 0.5 else "weak"


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, float) and math.isfinite(value)


def analyze_heads(
    entry: dict[str, Any],
    *,
    hsi_threshold: float = 0.3,
    thresholds: Mapping[str, float] | None = None,
    feature_labels: Mapping[str, FeatureLabel | Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Add HSI, primary feature, structural types and labels to an epoch ``entry`` (in place; returned).

    Definitions, per head:

    - ``corr_f``: Pearson correlation over the epoch's samples between the head's summary and feature ``f``
      (NaN where undefined: fewer than 2 samples, or a constant summary or feature);
    - ``HSI = max_f |corr_f|`` over the features with a defined correlation (``None`` if there is none);
      ``primary_feature = argmax_f |corr_f|``, ``correlation = corr_primary`` (signed);
    - type scores: ``previous_token``, ``duplicate_token``, ``induction`` (TransformerLens ``mul`` scores),
      ``sink`` = mean first-token mass, ``broad`` = mean normalized entropy; a head *is* of a type when its
      score is at least ``thresholds[type]``;
    - label: if ``HSI >= hsi_threshold``, the feature label of ``feature_labels[primary]`` (with
      ``" (inverted)"`` appended when the correlation's sign contradicts a non-zero expected sign; a feature
      without an entry gets ``"<Feature> Head"``); else the first structural type in :data:`HEAD_TYPES` order;
      else ``"General context"``.
    """
    thresholds = dict(thresholds or {})
    labels_by_feature = {name: FeatureLabel(*value) for name, value in (feature_labels or {}).items()}
    entry["hsi"], entry["primary_feature"], entry["correlation"] = {}, {}, {}
    entry["types"], entry["labels"], entry["descriptions"] = {}, {}, {}
    for site_info in entry["sites"]:
        site = site_info["name"]
        heads = site_info["num_heads"]
        stats = entry["statistics"][site]
        scores = entry["type_scores"][site]
        scores["sink"] = list(stats["first_token"])
        scores["broad"] = list(stats["entropy"])
        correlations = entry["correlations"].get(site, {})
        hsi_row, primary_row, corr_row, types_row, label_row, description_row = [], [], [], [], [], []
        for h in range(heads):
            defined = {f: values[h] for f, values in correlations.items() if _finite(values[h])}
            if defined:
                primary = max(defined, key=lambda f: abs(defined[f]))
                hsi, corr = abs(defined[primary]), defined[primary]
            else:
                primary, hsi, corr = None, None, None
            types = [
                t for t in HEAD_TYPES if t in thresholds and _finite(scores[t][h]) and scores[t][h] >= thresholds[t]
            ]
            if hsi is not None and primary is not None and hsi >= hsi_threshold:
                label, description = _feature_label(primary, corr, labels_by_feature.get(primary))
            elif types:
                label, description = STRUCTURAL_LABELS[types[0]]
            else:
                label, description = GENERAL_LABEL
            hsi_row.append(hsi)
            primary_row.append(primary)
            corr_row.append(corr)
            types_row.append(types)
            label_row.append(label)
            description_row.append(description)
        entry["hsi"][site], entry["primary_feature"][site], entry["correlation"][site] = hsi_row, primary_row, corr_row
        entry["types"][site], entry["labels"][site], entry["descriptions"][site] = types_row, label_row, description_row
    return entry


def _feature_label(feature: str, correlation: float, known: FeatureLabel | None) -> tuple[str, str]:
    sign = "+" if correlation >= 0 else "-"
    if known is None:
        title = feature.replace("_", " ").strip().title() or feature
        return f"{title} Head", f"Attention tracks {feature} (r {sign})"
    if known.expected_sign and (correlation >= 0) != (known.expected_sign > 0):
        return (
            f"{known.label} (inverted)",
            f"{known.description}; here inverted: correlation with {feature} is {sign}, "
            f"expected {'+' if known.expected_sign > 0 else '-'}",
        )
    return known.label, known.description
