"""``ExplainabilityReport``: post-hoc explainability report of a classifier, built from the test loop (or
validation), and :func:`build_report`, which runs it on a model and a dataloader without a Trainer script.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import functools
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_attn import sinks
from lightning_attn.callbacks.base import STAGE_KEYS, EvaluationCallback, Stage, close_recorder, log_scalars, open_recorder, stage_key
from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.functional.calibration import equal_width_bin_index
from lightning_attn.plots import report as plots
from lightning_attn.report import html as page
from lightning_attn.report.explain import (
    TARGET_KEYS,
    BatchAttention,
    GroupStatistics,
    ReportError,
    as_logits,
    class_targets,
    compute_saliency,
    default_forward,
    exclusive_recording,
    extract_targets,
    pair_agreement,
    probabilities,
    resolve_modality_pairs,
    slice_batch,
)
from lightning_attn.report.provenance import (
    StreamHasher,
    combine_input_hashes,
    hash_config,
    hash_state_dict,
    library_versions,
    report_hash,
    utc_now,
)

__all__ = ["SCHEMA_VERSION", "ExplainabilityReport", "build_report"]

#: Version of report.json's layout; report.schema.json describes it. Minor: additions; major: breaking changes.
SCHEMA_VERSION = "1.0"
NAMESPACE = "report"
INCOMPLETE = "INCOMPLETE"
PROVENANCE_PREFIX = "# lightning_attn report provenance: "
#: Under DDP, the sample rows of a non-zero rank travel to rank zero as raw CSV bytes in messages of at most this size
#: (one ``gather_object`` round per chunk), so no message holds a whole shard.
GATHER_CHUNK_BYTES = 8 << 20


class _ReportModule(pl.LightningModule):
    """Wraps a plain ``nn.Module`` (or a LightningModule without the needed step) for :func:`build_report`;
    the report explains ``self.model`` (site names and hashes are those of the wrapped model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None


def _target_module(pl_module: nn.Module) -> nn.Module:
    return pl_module.model if isinstance(pl_module, _ReportModule) else pl_module


@dataclass
class _HeadSums:
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

    def merge(self, other: _HeadSums) -> bool:
        """Add ``other``'s sums (another rank's); ``False`` (nothing added) when the head counts differ."""
        if other.heads != self.heads:
            return False
        self.n += other.n
        self.n_correct += other.n_correct
        for name in ("total", "total_sq", "total_correct", "total_incorrect", "focused"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return True


@dataclass
class _Run:
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
    bins: dict[str, np.ndarray] = field(default_factory=dict)
    heads: dict[str, _HeadSums] = field(default_factory=dict)
    agreement: dict[str, GroupStatistics] = field(default_factory=dict)
    batch_rows: list[list[Any]] = field(default_factory=list)
    hasher: StreamHasher = field(default_factory=StreamHasher)
    probes: list[dict[str, Any]] = field(default_factory=list)
    probe_positions: dict[str, list[tuple[int, np.ndarray, bool]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    finished: bool = False
    rank: int = 0
    shard: bool = False
    world_size: int = 1
    input_digests: list[tuple[int, str, int]] = field(default_factory=list)


class ExplainabilityReport(EvaluationCallback):
    """Post-hoc explainability report of a classifier from the test loop (validation when asked).

    For **every evaluated sample** one row is streamed to ``samples.csv`` as its batch ends (nothing per
    sample is held in memory): predicted class, confidence (max probability), true class, correct, margin
    (top-1 minus top-2 probability), normalized predictive entropy, NLL, Brier score, its equal-width
    calibration bin; per attention site the mean normalized attention entropy over heads (each head's mean
    over valid query rows, Clark et al. 2019), the most focused head (lowest entropy) and its entropy; the
    top attention pairs (``query>key:weight`` of the head-averaged map) of the chosen ``pair_sites``; and the
    modality agreement of each declared pair (:func:`~lightning_attn.functional.modality_agreement`); last, the
    global ``rank`` that evaluated it (0 in a single process).

    Streamed statistics: dataset-level accuracy, mean confidence, ECE/MCE over ``calibration_bins``
    equal-width bins (Guo et al. 2017; bins as torchmetrics and the calibration callback), NLL, Brier;
    per-batch rows; a correct-vs-incorrect comparison of every per-sample measure (n, mean, std per group,
    difference and effect size); a class-wise table (support, predictions, precision, recall, F1, mean
    confidence and attention entropy); per site and head the mean entropy, its correct/incorrect means and
    how often the head is the sample's most focused one.

    **Saliency** for a bounded set of probe samples (the first ``probe_samples``, or ``probe_indices``):
    gradient x input on every floating tensor input of the batch (per feature = last axis, named by
    ``feature_names``), gradient-weighted attention rollout and per-head relevance from
    ``d(score)/d(attention)`` with negatives clamped, maps and gradients paired by site name
    (:func:`~lightning_attn.report.explain.compute_saliency`). The loop runs under ``torch.inference_mode``;
    the saliency pass runs under ``torch.inference_mode(False)`` and ``torch.enable_grad()`` on clones of
    the batch made outside inference mode. Integer inputs (token ids) get no gradient x input; their
    explanation is the rollout.

    **How the model is called.** Logits are taken from what ``test_step``/``validation_step`` returned when it
    is a ``[B, C]`` tensor or a mapping with ``logits_key`` (targets from its ``target``/``y``/``labels`` key
    if present); else, without a ``forward_fn``, from the output of ``pl_module``'s own forward inside the
    step (a forward hook: no extra pass); attention is recorded during the step itself. Otherwise the
    callback calls ``forward_fn(pl_module, batch) -> logits`` once more per batch, recorded for the report
    only (other callbacks' recorders are suspended during the report's own passes, so their statistics
    never see them). The saliency pass always calls ``forward_fn``. The default ``forward_fn`` calls
    ``pl_module(**inputs)`` for a mapping batch (the batch minus its target key), ``pl_module(*inputs)`` for a
    tuple/list batch (``pl_module(x)`` for ``(x, y)``) and ``pl_module(batch)`` for a tensor; its output
    may be logits, a mapping with ``"logits"``, an object with ``.logits`` or a tuple starting with them.
    Targets: ``target_fn(batch)``, else the batch's ``target_key`` (default: the first of ``target``,
    ``targets``, ``label``, ``labels``, ``y``), else the last element of a tuple/list batch. A batch without
    targets is an error (:class:`~lightning_attn.report.explain.ReportError`).

    **Outputs**, written at the end of the loop (after every callback's epoch end, so that the sections of a
    calibration or head-specialization callback of the same Trainer, found in ``trainer.callbacks`` through
    their ``.results`` and ``registry()``, are included; their absence is fine) into a temporary directory
    with an ``INCOMPLETE`` marker, renamed to the final directory only on success:

    - ``report.html``: self-contained page (figures inline as base64 PNG, sortable tables, no network);
    - ``report.json``: every number, ``schema_version`` ``1.0``, valid against the packaged
      ``lightning_attn/report/report.schema.json``; lists every other file with its SHA-256;
    - ``samples.csv`` (one row per sample), ``per_head.csv``, ``classwise.csv``, ``batches.csv``,
      ``saliency.csv``; the first line of each is ``# lightning_attn report provenance: {json}``
      (skip it: ``pandas.read_csv(path, skiprows=1)``);
    - ``summary.md``; ``figures/*.png`` (provenance in the PNG text chunk ``lightning_attn_provenance``).

    Provenance in every output: SHA-256 of the model's ``state_dict`` (tensor bytes in sorted key order), of
    the evaluated batches (streamed), of the report configuration, their combination ``report_sha256``,
    library versions, start and end time (:mod:`lightning_attn.report.provenance`).

    Directory: ``report_dir`` if given (dataloader ``k >= 1`` gets ``<report_dir>_dl<k>``), else
    ``<save_dir or log_dir/lightning_attn>/report/<test|val_epoch<E>>[_dl<k>]``.

    **Distributed runs** (DDP and any strategy on a ``torch.distributed`` process group): every rank evaluates its
    own batches into its own sums and streams its sample rows to a file in a rank-local temporary directory (no
    shared file system needed). At the end of the epoch each rank sends rank zero (``torch.distributed.gather_object``:
    gloo, and NCCL through the current CUDA device, which Lightning sets) its counts, correct-vs-incorrect moments,
    class-wise, calibration and per-head sums, per-batch rows, input hash and sample rows (raw CSV, in messages of at
    most ``GATHER_CHUNK_BYTES``). Rank zero appends the other ranks' rows to ``samples.csv`` in rank order
    (``sample`` renumbered consecutively, rank zero's rows first; ``batch`` is the rank's own batch index), merges
    the sums and alone writes the report: its dataset-level numbers, class-wise and per-head tables equal those of
    one process over the same samples (up to float summation order). Per-batch rows follow each rank's batches (a
    ``rank`` column says whose). Saliency runs on rank zero only, for the first ``probe_samples`` (or the
    ``probe_indices``) of rank zero's shard, which are the first rows of ``samples.csv``. The inputs hash combines
    the per-rank hashes in rank order (:func:`~lightning_attn.report.provenance.combine_input_hashes`): it differs
    from a single-process hash of the same data, the model and configuration hashes do not; ``provenance``
    records the ``world_size``. The logged scalars are the merged values, broadcast to every rank. Lightning's
    ``DistributedSampler`` pads data that does not split evenly over the ranks by repeating samples: the report
    then counts those repeats, as Lightning's metrics do (a note in the report and a warning say how many). One
    process gathers nothing. Under a strategy without an initialized ``torch.distributed`` group the report falls
    back to rank zero's shard (a warning says so).

    Args:
        stages: evaluation loops to report on: ``"test"`` and/or ``"validate"``.
        every_n_epochs: for validation, report on epochs whose index is a multiple of this.
        save_dir: base directory (see above).
        report_dir: exact output directory (overrides ``save_dir``).
        forward_fn: ``forward_fn(pl_module, batch) -> logits`` (see above); default :func:`default_forward`.
        target_fn: ``target_fn(batch) -> targets`` ([B] class indices, [B, 1], or [B, C] one-hot/soft).
        target_key: key of the targets in mapping batches.
        logits_key: key of the logits in mapping outputs of the step or of the model.
        outputs_are_probabilities: the model outputs probabilities, not logits.
        class_names: names of the classes (``target_name``/``predicted_name`` columns, tables).
        feature_names: names of the last-axis features of the floating inputs: one list for every input with
            that many features, or a mapping from input name (batch key, ``input<k>`` for the k-th element of
            a tuple batch, ``input`` for a tensor batch) to names.
        include: glob patterns of attention sites to analyse (default all).
        exclude: glob patterns of sites to skip.
        pair_sites: glob patterns of sites whose top attention pairs are reported per sample (default: the
            last site of the forward pass).
        top_k: attention pairs per sample and site.
        modality_pairs: named pairs of cross-attention sites ``{"eeg<->spec": ("<A->B site>", "<B->A site>")}``
            (names or globs); per-sample agreement for each.
        calibration_bins: equal-width confidence bins.
        probe_samples: number of first samples that get saliency (0: none).
        probe_indices: explicit sample indices (order of evaluation) for saliency, instead of the first ones.
        saliency_target: explain the ``"predicted"`` class or the ``"target"`` class.
        chunk_size: query rows reduced at a time for per-sample entropy (``None``: whole maps).
        max_batches: report on at most this many batches per dataloader (per rank under DDP; ``None``: all).
        html_max_rows: at most this many rows in the HTML per-sample table (``None``: all; the CSV has all).
        max_positions: positions kept (block-averaged) per probe for position x feature saliency maps.
        title: title of the report.
        figures: draw the PNG figures (embedded in the HTML); ``False`` is faster and writes tables only.
        figure_dpi: resolution of the PNG figures.
    """

    def __init__(
        self,
        stages: Sequence[Stage] = ("test",),
        every_n_epochs: int = 1,
        save_dir: str | None = None,
        report_dir: str | None = None,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        target_fn: Callable[[Any], Any] | None = None,
        target_key: str | None = None,
        logits_key: str = "logits",
        outputs_are_probabilities: bool = False,
        class_names: Sequence[str] | None = None,
        feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        pair_sites: Sequence[str] | None = None,
        top_k: int = 3,
        modality_pairs: Mapping[str, tuple[str, str]] | None = None,
        calibration_bins: int = 15,
        probe_samples: int = 4,
        probe_indices: Sequence[int] | None = None,
        saliency_target: Literal["predicted", "target"] = "predicted",
        chunk_size: int | None = 256,
        max_batches: int | None = None,
        html_max_rows: int | None = None,
        max_positions: int = 64,
        title: str = "Explainability report",
        figures: bool = True,
        figure_dpi: int = 90,
    ) -> None:
        super().__init__(stages=stages, every_n_epochs=every_n_epochs, save_dir=save_dir)
        for name, value, low in (("top_k", top_k, 1), ("calibration_bins", calibration_bins, 1), ("probe_samples", probe_samples, 0),
                                 ("max_positions", max_positions, 1), ("figure_dpi", figure_dpi, 20)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, value in (("chunk_size", chunk_size), ("max_batches", max_batches), ("html_max_rows", html_max_rows)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if saliency_target not in ("predicted", "target"):
            raise ValueError(f"saliency_target must be 'predicted' or 'target', got {saliency_target!r}")
        if probe_indices is not None and any(int(i) < 0 for i in probe_indices):
            raise ValueError("probe_indices must be non-negative sample indices")
        for pair, sites in (modality_pairs or {}).items():
            if len(sites) != 2:
                raise ValueError(f"modality pair {pair!r} needs two sites (A->B, B->A), got {sites!r}")
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.forward_fn = forward_fn
        self.target_fn = target_fn
        self.target_key = target_key
        self.logits_key = logits_key
        self.outputs_are_probabilities = outputs_are_probabilities
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.feature_names = feature_names
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.pair_sites = list(pair_sites) if pair_sites is not None else None
        self.top_k = top_k
        self.modality_pairs = {str(k): (str(v[0]), str(v[1])) for k, v in (modality_pairs or {}).items()}
        self.calibration_bins = calibration_bins
        self.probe_samples = probe_samples
        self.probe_indices = sorted({int(i) for i in probe_indices}) if probe_indices is not None else None
        self.saliency_target = saliency_target
        self.chunk_size = chunk_size
        self.max_batches = max_batches
        self.html_max_rows = html_max_rows
        self.max_positions = max_positions
        self.title = title
        self.figures = figures
        self.figure_dpi = figure_dpi
        #: ``results[<stage key>]``: the last report's summary (what report.json holds) and its directory.
        self.results: dict[str, dict[str, Any]] = {}
        self._runs: dict[int, _Run] = {}
        self._pending: list[_Run] = []
        self._recorder: AttentionRecorder | None = None
        self._attention: BatchAttention | None = None
        self._hook: Any = None
        self._step_output: Any = None
        self._record_in_step = True
        self._model_sha256: str | None = None
        self._warned_ddp = False
        self._warned_padding = False
        self._distributed = False  # this epoch's ranks each evaluate their shard and send it to rank zero

    # -- identity ----------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(stages=self.stages, report_dir=str(self.report_dir))

    def config(self) -> dict[str, Any]:
        """The settings that shape the report (hashed into its provenance; directories excluded)."""
        return {
            "report": f"{type(self).__module__}.{type(self).__qualname__}",
            "schema_version": SCHEMA_VERSION,
            "stages": list(self.stages),
            "every_n_epochs": self.every_n_epochs,
            "forward_fn": _callable_name(self.forward_fn) or "default_forward",
            "target_fn": _callable_name(self.target_fn),
            "target_key": self.target_key,
            "logits_key": self.logits_key,
            "outputs_are_probabilities": self.outputs_are_probabilities,
            "class_names": self.class_names,
            "feature_names": _jsonable(self.feature_names),
            "include": self.include,
            "exclude": self.exclude,
            "pair_sites": self.pair_sites,
            "top_k": self.top_k,
            "modality_pairs": {k: list(v) for k, v in self.modality_pairs.items()},
            "calibration_bins": self.calibration_bins,
            "probe_samples": self.probe_samples,
            "probe_indices": self.probe_indices,
            "saliency_target": self.saliency_target,
            "chunk_size": self.chunk_size,
            "max_batches": self.max_batches,
            "html_max_rows": self.html_max_rows,
            "max_positions": self.max_positions,
            "title": self.title,
            "figures": self.figures,
            "figure_dpi": self.figure_dpi,
        }

    def _forward(self) -> Callable[[Any, Any], Any]:
        if self.forward_fn is not None:
            return self.forward_fn
        return functools.partial(default_forward, target_key=self.target_key)

    # -- run management ------------------------------------------------------------------------------------
    def _final_dir(self, trainer: pl.Trainer, stage: str, dataloader_idx: int) -> Path:
        suffix = f"_dl{dataloader_idx}" if dataloader_idx else ""
        if self.report_dir is not None:
            return self.report_dir if not dataloader_idx else self.report_dir.with_name(self.report_dir.name + suffix)
        base = sinks.output_dir(trainer, NAMESPACE, self.save_dir)
        name = "test" if stage == "test" else f"val_epoch{int(trainer.current_epoch)}"
        return base / (name + suffix)

    def _run_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, dataloader_idx: int) -> _Run:
        run = self._runs.get(dataloader_idx)
        if run is not None:
            return run
        model = _target_module(pl_module)
        if not trainer.is_global_zero:
            # a shard of a distributed report: rank-local scratch space, sent to rank zero at the end of the epoch
            rank = int(trainer.global_rank)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"lightning_attn_report_rank{rank}_"))
            run = _Run(
                stage=stage, key=stage_key(stage, dataloader_idx), dataloader_idx=dataloader_idx, epoch=int(trainer.current_epoch),
                final_dir=tmp_dir, tmp_dir=tmp_dir, started=utc_now(), model_sha256="",
                model_class=f"{type(model).__module__}.{type(model).__qualname__}", rank=rank, shard=True,
                world_size=int(trainer.world_size),
            )
            run.bins = {name: np.zeros(self.calibration_bins, dtype=np.float64) for name in ("count", "conf", "hits")}
            self._runs[dataloader_idx] = run
            return run
        final_dir = self._final_dir(trainer, stage, dataloader_idx)
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = final_dir.parent / f".{final_dir.name}.incomplete-{os.getpid()}-{id(self) % 100000}"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        started = utc_now()
        (tmp_dir / INCOMPLETE).write_text(
            f"This report is INCOMPLETE: it is being written (started {started}) or its run failed.\n"
            f"A finished report is renamed to {final_dir.name}/ and has no INCOMPLETE file.\n"
        )
        if self._model_sha256 is None:
            self._model_sha256 = hash_state_dict(model.state_dict())
        run = _Run(
            stage=stage, key=stage_key(stage, dataloader_idx), dataloader_idx=dataloader_idx, epoch=int(trainer.current_epoch),
            final_dir=final_dir, tmp_dir=tmp_dir, started=started, model_sha256=self._model_sha256,
            model_class=f"{type(model).__module__}.{type(model).__qualname__}", world_size=int(trainer.world_size),
        )
        run.bins = {name: np.zeros(self.calibration_bins, dtype=np.float64) for name in ("count", "conf", "hits")}
        self._runs[dataloader_idx] = run
        return run

    def _sampled(self, batch_idx: int) -> bool:
        return self.max_batches is None or batch_idx < self.max_batches

    # -- hooks -------------------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._abandon("a new evaluation epoch started before the previous report was written")
        self._runs = {}
        self._model_sha256 = None
        self._record_in_step = not isinstance(pl_module, _ReportModule)
        self._distributed = (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
                             and dist.get_world_size() == trainer.world_size)
        if trainer.world_size > 1 and not self._distributed and not self._warned_ddp:
            self._warned_ddp = True
            warnings.warn(
                "ExplainabilityReport: this distributed strategy has no initialized torch.distributed process group to "
                "gather the ranks' samples through, so the report covers rank zero's shard of the data.", UserWarning, stacklevel=2,
            )

    def _covers(self, trainer: pl.Trainer) -> bool:
        """Whether this rank evaluates its batches for the report (every rank under DDP, else rank zero)."""
        return trainer.is_global_zero or self._distributed

    def eval_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        self._close_recorder()
        if not self._covers(trainer) or not self._sampled(batch_idx):
            return
        self._run_for(trainer, pl_module, stage, dataloader_idx)
        self._step_output = None
        if self._record_in_step:
            self._open_recorder(pl_module, hook=True)

    def eval_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        attention, step_output = self._attention, self._step_output
        self._close_recorder()
        self._step_output = None
        if not self._covers(trainer) or not self._sampled(batch_idx):
            return
        run = self._run_for(trainer, pl_module, stage, dataloader_idx)
        self._process(run, pl_module, outputs, batch, batch_idx, attention, step_output)

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_recorder()
        runs = [self._runs[k] for k in sorted(self._runs)]
        self._runs = {}
        for run in runs:
            if run.samples_handle is not None:
                run.samples_handle.flush()
        if self._distributed:
            scalars = self._gather(trainer, pl_module, stage, runs)  # a collective: every rank
        else:
            if trainer.world_size > 1:
                for run in runs:
                    run.notes.append(f"rank zero's shard only: no torch.distributed process group to gather the "
                                     f"{trainer.world_size} ranks through")
            self._pending.extend(runs)
            scalars = _scalars(runs) if trainer.world_size == 1 else {}
        if scalars:
            log_scalars(pl_module, scalars)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize_pending(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize_pending(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._abandon(f"{type(exception).__name__}: {exception}")
        super().on_exception(trainer, pl_module, exception)

    def eval_abort(self) -> None:
        self._close_recorder()

    # -- recording ---------------------------------------------------------------------------------------------
    def _open_recorder(self, pl_module: nn.Module, hook: bool = False) -> None:
        sites = [s for pair in self.modality_pairs.values() for s in pair]
        self._attention = BatchAttention(self.chunk_size, self.pair_sites, sites, self.top_k)
        module = _target_module(pl_module)
        self._recorder = open_recorder(module, self._attention, self.include, self.exclude)
        if hook:
            # the output of the module's forward inside the step: the logits when the step returns none
            self._hook = module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._step_output = output

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()
        self._attention = None
        close_recorder(recorder, quiet=True)  # "found no attention" is reported once, in the report itself

    def _abandon(self, reason: str) -> None:
        """Leave every unfinished report visibly INCOMPLETE (never renamed to its final name)."""
        self._close_recorder()
        for run in list(self._runs.values()) + self._pending:
            if run.samples_handle is not None:
                run.samples_handle.close()
                run.samples_handle = None
            if run.shard:  # a non-zero rank's scratch space: nothing of the report is there
                shutil.rmtree(run.tmp_dir, ignore_errors=True)
                continue
            if run.tmp_dir.exists() and not run.finished:
                (run.tmp_dir / INCOMPLETE).write_text(
                    f"This report is INCOMPLETE: its run failed ({reason}).\nStarted {run.started}; nothing here is final.\n"
                )
        self._runs = {}
        self._pending = []

    # -- per batch ---------------------------------------------------------------------------------------------
    def _logits_from_outputs(self, outputs: Any) -> Tensor | None:
        if isinstance(outputs, Mapping):
            return as_logits(outputs, self.logits_key)
        if isinstance(outputs, Tensor) and outputs.dim() == 2:
            return outputs
        return None

    def _targets(self, outputs: Any, batch: Any) -> Any:
        if self.target_fn is not None:
            return self.target_fn(batch)
        if isinstance(outputs, Mapping):
            keys = (self.target_key,) if self.target_key else TARGET_KEYS
            for key in keys:
                if isinstance(outputs.get(key), Tensor):
                    return outputs[key]
        return extract_targets(batch, self.target_key)

    def _process(self, run: _Run, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
                 attention: BatchAttention | None, step_output: Any = None) -> None:
        module = _target_module(pl_module)
        raw_targets = self._targets(outputs, batch)
        if raw_targets is None:
            raise ReportError(
                "the dataloader's batches carry no targets: expected a (inputs, target) tuple, or a mapping with one of "
                f"the keys {', '.join(TARGET_KEYS)} (or pass target_key= / target_fn=)"
            )
        expected = int(raw_targets.shape[0]) if isinstance(raw_targets, Tensor) and raw_targets.dim() else None
        logits = None
        if attention is not None:
            # logits of the step itself: returned by it, else the output of the module's forward inside it
            hooked = as_logits(step_output, self.logits_key) if self.forward_fn is None else None
            for candidate in (self._logits_from_outputs(outputs), hooked):
                if candidate is not None and candidate.dim() >= 1 and (expected is None or candidate.shape[0] == expected):
                    logits = candidate
                    break
        if logits is None:
            # One forward pass of our own, recorded for this report only; later batches skip the step recording.
            self._record_in_step = False
            self._open_recorder(pl_module)
            attention = self._attention
            try:
                with exclusive_recording(self._recorder):
                    logits = as_logits(self._forward()(module, batch), self.logits_key)
            finally:
                self._close_recorder()
            if logits is None:
                raise ReportError("forward_fn returned no logits tensor (a tensor, a mapping with 'logits', .logits or a tuple)")
        probs = probabilities(logits, self.outputs_are_probabilities)
        batch_size, num_classes = probs.shape
        target = class_targets(raw_targets, batch_size, num_classes).to(probs.device)
        if run.num_classes == 0:
            self._first_batch(run, num_classes, attention)
        elif num_classes != run.num_classes:
            raise ReportError(f"the model gave {num_classes} classes in batch {batch_idx}, {run.num_classes} before")
        elif attention is not None and not set(attention.sites) <= set(run.sites):
            note = (f"batch {batch_idx} has attention sites the first batch had not ({sorted(set(attention.sites) - set(run.sites))[:5]}); "
                    "per-sample columns follow the first batch's sites")
            if not any(n.startswith("batch ") and "attention sites the first batch" in n for n in run.notes):
                run.notes.append(note)

        confidence, predicted = probs.max(1)
        correct = predicted == target
        top2 = probs.topk(min(2, num_classes), dim=1).values
        margin = top2[:, 0] - (top2[:, 1] if num_classes > 1 else 0)
        log_probs = probs.clamp_min(1e-12).log()
        output_entropy = -(probs * log_probs).sum(1) / math.log(max(num_classes, 2))
        nll = -log_probs.gather(1, target[:, None])[:, 0]
        brier = (probs - torch.nn.functional.one_hot(target, num_classes).float()).pow(2).sum(1)
        bins = equal_width_bin_index(confidence.double().clamp(0, 1), self.calibration_bins).clamp(0, self.calibration_bins - 1)

        host = {
            name: value.detach().cpu()
            for name, value in dict(confidence=confidence, predicted=predicted, target=target, correct=correct, margin=margin,
                                    output_entropy=output_entropy, nll=nll, brier=brier, bins=bins).items()
        }
        correct_list = host["correct"].tolist()
        measures: dict[str, list[float]] = {k: host[k].double().tolist() for k in ("confidence", "margin", "output_entropy", "nll", "brier")}
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
            self._update_heads(run, site, entropy, host["correct"])
        for site in run.pair_sites:
            sample = attention.sites.get(site) if attention is not None else None
            if sample is None or sample.top_values is None:
                site_columns[f"{site}/top_pairs"] = [None] * batch_size
            else:
                site_columns[f"{site}/top_pairs"] = [";".join(f"{q}>{k}:{w:.4g}" for q, k, w in pairs) for pairs in sample.top_pairs()]
        for pair, (site_a, site_b) in run.modality.items():
            values = pair_agreement(attention, site_a, site_b) if attention is not None else None
            agreement = values.detach().double().cpu().tolist() if values is not None else [None] * batch_size
            site_columns[f"agreement/{pair}"] = agreement
            measures[f"agreement/{pair}"] = [math.nan if v is None else v for v in agreement]

        attention_entropy = [sum(v) / len(v) for v in zip(*site_mean_entropy)] if site_mean_entropy else [math.nan] * batch_size
        for name, values in measures.items():
            run.stats.add(name, values, correct_list)

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
        np.add.at(run.bins["count"], host["bins"].numpy(), 1)
        np.add.at(run.bins["conf"], host["bins"].numpy(), host["confidence"].double().numpy())
        np.add.at(run.bins["hits"], host["bins"].numpy(), host["correct"].double().numpy())

        # rows
        first_index = run.count
        names = run.class_names
        for i in range(batch_size):
            row: list[Any] = [first_index + i, batch_idx, t_list[i], p_list[i], int(correct_list[i])]
            row += [measures[k][i] for k in ("confidence", "margin", "output_entropy", "nll", "brier")]
            row.append(int(host["bins"][i]))
            if names is not None:
                row += [_name(names, t_list[i]), _name(names, p_list[i])]
            row += [site_columns[c][i] for c in run.columns[len(row):-1]]
            row.append(run.rank)
            run.samples_writer.writerow([_cell(v) for v in row])
        run.count += batch_size
        finite_entropy = [v for v in attention_entropy if math.isfinite(v)]
        run.batch_rows.append([
            batch_idx, batch_size, sum(correct_list) / batch_size, sum(measures["confidence"]) / batch_size,
            sum(finite_entropy) / len(finite_entropy) if finite_entropy else None, run.rank,
        ])
        run.hasher.update(batch)

        # probes (rank zero only: the first samples of its shard are the first rows of a distributed report)
        wanted = self._probe_positions(first_index, batch_size) if not run.shard else []
        if wanted:
            self._saliency(run, module, batch, wanted, first_index, batch_idx, host)

    def _first_batch(self, run: _Run, num_classes: int, attention: BatchAttention | None) -> None:
        run.num_classes = num_classes
        run.class_names = self.class_names
        if self.class_names is not None and len(self.class_names) != num_classes:
            run.notes.append(f"class_names has {len(self.class_names)} names for {num_classes} classes; names not used")
            run.class_names = None
        run.class_arrays = {name: np.zeros(num_classes, dtype=np.float64)
                            for name in ("support", "predicted", "tp", "conf_true", "conf_pred", "entropy_true", "entropy_count")}
        if attention is not None:
            run.sites = list(attention.sites)
            run.site_info = {s: dataclasses.asdict(attention.infos[s]) for s in run.sites}
            run.pair_sites = attention.pair_site_names()
            run.modality = resolve_modality_pairs(self.modality_pairs, run.sites)
        if not run.sites:
            run.notes.append("no attention was captured: the report has no attention measures (see the recorder's limits)")
        for pair, (a, b) in run.modality.items():
            if a is None or b is None:
                run.notes.append(f"modality pair {pair!r}: no site matches {self.modality_pairs[pair][0 if a is None else 1]!r}")
        columns = ["sample", "batch", "target", "predicted", "correct", "confidence", "margin", "output_entropy", "nll", "brier",
                   "calibration_bin"]
        if run.class_names is not None:
            columns += ["target_name", "predicted_name"]
        for site in run.sites:
            columns += [f"{site}/entropy_mean", f"{site}/focused_head", f"{site}/focused_entropy"]
        columns += [f"{site}/top_pairs" for site in run.pair_sites]
        columns += [f"agreement/{pair}" for pair in run.modality]
        columns.append("rank")
        run.columns = columns
        run.samples_handle = (run.tmp_dir / "samples.csv.part").open("w", newline="", encoding="utf-8")
        run.samples_writer = csv.writer(run.samples_handle)
        run.samples_writer.writerow(columns)

    def _update_heads(self, run: _Run, site: str, entropy: Tensor, correct: Tensor) -> None:
        sums = run.heads.get(site)
        heads = entropy.shape[1]
        if sums is None:
            sums = run.heads[site] = _HeadSums(heads)
        if sums.heads != heads:
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

    def _probe_positions(self, first_index: int, batch_size: int) -> list[int]:
        if self.probe_indices is not None:
            return [i - first_index for i in self.probe_indices if first_index <= i < first_index + batch_size]
        return list(range(0, max(0, min(batch_size, self.probe_samples - first_index))))

    def _feature_names_for(self, name: str, count: int) -> list[str]:
        names = self.feature_names
        if isinstance(names, Mapping):
            names = names.get(name)
        return plots.names_or_indices(names, count)

    def _saliency(self, run: _Run, module: nn.Module, batch: Any, positions: list[int], first_index: int, batch_idx: int,
                  host: Mapping[str, Tensor]) -> None:
        index = torch.tensor(positions, dtype=torch.long)
        device = _batch_device(batch)
        sub = slice_batch(batch, index.to(device) if device is not None else index)
        source = host["predicted"] if self.saliency_target == "predicted" else host["target"]
        explain = source[index]
        try:
            result = compute_saliency(module, sub, self._forward(), explain=explain, target_key=self.target_key,
                                      logits_key=self.logits_key, include=self.include, exclude=self.exclude,
                                      max_positions=self.max_positions)
        except ReportError:
            raise
        except Exception as error:  # the report stays useful without saliency; the failure is in it
            message = f"saliency failed for samples {[first_index + p for p in positions]}: {type(error).__name__}: {error}"
            run.notes.append(message)
            warnings.warn(f"ExplainabilityReport: {message}", UserWarning, stacklevel=2)
            return
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
                features = self._feature_names_for(name, entry["share"].shape[1])
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
                if "positions" in entry:
                    run.probe_positions.setdefault(name, []).append(
                        (first_index + position, entry["positions"][row].numpy(), bool(entry["positions_pooled"]))
                    )
            if result["rollout"] is not None:
                rollout = result["rollout"]
                probe["rollout"] = {"sites": list(rollout["sites"]), "mean_row": rollout["mean_row"][row].double().tolist(),
                                    "row0": rollout["row0"][row].double().tolist()}
            run.probes.append(probe)

    # -- distributed: every rank's shard to rank zero ---------------------------------------------------------------
    def _gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, runs: list[_Run]) -> dict[str, float]:
        """Send every rank's sums and sample rows to rank zero, which merges them into its runs (then finalized as
        in one process); returns the merged scalars to log, the same on every rank. A collective: every rank calls
        it, in the same order as the other callbacks' epoch-end collectives.

        Messages: ``all_gather_object`` of each rank's chunk counts (tiny), ``gather_object`` of each rank's sums
        (bounded by classes, sites, heads and batches), then one ``gather_object`` round per chunk of at most
        :data:`GATHER_CHUNK_BYTES` of raw CSV rows (rank zero writes them to a local scratch file, never holding a
        shard in memory), and a ``broadcast`` of the scalars or of the first error, raised on every rank."""
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        mine = {run.dataloader_idx: run for run in runs}
        error: BaseException | str | None = None
        payloads: dict[int, dict[str, Any]] | str = {}
        chunks: dict[int, int] = {}
        if rank:
            try:
                for run in runs:
                    if run.samples_handle is not None:
                        run.samples_handle.close()
                        run.samples_handle = None
                    part = run.tmp_dir / "samples.csv.part"
                    size = part.stat().st_size if part.exists() else 0
                    chunks[run.dataloader_idx] = -(-size // GATHER_CHUNK_BYTES)
                    payloads[run.dataloader_idx] = _shard_payload(run)  # type: ignore[index]
            except Exception as exc:  # noqa: BLE001 - sent to rank zero, raised on every rank below
                payloads, chunks = f"rank {rank}: {type(exc).__name__}: {exc}", {}
        scratch: Path | None = None
        if rank == 0:
            try:
                scratch = Path(tempfile.mkdtemp(prefix="lightning_attn_report_gather_"))
            except Exception as exc:  # noqa: BLE001 - keep to the collectives, raise after them
                error = exc
        try:
            counts: list[Any] = [None] * world
            dist.all_gather_object(counts, chunks)
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(payloads, gathered, dst=0)
            keys = sorted(set(mine) | {k for c in counts for k in c})  # every rank's dataloaders with sample chunks to send
            if gathered is not None:
                keys = sorted(set(keys) | {k for p in gathered if isinstance(p, dict) for k in p})
            for idx in keys:
                rounds = max(c.get(idx, 0) for c in counts)
                source: IO[bytes] | None = None
                try:
                    for round_index in range(rounds):
                        piece = b""
                        try:
                            if round_index == 0 and rank and chunks.get(idx):
                                source = (mine[idx].tmp_dir / "samples.csv.part").open("rb")
                            if source is not None:
                                piece = source.read(GATHER_CHUNK_BYTES)
                        except Exception as exc:  # noqa: BLE001 - keep to the rounds; rank zero sees the short row count
                            piece = b""
                            if source is not None:
                                source.close()
                            source = None
                            warnings.warn(f"ExplainabilityReport: rank {rank} could not read its samples: {exc}", UserWarning, stacklevel=2)
                        received: list[Any] | None = [None] * world if rank == 0 else None
                        dist.gather_object(piece, received, dst=0)
                        if received is not None and scratch is not None and error is None:
                            try:
                                for k in range(1, world):
                                    if received[k]:
                                        with (scratch / f"rank{k}_dl{idx}.csv").open("ab") as handle:
                                            handle.write(received[k])
                            except Exception as exc:  # noqa: BLE001 - keep to the rounds, raise after them
                                error = exc
                finally:
                    if source is not None:
                        source.close()
            scalars: dict[str, float] = {}
            if rank == 0:
                targets: list[_Run] = []
                try:
                    if error is not None:
                        raise error
                    assert gathered is not None and scratch is not None
                    failed = [p for p in gathered[1:] if isinstance(p, str)]
                    if failed:
                        raise ReportError(f"a rank could not send its part of the report ({failed[0]})")
                    for idx in keys:
                        run = mine.get(idx)
                        if run is None:  # rank zero evaluated no batch of this dataloader; other ranks did
                            run = self._run_for(trainer, pl_module, stage, idx)
                            self._runs.pop(idx, None)
                        targets.append(run)
                    for run in targets:
                        self._merge_shards(run, gathered, scratch)
                        self._padding_note(trainer, stage, run)
                    scalars = _scalars(targets)
                except Exception as exc:  # noqa: BLE001 - raised on every rank below
                    error = exc
                # finalized at the end of the loop, or left INCOMPLETE by on_exception
                self._pending.extend(targets or list(mine.values()))
            outcome = {"scalars": scalars, "error": None if error is None else f"{type(error).__name__}: {error}"}
            outcome = trainer.strategy.broadcast(outcome, src=0)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            for run in runs:
                if run.shard:
                    shutil.rmtree(run.tmp_dir, ignore_errors=True)
        if outcome["error"] is not None:
            if isinstance(error, BaseException):
                raise error
            raise ReportError(f"the distributed report failed on rank zero: {outcome['error']}")
        return outcome["scalars"]

    def _merge_shards(self, run: _Run, gathered: list[Any], scratch: Path) -> None:
        """Merge the other ranks' sums into rank zero's ``run`` and append their rows (from the scratch files) to
        its samples, in rank order with consecutive sample indices."""
        run.world_size = len(gathered)
        run.input_digests = [(0, run.hasher.hexdigest(), run.hasher.count)]
        for k in range(1, len(gathered)):
            payload = gathered[k].get(run.dataloader_idx)
            if payload is None:  # this rank evaluated no batch of this dataloader
                run.input_digests.append((k, StreamHasher().hexdigest(), 0))
                continue
            run.input_digests.append(tuple(payload["digest"]))  # type: ignore[arg-type]
            if not payload["count"]:
                continue
            if run.num_classes == 0:
                self._adopt(run, payload)
            elif payload["num_classes"] != run.num_classes:
                raise ReportError(f"rank {k} saw {payload['num_classes']} classes in the {run.key} report, rank 0 {run.num_classes}")
            run.stats.merge(payload["stats"])
            for name, values in payload["class_arrays"].items():
                run.class_arrays[name] = run.class_arrays[name] + values
            for name, values in payload["bins"].items():
                run.bins[name] = run.bins[name] + values
            for site, sums in payload["heads"].items():
                if site not in run.heads:
                    run.heads[site] = sums
                elif not run.heads[site].merge(sums):
                    run.notes.append(f"site {site}: rank {k} saw {sums.heads} heads, rank 0 {run.heads[site].heads}; "
                                     "its samples are not in the per-head table")
            for pair, stats in payload["agreement"].items():
                run.agreement.setdefault(pair, GroupStatistics()).merge(stats)
            run.batch_rows.extend(payload["batch_rows"])
            for note in payload["notes"]:
                if note not in run.notes:
                    run.notes.append(f"rank {k}: {note}")
            rows = self._append_rows(run, scratch / f"rank{k}_dl{run.dataloader_idx}.csv")
            if rows != payload["count"]:
                raise ReportError(f"rank {k} sent {rows} sample rows for its {payload['count']} samples of the {run.key} report")
            run.count += rows

    def _adopt(self, run: _Run, payload: Mapping[str, Any]) -> None:
        """Set up rank zero's ``run`` from another rank's first batch (rank zero evaluated none of this dataloader)."""
        run.num_classes = payload["num_classes"]
        run.class_names = payload["class_names"]
        run.class_arrays = {name: np.zeros_like(values) for name, values in payload["class_arrays"].items()}
        run.sites, run.site_info, run.pair_sites = list(payload["sites"]), dict(payload["site_info"]), list(payload["pair_sites"])
        run.modality = dict(payload["modality"])
        run.columns = list(payload["columns"])
        run.samples_handle = (run.tmp_dir / "samples.csv.part").open("w", newline="", encoding="utf-8")
        run.samples_writer = csv.writer(run.samples_handle)
        run.samples_writer.writerow(run.columns)

    def _append_rows(self, run: _Run, path: Path) -> int:
        """Append another rank's sample rows (its CSV, header first) to rank zero's, renumbering ``sample``;
        columns are matched by name (the ranks' first batches normally give the same). Returns the row count."""
        if not path.exists():
            return 0
        count = 0
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return 0
            index = {name: i for i, name in enumerate(header)}
            same = header == run.columns
            for row in reader:
                if not same:
                    row = [row[index[name]] if name in index else "" for name in run.columns]
                row[0] = str(run.count + count)
                run.samples_writer.writerow(row)
                count += 1
        return count

    def _padding_note(self, trainer: pl.Trainer, stage: str, run: _Run) -> None:
        """Note (and warn once) when Lightning's DistributedSampler padded this dataloader with repeated samples
        that the report counted."""
        try:
            from torch.utils.data import DistributedSampler

            loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
            if isinstance(loaders, Mapping):
                loaders = list(loaders.values())
            elif not isinstance(loaders, (list, tuple)):
                loaders = [loaders]
            sampler = getattr(loaders[run.dataloader_idx], "sampler", None) if run.dataloader_idx < len(loaders) else None
            if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
                return
            total, size = int(sampler.total_size), len(sampler.dataset)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a best-effort note
            return
        if total > size and run.count == total:
            note = (f"the DistributedSampler padded the {size} samples to {total} ({total - size} repeated) so that the "
                    f"{run.world_size} ranks get as many: samples.csv and every statistic count the repeats (as Lightning's metrics do)")
            run.notes.append(note)
            if not self._warned_padding:
                self._warned_padding = True
                warnings.warn(f"ExplainabilityReport ({run.key}): {note}", UserWarning, stacklevel=2)

    # -- end of loop: write everything ----------------------------------------------------------------------------
    def _finalize_pending(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, []
        for index, run in enumerate(pending):
            try:
                self._finalize(trainer, run)
            except BaseException as error:
                self._pending = pending[index:]
                self._abandon(f"writing the report failed: {type(error).__name__}: {error}")
                raise

    def _finalize(self, trainer: pl.Trainer, run: _Run) -> None:
        if run.samples_handle is not None:
            run.samples_handle.close()
            run.samples_handle = None
        if run.count == 0:
            raise ReportError(f"no samples were evaluated for the {run.key} report (empty dataloader?)")
        config = self.config()
        config_sha = hash_config(config)
        if run.world_size > 1 and run.input_digests:
            inputs_sha = combine_input_hashes(run.input_digests)
            num_batches = sum(count for _, _, count in run.input_digests)
        else:
            inputs_sha, num_batches = run.hasher.hexdigest(), run.hasher.count
        provenance = {
            "report_sha256": report_hash(run.model_sha256, inputs_sha, config_sha),
            "model_sha256": run.model_sha256,
            "inputs_sha256": inputs_sha,
            "config_sha256": config_sha,
            "model_class": run.model_class,
            "num_samples": run.count,
            "num_batches": num_batches,
            "world_size": run.world_size,
            "stage": run.stage,
            "dataloader_idx": run.dataloader_idx,
            "epoch": run.epoch,
            "global_step": int(trainer.global_step),
            "started_utc": run.started,
            "finished_utc": utc_now(),
            "versions": library_versions(),
        }
        summary = self._summary(run, trainer, config, provenance)
        tmp = run.tmp_dir
        files: dict[str, dict[str, Any]] = {}
        line = PROVENANCE_PREFIX + json.dumps(_jsonable(provenance), sort_keys=True, separators=(",", ":")) + "\n"

        # CSVs: the provenance line, then the table (the per-sample body is copied, never loaded)
        with (tmp / "samples.csv").open("w", newline="", encoding="utf-8") as out, (tmp / "samples.csv.part").open(encoding="utf-8") as body:
            out.write(line)
            shutil.copyfileobj(body, out)
        (tmp / "samples.csv.part").unlink()
        files["samples.csv"] = {"rows": run.count, "kind": "per-sample"}
        for name, (columns, rows) in self._tables(run, summary).items():
            _write_csv(tmp / name, line, columns, rows)
            files[name] = {"rows": len(rows), "kind": name[:-4]}

        # figures
        (tmp / "figures").mkdir()
        figures = self._figures(run, summary) if self.figures else []
        rendered: list[tuple[str, str, bytes]] = []
        png_meta = {"Software": f"lightning_attn {provenance['versions'].get('lightning_attn', '')}".strip(),
                    "lightning_attn_provenance": json.dumps(_jsonable(provenance), sort_keys=True)}
        for name, title, caption, figure in figures:
            png = _render(figure, self.figure_dpi, png_meta)
            path = f"figures/{name}.png"
            (tmp / path).write_bytes(png)
            files[path] = {"kind": "figure", "title": title}
            rendered.append((title, caption, png))
        figures.clear()

        # Markdown and HTML
        (tmp / "summary.md").write_text(self._markdown(summary, provenance, sorted(files) + ["report.html", "report.json"]), encoding="utf-8")
        files["summary.md"] = {"kind": "summary"}
        self._write_html(tmp / "report.html", run, summary, provenance, rendered)
        files["report.html"] = {"kind": "html"}
        for name, entry in files.items():
            entry["sha256"] = _file_sha256(tmp / name)
            entry["bytes"] = (tmp / name).stat().st_size
        summary["files"] = {name: files[name] for name in sorted(files)}
        summary["provenance"] = provenance
        document = _jsonable(summary)
        (tmp / "report.json").write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")

        # publish: the temporary directory becomes the final one
        (tmp / INCOMPLETE).unlink()
        final = run.final_dir
        trash = None
        if final.exists():
            trash = final.parent / f".{final.name}.replaced-{os.getpid()}"
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
        tmp.rename(final)
        run.finished = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        document["directory"] = str(final)
        self.results[run.key] = document

    # -- summary ------------------------------------------------------------------------------------------------------
    def _summary(self, run: _Run, trainer: pl.Trainer, config: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
        arrays = run.class_arrays
        n = int(arrays["support"].sum())
        group = run.stats.summary()
        calibration = _calibration(run.bins)
        dataset = {
            "num_samples": n,
            "num_batches": len(run.batch_rows),
            "num_classes": run.num_classes,
            "accuracy": float(arrays["tp"].sum() / n),
            "mean_confidence": group["confidence"]["all"]["mean"],
            "mean_margin": group["margin"]["all"]["mean"],
            "mean_output_entropy": group["output_entropy"]["all"]["mean"],
            "nll": group["nll"]["all"]["mean"],
            "brier": group["brier"]["all"]["mean"],
            "ece": calibration["ece"],
            "mce": calibration["mce"],
            "num_correct": int(arrays["tp"].sum()),
            "num_incorrect": n - int(arrays["tp"].sum()),
        }
        classes = []
        for k in range(run.num_classes):
            support, predicted, tp = int(arrays["support"][k]), int(arrays["predicted"][k]), int(arrays["tp"][k])
            precision = tp / predicted if predicted else None
            recall = tp / support if support else None
            f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if precision is not None and recall is not None else None)
            classes.append({
                "class": k,
                "name": _name(run.class_names, k),
                "support": support,
                "predicted": predicted,
                "correct": tp,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "mean_confidence_true": arrays["conf_true"][k] / support if support else None,
                "mean_confidence_predicted": arrays["conf_pred"][k] / predicted if predicted else None,
                "mean_attention_entropy": arrays["entropy_true"][k] / arrays["entropy_count"][k] if arrays["entropy_count"][k] else None,
            })
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
                entry.update({
                    "num_samples": sums.n,
                    "entropy_mean": mean.tolist(),
                    "entropy_std": np.sqrt(np.maximum(sums.total_sq / sums.n - mean * mean, 0)).tolist(),
                    "entropy_mean_correct": (sums.total_correct / sums.n_correct).tolist() if sums.n_correct else [None] * sums.heads,
                    "entropy_mean_incorrect": (sums.total_incorrect / n_inc).tolist() if n_inc else [None] * sums.heads,
                    "focused_share": (sums.focused / sums.n).tolist(),
                    "most_focused_head": int(mean.argmin()),
                })
            sites.append(entry)
        modality = {
            pair: {"sites": [a, b], **group.get(f"agreement/{pair}", {"all": {"n": 0, "mean": None, "std": None}})}
            for pair, (a, b) in run.modality.items()
        }
        bins = run.bins
        edges = np.linspace(0.0, 1.0, self.calibration_bins + 1)
        calibration_bins = [
            {
                "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(bins["count"][b]),
                "accuracy": float(bins["hits"][b] / bins["count"][b]) if bins["count"][b] else None,
                "confidence": float(bins["conf"][b] / bins["count"][b]) if bins["count"][b] else None,
                "correct": int(bins["hits"][b]), "incorrect": int(bins["count"][b] - bins["hits"][b]),
            }
            for b in range(self.calibration_bins)
        ]
        batch_acc = [row[2] for row in run.batch_rows]
        batches = {
            "count": len(run.batch_rows),
            "columns": ["batch", "samples", "accuracy", "mean_confidence", "mean_attention_entropy", "rank"],
            "rows": run.batch_rows,
            "accuracy": _moments(batch_acc),
            "mean_confidence": _moments([row[3] for row in run.batch_rows]),
        }
        saliency = self._saliency_summary(run)
        return {
            "schema_version": SCHEMA_VERSION,
            "title": self.title,
            "stage": run.stage,
            "stage_key": run.key,
            "dataloader_idx": run.dataloader_idx,
            "config": config,
            "dataset": dataset,
            "calibration": {"n_bins": self.calibration_bins, "ece": calibration["ece"], "mce": calibration["mce"], "bins": calibration_bins},
            "batches": batches,
            "correct_vs_incorrect": group,
            "classwise": classes,
            "attention": {"sites": sites, "pair_sites": run.pair_sites, "modality_pairs": modality},
            "saliency": saliency,
            "sections": self._sections(trainer, run),
            "notes": list(run.notes),
            "samples": {"file": "samples.csv", "rows": run.count, "columns": run.columns},
        }

    def _saliency_summary(self, run: _Run) -> dict[str, Any]:
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
            aggregate[name] = {"feature_names": agg["feature_names"], "mean_share": mean.tolist(),
                               "top": [[agg["feature_names"][i], float(mean[i])] for i in order]}
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
            head_relevance[site] = {"mean": mean.tolist(), "share": (mean / total).tolist() if total > 0 else [0.0] * len(mean)}
        rollout_sites = next((p["rollout"]["sites"] for p in probes if p["rollout"] is not None), [])
        return {
            "target": self.saliency_target,
            "method": {
                "inputs": "gradient x input (x * d score / d x), |.| summed over all but the last (feature) axis; share of the input's total",
                "rollout": "gradient-weighted attention rollout: mean_h(max(A * dA, 0)) per layer, 0.5 identity, rows renormalized",
                "head_relevance": "sum over (query, key) of max(A * dA, 0), mean over probes; share within the site",
            },
            "num_probes": len(probes),
            "probes": probes,
            "aggregate": aggregate,
            "head_relevance": head_relevance,
            "rollout_sites": rollout_sites,
        }

    def _sections(self, trainer: pl.Trainer, run: _Run) -> dict[str, Any]:
        """``.results`` and ``registry()`` of the other lightning_attn callbacks of the Trainer (any that exist)."""
        sections: dict[str, Any] = {}
        for callback in getattr(trainer, "callbacks", None) or []:
            if callback is self or isinstance(callback, ExplainabilityReport):
                continue
            has_results = hasattr(callback, "results")
            registry = getattr(callback, "registry", None)
            if not has_results and not callable(registry):
                continue
            name = _section_name(callback)
            entry: dict[str, Any] = {"callback": f"{type(callback).__module__}.{type(callback).__qualname__}"}
            try:
                if has_results:
                    entry["results"] = _jsonable(_pick_stage(callback.results, run))
                if callable(registry):
                    try:
                        value = registry(run.key)
                    except TypeError:
                        value = registry()
                    entry["registry"] = _jsonable(value)
            except Exception as error:  # another callback's state must never break the report
                entry["error"] = f"{type(error).__name__}: {error}"
            key, i = name, 2
            while key in sections:
                key, i = f"{name}_{i}", i + 1
            sections[key] = entry
        return sections

    def _tables(self, run: _Run, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
        relevance = summary["saliency"]["head_relevance"]
        head_rows = []
        for site in summary["attention"]["sites"]:
            if "entropy_mean" not in site:
                continue
            rel = relevance.get(site["name"], {})
            for h in range(len(site["entropy_mean"])):
                head_rows.append([
                    site["name"], h, site["num_samples"], site["entropy_mean"][h], site["entropy_std"][h],
                    site["entropy_mean_correct"][h], site["entropy_mean_incorrect"][h], site["focused_share"][h],
                    rel.get("mean", [None] * (h + 1))[h] if rel else None, rel.get("share", [None] * (h + 1))[h] if rel else None,
                ])
        class_columns = ["class", "name", "support", "predicted", "correct", "precision", "recall", "f1", "mean_confidence_true",
                         "mean_confidence_predicted", "mean_attention_entropy"]
        saliency_rows = []
        for probe in summary["saliency"]["probes"]:
            for name, entry in probe["inputs"].items():
                for i, feature in enumerate(entry["feature_names"]):
                    saliency_rows.append([probe["sample"], probe["explained_class"], name, i, feature, entry["share"][i],
                                          entry["abs"][i], entry["signed"][i]])
        return {
            "per_head.csv": (["site", "head", "num_samples", "entropy_mean", "entropy_std", "entropy_mean_correct",
                              "entropy_mean_incorrect", "focused_share", "relevance", "relevance_share"], head_rows),
            "classwise.csv": (class_columns, [[c[k] for k in class_columns] for c in summary["classwise"]]),
            "batches.csv": (summary["batches"]["columns"], summary["batches"]["rows"]),
            "saliency.csv": (["sample", "explained_class", "input", "feature_index", "feature", "share", "abs", "signed"], saliency_rows),
        }

    # -- figures ----------------------------------------------------------------------------------------------------
    def _figures(self, run: _Run, summary: dict[str, Any]) -> list[tuple[str, str, str, Figure]]:
        out: list[tuple[str, str, str, Figure]] = []
        cal = summary["calibration"]
        bins = cal["bins"]
        lower, upper = [b["lower"] for b in bins], [b["upper"] for b in bins]
        out.append(("reliability", "Reliability diagram",
                    f"accuracy per equal-width confidence bin ({cal['n_bins']} bins); ECE {_f(cal['ece'])}, MCE {_f(cal['mce'])}",
                    plots.plot_reliability(lower, upper, [b["accuracy"] for b in bins], [b["confidence"] for b in bins],
                                           [b["count"] for b in bins], ece=cal["ece"])))
        out.append(("confidence", "Confidence histogram", "confidence of correct and incorrect predictions",
                    plots.plot_confidence_histogram(lower, upper, [b["correct"] for b in bins], [b["incorrect"] for b in bins])))
        group = summary["correct_vs_incorrect"]
        names = [n for n in group if group[n]["effect_size"] is not None]
        if names:
            out.append(("correct_vs_incorrect", "Correct vs. incorrect",
                        "standardized difference of every per-sample measure (positive: larger for correct predictions)",
                        plots.plot_effect_sizes(names, [group[n]["effect_size"] for n in names])))
        classes = summary["classwise"]
        out.append(("classwise", "Class-wise precision and recall", "per true class",
                    plots.plot_classwise([c["name"] for c in classes], [c["support"] for c in classes],
                                         [c["recall"] for c in classes], [c["precision"] for c in classes])))
        if len(run.batch_rows) > 1:
            out.append(("batches", "Per-batch statistics", "accuracy and mean confidence of each batch",
                        plots.plot_batch_accuracy([r[2] for r in run.batch_rows], [r[3] for r in run.batch_rows])))
        sites = [s for s in summary["attention"]["sites"] if "entropy_mean" in s]
        if sites:
            width = max(len(s["entropy_mean"]) for s in sites)
            matrix = np.full((len(sites), width), np.nan)
            for i, s in enumerate(sites):
                matrix[i, : len(s["entropy_mean"])] = s["entropy_mean"]
            out.append(("head_entropy", "Mean attention entropy per head",
                        "normalized entropy in [0, 1] averaged over samples (0: one key, 1: uniform)",
                        plots.plot_head_matrix([s["name"] for s in sites], matrix, title="Mean normalized entropy per head",
                                               label="entropy", vmin=0, vmax=1)))
        relevance = summary["saliency"]["head_relevance"]
        if relevance:
            names = list(relevance)
            width = max(len(v["share"]) for v in relevance.values())
            matrix = np.full((len(names), width), np.nan)
            for i, name in enumerate(names):
                matrix[i, : len(relevance[name]["share"])] = relevance[name]["share"]
            out.append(("head_relevance", "Head relevance (gradient-weighted)",
                        "share of sum(max(A * dA, 0)) of each head within its site, mean over probe samples",
                        plots.plot_head_matrix(names, matrix, title="Head relevance share", label="share", cmap="magma", vmin=0)))
        probes = summary["saliency"]["probes"]
        labels = [f"sample {p['sample']} (class {p['explained_class']})" for p in probes]
        for name, agg in summary["saliency"]["aggregate"].items():
            shares = [p["inputs"][name]["share"] for p in probes if name in p["inputs"]]
            if shares:
                out.append((f"saliency_{_safe(name)}", f"Gradient x input: {name}",
                            "share of |gradient x input| per feature (rows: probe samples; bars: mean)",
                            plots.plot_feature_saliency(agg["feature_names"], shares, sample_labels=labels[: len(shares)],
                                                        title=f"Feature saliency of input '{name}'")))
        for name, entries in run.probe_positions.items():
            entries = entries[:4]
            maps = np.stack([m for _, m, _ in entries]) if len({m.shape for _, m, _ in entries}) == 1 else None
            if maps is not None:
                out.append((f"saliency_map_{_safe(name)}", f"Gradient x input over positions: {name}",
                            "|gradient x input| per position and feature, first probe samples",
                            plots.plot_position_saliency(maps, feature_names=summary["saliency"]["aggregate"].get(name, {}).get("feature_names"),
                                                         sample_labels=[f"sample {s}" for s, _, _ in entries],
                                                         title=f"Saliency map of input '{name}'", pooled=entries[0][2])))
        rolled = [p for p in probes if p["rollout"] is not None]
        if rolled and len({len(p["rollout"]["mean_row"]) for p in rolled}) == 1:
            sites_used = rolled[0]["rollout"]["sites"]
            out.append(("rollout", "Gradient-weighted attention rollout",
                        f"token relevance (mean over output rows) through {len(sites_used)} sites: {', '.join(sites_used)}",
                        plots.plot_rollout_relevance([p["rollout"]["mean_row"] for p in rolled],
                                                     sample_labels=[f"sample {p['sample']}" for p in rolled],
                                                     title="Gradient-weighted rollout relevance")))
        return out

    # -- Markdown ----------------------------------------------------------------------------------------------------
    def _markdown(self, summary: dict[str, Any], provenance: dict[str, Any], files: list[str]) -> str:
        d = summary["dataset"]
        lines = [f"# {self.title}", "",
                 f"Stage `{summary['stage_key']}`, {d['num_samples']} samples in {d['num_batches']} batches, "
                 f"{d['num_classes']} classes. Written {provenance['finished_utc']}.", "",
                 "## Provenance", "", "| item | value |", "|---|---|"]
        for key in ("report_sha256", "model_sha256", "inputs_sha256", "config_sha256", "model_class", "started_utc", "finished_utc"):
            lines.append(f"| {key} | `{provenance[key]}` |")
        if provenance.get("world_size", 1) > 1:
            lines.append(f"| world_size | {provenance['world_size']} (inputs_sha256 combines the ranks' hashes) |")
        lines.append("| versions | " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()) + " |")
        lines += ["", "## Dataset", "", "| measure | value |", "|---|---|"]
        for key in ("accuracy", "mean_confidence", "ece", "mce", "nll", "brier", "mean_margin", "mean_output_entropy", "num_correct", "num_incorrect"):
            lines.append(f"| {key} | {_f(d[key])} |")
        lines += ["", "## Correct vs. incorrect predictions", "",
                  "| measure | mean (correct) | mean (incorrect) | difference | effect size |", "|---|---|---|---|---|"]
        for name, g in summary["correct_vs_incorrect"].items():
            lines.append(f"| {name} | {_f(g['correct']['mean'])} | {_f(g['incorrect']['mean'])} | {_f(g['difference'])} | {_f(g['effect_size'])} |")
        lines += ["", "## Class-wise", "", "| class | support | predicted | precision | recall | f1 | mean confidence |", "|---|---|---|---|---|---|---|"]
        for c in summary["classwise"]:
            lines.append(f"| {c['name']} | {c['support']} | {c['predicted']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} | {_f(c['mean_confidence_true'])} |")
        sites = [s for s in summary["attention"]["sites"] if "entropy_mean" in s]
        if sites:
            lines += ["", "## Attention sites", "", "| site | heads | mean entropy | most focused head |", "|---|---|---|---|"]
            for s in sites:
                lines.append(f"| `{s['name']}` | {s['num_heads']} | {_f(float(np.mean(s['entropy_mean'])))} | h{s['most_focused_head']} |")
        for pair, entry in summary["attention"]["modality_pairs"].items():
            lines.append(f"\nModality agreement `{pair}`: mean {_f(entry['all']['mean'])} over {entry['all']['n']} samples.")
        sal = summary["saliency"]
        if sal["num_probes"]:
            lines += ["", f"## Saliency ({sal['num_probes']} probe samples, {sal['target']} class)", ""]
            for name, agg in sal["aggregate"].items():
                lines.append(f"- input `{name}`: " + ", ".join(f"{f} {_f(v)}" for f, v in agg["top"][:5]))
            for site, rel in sal["head_relevance"].items():
                top = int(np.argmax(rel["share"])) if rel["share"] else 0
                lines.append(f"- head relevance `{site}`: most relevant h{top} ({_f(rel['share'][top] if rel['share'] else None)})")
        if summary["sections"]:
            lines += ["", "## Other callbacks", ""] + [f"- {k}: `{v['callback']}` (see report.json / report.html)" for k, v in summary["sections"].items()]
        if summary["notes"]:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
        lines += ["", "## Files", ""] + [f"- `{f}`" for f in files] + [""]
        return "\n".join(lines)

    # -- HTML ------------------------------------------------------------------------------------------------------
    def _write_html(self, path: Path, run: _Run, summary: dict[str, Any], provenance: dict[str, Any],
                    figures: list[tuple[str, str, bytes]]) -> None:
        d = summary["dataset"]
        blocks: list[str] = []
        cards = [("samples", d["num_samples"]), ("accuracy", d["accuracy"]), ("mean confidence", d["mean_confidence"]),
                 ("ECE", d["ece"]), ("NLL", d["nll"]), ("Brier", d["brier"]), ("attention sites", len(summary["attention"]["sites"])),
                 ("probe samples", summary["saliency"]["num_probes"])]
        notes = "".join(f'<p class="warn">{page.esc(n)}</p>' for n in summary["notes"])
        blocks.append('<section id="overview"><h2>Overview</h2><div class="cards">'
                      + "".join(f'<div class="card"><div class="v">{page.esc(_f(v))}</div><div class="k">{page.esc(k)}</div></div>' for k, v in cards)
                      + f"</div>{notes}</section>")
        blocks.append('<section id="figures"><h2>Figures</h2>' + "".join(page.figure_html(t, png, c) for t, c, png in figures) + "</section>")
        group = summary["correct_vs_incorrect"]
        rows = [[name, g["correct"]["n"], g["correct"]["mean"], g["correct"]["std"], g["incorrect"]["n"], g["incorrect"]["mean"],
                 g["incorrect"]["std"], g["difference"], g["effect_size"]] for name, g in group.items()]
        blocks.append('<section id="correct-vs-incorrect"><h2>Correct vs. incorrect predictions</h2>'
                      + page.table_html(["measure", "n correct", "mean correct", "std correct", "n incorrect", "mean incorrect",
                                         "std incorrect", "difference", "effect size"], rows) + "</section>")
        class_columns = ["class", "name", "support", "predicted", "correct", "precision", "recall", "f1", "mean_confidence_true",
                         "mean_confidence_predicted", "mean_attention_entropy"]
        blocks.append('<section id="classwise"><h2>Class-wise</h2>'
                      + page.table_html(class_columns, [[c[k] for k in class_columns] for c in summary["classwise"]]) + "</section>")
        tables = self._tables(run, summary)
        head_columns, head_rows = tables["per_head.csv"]
        attention_block = '<section id="heads"><h2>Attention heads</h2>'
        if head_rows:
            attention_block += ('<p class="note">Per site and head: mean normalized entropy over samples, for correct and incorrect '
                                "predictions, how often the head is a sample's most focused one, and its gradient-weighted relevance "
                                "(probe samples).</p>" + page.table_html(head_columns, head_rows))
        else:
            attention_block += '<p class="note">No attention was captured.</p>'
        for pair, entry in summary["attention"]["modality_pairs"].items():
            attention_block += (f"<p>Modality agreement <code>{page.esc(pair)}</code> ({page.esc(entry['sites'][0])} vs. "
                                f"{page.esc(entry['sites'][1])}): mean {_f(entry['all']['mean'])}, correct {_f(entry['correct']['mean'])}, "
                                f"incorrect {_f(entry['incorrect']['mean'])}.</p>")
        blocks.append(attention_block + "</section>")
        sal = summary["saliency"]
        sal_block = '<section id="saliency"><h2>Saliency</h2>'
        if sal["num_probes"]:
            sal_block += (f'<p class="note">{sal["num_probes"]} probe samples, explaining the {page.esc(sal["target"])} class. '
                          f'{page.esc(sal["method"]["inputs"])}. Rollout: {page.esc(sal["method"]["rollout"])}.</p>')
            rows = []
            for p in sal["probes"]:
                for name, entry in p["inputs"].items():
                    rows.append([p["sample"], p["target"], p["predicted"], p["explained_class"], name,
                                 ", ".join(f"{f} ({v:.3f})" for f, v in entry["top"][:5])])
                if p["rollout"] is not None:
                    relevance = np.asarray(p["rollout"]["mean_row"])
                    order = np.argsort(-relevance)[:5]
                    rows.append([p["sample"], p["target"], p["predicted"], p["explained_class"], "rollout tokens",
                                 ", ".join(f"{i} ({relevance[i]:.3f})" for i in order)])
            sal_block += page.table_html(["sample", "target", "predicted", "explained class", "input", "top features (share)"], rows)
        else:
            sal_block += '<p class="note">No probe samples (probe_samples=0).</p>'
        blocks.append(sal_block + "</section>")
        batch_rows = summary["batches"]["rows"]
        blocks.append('<section id="batches"><h2>Batches</h2>'
                      + page.table_html(summary["batches"]["columns"], batch_rows[:500])
                      + (f'<p class="note">first 500 of {len(batch_rows)} batches; all in batches.csv</p>' if len(batch_rows) > 500 else "")
                      + "</section>")
        sections = summary["sections"]
        for key in ("calibration", "head_specialization"):
            title = key.replace("_", " ").capitalize()
            if key in sections:
                blocks.append(f'<section id="{key}"><h2>{title}</h2><p class="note">from <code>{page.esc(sections[key]["callback"])}</code> '
                              "of the same Trainer</p>" + _section_html(sections[key]) + "</section>")
            else:
                blocks.append(f'<section id="{key}"><h2>{title}</h2><p class="note">No {title.lower()} callback ran in this Trainer.</p></section>')
        for key, entry in sections.items():
            if key in ("calibration", "head_specialization"):
                continue
            blocks.append(f'<section id="{page.esc(key)}"><h2>{page.esc(key)}</h2><p class="note">from <code>{page.esc(entry["callback"])}</code>'
                          "</p>" + _section_html(entry) + "</section>")
        prov_rows = [[k, v] for k, v in provenance.items() if k != "versions"] + [[f"version: {k}", v] for k, v in provenance["versions"].items()]
        blocks.append('<section id="provenance"><h2>Provenance</h2>' + page.table_html(["item", "value"], prov_rows, sortable=False)
                      + "<h3>Configuration</h3>" + page.nested_html(summary["config"]) + "</section>")
        shown = run.count if self.html_max_rows is None else min(run.count, self.html_max_rows)
        nav = [("overview", "Overview"), ("figures", "Figures"), ("correct-vs-incorrect", "Correct vs. incorrect"), ("classwise", "Class-wise"),
               ("heads", "Heads"), ("saliency", "Saliency"), ("calibration", "Calibration"), ("head_specialization", "Head specialization"),
               ("provenance", "Provenance"), ("per-sample", "Per-sample")]
        meta = {"generator": "lightning_attn ExplainabilityReport", "lightning-attn-schema-version": SCHEMA_VERSION,
                **{f"lightning-attn-{k.replace('_', '-')}": str(provenance[k]) for k in ("report_sha256", "model_sha256", "inputs_sha256", "config_sha256", "finished_utc")}}
        with path.open("w", encoding="utf-8") as handle, (run.tmp_dir / "samples.csv").open(encoding="utf-8", newline="") as samples:
            samples.readline()  # provenance line
            reader = csv.reader(samples)
            columns = next(reader)
            page.write_page(
                handle, title=self.title,
                subtitle=f"{summary['stage_key']} · {d['num_samples']} samples · model {provenance['model_class']} · "
                         f"report sha256 {provenance['report_sha256'][:16]}… · {provenance['finished_utc']}",
                meta=meta, nav=nav, blocks=blocks, samples_columns=columns, samples_rows=_limited(reader, shown),
                expected_rows=shown, total_rows=run.count,
            )


# -----------------------------------------------------------------------------------------------------------------
# helpers
# -----------------------------------------------------------------------------------------------------------------
def _callable_name(fn: Any) -> str | None:
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return f"partial({_callable_name(fn.func)})"
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return value


def _f(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    return str(value)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_") or "input"


def _moments(values: Sequence[float]) -> dict[str, float | None]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {"mean": None, "std": None, "min": None, "max": None}
    array = np.asarray(clean, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()), "max": float(array.max())}


def _scalars(runs: Iterable[_Run]) -> dict[str, float]:
    """``report/<key>/accuracy`` and ``report/<key>/ece`` of the runs that saw samples."""
    scalars = {}
    for run in runs:
        n = run.class_arrays.get("support", np.zeros(0)).sum()
        if n:
            scalars[f"{NAMESPACE}/{run.key}/accuracy"] = float(run.class_arrays["tp"].sum() / n)
            scalars[f"{NAMESPACE}/{run.key}/ece"] = float(_calibration(run.bins)["ece"] or 0.0)
    return scalars


def _shard_payload(run: _Run) -> dict[str, Any]:
    """What a non-zero rank sends rank zero for one run: everything mergeable, no sample rows (those follow in chunks)."""
    return {
        "count": run.count, "num_classes": run.num_classes, "class_names": run.class_names, "columns": run.columns,
        "sites": run.sites, "site_info": run.site_info, "pair_sites": run.pair_sites, "modality": run.modality,
        "stats": run.stats, "class_arrays": run.class_arrays, "bins": run.bins, "heads": run.heads, "agreement": run.agreement,
        "batch_rows": run.batch_rows, "notes": run.notes, "digest": (run.rank, run.hasher.hexdigest(), run.hasher.count),
    }


def _calibration(bins: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    count = bins["count"]
    n = count.sum()
    if not n:
        return {"ece": None, "mce": None}
    filled = count > 0
    gap = np.abs(bins["hits"][filled] / count[filled] - bins["conf"][filled] / count[filled])
    return {"ece": float((gap * count[filled]).sum() / n), "mce": float(gap.max())}


def _batch_device(batch: Any) -> torch.device | None:
    if isinstance(batch, Tensor):
        return batch.device
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        device = _batch_device(value)
        if device is not None:
            return device
    return None


def _limited(rows: Iterator[list[str]], count: int) -> Iterator[list[str]]:
    for index, row in enumerate(rows):
        if index >= count:
            return
        yield row


def _write_csv(path: Path, provenance_line: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        handle.write(provenance_line)
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(v) for v in row])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _render(figure: Figure, dpi: int, metadata: Mapping[str, str]) -> bytes:
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata=dict(metadata))
    figure.clear()
    return buffer.getvalue()


def _section_name(callback: Any) -> str:
    name = type(callback).__name__.lower()
    if "calibration" in name:
        return "calibration"
    if "head" in name and "special" in name:
        return "head_specialization"
    if "attention" in name:
        return "attention"
    return type(callback).__name__


def _pick_stage(results: Any, run: _Run) -> Any:
    if isinstance(results, Mapping):
        for key in (run.key, STAGE_KEYS.get(run.stage), run.stage):
            if key is not None and key in results:
                return results[key]
    return results


def _section_html(entry: Mapping[str, Any]) -> str:
    parts = []
    if "error" in entry:
        parts.append(f'<p class="warn">Reading this callback failed: {page.esc(entry["error"])}</p>')
    for key in ("results", "registry"):
        if key in entry:
            parts.append(f"<h3>{key}</h3>" + page.nested_html(entry[key]))
    return "".join(parts)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Plain JSON types from tensors, arrays, dataclasses, objects with ``to_dict()``, enums and paths; NaN and
    infinities become ``None``; anything else its ``repr``."""
    if depth > 32:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _jsonable(value.detach().cpu().tolist(), depth + 1)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), depth + 1)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), depth + 1)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, depth + 1) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        try:
            return _jsonable(to_dict(), depth + 1)
        except Exception:  # noqa: BLE001 - fall back to repr
            pass
    if callable(value):
        return _callable_name(value)
    return repr(value)


# -----------------------------------------------------------------------------------------------------------------
# build_report
# -----------------------------------------------------------------------------------------------------------------
def _stderr_progress_bar() -> pl.Callback:
    """Lightning's tqdm progress bar, drawn on stderr (Lightning's own draws on stdout, which a command keeps for
    its result)."""
    import contextlib
    import sys

    from lightning.pytorch.callbacks import TQDMProgressBar

    class StderrTQDMProgressBar(TQDMProgressBar):
        def init_sanity_tqdm(self) -> Any:
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_sanity_tqdm()

        def init_validation_tqdm(self) -> Any:
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_validation_tqdm()

        def init_test_tqdm(self) -> Any:
            with contextlib.redirect_stdout(sys.stderr):
                return super().init_test_tqdm()

    return StderrTQDMProgressBar()


def build_report(
    model: nn.Module,
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    stage: Literal["test", "validate"] = "test",
    callbacks: Sequence[pl.Callback] = (),
    accelerator: str = "auto",
    devices: int | str = 1,
    progress: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **report_kwargs: Any,
) -> Path:
    """Build the explainability report of ``model`` on ``data`` into ``out_dir``, with no Trainer script.

    Runs ``Trainer.test`` (or ``Trainer.validate`` for ``stage="validate"``) with an
    :class:`ExplainabilityReport` (``report_kwargs`` are its arguments, e.g. ``forward_fn``, ``class_names``,
    ``feature_names``, ``modality_pairs``, ``probe_samples``) and the given extra ``callbacks`` (a calibration
    or head-specialization callback there gets its section in the report). No logger, no checkpointing; the
    progress bar is Lightning's tqdm bar.

    Args:
        model: a LightningModule with a ``test_step`` (``validation_step``) or any ``nn.Module``; modules
            without the step are wrapped, and the report explains the module itself (its site names, its hash).
        data: a DataLoader (or any iterable of batches), or a LightningDataModule.
        out_dir: the report's directory; replaced on success, untouched on failure (the partial output stays
            in a sibling ``.<name>.incomplete-*`` directory with an ``INCOMPLETE`` marker).
        stage: ``"test"`` or ``"validate"``.
        callbacks: more callbacks for the Trainer.
        accelerator: Trainer accelerator (``"cpu"`` for hashes comparable across machines).
        devices: Trainer devices; with several (``trainer_kwargs={"strategy": "ddp"}``) every rank evaluates its shard
            and global rank zero writes the report of all of them (see :class:`ExplainabilityReport`).
        progress: show the progress bar.
        trainer_kwargs: more Trainer arguments.

    Returns:
        The report directory (``report.html``, ``report.json``, CSVs, ``summary.md``, ``figures/``), written by global
        rank zero.

    Raises:
        ReportError: bad inputs (no targets, not a classifier output, ...), with a one-line message.
    """
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if stage not in ("test", "validate"):
        raise ValueError(f"stage must be 'test' or 'validate', got {stage!r}")
    if not isinstance(model, nn.Module):
        raise ReportError(f"build_report needs an nn.Module, got {type(model).__name__}")
    step = "test_step" if stage == "test" else "validation_step"
    module = model if isinstance(model, pl.LightningModule) and is_overridden(step, model) else _ReportModule(model)
    report = ExplainabilityReport(stages=(stage,), report_dir=str(out_dir), **report_kwargs)
    kwargs: dict[str, Any] = {
        "accelerator": accelerator, "devices": devices, "logger": False, "enable_checkpointing": False,
        "enable_model_summary": False, "enable_progress_bar": progress,
        "default_root_dir": str(Path(out_dir).parent),
    }
    max_batches = report_kwargs.get("max_batches")
    if max_batches is not None:
        kwargs["limit_test_batches" if stage == "test" else "limit_val_batches"] = int(max_batches)
    kwargs.update(trainer_kwargs or {})
    extra = list(callbacks)
    if kwargs.get("enable_progress_bar") and not any(isinstance(c, ProgressBar) for c in extra):
        extra.append(_stderr_progress_bar())
    trainer = pl.Trainer(callbacks=[report, *extra], **kwargs)
    run = trainer.test if stage == "test" else trainer.validate
    if isinstance(data, pl.LightningDataModule):
        run(module, datamodule=data, verbose=False)
    else:
        run(module, dataloaders=data, verbose=False)
    key = STAGE_KEYS[stage]
    if not trainer.is_global_zero:  # rank zero wrote the report
        return Path(out_dir)
    if key not in report.results:
        raise ReportError(f"the {stage} loop evaluated no batch: is the dataloader empty?")
    return Path(report.results[key]["directory"])
