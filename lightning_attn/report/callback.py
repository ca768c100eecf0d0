"""``ExplainabilityReport``: post-hoc explainability report of a classifier, built from the test loop (or
validation), and :func:`build_report`, which runs it on a model and a dataloader without a Trainer script.

The callback wires the loop to the report: per batch it records attention, takes the logits and targets and hands
them to :mod:`~lightning_attn.report.run` (sums and sample rows) and, for probe samples, to the saliency of
:mod:`~lightning_attn.report.explain`; at the end of the epoch it gathers the ranks' shards
(:mod:`~lightning_attn.report.distributed`); at the end of the loop it writes the report
(:mod:`~lightning_attn.report.write`, with :mod:`~lightning_attn.report.summary` and
:mod:`~lightning_attn.report.render`).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_attn import sinks
from lightning_attn.callbacks.base import (
    EvaluationCallback,
    Stage,
    close_recorder,
    log_scalars,
    open_recorder,
    stage_key,
)
from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.report.attribution import AttributionSettings
from lightning_attn.report.batches import BatchProcessing, ReportModule, ReportWrapper, target_module
from lightning_attn.report.distributed import gather_shards
from lightning_attn.report.explain import (
    BatchAttention,
    ReportError,
    default_forward,
)
from lightning_attn.report.map_history import ProbeMapHistory
from lightning_attn.report.provenance import hash_state_dict, utc_now
from lightning_attn.report.run import NAMESPACE, ReportRun, scalars
from lightning_attn.report.summary import SCHEMA_VERSION, callable_name, jsonable, other_sections
from lightning_attn.report.write import INCOMPLETE, OutputSettings, incomplete_dir, report_destination, write_report
from lightning_attn.sinks.dashboards import publish_report

__all__ = ["SCHEMA_VERSION", "ExplainabilityReport", "ReportModule"]


class ExplainabilityReport(BatchProcessing, EvaluationCallback):
    """Post-hoc explainability report of a classifier from the test loop (validation when asked).

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

    **Saliency** for a bounded set of probe samples (the first ``probe_samples``, or ``probe_indices``):
    gradient x input on every floating tensor input of the batch (per feature = last axis, named by
    ``feature_names``), gradient-weighted attention rollout and per-head relevance from
    ``d(score)/d(attention)`` with negatives clamped, maps and gradients paired by site name
    (:func:`~lightning_attn.report.explain.compute_saliency`). The loop runs under ``torch.inference_mode``;
    the saliency pass runs under ``torch.inference_mode(False)`` and ``torch.enable_grad()`` on clones of
    the batch made outside inference mode. Integer inputs (token ids) get token saliency instead: gradient x
    input (or integrated gradients, ``saliency=``) on the output of the input embedding layer, summed over its hidden
    axis, shown as coloured tokens; ``gradcam_layer`` adds Grad-CAM over the input image
    (:mod:`~lightning_attn.report.attribution`).

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
      ``saliency.csv``, each starting with its header (``pandas.read_csv(path)``, ``csv.DictReader``), and
      ``provenance.json`` beside them;
    - ``summary.md``; ``figures/*.png`` (provenance in the PNG text chunk ``lightning_attn_provenance``).

    Provenance in every output: SHA-256 of the model's ``state_dict`` (tensor bytes in sorted key order), of
    the evaluated batches (streamed), of the report configuration, their combination ``report_sha256``,
    library versions, start and end time (:mod:`lightning_attn.report.provenance`).

    Directory: ``report_dir`` if given (dataloader ``k >= 1`` gets ``<report_dir>_dl<k>``), else
    ``<save_dir or log_dir/lightning_attn>/report/<test|val_epoch<E>>[_dl<k>]``. It is replaced only when it holds a
    previous report and nothing else (:func:`~lightning_attn.report.write.is_own_report`); a file or a folder with
    other files there is kept and the report goes to ``<dir>-1``, ``<dir>-2``, ... with a warning naming both.

    **Distributed runs** (DDP and any strategy on a ``torch.distributed`` process group): every rank evaluates its
    own batches into its own sums and streams its sample rows to a file in a rank-local temporary directory (no
    shared file system needed). At the end of the epoch each rank sends rank zero (``torch.distributed.gather_object``:
    gloo, and NCCL through the current CUDA device, which Lightning sets) its counts, correct-vs-incorrect moments,
    class-wise, calibration and per-head sums, per-batch rows, input hash and sample rows (raw CSV, in messages of at
    most :data:`~lightning_attn.report.distributed.GATHER_CHUNK_BYTES`). Rank zero appends the other ranks' rows to
    ``samples.csv`` in rank order
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
        embedding: name of the input embedding layer for token saliency (default: ``get_input_embeddings()``, else
            the first ``nn.Embedding``; used when the inputs hold token ids).
        saliency: token saliency method, ``"gradient_x_input"`` or ``"integrated_gradients"``
            (:mod:`~lightning_attn.report.attribution`).
        n_steps: Gauss-Legendre points of integrated gradients (baseline: the padding token's embedding, else zeros).
        tokenizer: a Hugging Face tokenizer: token strings (and the padding id) in the token view.
        id_to_token: ``id_to_token(id) -> str`` instead of a tokenizer.
        gradcam_layer: glob of the module whose ``[batch, tokens, channels]`` output gets Grad-CAM (the last match;
            for a ViT the last block's first norm, e.g. ``"encoder.layers.2.norm1"``); ``None``: no Grad-CAM.
        grid: ``(rows, cols)`` patch grid of the Grad-CAM map (default: inferred when the tokens, or the tokens less a
            leading [CLS], form a square).

    Raises:
        ValueError: an argument out of range (at construction).
        ReportError: at the first batch: no targets, not a classifier output, an ``embedding`` or ``gradcam_layer``
            that names no fitting module.
    """

    namespace = NAMESPACE

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
        embedding: str | None = None,
        saliency: Literal["gradient_x_input", "integrated_gradients"] = "gradient_x_input",
        n_steps: int = 32,
        tokenizer: Any = None,
        id_to_token: Callable[[int], str] | None = None,
        gradcam_layer: str | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(stages=stages, every_n_epochs=every_n_epochs, save_dir=save_dir)
        for name, value, low in (
            ("top_k", top_k, 1),
            ("calibration_bins", calibration_bins, 1),
            ("probe_samples", probe_samples, 0),
            ("max_positions", max_positions, 1),
            ("figure_dpi", figure_dpi, 20),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, limit in (("chunk_size", chunk_size), ("max_batches", max_batches), ("html_max_rows", html_max_rows)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {limit}")
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
        self.attribution = AttributionSettings(
            embedding=embedding,
            saliency=saliency,
            n_steps=n_steps,
            tokenizer=tokenizer,
            id_to_token=id_to_token,
            gradcam_layer=gradcam_layer,
            grid=grid,
        )
        #: ``results[<stage key>]``: the last report's summary (what report.json holds) and its directory.
        self.results: dict[str, dict[str, Any]] = {}
        self._runs: dict[int, ReportRun] = {}
        self._map_history = ProbeMapHistory()
        self._pending: list[ReportRun] = []
        self._recorder: AttentionRecorder | None = None
        self._attention: BatchAttention | None = None
        self._hook: Any = None
        self._step_output: Any = None
        self._record_in_step = True
        self._model_sha256: str | None = None
        self._warned_ddp = False
        self._warned_padding = False
        self._warned_nonfinite = False
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
            "forward_fn": callable_name(self.forward_fn) or "default_forward",
            "target_fn": callable_name(self.target_fn),
            "target_key": self.target_key,
            "logits_key": self.logits_key,
            "outputs_are_probabilities": self.outputs_are_probabilities,
            "class_names": self.class_names,
            "feature_names": jsonable(self.feature_names),
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
            **self.attribution.config(),
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

    def _run_for(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, dataloader_idx: int
    ) -> ReportRun:
        run = self._runs.get(dataloader_idx)
        if run is None:
            run = self._runs[dataloader_idx] = self._new_run(trainer, pl_module, stage, dataloader_idx)
        return run

    def _new_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, dataloader_idx: int
    ) -> ReportRun:
        model = target_module(pl_module)
        if not trainer.is_global_zero:
            # a shard of a distributed report: rank-local scratch space, sent to rank zero at the end of the epoch
            rank = int(trainer.global_rank)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"lightning_attn_report_rank{rank}_"))
            run = ReportRun(
                stage=stage,
                key=stage_key(stage, dataloader_idx),
                dataloader_idx=dataloader_idx,
                epoch=int(trainer.current_epoch),
                final_dir=tmp_dir,
                tmp_dir=tmp_dir,
                started=utc_now(),
                model_sha256="",
                model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                rank=rank,
                shard=True,
                world_size=int(trainer.world_size),
            )
        else:
            final_dir, moved = report_destination(self._final_dir(trainer, stage, dataloader_idx))
            if moved is not None:  # the same message again (every validation epoch) is shown once by Python's filter
                rank_zero_warn(f"ExplainabilityReport: {moved}", category=UserWarning)
            tmp_dir, started = incomplete_dir(final_dir, id(self))
            if self._model_sha256 is None:
                self._model_sha256 = hash_state_dict(model.state_dict())
            run = ReportRun(
                stage=stage,
                key=stage_key(stage, dataloader_idx),
                dataloader_idx=dataloader_idx,
                epoch=sinks.position(trainer).epoch,
                checkpoint=sinks.position(trainer).checkpoint,
                final_dir=final_dir,
                tmp_dir=tmp_dir,
                started=started,
                model_sha256=self._model_sha256,
                model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                world_size=int(trainer.world_size),
            )
            run.earlier_maps = self._map_history.earlier(run.key, run.epoch)
        return run

    def _sampled(self, batch_idx: int) -> bool:
        return self.max_batches is None or batch_idx < self.max_batches

    # -- hooks -------------------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._abandon("a new evaluation epoch started before the previous report was written")
        self._runs = {}
        self._model_sha256 = None
        self._record_in_step = not isinstance(pl_module, ReportWrapper)
        self._distributed = (
            trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() == trainer.world_size
        )
        if trainer.world_size > 1 and not self._distributed and not self._warned_ddp:
            self._warned_ddp = True
            rank_zero_warn(
                "ExplainabilityReport: this distributed strategy has no initialized torch.distributed process group to "
                "gather the ranks' samples through, so the report covers rank zero's shard of the data.",
                category=UserWarning,
            )

    def _covers(self, trainer: pl.Trainer) -> bool:
        """Whether this rank evaluates its batches for the report (every rank under DDP, else rank zero)."""
        return trainer.is_global_zero or self._distributed

    def eval_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        self._close_recorder()
        if not self._covers(trainer) or not self._sampled(batch_idx):
            return
        self._run_for(trainer, pl_module, stage, dataloader_idx)
        self._step_output = None
        if self._record_in_step:
            self._open_recorder(pl_module, hook=True)

    def eval_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
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
            logged = gather_shards(  # a collective: every rank
                trainer,
                stage,
                runs,
                new_run=functools.partial(self._new_run, trainer, pl_module, stage),
                pending=self._pending,
                warn_padding=self._warn_padding,
            )
        else:
            if trainer.world_size > 1:
                for run in runs:
                    run.notes.append(
                        f"rank zero's shard only: no torch.distributed process group to gather the "
                        f"{trainer.world_size} ranks through"
                    )
            self._pending.extend(runs)
            logged = scalars(runs) if trainer.world_size == 1 else {}
        if logged:
            log_scalars(pl_module, logged)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize_pending(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize_pending(trainer)
        super().on_test_end(trainer, pl_module)

    def _announce(self, trainer: pl.Trainer, report: Path | None = None) -> None:
        last = max(self.results.values(), key=lambda document: document["provenance"]["finished_utc"], default=None)
        super()._announce(trainer, Path(last["directory"]) if last else None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._abandon(f"{type(exception).__name__}: {exception}")
        super().on_exception(trainer, pl_module, exception)

    def eval_abort(self) -> None:
        self._close_recorder()

    # -- recording ---------------------------------------------------------------------------------------------
    def _open_recorder(self, pl_module: nn.Module, hook: bool = False) -> None:
        sites = [s for pair in self.modality_pairs.values() for s in pair]
        self._attention = BatchAttention(self.chunk_size, self.pair_sites, sites, self.top_k)
        module = target_module(pl_module)
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
            run.close_samples()
            if run.shard:  # a non-zero rank's scratch space: nothing of the report is there
                shutil.rmtree(run.tmp_dir, ignore_errors=True)
                continue
            if run.tmp_dir.exists() and not run.finished:
                (run.tmp_dir / INCOMPLETE).write_text(
                    f"This report is INCOMPLETE: its run failed ({reason}).\nStarted {run.started}; nothing here is "
                    "final.\n"
                )
        self._runs = {}
        self._pending = []

    def forget_model(self) -> None:
        """Another model: its earlier epochs' probe maps are not this one's."""
        super().forget_model()
        self._map_history.clear()

    # -- distributed -------------------------------------------------------------------------------------------------
    def _warn_padding(self, run: ReportRun, note: str) -> None:
        """Warn (once per report) that the DistributedSampler padded a dataloader (``note``, already in the notes)."""
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

    def _finalize(self, trainer: pl.Trainer, run: ReportRun) -> None:
        run.close_samples()
        if run.count == 0:
            raise ReportError(
                f"no samples were evaluated for the {run.key} report "
                f"({'every model output was NaN or Inf' if run.skipped_rows else 'empty dataloader?'})"
            )
        config = self.config()
        sections = other_sections(getattr(trainer, "callbacks", None) or [], run, skip=ExplainabilityReport)
        settings = OutputSettings(
            title=self.title,
            calibration_bins=self.calibration_bins,
            saliency_target=self.saliency_target,
            html_max_rows=self.html_max_rows,
            figures=self.figures,
            figure_dpi=self.figure_dpi,
        )
        self.results[run.key] = write_report(
            run, config, sections, global_step=sinks.position(trainer).step, settings=settings
        )
        self._map_history.add(run)
        publish_report(trainer, run.final_dir, run.key, int(trainer.global_step))
