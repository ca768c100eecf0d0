"""The numbers of a finished report: the summary that ``report.json`` holds (dataset, calibration, batches,
correct-vs-incorrect, class-wise, attention, saliency, the other callbacks' sections, notes), the tables of its
CSV files, and the conversion of any value to plain JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lightning_attn.callbacks.base import STAGE_KEYS
from lightning_attn.report.run import ReportRun, calibration, class_name

__all__ = ["SCHEMA_VERSION", "callable_name", "jsonable", "other_sections", "summarize", "tables"]

#: Version of report.json's layout; report.schema.json describes it. Minor: additions; major: breaking changes.
SCHEMA_VERSION = "1.0"


def summarize(
    run: ReportRun,
    config: dict[str, Any],
    sections: dict[str, Any],
    *,
    title: str,
    calibration_bins: int,
    saliency_target: str,
) -> dict[str, Any]:
    """The summary of a finished ``run`` (report.json without ``files`` and ``provenance``), with the report's
    ``config``, the ``sections`` of the other callbacks (:func:`other_sections`) and the report's ``title``,
    ``calibration_bins`` and ``saliency_target``."""
    arrays = run.class_arrays
    n = int(arrays["support"].sum())
    group = run.stats.summary()
    measures = calibration(run)
    dataset = {
        "num_samples": n,
        "num_batches": len(run.batch_rows),
        "num_classes": run.num_classes,
        "accuracy": float(arrays["tp"].sum() / n),
        "mean_confidence": group["confidence"]["all"]["mean"],
        "mean_margin": group["margin"]["all"]["mean"],
        "mean_output_entropy": group["output_entropy"]["all"]["mean"],
        "nll": float(measures["nll"]),
        "brier": float(measures["brier"]),
        "ece": float(measures["ece"]),
        "mce": float(measures["mce"]),
        "num_correct": int(arrays["tp"].sum()),
        "num_incorrect": n - int(arrays["tp"].sum()),
    }
    classes = []
    for k in range(run.num_classes):
        support, predicted, tp = int(arrays["support"][k]), int(arrays["predicted"][k]), int(arrays["tp"][k])
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision and recall
            else (0.0 if precision is not None and recall is not None else None)
        )
        classes.append(
            {
                "class": k,
                "name": class_name(run.class_names, k),
                "support": support,
                "predicted": predicted,
                "correct": tp,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "mean_confidence_true": arrays["conf_true"][k] / support if support else None,
                "mean_confidence_predicted": arrays["conf_pred"][k] / predicted if predicted else None,
                "mean_attention_entropy": arrays["entropy_true"][k] / arrays["entropy_count"][k]
                if arrays["entropy_count"][k]
                else None,
            }
        )
    sites = []
    for site in run.sites:
        sums = run.heads.get(site)
        info = run.site_info.get(site, {})
        entry: dict[str, Any] = {
            "name": site,
            "kind": info.get("kind"),
            "source": info.get("source"),
            "module_type": info.get("module_type"),
            "num_heads": info.get("num_heads"),
            "num_queries": info.get("num_queries"),
            "num_keys": info.get("num_keys"),
        }
        if sums is not None and sums.n:
            mean = sums.total / sums.n
            n_inc = sums.n - sums.n_correct
            entry.update(
                {
                    "num_samples": sums.n,
                    "entropy_mean": mean.tolist(),
                    "entropy_std": np.sqrt(np.maximum(sums.total_sq / sums.n - mean * mean, 0)).tolist(),
                    "entropy_mean_correct": (sums.total_correct / sums.n_correct).tolist()
                    if sums.n_correct
                    else [None] * sums.heads,
                    "entropy_mean_incorrect": (sums.total_incorrect / n_inc).tolist() if n_inc else [None] * sums.heads,
                    "focused_share": (sums.focused / sums.n).tolist(),
                    "most_focused_head": int(mean.argmin()),
                }
            )
        sites.append(entry)
    modality = {
        pair: {"sites": [a, b], **group.get(f"agreement/{pair}", {"all": {"n": 0, "mean": None, "std": None}})}
        for pair, (a, b) in run.modality.items()
    }
    edges, counts = measures["bin_edges"].tolist(), measures["bin_count"].tolist()
    accuracy, confidence = measures["bin_accuracy"].tolist(), measures["bin_confidence"].tolist()
    bin_rows = [
        {
            "lower": edges[b],
            "upper": edges[b + 1],
            "count": int(counts[b]),
            "accuracy": accuracy[b] if counts[b] else None,
            "confidence": confidence[b] if counts[b] else None,
            "correct": round(accuracy[b] * counts[b]) if counts[b] else 0,
            "incorrect": int(counts[b]) - round(accuracy[b] * counts[b]) if counts[b] else 0,
        }
        for b in range(calibration_bins)
    ]
    batch_acc = [row[2] for row in run.batch_rows]
    batches = {
        "count": len(run.batch_rows),
        "columns": ["batch", "samples", "accuracy", "mean_confidence", "mean_attention_entropy", "rank"],
        "rows": run.batch_rows,
        "accuracy": _moments(batch_acc),
        "mean_confidence": _moments([row[3] for row in run.batch_rows]),
    }
    saliency = _saliency_summary(run, saliency_target)
    return {
        "schema_version": SCHEMA_VERSION,
        "title": title,
        "stage": run.stage,
        "stage_key": run.key,
        "dataloader_idx": run.dataloader_idx,
        "config": config,
        "dataset": dataset,
        "calibration": {
            "n_bins": calibration_bins,
            "ece": float(measures["ece"]),
            "mce": float(measures["mce"]),
            "bins": bin_rows,
        },
        "batches": batches,
        "correct_vs_incorrect": group,
        "classwise": classes,
        "attention": {"sites": sites, "pair_sites": run.pair_sites, "modality_pairs": modality},
        "saliency": saliency,
        "sections": sections,
        "notes": list(run.notes),
        "samples": {"file": "samples.csv", "rows": run.count, "columns": run.columns},
    }


def _saliency_summary(run: ReportRun, target: str) -> dict[str, Any]:
    probes = run.probes
    inputs: dict[str, Any] = {}
    for probe in probes:
        for name, entry in probe["inputs"].items():
            agg = inputs.setdefault(name, {"feature_names": entry["feature_names"], "shares": []})
            if len(entry["share"]) == len(agg["feature_names"]):
                agg["shares"].append(entry["share"])
    aggregate = {}
    for name, agg in inputs.items():
        mean = np.mean(np.array(agg["shares"]), axis=0) if agg["shares"] else np.zeros(len(agg["feature_names"]))
        order = np.argsort(-mean)[:10]
        aggregate[name] = {
            "feature_names": agg["feature_names"],
            "mean_share": mean.tolist(),
            "top": [[agg["feature_names"][i], float(mean[i])] for i in order],
        }
    relevance: dict[str, Any] = {}
    for probe in probes:
        for site, values in probe["head_relevance"].items():
            relevance.setdefault(site, []).append(values)
    head_relevance = {}
    for site, rows in relevance.items():
        if len({len(r) for r in rows}) != 1:
            continue
        mean = np.mean(np.array(rows, dtype=np.float64), axis=0)
        total = mean.sum()
        head_relevance[site] = {
            "mean": mean.tolist(),
            "share": (mean / total).tolist() if total > 0 else [0.0] * len(mean),
        }
    rollout_sites: list[str] = next((p["rollout"]["sites"] for p in probes if p["rollout"] is not None), [])
    return {
        "target": target,
        "method": {
            "inputs": "gradient x input (x * d score / d x), |.| summed over all but the last (feature) axis; "
            "share of the input's total",
            "rollout": "gradient-weighted attention rollout: mean_h(max(A * dA, 0)) per layer, 0.5 identity, rows "
            "renormalized",
            "head_relevance": "sum over (query, key) of max(A * dA, 0), mean over probes; share within the site",
        },
        "num_probes": len(probes),
        "probes": probes,
        "aggregate": aggregate,
        "head_relevance": head_relevance,
        "rollout_sites": rollout_sites,
    }


def other_sections(callbacks: Iterable[Any], run: ReportRun, skip: type) -> dict[str, Any]:
    """``.results`` and ``registry()`` of the other lightning_attn callbacks of the Trainer (any that exist);
    instances of ``skip`` (the reports) are left out."""
    sections: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, skip):
            continue
        has_results = hasattr(callback, "results")
        registry = getattr(callback, "registry", None)
        if not has_results and not callable(registry):
            continue
        name = _section_name(callback)
        entry: dict[str, Any] = {"callback": f"{type(callback).__module__}.{type(callback).__qualname__}"}
        try:
            if has_results:
                entry["results"] = jsonable(_pick_stage(callback.results, run))
            if callable(registry):
                try:
                    value = registry(run.key)
                except TypeError:
                    value = registry()
                entry["registry"] = jsonable(value)
        except Exception as error:  # another callback's state must never break the report
            entry["error"] = f"{type(error).__name__}: {error}"
        key, i = name, 2
        while key in sections:
            key, i = f"{name}_{i}", i + 1
        sections[key] = entry
    return sections


def tables(summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The CSV tables of a summary, ``{file name: (columns, rows)}``: per head, class-wise, per batch, saliency."""
    relevance = summary["saliency"]["head_relevance"]
    head_rows = []
    for site in summary["attention"]["sites"]:
        if "entropy_mean" not in site:
            continue
        rel = relevance.get(site["name"], {})
        for h in range(len(site["entropy_mean"])):
            head_rows.append(
                [
                    site["name"],
                    h,
                    site["num_samples"],
                    site["entropy_mean"][h],
                    site["entropy_std"][h],
                    site["entropy_mean_correct"][h],
                    site["entropy_mean_incorrect"][h],
                    site["focused_share"][h],
                    rel.get("mean", [None] * (h + 1))[h] if rel else None,
                    rel.get("share", [None] * (h + 1))[h] if rel else None,
                ]
            )
    class_columns = [
        "class",
        "name",
        "support",
        "predicted",
        "correct",
        "precision",
        "recall",
        "f1",
        "mean_confidence_true",
        "mean_confidence_predicted",
        "mean_attention_entropy",
    ]
    saliency_rows = []
    for probe in summary["saliency"]["probes"]:
        for name, entry in probe["inputs"].items():
            for i, feature in enumerate(entry["feature_names"]):
                saliency_rows.append(
                    [
                        probe["sample"],
                        probe["explained_class"],
                        name,
                        i,
                        feature,
                        entry["share"][i],
                        entry["abs"][i],
                        entry["signed"][i],
                    ]
                )
    return {
        "per_head.csv": (
            [
                "site",
                "head",
                "num_samples",
                "entropy_mean",
                "entropy_std",
                "entropy_mean_correct",
                "entropy_mean_incorrect",
                "focused_share",
                "relevance",
                "relevance_share",
            ],
            head_rows,
        ),
        "classwise.csv": (class_columns, [[c[k] for k in class_columns] for c in summary["classwise"]]),
        "batches.csv": (summary["batches"]["columns"], summary["batches"]["rows"]),
        "saliency.csv": (
            ["sample", "explained_class", "input", "feature_index", "feature", "share", "abs", "signed"],
            saliency_rows,
        ),
    }


# -----------------------------------------------------------------------------------------------------------------
# helpers
# -----------------------------------------------------------------------------------------------------------------
def callable_name(fn: Any) -> str | None:
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)})"
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


def _moments(values: Sequence[float]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {"mean": None, "std": None, "min": None, "max": None}
    array = np.asarray(clean, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _section_name(callback: Any) -> str:
    name = type(callback).__name__.lower()
    if "calibration" in name:
        return "calibration"
    if "head" in name and "special" in name:
        return "head_specialization"
    if "attention" in name:
        return "attention"
    return type(callback).__name__


def _pick_stage(results: Any, run: ReportRun) -> Any:
    if isinstance(results, Mapping):
        for key in (run.key, STAGE_KEYS.get(run.stage), run.stage):
            if key is not None and key in results:
                return results[key]
    return results


def jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON types from tensors, arrays, dataclasses, objects with ``to_dict()``, enums and paths; NaN and
    infinities become ``None``; anything else its ``repr``."""
    if depth > 32:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return jsonable(value.detach().cpu().tolist(), depth + 1)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v, depth + 1) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return jsonable(to_dict(), depth + 1)
        except Exception:
            pass
    if callable(value):
        return callable_name(value)
    return repr(value)
