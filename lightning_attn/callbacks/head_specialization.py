"""``HeadSpecializationTracker``: what each attention head does, how it evolves, and a head-function registry."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from lightning_attn.callbacks.base import (
    EvaluationCallback,
    Stage,
    close_recorder,
    log_scalars,
    open_recorder,
    probe_batch,
    stage_key,
    used_on_any_rank,
)
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, DEFAULT_OVERHEAD_BUDGET, BatchBudget, coverage_scalars
from lightning_attn.callbacks.head_importance import head_gradients
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.metrics.batch_context import batch_context
from lightning_attn.metrics.head_roles import (
    EVENT_COLUMNS,
    PRUNABLE_COLUMNS,
    add_head_history,
    event_rows,
    importance_record,
    previous_record,
    prunable_heads,
    role_events,
)
from lightning_attn.metrics.heads import (
    DEFAULT_FEATURE_LABELS,
    HEAD_STATISTICS,
    TYPE_SCORES,
    BatchContext,
    FeatureLabel,
    HeadSpecializationMetrics,
    analyze_heads,
    build_registry,
)
from lightning_attn.metrics.importance import HeadImportance
from lightning_attn.metrics.registry import registry_table
from lightning_attn.plots.head_specialization import tracker_figures
from lightning_attn.sinks import publish_figures, publish_json, publish_table
from lightning_attn.sinks.dashboards import per_head_charts, publish_scalar_layout

__all__ = ["HeadSpecializationTracker"]

#: Names accepted in ``logged_scores``.
LOGGABLE_SCORES: tuple[str, ...] = (*HEAD_STATISTICS, *TYPE_SCORES, "sink", "broad", "hsi")

#: Bump when the layout of a history record changes. 2: the features are saved with the history.
_STATE_VERSION = 2


class HeadSpecializationTracker(EvaluationCallback):
    """Track what every attention head does, epoch after epoch, and export a head-function registry.

    Attention is captured with :class:`~lightning_attn.AttentionRecorder` (any ``nn.MultiheadAttention``,
    ``scaled_dot_product_attention`` call or weight-returning module), reduced in query chunks and streamed into
    sum-reduced torchmetrics states, so that results over DDP ranks equal one process over the same samples.
    Per head ``h`` of every site (a *layer* of the registry), per evaluated epoch:

    **Row statistics** (mean over every (sample, query) row of the epoch;
    :func:`~lightning_attn.metrics.heads.head_statistics_reducers`): ``entropy`` (normalized, ``H_i / log n_i``),
    ``confidence`` (Voita et al. 2019: ``max_j A_ij``, keys in ``confidence_exclude_positions`` /
    ``confidence_exclude_key`` left out), ``distance`` (``sum_j A_ij |i - j|``), ``first_token`` (``A_i0``),
    ``self``, ``previous``, ``next`` (``A_{i,i}``, ``A_{i,i-1}``, ``A_{i,i+1}``) and ``local``
    (``sum_{|i-j| <= local_window} A_ij``).

    **Head-type scores**: TransformerLens ``head_detector`` ``mul`` scores ``sum(A * P) / sum(A)``, with numerator
    and denominator each summed over all samples of the epoch, for the previous-token pattern and, when the batch
    carries token ids under ``token_ids_key``, the duplicate-token and induction patterns (self-attention sites
    only); plus ``sink`` (= mean first-token mass) and ``broad`` (= mean normalized entropy). A head *is* of a type
    when its score reaches the type's threshold.

    **Redundancy**: pairwise Jensen-Shannon divergence between heads (Clark et al. 2019, smoothing
    ``0.001/n + 0.999 A``, averaged over query rows and probe samples), on the probe samples: the first
    ``probe_samples`` samples of the first batch of dataloader 0 on global rank zero (as
    :class:`~lightning_attn.AttentionLogger`), maps block-pooled to ``probe_max_tokens``. Heads of sites of equal
    shape are compared, across layers too. Clusters: connected components of ``JS <= redundancy_threshold``.
    Under DDP the clusters are rank zero's (the streamed measures are global).

    **Semantic features** (Head Specialization Index): ``features`` names per-sample values taken from each batch
    (``{"ttc": "ttc", "distance": "dist"}``: feature name -> batch key, dotted path or callable). For each head
    and feature, the epoch's Pearson correlation ``corr_f`` between the head's per-sample *summary* and the
    feature, over all samples (sums of ``x, y, x^2, y^2, xy, n`` streamed). The summary (``summary``): the
    attention mass on the feature's key tokens when ``feature_masks`` gives a ``[B, K]`` mask for it, else the
    head's per-sample mean confidence (``max_j A_ij`` averaged over rows); ``"entropy"`` uses the mean normalized
    entropy. A feature of shape ``[B, K]`` is per key token: the attention each token receives is paired with its
    value. ``HSI = max_f |corr_f|``, ``primary feature = argmax``; undefined correlations (constant summary or
    feature) are skipped.

    **Labels**: ``HSI >= hsi_threshold`` gives the primary feature's label from ``feature_labels`` (merged over
    :data:`~lightning_attn.metrics.heads.DEFAULT_FEATURE_LABELS`: ``ttc`` -> *Safety Head* (expected sign -),
    ``distance`` -> *Proximity Head* (-), ``closing_speed`` -> *Threat Assessment* (+), ``is_ahead`` ->
    *Traffic Flow* (+), ``is_left``/``is_right`` -> *Lane Awareness* (+); ``" (inverted)"`` when the sign is the
    opposite); else the first structural type reached, in the order induction, duplicate-token, previous-token,
    sink, broad; else *General context*.

    **Outputs**, per evaluated epoch and stage (``val``, ``test``, ``val_dl1`` ...):

    - scalars ``heads/<stage>/<score>`` (mean over every head of the model) for each score of ``logged_scores``
      (default: entropy, confidence, hsi), per head ``heads/<stage>/<site>/h<k>/<score>`` with ``log_per_head=True``
      (one TensorBoard chart per site and score), and ``heads/<stage>/specialized`` (heads with
      ``HSI >= hsi_threshold``) and
      ``heads/<stage>/general`` (heads labelled *General context*);
    - figures (W&B, TensorBoard, else PNG files; through :mod:`lightning_attn.sinks`) under ``heads/<stage>/``:
      ``hsi``, ``feature_correlation``, ``type_scores``, ``redundancy``, ``evolution`` (entropy and HSI per head
      over the epochs of the history), ``timeline`` and ``importance`` (below);
    - ``head_functions.json`` (the registry, :meth:`registry`, schema
      ``lightning_attn/report/head_functions.schema.json``) and a ``registry`` table, in
      ``<save_dir or log_dir/lightning_attn>/heads/<stage>/``;
    - **head roles over training**: a head whose label, structural types or HSI side of ``hsi_threshold`` differs
      from the stage's previous evaluated epoch is an *event* (:func:`~lightning_attn.metrics.head_roles.role_events`),
      kept in the epoch's record (``events``, so in the ``state_dict`` too, and in :meth:`events`), published as
      a ``role_events`` table every epoch (W&B table, TensorBoard text, CSV) and drawn in the ``timeline`` figure
      (heads x epochs, coloured by label); each registry head has its ``label_history``;
    - with ``head_importance``: Michel et al.'s (2019) head importance ``I_h = E_x |dL(x)/d xi_h|`` for a gate
      ``xi_h`` of ones on the head's output (:mod:`lightning_attn.capture.gates`), from one extra forward and
      backward of each evaluated batch (:mod:`lightning_attn.callbacks.head_importance`: the module's own
      evaluation step is re-run with grad enabled and logging off, and must return its loss or ``logits`` and
      ``target``; parameters' ``.grad`` is never touched). Streamed as sum-reduced states (DDP equal to one
      process), kept as ``importance`` (raw) and ``importance_normalized`` (per layer by the L2 norm, then
      min-max over the model) in the record, ``importance`` on each registry head, an ``importance`` heatmap and
      a ``prunable_heads`` table (least important first, with the cumulative share of importance removed).

    The per-epoch history (:attr:`history`) is kept in the callback's ``state_dict``, so a run resumed from a
    checkpoint continues it (a resume with other ``features`` drops it, with a warning); re-evaluating an epoch
    replaces that epoch's record. A ``fit``/``validate``/``test`` with another model starts a new history.

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        include: glob patterns of site names to analyse (default: every attention site).
        exclude: glob patterns of site names to leave out.
        chunk_size: query rows reduced at a time (bounds memory for long sequences); ``None``: all at once.
        token_ids_key: batch key (or dotted path) of the ``[B, L]`` token ids used for the duplicate-token and
            induction scores; ``None`` or absent from the batch: those scores are skipped.
        padding_mask_key: batch key of a ``[B, L]`` mask (1 = real token, the Hugging Face ``attention_mask``):
            padding query rows are left out and padding positions match no token pattern; ``None`` or absent:
            every position counts.
        features: feature name -> batch key (dotted path) or callable ``fn(batch)`` giving ``[B]`` per-sample (or
            ``[B, K]`` per-key-token) values. Missing keys raise ``KeyError``; NaN values are skipped.
        feature_masks: feature name -> batch key or callable giving a ``[B, K]`` key-token mask (True: the tokens
            the feature is about, e.g. the vehicle tokens); the head summary is then the attention mass on them.
        feature_labels: feature name -> ``(label, description, expected sign -1/0/+1)``, merged over the defaults.
        summary: per-sample head summary: ``"auto"`` (mask mass if a mask, else mean confidence), ``"mass"``
            (features without a mask are skipped), ``"max_weight"`` (mean confidence) or ``"entropy"``.
        hsi_threshold: minimum HSI for a feature label (the notebook's 0.3: weak specialization and above).
        previous_token_threshold: minimum previous-token score of a previous-token head.
        duplicate_token_threshold: minimum duplicate-token score of a duplicate-token head.
        induction_threshold: minimum induction score of an induction head.
        sink_threshold: minimum mean first-token mass of a sink head.
        broad_threshold: minimum mean normalized entropy of a broad head (Clark et al.'s 3.8 nats on 128 tokens
            is 0.78).
        local_window: half-width of the ``local`` window, in tokens.
        confidence_exclude_positions: key positions left out of the confidence max (e.g. ``[-1]`` for EOS).
        confidence_exclude_key: batch key of a ``[B, K]`` mask of keys left out of the confidence max (e.g. the
            tokenizer's ``special_tokens_mask``); ``None``: positions only.
        type_score_exclude_bos: zero attention to key 0 before the type scores (TransformerLens ``exclude_bos``).
        type_score_exclude_current_token: zero the diagonal before the type scores (``exclude_current_token``).
        probe_samples: probe samples for the redundancy matrix; 0 disables redundancy.
        probe_max_tokens: probe maps longer than this are block-pooled to it before the JS distances.
        redundancy_threshold: JS divergence (nats, in ``[0, log 2]``) at or below which two heads are
            near-duplicates.
        logged_scores: per-head scalars to log, from the row statistics, ``previous_token``,
            ``duplicate_token``, ``induction``, ``sink``, ``broad`` and ``hsi``; empty: none.
        log_per_head: log ``logged_scores`` per head too (a 12 x 12-head model: 144 scalars per score); per-head
            values are always in the registry table and the figures.
        log_figures: publish the figures.
        export_registry: write ``head_functions.json`` and the registry table each evaluated epoch.
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
        name: replaces ``heads`` in the logged keys, published names and output folders; default ``heads``, or
            ``heads-<include patterns>`` with ``include``, so that two instances on one Trainer keep their outputs,
            keys and checkpoint states apart (equal names raise at setup).
        head_importance: also score every head's importance by the gradient of the step's loss with respect to a
            gate on its output (one extra forward and backward per evaluated batch, about 3x the step's cost).
        overhead_budget: share of the epoch that recording may add: evenly spread batches, the same on every rank
            and for every callback (:mod:`~lightning_attn.callbacks.budget`); ``None``: every batch.
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader (all when fewer).
        exact_outputs: ``False``: SDPA outputs computed from the probabilities recorded (within 1e-5, not bitwise;
            see :class:`~lightning_attn.AttentionRecorder`).

    Raises:
        ValueError: with ``head_importance``, at the first batch, when the evaluation step returns neither its loss
            nor ``logits`` and ``target``.
    """

    #: The default :attr:`name`.
    namespace = "heads"

    def __init__(
        self,
        stages: Sequence[Stage] = ("validate",),
        every_n_epochs: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        chunk_size: int | None = 256,
        token_ids_key: str | None = "input_ids",
        padding_mask_key: str | None = "attention_mask",
        features: Mapping[str, str | Callable[[Any], Any]] | None = None,
        feature_masks: Mapping[str, str | Callable[[Any], Any]] | None = None,
        feature_labels: Mapping[str, tuple[str, str, int]] | None = None,
        summary: Literal["auto", "mass", "max_weight", "entropy"] = "auto",
        hsi_threshold: float = 0.3,
        previous_token_threshold: float = 0.5,
        duplicate_token_threshold: float = 0.5,
        induction_threshold: float = 0.5,
        sink_threshold: float = 0.5,
        broad_threshold: float = 0.8,
        local_window: int = 2,
        confidence_exclude_positions: Sequence[int] = (),
        confidence_exclude_key: str | None = None,
        type_score_exclude_bos: bool = False,
        type_score_exclude_current_token: bool = False,
        probe_samples: int = 4,
        probe_max_tokens: int = 128,
        redundancy_threshold: float = 0.05,
        logged_scores: Sequence[str] = ("entropy", "confidence", "hsi"),
        log_per_head: bool = False,
        log_figures: bool = True,
        export_registry: bool = True,
        save_dir: str | None = None,
        head_importance: bool = False,
        name: str | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        min_batches: int = DEFAULT_MIN_BATCHES,
        exact_outputs: bool = True,
    ) -> None:
        super().__init__(stages=stages, every_n_epochs=every_n_epochs, save_dir=save_dir)
        self._set_name(self.namespace, name, include)
        self.overhead_budget = overhead_budget
        self.min_batches = min_batches
        self.exact_outputs = exact_outputs
        self._budget = BatchBudget(overhead_budget, min_batches)
        self._recording = False  # whether the running batch is recorded (head importance follows it)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        if summary not in ("auto", "mass", "max_weight", "entropy"):
            raise ValueError(f"summary must be 'auto', 'mass', 'max_weight' or 'entropy', got {summary!r}")
        if probe_samples < 0 or probe_max_tokens < 1 or local_window < 0:
            raise ValueError("probe_samples and local_window must be >= 0, probe_max_tokens >= 1")
        unknown = [s for s in logged_scores if s not in LOGGABLE_SCORES]
        if unknown:
            raise ValueError(f"unknown logged_scores {unknown}: choose from {list(LOGGABLE_SCORES)}")
        self.features = dict(features or {})
        unmasked = [name for name in (feature_masks or {}) if name not in self.features]
        if unmasked:
            raise ValueError(f"feature_masks for unknown features {unmasked}: features are {list(self.features)}")
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.chunk_size = chunk_size
        self.token_ids_key = token_ids_key
        self.padding_mask_key = padding_mask_key
        self.feature_masks = dict(feature_masks or {})
        self.feature_labels: dict[str, FeatureLabel] = {**DEFAULT_FEATURE_LABELS}
        for name, value in (feature_labels or {}).items():
            label = FeatureLabel(*value)
            if label.expected_sign not in (-1, 0, 1):
                raise ValueError(
                    f"feature_labels[{name!r}]: expected sign must be -1, 0 or 1, got {label.expected_sign}"
                )
            self.feature_labels[name] = label
        self.summary = summary
        self.hsi_threshold = float(hsi_threshold)
        self.thresholds: dict[str, float] = {
            "induction": float(induction_threshold),
            "duplicate_token": float(duplicate_token_threshold),
            "previous_token": float(previous_token_threshold),
            "sink": float(sink_threshold),
            "broad": float(broad_threshold),
        }
        self.local_window = local_window
        self.confidence_exclude_positions = tuple(int(p) for p in confidence_exclude_positions)
        self.confidence_exclude_key = confidence_exclude_key
        self.type_score_exclude_bos = type_score_exclude_bos
        self.type_score_exclude_current_token = type_score_exclude_current_token
        self.probe_samples = probe_samples
        self.probe_max_tokens = probe_max_tokens
        self.redundancy_threshold = float(redundancy_threshold)
        self.logged_scores = tuple(logged_scores)
        self.log_per_head = log_per_head
        self.log_figures = log_figures
        self.export_registry = export_registry
        self.head_importance = head_importance
        self._importance: dict[tuple[str, int], HeadImportance] = {}
        self._history: list[dict[str, Any]] = []
        self._metrics: dict[tuple[str, int], HeadSpecializationMetrics] = {}
        self._recorder: AttentionRecorder | None = None
        self._target: HeadSpecializationMetrics | None = None
        self._context: BatchContext | None = None
        self.last_redundancy: dict[str, dict[str, Any]] = {}

    # -- checkpointing ----------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # no features: a resume with other features finds its state and says why it drops the history
        return self._generate_state_key(
            stages=list(self.stages), include=self.include, exclude=self.exclude, **self._name_in_state_key()
        )

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history (plain Python values) and the features it was computed with, so that a resumed
        run continues it."""
        history = [dict(record) for record in self._history]
        return {"version": _STATE_VERSION, "features": sorted(self.features), "history": history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("features", sorted(self.features))
        if saved != sorted(self.features):
            records = len(state_dict.get("history", []))
            rank_zero_warn(
                f"HeadSpecializationTracker: the checkpoint's history was computed with features {saved}, "
                f"this run has {sorted(self.features)}: its correlations, HSI and labels do not compare, so "
                f"the history of {records} record(s) was dropped and starts again here",
                category=UserWarning,
            )
            self._history = []
            return
        self._history = [dict(record) for record in state_dict.get("history", [])]

    def forget_model(self) -> None:
        super().forget_model()
        self._history = []
        self._metrics = {}
        self._importance = {}
        self.last_redundancy = {}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every evaluated epoch's analysed record, oldest first: ``stage``, ``epoch``, ``global_step``, ``sites``,
        ``rows``,
        ``statistics``, ``type_scores``, ``correlations``, ``hsi``, ``primary_feature``, ``correlation``,
        ``types``, ``labels``, ``descriptions``, ``clusters`` (per site, per head lists; NaN where undefined)."""
        return self._history

    def history_for(self, stage: str = "val") -> list[dict[str, Any]]:
        """The records of one stage key (``val``, ``test``, ``val_dl1`` ...), oldest first."""
        return [record for record in self._history if record["stage"] == stage]

    def events(self, stage: str = "val") -> list[dict[str, Any]]:
        """The head-role changes of one stage key over the history, oldest first (see :func:`role_events`)."""
        return [event for record in self.history_for(stage) for event in record.get("events", [])]

    # -- registry ---------------------------------------------------------------------------------------
    def registry(self, stage: str = "val") -> dict[str, Any]:
        """The head-function registry of the latest record of ``stage`` (JSON-ready, NaN as ``None``); layout in
        :func:`~lightning_attn.metrics.heads.build_registry` and ``lightning_attn/report/head_functions.schema.json``.

        Raises:
            LookupError: when nothing was recorded for ``stage`` yet.
        """
        records = self.history_for(stage)
        if not records:
            have = sorted({r["stage"] for r in self._history})
            raise LookupError(f"no head-specialization record for stage {stage!r} yet (have {have})")
        registry = build_registry(
            records[-1],
            hsi_threshold=self.hsi_threshold,
            thresholds=self.thresholds,
            feature_labels=self.feature_labels,
            features=list(self.features),
            summary=self.summary,
        )
        return add_head_history(registry, records)

    def save_registry(self, path: str | Path, stage: str = "val") -> Path:
        """Write :meth:`registry` to ``path`` as JSON (any rank; the callback itself writes on rank zero)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.registry(stage), indent=2, allow_nan=False))
        return path

    # -- hooks ------------------------------------------------------------------------------------------
    def _metrics_for(self, stage: str, dataloader_idx: int, device: torch.device) -> HeadSpecializationMetrics:
        key = (stage, dataloader_idx)
        metrics = self._metrics.get(key)
        if metrics is None:
            metrics = HeadSpecializationMetrics(
                list(self.features),
                summary=self.summary,
                chunk_size=self.chunk_size,
                local_window=self.local_window,
                confidence_exclude_positions=self.confidence_exclude_positions,
                exclude_bos=self.type_score_exclude_bos,
                exclude_current_token=self.type_score_exclude_current_token,
                probe_samples=self.probe_samples,
                probe_max_tokens=self.probe_max_tokens,
            )
            self._metrics[key] = metrics
        return metrics.to(device)

    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for (metric_stage, _), metrics in self._metrics.items():
            if metric_stage == stage:
                metrics.reset()
        for (metric_stage, _), importance in self._importance.items():
            if metric_stage == stage:
                importance.reset()

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
        assert self._budget is not None
        self._recording = self._budget.records(stage, dataloader_idx, batch_idx)
        if not self._recording:
            return
        device = pl_module.device
        self._target = self._metrics_for(stage, dataloader_idx, device)
        probe = self.probe_samples > 0 and probe_batch(trainer, batch_idx, dataloader_idx)
        self._context = self._batch_context(batch, device, probe)
        self._recorder = open_recorder(pl_module, self._on_capture, self.include, self.exclude, self.exact_outputs)

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
        self._close_recorder()
        if self.head_importance and self._recording:
            importance = self._importance.setdefault((stage, dataloader_idx), HeadImportance()).to(pl_module.device)
            sites = (self.include, self.exclude)
            gradients = head_gradients(trainer, pl_module, batch, batch_idx, dataloader_idx, stage, *sites)
            for site, per_sample in gradients.items():
                importance.update(site, per_sample)

    def eval_abort(self) -> None:
        self._close_recorder()

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)
        self._target = None
        self._context = None

    def _on_capture(self, capture: AttentionCapture) -> None:
        if self._target is not None and self._context is not None:
            self._target.update(capture, self._context)

    def _batch_context(self, batch: Any, device: torch.device, probe: bool) -> BatchContext:
        """Everything taken from the batch, as tensors on ``device`` (no host synchronization)."""
        return batch_context(
            batch,
            device,
            probe=probe,
            token_ids_key=self.token_ids_key,
            padding_mask_key=self.padding_mask_key,
            confidence_exclude_key=self.confidence_exclude_key,
            features=self.features,
            feature_masks=self.feature_masks,
        )

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_recorder()
        used = {
            index for (key_stage, index), metrics in self._metrics.items() if key_stage == stage and metrics.updated
        }
        dataloaders = used_on_any_rank(used)
        assert self._budget is not None
        coverage = self._budget.coverage(trainer, stage, dataloaders)  # a collective: every rank
        for dataloader_idx in dataloaders:
            metrics = self._metrics_for(stage, dataloader_idx, pl_module.device)
            entry = metrics.compute(self.redundancy_threshold)  # a collective: every rank
            metrics.reset()
            key = stage_key(stage, dataloader_idx)
            redundancy = entry.pop("redundancy", None)
            entry.update(stage=key, epoch=int(trainer.current_epoch), global_step=int(trainer.global_step))
            entry["coverage"] = coverage[dataloader_idx]
            entry["clusters"] = list(redundancy["clusters"]) if redundancy else []
            analyze_heads(
                entry, hsi_threshold=self.hsi_threshold, thresholds=self.thresholds, feature_labels=self.feature_labels
            )
            importance = self._importance.get((stage, dataloader_idx))
            if importance is not None and importance.update_called:
                entry.update(importance_record(importance.compute(), entry["sites"]))  # a collective: every rank
                importance.reset()
            previous = previous_record(self.history_for(key), entry["epoch"])
            entry["events"] = role_events(previous, entry, self.hsi_threshold)
            self._record(entry)
            if redundancy:
                self.last_redundancy[key] = redundancy
            scalars = self._scalars(entry)
            log_scalars(pl_module, {**scalars, **coverage_scalars(self.name, key, entry["coverage"])})
            if trainer.is_global_zero:
                publish_scalar_layout(trainer, self.name, per_head_charts(list(scalars)))
                self._publish(trainer, entry, redundancy)

    def _record(self, entry: dict[str, Any]) -> None:
        """Append, replacing a record of the same stage and epoch (a re-run epoch, a resumed run)."""
        self._history = [
            r for r in self._history if not (r["stage"] == entry["stage"] and r["epoch"] == entry["epoch"])
        ]
        self._history.append(entry)

    def _scalars(self, entry: dict[str, Any]) -> dict[str, float]:
        scalars: dict[str, float] = {}
        stage = entry["stage"]
        specialized = general = 0
        # without per-head scalars, one mean over every head of the model: the per-site view of the same measures is
        # AttentionLogger's (site-level scalars), the per-head one the registry table and figures
        per_score: dict[str, list[float]] = {score: [] for score in self.logged_scores}
        for site_info in entry["sites"]:
            site = site_info["name"]
            for h in range(site_info["num_heads"]):
                hsi = entry["hsi"][site][h]
                specialized += int(hsi is not None and hsi >= self.hsi_threshold)
                general += int(entry["labels"][site][h] == "General context")
                for score in self.logged_scores:
                    value = self._score(entry, site, h, score)
                    if value is not None and math.isfinite(value):
                        per_score[score].append(float(value))
                        if self.log_per_head:
                            scalars[f"{self.name}/{stage}/{site}/h{h}/{score}"] = float(value)
        for score, values in per_score.items():
            if values:
                scalars[f"{self.name}/{stage}/{score}"] = sum(values) / len(values)
        if self.features:
            scalars[f"{self.name}/{stage}/specialized"] = float(specialized)
        scalars[f"{self.name}/{stage}/general"] = float(general)
        return scalars

    @staticmethod
    def _score(entry: dict[str, Any], site: str, head: int, score: str) -> float | None:
        if score == "hsi":
            return entry["hsi"][site][head]
        if score in entry["statistics"][site]:
            return entry["statistics"][site][score][head]
        return entry["type_scores"][site][score][head]

    # -- outputs (rank zero) ----------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, entry: dict[str, Any], redundancy: dict[str, Any] | None) -> None:
        """The registry, the tables and the figures of ``entry``, in the :attr:`publisher` (a background job)."""
        self.publisher.submit(trainer, lambda view: self._publish_now(view, entry, redundancy))

    def _publish_now(self, trainer: Any, entry: dict[str, Any], redundancy: dict[str, Any] | None) -> None:
        key, step = entry["stage"], int(trainer.global_step)
        namespace = f"{self.name}/{key}"
        if self.export_registry:
            registry = self.registry(key)
            publish_json(trainer, "head_functions", registry, namespace=namespace, save_dir=self.save_dir)
            head_columns, head_rows = registry_table(registry)
            publish_table(
                trainer, "registry", head_columns, head_rows, namespace=namespace, step=step, save_dir=self.save_dir
            )
        tables: dict[str, tuple[Sequence[str], list[list[Any]]]] = {}
        tables["role_events"] = (EVENT_COLUMNS, event_rows(entry["events"]))
        if "importance" in entry:
            tables["prunable_heads"] = (PRUNABLE_COLUMNS, prunable_heads(entry))
        for name, (columns, table_rows) in tables.items():
            publish_table(trainer, name, columns, table_rows, namespace=namespace, step=step, save_dir=self.save_dir)
        if self.log_figures:
            publish_figures(
                trainer, self.figures(key, redundancy), namespace=namespace, step=step, save_dir=self.save_dir
            )

    def figures(self, stage: str = "val", redundancy: dict[str, Any] | None = None) -> dict[str, Figure]:
        """The figures of the latest record of ``stage`` (``matplotlib.figure.Figure``, no pyplot): ``hsi`` and
        ``feature_correlation`` (with features), ``type_scores``, ``redundancy`` (given the probe's result),
        ``evolution``, ``timeline`` (labels and role changes over the epochs), ``importance`` (with
        ``head_importance``)."""
        return tracker_figures(
            self.history_for(stage),
            self.events(stage),
            stage=stage,
            features=list(self.features),
            hsi_threshold=self.hsi_threshold,
            redundancy_threshold=self.redundancy_threshold,
            redundancy=redundancy,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(stages={list(self.stages)}, features={list(self.features)}, "
            f"every_n_epochs={self.every_n_epochs})"
        )
