"""``HeadSpecializationTracker``: checks its arguments, records the evaluated batches' attention into a
:class:`~lightning_attn.metrics.head_tracking.HeadTracking`, logs each epoch's scalars and publishes its registry,
tables and figures (:mod:`lightning_attn.plots.head_specialization`) through :mod:`lightning_attn.sinks`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from lightning_attn.callbacks.base import EvaluationCallback, Stage, probe_batch
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, DEFAULT_OVERHEAD_BUDGET, BatchBudget
from lightning_attn.callbacks.first_batch import FirstBatchCheck
from lightning_attn.callbacks.head_importance import head_gradients
from lightning_attn.callbacks.head_outputs import finish_head_epoch, write_json
from lightning_attn.capture.recorder import AttentionRecorder, close_recorder, open_recorder
from lightning_attn.metrics.batch_context import PADDING_MASK_KEY, TOKEN_IDS_KEY
from lightning_attn.metrics.head_labels import HEAD_TYPES
from lightning_attn.metrics.head_records import LOGGABLE_SCORES, merged_feature_labels
from lightning_attn.metrics.head_tracking import HeadTracking, named_batch_keys
from lightning_attn.plots.head_specialization import tracker_figures

__all__ = ["HeadSpecializationTracker"]


class HeadSpecializationTracker(EvaluationCallback):
    """Track what every attention head does, epoch after epoch, and export a head-function registry.

    Per head of every attention site and evaluated epoch: row statistics, TransformerLens head-type scores, the
    Jensen-Shannon redundancy of the probe samples, the correlation with each of ``features`` (Head Specialization
    Index, HSI) and a label (:mod:`lightning_attn.metrics.head_records`), streamed as sum-reduced states (over DDP
    ranks, equal to one process's); logged and published each epoch (:mod:`lightning_attn.callbacks.head_outputs`).
    The history (:attr:`history`) is in the ``state_dict``: a resumed run continues it (with other ``features``:
    dropped, with a warning); another model starts a new one.

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        include: glob patterns of the site names to analyse (default: every attention site).
        exclude: glob patterns of the site names to leave out.
        chunk_size: query rows reduced at a time (bounds memory for long sequences); ``None``: all at once.
        token_ids_key: batch key (or dotted path) of the ``[B, L]`` token ids of the duplicate-token and induction
            scores; ``None``, or the default absent from the batch: those scores are skipped.
        padding_mask_key: batch key of a ``[B, L]`` mask (1 = real token): padding rows and positions are left out;
            ``None``, or the default absent from the batch: every position counts.
        features: feature name -> batch key (dotted path) or callable ``fn(batch)`` giving ``[B]`` per-sample (or
            ``[B, K]`` per-key-token) values; NaN values are skipped.
        feature_masks: feature name -> batch key or callable giving a ``[B, K]`` key-token mask (the tokens the
            feature is about); the head summary is then the attention mass on them.
        feature_labels: feature name -> ``(label, description, expected sign -1/0/+1)``, merged over the defaults.
        summary: per-sample head summary: ``"auto"`` (mask mass if a mask, else mean confidence), ``"mass"``
            (features without a mask are skipped), ``"max_weight"`` (mean confidence) or ``"entropy"``.
        hsi_threshold: minimum HSI for a feature label (the notebook's 0.3: weak specialization and above).
        previous_token_threshold: minimum previous-token score of a previous-token head.
        duplicate_token_threshold: minimum duplicate-token score of a duplicate-token head.
        induction_threshold: minimum induction score of an induction head.
        sink_threshold: minimum mean first-token mass of a sink head.
        broad_threshold: minimum mean normalized entropy of a broad head (Clark et al.'s 3.8 nats on 128 tokens: 0.78).
        local_window: half-width of the ``local`` window, in tokens.
        confidence_exclude_positions: key positions left out of the confidence max (e.g. ``[-1]`` for EOS).
        confidence_exclude_key: batch key of a ``[B, K]`` mask of keys left out of the confidence max (e.g. the
            tokenizer's ``special_tokens_mask``); ``None``: positions only.
        type_score_exclude_bos: zero attention to key 0 before the type scores (TransformerLens ``exclude_bos``).
        type_score_exclude_current_token: zero the diagonal before the type scores (``exclude_current_token``).
        probe_samples: probe samples for the redundancy matrix; 0 disables redundancy.
        probe_max_tokens: maps block-pooled to this before the JS distances (cost ~ heads^2 x samples x tokens^2).
        redundancy_threshold: JS divergence (nats, in ``[0, log 2]``) at or below which two heads are near-duplicates.
        logged_scores: per-head scores to log (:data:`~lightning_attn.metrics.head_records.LOGGABLE_SCORES`).
        log_per_head: log ``logged_scores`` per head too (a 12 x 12-head model: 144 scalars per score).
        log_figures: publish the figures.
        export_registry: write ``head_functions.json`` and the registry table each evaluated epoch.
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
        name: replaces ``heads`` in the logged keys, published names, output folders and checkpoint state; default
            ``heads``, or ``heads-<include patterns>`` with ``include`` (equal names on one Trainer raise at setup).
        head_importance: also score each head by the gradient of the step's loss with respect to a gate on its output
            (one extra forward and backward per evaluated batch, about 3x the step's cost).
        overhead_budget: share of the epoch that recording may add (:mod:`~lightning_attn.callbacks.budget`); ``None``:
            every batch.
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader (all when fewer).
        exact_outputs: ``False``: SDPA outputs computed from the probabilities recorded (within 1e-5, not bitwise).

    Raises:
        ValueError: at the first batch of each stage it runs in, sanity check included (:mod:`.first_batch`): a batch
            key it names (``features``, ``feature_masks``, ``confidence_exclude_key``, a non-default ``token_ids_key``
            or ``padding_mask_key``) absent or not ``[B, L]``, a file as ``save_dir``, an ``include`` pattern matching
            no site that ran (``exclude``: a warning); with ``head_importance``, a step returning no loss nor logits.
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
        token_ids_key: str | None = TOKEN_IDS_KEY,
        padding_mask_key: str | None = PADDING_MASK_KEY,
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
        probe_max_tokens: int = 64,
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
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        if summary not in ("auto", "mass", "max_weight", "entropy"):
            raise ValueError(f"summary must be 'auto', 'mass', 'max_weight' or 'entropy', got {summary!r}")
        if probe_samples < 0 or probe_max_tokens < 1 or local_window < 0:
            raise ValueError("probe_samples and local_window must be >= 0, probe_max_tokens >= 1")
        unknown = [s for s in logged_scores if s not in LOGGABLE_SCORES]
        if unknown:
            raise ValueError(f"unknown logged_scores {unknown}: choose from {list(LOGGABLE_SCORES)}")
        self.features, self.feature_masks = dict(features or {}), dict(feature_masks or {})
        unmasked = [name for name in self.feature_masks if name not in self.features]
        if unmasked:
            raise ValueError(f"feature_masks for unknown features {unmasked}: features are {list(self.features)}")
        self.overhead_budget, self.min_batches, self.exact_outputs = overhead_budget, min_batches, exact_outputs
        self._budget = BatchBudget(overhead_budget, min_batches)
        self.include, self.exclude = list(include) if include else None, list(exclude) if exclude else None
        self.chunk_size, self.summary, self.local_window = chunk_size, summary, local_window
        self.token_ids_key, self.padding_mask_key = token_ids_key, padding_mask_key
        self.confidence_exclude_key = confidence_exclude_key
        self.confidence_exclude_positions = tuple(int(p) for p in confidence_exclude_positions)
        self.type_score_exclude_bos = type_score_exclude_bos
        self.type_score_exclude_current_token = type_score_exclude_current_token
        self.feature_labels = merged_feature_labels(feature_labels)
        self.hsi_threshold = float(hsi_threshold)
        thresholds = (induction_threshold, duplicate_token_threshold, previous_token_threshold, sink_threshold)
        self.thresholds = dict(zip(HEAD_TYPES, map(float, (*thresholds, broad_threshold)), strict=True))
        self.probe_samples, self.probe_max_tokens = probe_samples, probe_max_tokens
        self.redundancy_threshold = float(redundancy_threshold)
        self.logged_scores, self.log_per_head = tuple(logged_scores), log_per_head
        self.log_figures, self.export_registry, self.head_importance = log_figures, export_registry, head_importance
        self._tracking = HeadTracking(self)
        self._recorder: AttentionRecorder | None = None
        self._recording = False  # whether the running batch is recorded (head importance follows it)
        owner, sites, keys = type(self).__name__, (self.include, self.exclude), named_batch_keys(self)
        self._checks = FirstBatchCheck(owner, *sites, (), *keys, self.save_dir, exact_outputs)

    # -- checkpointing and results -----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # no features: a resume with other features finds its state and says why it drops the history
        return self._generate_state_key(
            stages=list(self.stages), include=self.include, exclude=self.exclude, **self._name_in_state_key()
        )

    def state_dict(self) -> dict[str, Any]:
        """The per-epoch history and the features it was computed with, so that a resumed run continues it."""
        return self._tracking.history.state_dict(list(self.features))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = self._tracking.history.load_state_dict(state_dict, list(self.features))
        if saved is not None:
            rank_zero_warn(
                f"HeadSpecializationTracker: the checkpoint's history was computed with features {saved}, "
                f"this run has {sorted(self.features)}: its correlations, HSI and labels do not compare, so "
                f"the history of {len(state_dict.get('history', []))} record(s) was dropped and starts again here",
                category=UserWarning,
            )

    def forget_model(self) -> None:
        super().forget_model()
        self._tracking = HeadTracking(self)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every evaluated epoch's record, oldest first (layout in :mod:`lightning_attn.metrics.head_records`)."""
        return self._tracking.history.records

    @property
    def last_redundancy(self) -> dict[str, dict[str, Any]]:
        """The probe's redundancy result by stage key, last evaluated epoch."""
        return self._tracking.last_redundancy

    def history_for(self, stage: str = "val") -> list[dict[str, Any]]:
        """The records of one stage key (``val``, ``test``, ``val_dl1`` ...), oldest first."""
        return self._tracking.history.for_stage(stage)

    def events(self, stage: str = "val") -> list[dict[str, Any]]:
        """The head-role changes of one stage key, oldest first (see :func:`role_events`)."""
        return self._tracking.history.events(stage)

    def registry(self, stage: str = "val") -> dict[str, Any]:
        """The head-function registry of the latest record of ``stage`` (JSON-ready, NaN as ``None``); layout in
        :func:`~lightning_attn.metrics.registry.build_registry` and ``report/head_functions.schema.json``.

        Raises:
            LookupError: when nothing was recorded for ``stage`` yet.
        """
        return self._tracking.registry(stage)

    def save_registry(self, path: str | Path, stage: str = "val") -> Path:
        """Write :meth:`registry` to ``path`` as JSON (any rank; the callback itself writes on rank zero)."""
        return write_json(Path(path), self.registry(stage))

    # -- hooks ------------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._tracking.reset(stage)

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
        if self._recording:
            probe = self.probe_samples > 0 and probe_batch(trainer, batch_idx, dataloader_idx)
            self._tracking.start_batch(stage, dataloader_idx, batch, pl_module.device, probe)
            on_capture = self._tracking.on_capture
            self._recorder = open_recorder(pl_module, on_capture, self.include, self.exclude, self.exact_outputs)

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
            importance = self._tracking.importance_for(stage, dataloader_idx, pl_module.device)
            sites = (self.include, self.exclude)
            gradients = head_gradients(trainer, pl_module, batch, batch_idx, dataloader_idx, stage, *sites)
            for site, per_sample in gradients.items():
                importance.update(site, per_sample)

    def eval_abort(self) -> None:
        self._close_recorder()

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)
        self._tracking.end_batch()

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_recorder()
        assert self._budget is not None
        finish_head_epoch(trainer, pl_module, stage, self, self._tracking, self._budget, self.publisher.submit)

    def figures(self, stage: str = "val", redundancy: dict[str, Any] | None = None) -> dict[str, Figure]:
        """The figures of the latest record of ``stage`` (``matplotlib.figure.Figure``, no pyplot): ``hsi`` and
        ``feature_correlation`` (with features), ``type_scores``, ``redundancy`` (given the probe's result),
        ``evolution`` (entropy and HSI per head over the epochs), ``timeline`` (labels and role changes over the
        epochs), ``importance`` (with ``head_importance``)."""
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
        arguments = f"stages={list(self.stages)}, features={list(self.features)}, every_n_epochs={self.every_n_epochs}"
        return f"{type(self).__name__}({arguments})"
