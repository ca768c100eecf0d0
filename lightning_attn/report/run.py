"""The state of one explainability report while its loop runs (:class:`ReportRun`) and what each batch adds to it:
the per-sample rows streamed to ``samples.csv.part``, the streamed sums (correct-vs-incorrect moments, class-wise,
calibration and per-head sums, per-batch rows, the inputs hash) and the saliency probes; last, the scalars logged
from those sums.

Nothing here touches the model or the Trainer: :class:`~lightning_attn.report.callback.ExplainabilityReport` gets the
probabilities, targets and attention of a batch and hands them to :func:`add_batch`.

For **every evaluated sample** one row is streamed to ``samples.csv`` as its batch ends (nothing per
sample is held in memory): predicted class, confidence (max probability), true class, correct, margin
(top-1 minus top-2 probability), normalized predictive entropy, NLL, Brier score, its equal-width
calibration bin; per attention site the mean normalized attention entropy over heads (each head's mean
over valid query rows, Clark et al. 2019), the most focused head (lowest entropy) and its entropy; the
top attention pairs (``query>key:weight`` of the head-averaged map) of the chosen ``pair_sites``; and the
modality agreement of each declared pair (:func:`~lightning_attn.functional.modality_agreement`); the
SHA-256 of its model inputs (``input_sha256``, 16 hex digits: ``lightning-attn compare`` matches samples by it);
last, the global ``rank`` that evaluated it (0 in a single process).

Streamed statistics: dataset-level accuracy, mean confidence, ECE/MCE over ``calibration_bins``
equal-width bins (Guo et al. 2017; bins as torchmetrics and the calibration callback), NLL, Brier;
per-batch rows; a correct-vs-incorrect comparison of every per-sample measure (n, mean, std per group,
difference and effect size); a class-wise table (support, predictions, precision, recall, F1, mean
confidence and attention entropy); per site and head the mean entropy, its correct/incorrect means and
how often the head is the sample's most focused one.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from lightning_attn.functional.calibration import brier_score, equal_width_bin_index, negative_log_likelihood
from lightning_attn.metrics import CalibrationMetric
from lightning_attn.plots import report as plots
from lightning_attn.report.explain import (
    BatchAttention,
    ReportError,
    pair_agreement,
    resolve_modality_pairs,
)
from lightning_attn.report.group_statistics import GroupStatistics
from lightning_attn.report.provenance import StreamHasher

__all__ = [
    "NAMESPACE",
    "HeadSums",
    "ReportRun",
    "add_batch",
    "calibration",
    "class_name",
    "csv_cell",
    "keep_finite_rows",
    "record_probes",
    "scalars",
    "skip_rows",
]

#: Namespace of the report: the prefix of its logged scalars and the folder of its default output directory.
NAMESPACE = "report"
#: Attention weights of the probe samples kept for the explorer, in all (BERT-base, 4 probes at 128 tokens: 9.4 M);
#: the maps of later probes beyond it are left out (a note says so), which bounds host memory and the page's size.
MAX_PROBE_MAP_VALUES = 10_000_000


@dataclass
class HeadSums:
    """Per-head sums of one site's per-sample attention entropy: over all samples (``total``, ``total_sq``), over
    correct and incorrect ones, and how often each head was a sample's most focused (lowest entropy) head."""

    heads: int
    n: int = 0
    n_correct: int = 0
    total: np.ndarray = None  # type: ignore[assignment]
    total_sq: np.ndarray = None  # type: ignore[assignment]
    total_correct: np.ndarray = None  # type: ignore[assignment]
    total_incorrect: np.ndarray = None  # type: ignore[assignment]
    focused: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("total", "total_sq", "total_correct", "total_incorrect", "focused"):
            setattr(self, name, np.zeros(self.heads, dtype=np.float64))

    def merge(self, other: HeadSums) -> bool:
        """Add ``other``'s sums (another rank's); ``False`` (nothing added) when the head counts differ."""
        if other.heads != self.heads:
            return False
        self.n += other.n
        self.n_correct += other.n_correct
        for name in ("total", "total_sq", "total_correct", "total_incorrect", "focused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return True


@dataclass
class ReportRun:
    """State of one report (one stage and dataloader) while the loop runs; host-side, bounded by the number of
    classes, sites, heads, batches and probe samples, never by the number of samples.

    Under DDP every rank holds one per dataloader: a non-zero rank's (``shard``) streams its rows to a file in a
    rank-local temporary directory (``tmp_dir``; ``final_dir`` is unused) and sends its sums and rows to rank zero
    at the end of the epoch, where they are merged into rank zero's (``input_digests`` then holds every rank's
    input hash, ``world_size`` the number of ranks)."""

    stage: str
    key: str
    dataloader_idx: int
    epoch: int
    final_dir: Path
    tmp_dir: Path
    started: str
    model_sha256: str
    model_class: str
    samples_handle: IO[str] | None = None
    samples_writer: Any = None
    columns: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    site_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    pair_sites: list[str] = field(default_factory=list)
    modality: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    count: int = 0
    num_classes: int = 0
    stats: GroupStatistics = field(default_factory=GroupStatistics)
    class_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    calibration_metric: CalibrationMetric | None = None  # the dataset's calibration, the CalibrationMonitor's metric
    heads: dict[str, HeadSums] = field(default_factory=dict)
    batch_rows: list[list[Any]] = field(default_factory=list)
    hasher: StreamHasher = field(default_factory=StreamHasher)
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_positions: dict[str, list[tuple[int, np.ndarray, bool]]] = field(default_factory=dict)
    probe_images: dict[int, np.ndarray] = field(default_factory=dict)  # input images of Grad-CAM probes, by sample
    probe_maps: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # by sample: site -> [H, Q, K]
    # the probe maps of this stage's earlier reports, by epoch (the explorer's epoch slider)
    earlier_maps: dict[int, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    probe_inputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # by sample: input name -> values
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    checkpoint: str | None = None  # the evaluated checkpoint file (``trainer.test(ckpt_path=...)``), else None
    finished: bool = False
    rank: int = 0
    shard: bool = False
    world_size: int = 1
    input_digests: list[tuple[int, str, int]] = field(default_factory=list)
    skipped_rows: list[tuple[int, list[int]]] = field(default_factory=list)

    def open_samples(self) -> None:
        """Start ``samples.csv.part`` in ``tmp_dir`` with the header ``columns``."""
        self.samples_handle = (self.tmp_dir / "samples.csv.part").open("w", newline="", encoding="utf-8")
        self.samples_writer = csv.writer(self.samples_handle)
        self.samples_writer.writerow(self.columns)

    def close_samples(self) -> None:
        """Close ``samples.csv.part`` if it is open."""
        if self.samples_handle is not None:
            self.samples_handle.close()
            self.samples_handle = None


def keep_finite_rows(
    run: ReportRun, batch_idx: int, probs: Tensor, target: Tensor, attention: BatchAttention | None
) -> tuple[list[int], Tensor, Tensor, str | None]:
    """Leave out the rows of a batch whose probabilities are not all finite (NaN or Inf model outputs): returns the
    kept rows' indices, their ``probs`` and ``target``, and the run's note on the skipped rows when this batch had
    any (``None`` otherwise); ``attention`` keeps only the kept rows too."""
    finite = torch.isfinite(probs).all(1)
    if bool(finite.all()):
        return list(range(probs.shape[0])), probs, target, None
    rows = finite.nonzero()[:, 0]
    kept = rows.tolist()
    note = skip_rows(run, batch_idx, sorted(set(range(probs.shape[0])) - set(kept)))
    if attention is not None:
        attention.select(rows)
    return kept, probs[rows], target[rows], note


def skip_rows(run: ReportRun, batch_idx: int, rows: list[int]) -> str:
    """Record that the rows ``rows`` of batch ``batch_idx`` had non-finite probabilities and were left out, and keep
    one note in ``run.notes`` that counts and names every such row so far; returns that note."""
    run.skipped_rows.append((batch_idx, rows))
    count = sum(len(r) for _, r in run.skipped_rows)
    named = "; ".join(
        f"batch {b} row{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for b, r in run.skipped_rows[:20]
    )
    more = f"; and {len(run.skipped_rows) - 20} more batches" if len(run.skipped_rows) > 20 else ""
    note = (
        f"{count} sample{'s' if count > 1 else ''} with non-finite model outputs (NaN or Inf probabilities) "
        f"left out of every statistic and of samples.csv ({named}{more}; rows counted from 0 within the batch)"
    )
    run.notes[:] = [n for n in run.notes if not n.endswith(_SKIPPED_SUFFIX)] + [note]
    return note


_SKIPPED_SUFFIX = "; rows counted from 0 within the batch)"


def class_name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return value


def calibration(run: ReportRun) -> dict[str, Tensor]:
    """The dataset-level calibration of ``run`` (ECE, MCE, NLL, Brier, the reliability bins ``bin_*``: what
    :meth:`~lightning_attn.metrics.CalibrationMetric.compute` gives, on the host), from the same metric as the
    CalibrationMonitor."""
    if run.calibration_metric is None:
        raise ReportError(f"no samples were evaluated for the {run.key} report")
    return {name: value.detach().cpu() for name, value in run.calibration_metric.compute().items()}


def scalars(runs: Iterable[ReportRun]) -> dict[str, float]:
    """``report/<key>/accuracy`` and ``report/<key>/ece`` of the runs that saw samples."""
    logged = {}
    for run in runs:
        n = run.class_arrays.get("support", np.zeros(0)).sum()
        if n:
            logged[f"{NAMESPACE}/{run.key}/accuracy"] = float(run.class_arrays["tp"].sum() / n)
            logged[f"{NAMESPACE}/{run.key}/ece"] = float(calibration(run)["ece"])
    return logged


# -----------------------------------------------------------------------------------------------------------------
# per batch
# -----------------------------------------------------------------------------------------------------------------
def add_batch(
    run: ReportRun,
    probs: Tensor,
    target: Tensor,
    batch: Any,
    batch_idx: int,
    attention: BatchAttention | None,
    *,
    calibration_bins: int,
    class_names: list[str] | None,
    modality_pairs: Mapping[str, tuple[str, str]],
    input_hashes: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Add one batch (``probs`` [B, C], class indices ``target`` [B], the recorded ``attention``) to ``run``: its rows
    to ``samples.csv.part``, its values to the sums, ``batch`` to the inputs hash. The first batch sets the run up
    (classes, sites, columns; ``class_names`` and ``modality_pairs`` as the report's arguments). ``input_hashes``: the
    samples' :func:`~lightning_attn.report.provenance.sample_hashes` (the ``input_sha256`` column). Returns the batch's
    per-sample values on the host (``confidence``, ``predicted``, ``target``, ``correct``, ...)."""
    batch_size, num_classes = probs.shape
    if run.num_classes == 0:
        _first_batch(run, num_classes, attention, class_names, modality_pairs)
    elif num_classes != run.num_classes:
        raise ReportError(f"the model gave {num_classes} classes in batch {batch_idx}, {run.num_classes} before")
    elif attention is not None and not set(attention.sites) <= set(run.sites):
        note = (
            f"batch {batch_idx} has attention sites the first batch had not "
            f"({sorted(set(attention.sites) - set(run.sites))[:5]}); "
            "per-sample columns follow the first batch's sites"
        )
        if not any(n.startswith("batch ") and "attention sites the first batch" in n for n in run.notes):
            run.notes.append(note)

    confidence, predicted = probs.max(1)
    correct = predicted == target
    top2 = probs.topk(min(2, num_classes), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if num_classes > 1 else 0)
    log_probs = probs.clamp_min(1e-12).log()
    output_entropy = -(probs * log_probs).sum(1) / math.log(max(num_classes, 2))
    nll = negative_log_likelihood(probs, target, score_type="probs", reduction="none")
    brier = brier_score(probs, target, reduction="none")
    bins = equal_width_bin_index(confidence.double().clamp(0, 1), calibration_bins).clamp(0, calibration_bins - 1)

    host = {
        name: value.detach().cpu()
        for name, value in dict(
            confidence=confidence,
            predicted=predicted,
            target=target,
            correct=correct,
            margin=margin,
            output_entropy=output_entropy,
            nll=nll,
            brier=brier,
            bins=bins,
        ).items()
    }
    correct_list = host["correct"].tolist()
    measures: dict[str, list[float]] = {
        k: host[k].double().tolist() for k in ("confidence", "margin", "output_entropy", "nll", "brier")
    }
    site_columns: dict[str, list[Any]] = {}
    site_mean_entropy: list[list[float]] = []
    for site in run.sites:
        sample = attention.sites.get(site) if attention is not None else None
        if sample is None:
            for suffix in ("entropy_mean", "focused_head", "focused_entropy"):
                site_columns[f"{site}/{suffix}"] = [None] * batch_size
            continue
        entropy = sample.entropy.detach().double().cpu()  # [B, H]
        mean = entropy.mean(1)
        focused_entropy, focused_head = entropy.min(1)
        site_columns[f"{site}/entropy_mean"] = mean.tolist()
        site_columns[f"{site}/focused_head"] = focused_head.tolist()
        site_columns[f"{site}/focused_entropy"] = focused_entropy.tolist()
        measures[f"{site}/entropy_mean"] = mean.tolist()
        measures[f"{site}/focused_entropy"] = focused_entropy.tolist()
        site_mean_entropy.append(mean.tolist())
        _update_heads(run, site, entropy, host["correct"])
    for site in run.pair_sites:
        sample = attention.sites.get(site) if attention is not None else None
        if sample is None or sample.top_values is None:
            site_columns[f"{site}/top_pairs"] = [None] * batch_size
        else:
            site_columns[f"{site}/top_pairs"] = [
                ";".join(f"{q}>{k}:{w:.4g}" for q, k, w in pairs) for pairs in sample.top_pairs()
            ]
    for pair, (site_a, site_b) in run.modality.items():
        values = pair_agreement(attention, site_a, site_b) if attention is not None else None
        agreement = values.detach().double().cpu().tolist() if values is not None else [None] * batch_size
        site_columns[f"agreement/{pair}"] = agreement
        measures[f"agreement/{pair}"] = [math.nan if v is None else v for v in agreement]

    site_columns["input_sha256"] = list(input_hashes) if input_hashes is not None else [None] * batch_size
    attention_entropy = (
        [sum(v) / len(v) for v in zip(*site_mean_entropy, strict=False)]
        if site_mean_entropy
        else [math.nan] * batch_size
    )
    for name, measure in measures.items():
        run.stats.add(name, measure, correct_list)

    # classwise and calibration sums
    t_list, p_list = host["target"].tolist(), host["predicted"].tolist()
    arrays = run.class_arrays
    for i in range(batch_size):
        t, p = t_list[i], p_list[i]
        arrays["support"][t] += 1
        arrays["predicted"][p] += 1
        arrays["tp"][t] += correct_list[i]
        arrays["conf_true"][t] += measures["confidence"][i]
        arrays["conf_pred"][p] += measures["confidence"][i]
        if math.isfinite(attention_entropy[i]):
            arrays["entropy_true"][t] += attention_entropy[i]
            arrays["entropy_count"][t] += 1
    if run.calibration_metric is None:
        run.calibration_metric = CalibrationMetric(
            "multiclass", num_classes=num_classes, score_type="probs", n_bins=calibration_bins, sync_on_compute=False
        )
    run.calibration_metric.update(probs.detach().double().cpu(), target.detach().cpu())

    # rows
    first_index = run.count
    names = run.class_names
    for i in range(batch_size):
        row: list[Any] = [first_index + i, batch_idx, t_list[i], p_list[i], int(correct_list[i])]
        row += [measures[k][i] for k in ("confidence", "margin", "output_entropy", "nll", "brier")]
        row.append(int(host["bins"][i]))
        if names is not None:
            row += [class_name(names, t_list[i]), class_name(names, p_list[i])]
        row += [site_columns[c][i] for c in run.columns[len(row) : -1]]
        row.append(run.rank)
        run.samples_writer.writerow([csv_cell(v) for v in row])
    run.count += batch_size
    finite_entropy = [v for v in attention_entropy if math.isfinite(v)]
    run.batch_rows.append(
        [
            batch_idx,
            batch_size,
            sum(correct_list) / batch_size,
            sum(measures["confidence"]) / batch_size,
            sum(finite_entropy) / len(finite_entropy) if finite_entropy else None,
            run.rank,
        ]
    )
    run.hasher.update(batch)
    return host


def _first_batch(
    run: ReportRun,
    num_classes: int,
    attention: BatchAttention | None,
    class_names: list[str] | None,
    modality_pairs: Mapping[str, tuple[str, str]],
) -> None:
    run.num_classes = num_classes
    run.class_names = class_names
    if class_names is not None and len(class_names) != num_classes:
        run.notes.append(f"class_names has {len(class_names)} names for {num_classes} classes; names not used")
        run.class_names = None
    run.class_arrays = {
        name: np.zeros(num_classes, dtype=np.float64)
        for name in ("support", "predicted", "tp", "conf_true", "conf_pred", "entropy_true", "entropy_count")
    }
    if attention is not None:
        run.sites = list(attention.sites)
        run.site_info = {s: dataclasses.asdict(attention.infos[s]) for s in run.sites}
        run.pair_sites = attention.pair_site_names()
        run.modality = resolve_modality_pairs(modality_pairs, run.sites)
    if not run.sites:
        run.notes.append("no attention was captured: the report has no attention measures (see the recorder's limits)")
    for pair, (a, b) in run.modality.items():
        if a is None or b is None:
            run.notes.append(f"modality pair {pair!r}: no site matches {modality_pairs[pair][0 if a is None else 1]!r}")
    columns = [
        "sample",
        "batch",
        "target",
        "predicted",
        "correct",
        "confidence",
        "margin",
        "output_entropy",
        "nll",
        "brier",
        "calibration_bin",
    ]
    if run.class_names is not None:
        columns += ["target_name", "predicted_name"]
    for site in run.sites:
        columns += [f"{site}/entropy_mean", f"{site}/focused_head", f"{site}/focused_entropy"]
    columns += [f"{site}/top_pairs" for site in run.pair_sites]
    columns += [f"agreement/{pair}" for pair in run.modality]
    columns += ["input_sha256", "rank"]
    run.columns = columns
    run.open_samples()


def _update_heads(run: ReportRun, site: str, entropy: Tensor, correct: Tensor) -> None:
    sums = run.heads.get(site)
    heads = entropy.shape[1]
    if sums is None:
        sums = run.heads[site] = HeadSums(heads)
    if sums.heads != heads:
        note = (
            f"site {site}: {heads} heads in a batch after {sums.heads} in the first; "
            "those batches are not in the per-head table"
        )
        if note not in run.notes:
            run.notes.append(note)
        return
    values = entropy.numpy()
    ok = correct.numpy().astype(bool)
    sums.n += values.shape[0]
    sums.n_correct += int(ok.sum())
    sums.total += values.sum(0)
    sums.total_sq += (values * values).sum(0)
    sums.total_correct += values[ok].sum(0)
    sums.total_incorrect += values[~ok].sum(0)
    np.add.at(sums.focused, values.argmin(1), 1)


# -----------------------------------------------------------------------------------------------------------------
# saliency probes
# -----------------------------------------------------------------------------------------------------------------
def record_probes(
    run: ReportRun,
    result: Mapping[str, Any],
    positions: list[int],
    first_index: int,
    batch_idx: int,
    host: Mapping[str, Tensor],
    feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> None:
    """Add the probes at ``positions`` of a batch (its first sample is ``first_index``) to ``run``: the
    :func:`~lightning_attn.report.explain.compute_saliency` ``result`` for them, with the batch's host values
    (:func:`add_batch`) and the report's ``feature_names``."""
    for missing in result["sites_without_gradient"]:
        note = f"site {missing}: no gradient reaches its attention map (not in the rollout or head relevance)"
        if note not in run.notes:
            run.notes.append(note)
    for row, position in enumerate(positions):
        probe: dict[str, Any] = {
            "sample": first_index + position,
            "batch": batch_idx,
            "target": int(host["target"][position]),
            "predicted": int(host["predicted"][position]),
            "confidence": float(host["confidence"][position]),
            "explained_class": int(result["explained"][row]),
            "inputs": {},
            "rollout": None,
            "head_relevance": {site: values[row].tolist() for site, values in result["head_relevance"].items()},
        }
        for name, entry in result["inputs"].items():
            features = _feature_names_for(feature_names, name, entry["share"].shape[1])
            share = entry["share"][row].double()
            order = share.argsort(descending=True)[: min(10, share.numel())].tolist()
            probe["inputs"][name] = {
                "shape": entry["shape"],
                "feature_names": features,
                "share": share.tolist(),
                "abs": entry["abs"][row].double().tolist(),
                "signed": entry["signed"][row].double().tolist(),
                "top": [[features[i], float(share[i])] for i in order],
            }
            run.probe_inputs.setdefault(first_index + position, {})[name] = entry["values"][row].numpy()
            if "positions" in entry:
                run.probe_positions.setdefault(name, []).append(
                    (first_index + position, entry["positions"][row].numpy(), bool(entry["positions_pooled"]))
                )
        if result["rollout"] is not None:
            rollout = result["rollout"]
            probe["rollout"] = {
                "sites": list(rollout["sites"]),
                "mean_row": rollout["mean_row"][row].double().tolist(),
                "row0": rollout["row0"][row].double().tolist(),
            }
        maps = {site: site_maps[row].numpy() for site, site_maps in result.get("attention", {}).items()}
        kept = sum(m.size for sample_maps in run.probe_maps.values() for m in sample_maps.values())
        if kept + sum(m.size for m in maps.values()) <= MAX_PROBE_MAP_VALUES:
            run.probe_maps[first_index + position] = maps
        elif not any(n.startswith("attention maps of probe sample") for n in run.notes):
            run.notes.append(
                f"attention maps of probe sample {first_index + position} and later ones not kept for the explorer: "
                f"over {MAX_PROBE_MAP_VALUES} weights in all"
            )
        run.probes.append(probe)


def _feature_names_for(
    feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None, name: str, count: int
) -> list[str]:
    names = feature_names
    if isinstance(names, Mapping):
        names = names.get(name)
    return plots.names_or_indices(names, count)
