"""What the report page shows beyond the summary's own tables: the probe samples' drill-down data (each input as
what it is: an image, a series, tokens), the one heads table (the report's per-head statistics joined with the
head-specialization registry when that callback ran) and the explorer's maps of the probe samples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lightning_attn.report import html as page
from lightning_attn.report.explorer import explorer_data
from lightning_attn.report.run import ReportRun, class_name

__all__ = [
    "HEAD_COLUMNS",
    "head_importance",
    "head_rows",
    "input_view",
    "probe_explorer",
    "probe_views",
    "registry_heads",
    "sample_rows",
]

#: Largest input drawn in the drill-down, in values (larger ones are subsampled with a stride).
MAX_INPUT_VALUES = 64 * 64 * 3
#: Lines of a series input drawn (the first features).
MAX_SERIES_LINES = 8

HEAD_COLUMNS = [
    "site",
    "head",
    "label",
    "types",
    "HSI",
    "primary feature",
    "entropy",
    "importance",
    "relevance share",
]


def registry_heads(document: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The heads of a report document's head-specialization registry by ``(site, head)`` (empty without one)."""
    registry = document.get("sections", {}).get("head_specialization", {}).get("registry")
    heads: dict[tuple[str, int], dict[str, Any]] = {}
    if isinstance(registry, dict):
        for layer in registry.get("layers", []):
            for head in layer.get("heads", []):
                heads[(str(layer.get("site")), int(head["head"]))] = head
    return heads


def head_importance(head: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(raw, normalized)`` head importance of a registry head (Michel et al. 2019: ``{"raw", "normalized"}``)."""
    value = head.get("importance")
    if isinstance(value, dict):
        return value.get("raw"), value.get("normalized")
    return value, None


def head_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """One row per (site, head): the registry's label, types, HSI and primary feature (empty without a
    head-specialization callback), the report's mean normalized entropy, the registry's normalized importance (raw
    when not normalized) and the probes' gradient-weighted relevance share."""
    registry = registry_heads({"sections": summary["sections"]})
    relevance = summary["saliency"]["head_relevance"]
    rows = []
    for site in summary["attention"]["sites"]:
        if "entropy_mean" not in site:
            continue
        share = relevance.get(site["name"], {}).get("share")
        for h, entropy in enumerate(site["entropy_mean"]):
            head = registry.get((site["name"], h), {})
            raw, normalized = head_importance(head)
            rows.append(
                [
                    site["name"],
                    h,
                    head.get("label"),
                    ", ".join(head.get("types") or []),
                    head.get("hsi"),
                    head.get("primary_feature"),
                    entropy,
                    normalized if normalized is not None else raw,
                    share[h] if share and h < len(share) else None,
                ]
            )
    return rows


def input_view(name: str, values: np.ndarray, feature_names: Sequence[str] | None) -> dict[str, Any]:
    """An input for the drill-down: ``image`` ([H, W], [C, H, W] or [H, W, C] with C in 1 or 3, values min-max
    scaled to [0, 1], channel-first) or ``series`` (positions x features, one line per feature; a vector is one
    line)."""
    array = np.asarray(values, dtype=np.float64)
    shape = list(array.shape)
    view: dict[str, Any] = {"name": name, "shape": shape}
    named = feature_names is not None and array.ndim >= 2 and len(feature_names) == array.shape[-1]
    if array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = np.moveaxis(array, -1, 0)
    image = (array.ndim == 3 and array.shape[0] in (1, 3)) or (array.ndim == 2 and not named and min(shape) >= 8)
    if image:
        if array.ndim == 2:
            array = array[None]
        stride = max(1, int(np.ceil(np.sqrt(array.size / MAX_INPUT_VALUES))))
        array = array[:, ::stride, ::stride]
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        view.update(
            kind="image",
            channels=int(array.shape[0]),
            height=int(array.shape[1]),
            width=int(array.shape[2]),
            values=np.round(scaled, 4).reshape(-1).tolist(),
            note=f"min {low:.3g} black, max {high:.3g} white" + (f", every {stride}th pixel" if stride > 1 else ""),
        )
        return view
    series = array.reshape(-1, 1) if array.ndim <= 1 else array.reshape(-1, array.shape[-1])
    stride = max(1, int(np.ceil(series.shape[0] / 512)))
    series = series[::stride, :MAX_SERIES_LINES]
    names = list(feature_names) if named and feature_names is not None else [str(i) for i in range(series.shape[1])]
    view.update(
        kind="series",
        length=int(series.shape[0]),
        features=names[: series.shape[1]],
        values=[np.round(series[:, f], 6).tolist() for f in range(series.shape[1])],
        note=", ".join(
            part
            for part in (
                f"every {stride}th position" if stride > 1 else "",
                f"first {MAX_SERIES_LINES} of {len(names)} features" if len(names) > MAX_SERIES_LINES else "",
            )
            if part
        ),
    )
    return view


