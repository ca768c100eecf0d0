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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_attn.callbacks.base import (
    EvaluationCallback,
    Stage,
    log_scalars,
)
from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.report.attribution import AttributionSettings
from lightning_attn.report.batches import BatchProcessing, ReportModule, ReportWrapper
from lightning_attn.report.explain import (
    BatchAttention,
    default_forward,
)
from lightning_attn.report.map_history import ProbeMapHistory
from lightning_attn.report.run import NAMESPACE, ReportRun
from lightning_attn.report.runs import ReportRuns
from lightning_attn.report.summary import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "ExplainabilityReport", "ReportModule"]


class ExplainabilityReport(ReportRuns, BatchProcessing, EvaluationCallback):
    """Post-hoc explainability report of a classifier from the test loop (validation when asked).

    For every evaluated sample one row streams to ``samples.csv`` (prediction, confidence, margin, entropy, NLL,
    Brier, per-site attention entropy and top pairs, modality agreement, input hash: :mod:`~lightning_attn.report.run`);
    sums give the dataset, class-wise, calibration (:class:`~lightning_attn.metrics.CalibrationMetric`, as the
    CalibrationMonitor) and per-head tables; the probe samples get saliency (:mod:`~lightning_attn.report.explain`,
    :mod:`~lightning_attn.report.attribution`) and their attention maps go to the explorer, with the earlier validation
    epochs' maps (:mod:`~lightning_attn.report.map_history`). How the model is called and where logits and targets come
    from: :mod:`~lightning_attn.report.batches`. Outputs (``report.html``, ``explorer.html``, ``report.json``, CSVs,
    figures, provenance) and the output directory: :mod:`~lightning_attn.report.write`. Distributed runs (every rank
    evaluates its shard, rank zero writes one report): :mod:`~lightning_attn.report.distributed`.

    Args:
        stages: evaluation loops to report on: ``"test"`` and/or ``"validate"``.
        every_n_epochs: for validation, report on epochs whose index is a multiple of this.
        save_dir: base directory (:mod:`~lightning_attn.report.write`).
        report_dir: exact output directory (overrides ``save_dir``).
        forward_fn: ``forward_fn(pl_module, batch) -> logits`` (:mod:`~lightning_attn.report.batches`); default
            :func:`default_forward`.
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

    def _forward(self) -> Callable[[Any, Any], Any]:
        if self.forward_fn is not None:
            return self.forward_fn
        return functools.partial(default_forward, target_key=self.target_key)

    # -- hooks -------------------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._abandon("a new evaluation epoch started before the previous report was written")
        self._runs = {}
        self._model_sha256 = None
        self._record_in_step = not isinstance(pl_module, ReportWrapper)
        self._detect_distributed(trainer)

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
        logged = self._end_epoch(trainer, pl_module, stage)
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

    def forget_model(self) -> None:
        """Another model: its earlier epochs' probe maps are not this one's."""
        super().forget_model()
        self._map_history.clear()