def probe_views(run: ReportRun, summary: dict[str, Any]) -> dict[str, Any]:
    """The drill-down data of each probe sample, keyed by its sample index (as text): prediction, confidence, inputs
    (:func:`input_view`), the top features of each input's saliency, its position x feature saliency map and the
    token saliency when there is one."""
    names = run.class_names
    views: dict[str, Any] = {}
    for probe in summary["saliency"]["probes"]:
        sample = int(probe["sample"])
        inputs = run.probe_inputs.get(sample, {})
        views[str(sample)] = {
            "sample": sample,
            "target": class_name(names, probe["target"]),
            "predicted": class_name(names, probe["predicted"]),
            "confidence": probe["confidence"],
            "explained_class": class_name(names, probe["explained_class"]),
            "inputs": [
                input_view(name, values, probe["inputs"].get(name, {}).get("feature_names"))
                for name, values in inputs.items()
            ],
            "saliency": {name: entry["top"][:8] for name, entry in probe["inputs"].items()},
            "positions": {
                name: np.round(np.asarray(saliency, dtype=np.float64), 6).tolist()
                for name, entries in run.probe_positions.items()
                for index, saliency, _ in entries
                if index == sample
            },
            "tokens": {k: probe["tokens"][k] for k in ("tokens", "share", "attribution")}
            if probe.get("tokens")
            else None,
        }
    return views


def probe_explorer(run: ReportRun, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The explorer payload (:func:`~lightning_attn.report.explorer.explorer_data`) of the probe samples' maps at the
    report's epoch and at the earlier epochs of its stage (``run.earlier_maps``: the epoch slider), labelled by their
    tokens where the probes have them; ``None`` without maps at the report's epoch."""
    maps = {sample: sites for sample, sites in run.probe_maps.items() if sites}
    if not maps:
        return None
    names = run.class_names
    titles, tokens = {}, {}
    for probe in summary["saliency"]["probes"]:
        sample = int(probe["sample"])
        titles[sample] = (
            f"sample {sample}: target {class_name(names, probe['target'])}, "
            f"predicted {class_name(names, probe['predicted'])} ({probe['confidence']:.2f})"
        )
        if probe.get("tokens"):
            tokens[sample] = probe["tokens"]["tokens"]
    return explorer_data({**run.earlier_maps, run.epoch: maps}, titles=titles, tokens=tokens)


def sample_rows(
    columns: Sequence[str], rows: Iterator[list[str]], count: int, probes: set[int]
) -> Iterator[dict[str, Any]]:
    """The first ``count`` rows of ``samples.csv`` (``rows``, after its header ``columns``) as the template's rows:
    filter attributes (sample, correct, target, confidence), a CSS class (wrong, probe) and the cells as ``(text,
    exact)`` (``exact``: the number as written, for sorting; ``None`` for text)."""
    where = {name: columns.index(name) for name in ("sample", "correct", "target", "confidence")}
    for index, row in enumerate(rows):
        if index >= count:
            return
        css = []
        if row[where["correct"]] in ("0", "false", "False"):
            css.append("wrong")
        if row[where["sample"]].isdigit() and int(row[where["sample"]]) in probes:
            css.append("probe")
        yield {
            "sample": row[where["sample"]],
            "correct": row[where["correct"]],
            "target": row[where["target"]],
            "confidence": row[where["confidence"]],
            "css": " ".join(css),
            "cells": [page.cell(value) for value in row],
        }
