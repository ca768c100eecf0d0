"""``AttentionLogger``: streaming per-head attention statistics and figures on validation and test."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from lightning_attn.callbacks.base import (
    Stage,
    StreamingCallback,
    check_min,
    probe_batch,
)
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, DEFAULT_OVERHEAD_BUDGET
from lightning_attn.callbacks.first_batch import FirstBatchCheck, site_naming_arguments
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder, close_recorder, open_recorder
from lightning_attn.metrics.attention import AttentionResults, PairBuffer, ProbeMaps
from lightning_attn.metrics.attention_epoch import AttentionAccumulators, position_labels
from lightning_attn.metrics.probe_inputs import ProbeInputs
from lightning_attn.plots.attention_epoch import attention_epoch_figures
from lightning_attn.sinks.layout import check_output_dir

__all__ = ["AttentionLogger"]

NAMESPACE = "attn"

PROBES_CHANGED = (
    "AttentionLogger: the probe samples (first samples of the first batch of dataloader 0) changed since the last "
    "epoch; is that dataloader shuffled? Figures of different epochs show different samples."
)


class AttentionLogger(StreamingCallback):
    """Per-head attention statistics and figures of every attention site, streamed over validation and test.

    Sites (``nn.MultiheadAttention``, ``nn.Transformer*`` fast paths, SDPA calls, weight-returning modules) are found
    at run time by :class:`~lightning_attn.AttentionRecorder`; captures are reduced in query chunks into fixed-size
    states on the module's device (:mod:`lightning_attn.metrics.attention_epoch`), with no host sync in batch hooks.

    Per site and head: mean and standard deviation over (sample, query) rows of ``entropy`` (normalized),
    ``max_weight``, ``sparsity``, ``distance`` and ``first_token``; per site the top attended and attending
    positions; per modality pair the agreement of A->B with B->A transposed. Logged at epoch end on every rank
    (monitorable): ``attn/<stage>/<site>/<stat>``, ``attn/<stage>/<site>/h<k>/<stat>`` (``log_per_head``),
    ``attn/<stage>/<pair>/agreement``, ``<stage>`` being ``val``/``test`` (``_dl<k>`` for dataloader k >= 1).
    Published on global rank zero to every logger (:mod:`lightning_attn.sinks`; files on disk without a dashboard
    logger or with ``save_dir``): the per-head table, ``<stage>/statistics_epoch<E>_step<S>.json`` and the figures of
    :func:`~lightning_attn.plots.attention_epoch.attention_epoch_figures`. ``results[<stage>]`` holds the last epoch's
    :class:`~lightning_attn.metrics.attention.AttentionResults`. Probe samples (maps, rollout, pairs): the first
    ``probe_samples`` of the first batch of dataloader 0 on rank zero (a warning says when they change).

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        max_batches: analyse at most this many batches per dataloader and epoch (``None``: all).
        every_n_batches: analyse only batches whose index is a multiple of this (the others are not recorded).
        include: glob patterns of site names to analyse (default: all sites).
        exclude: glob patterns of site names to skip.
        probe_samples: number of fixed samples whose maps are drawn (0: no map figures).
        sparsity_threshold: weight below which a key counts as not attended, for ``sparsity``.
        chunk_size: query rows reduced at a time (``None``: whole maps).
        modality_pairs: ``{"eeg<->spec": ("<A->B site>", "<B->A site>")}``, site names or globs.
        token_names: position labels: a list for every axis of its length, or a mapping by site glob
            (``"<glob>:queries"``/``"<glob>:keys"`` for one axis).
        log_per_head: also log per-head scalars (a 12 x 12-head model logs 144 per statistic).
        log_figures: draw and publish figures (statistics, table and JSON are published regardless).
        max_figure_sites: at most this many sites (first, last, evenly spaced between) get map figures and head bars.
        max_map_tokens: probe maps are block-pooled to at most this many queries and keys for display.
        top_k: number of top attended / attending positions reported per site.
        max_positions: positions tracked for the top-position statistics (fixed state size per site).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn/<name>/<stage>``.
        name: replaces ``attn`` in keys, published names and the output folder; default ``attn`` or
            ``attn-<include patterns>``; two instances on one Trainer need different names.
        overhead_budget: share of the epoch that recording may add (:mod:`~lightning_attn.callbacks.budget`).
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader.
        exact_outputs: ``False``: SDPA outputs computed from the recorded probabilities (within 1e-5, not bitwise).

    Raises:
        NotADirectoryError: at setup, a ``save_dir`` that is a file (or under one).
        ValueError: an argument out of range (construction); a site name or glob
            that matches nothing, at the first evaluation batch, sanity check included
            (:class:`~lightning_attn.callbacks.first_batch.FirstBatchCheck`).

    Example::

        trainer = pl.Trainer(callbacks=[AttentionLogger(include=["encoder.*"], probe_samples=2)])
    """

    namespace = NAMESPACE

    def __init__(
        self,
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        every_n_batches: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        probe_samples: int = 2,
        sparsity_threshold: float = 0.01,
        chunk_size: int | None = 256,
        modality_pairs: Mapping[str, tuple[str, str]] | None = None,
        token_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        log_per_head: bool = False,
        log_figures: bool = True,
        max_figure_sites: int = 3,
        max_map_tokens: int = 128,
        top_k: int = 10,
        max_positions: int = 4096,
        save_dir: str | None = None,
        name: str | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        min_batches: int = DEFAULT_MIN_BATCHES,
        exact_outputs: bool = True,
    ) -> None:
        super().__init__(
            stages, every_n_epochs, max_batches, every_n_batches, max_figure_sites, save_dir, name=name, include=include
        )
        self._set_budget(overhead_budget, min_batches)
        self.exact_outputs = exact_outputs
        check_min(0, probe_samples=probe_samples)
        check_min(1, max_map_tokens=max_map_tokens, top_k=top_k, max_positions=max_positions)
        check_min(1, optional=True, chunk_size=chunk_size)
        if not 0.0 < sparsity_threshold < 1.0:
            raise ValueError(f"sparsity_threshold must be in (0, 1), got {sparsity_threshold}")
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.probe_samples = probe_samples
        self.sparsity_threshold = sparsity_threshold
        self.chunk_size = chunk_size
        self.modality_pairs = PairBuffer(modality_pairs or {}).pairs  # checked: two sites a pair
        self.token_names = token_names
        self.log_per_head = log_per_head
        self.log_figures = log_figures
        self.max_map_tokens = max_map_tokens
        self.top_k = top_k
        self.max_positions = max_positions
        self._active: AttentionAccumulators | None = None
        self._recorder: AttentionRecorder | None = None
        owner, named = f"AttentionLogger(name={self.name!r})", site_naming_arguments(self.modality_pairs, token_names)
        self._checks = FirstBatchCheck(owner, self.include, self.exclude, named, exact_outputs=exact_outputs)
        self._probe: ProbeMaps | None = None
        self._probe_inputs = ProbeInputs(probe_samples)

    # -- identity and checkpoints ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            stages=self.stages, include=self.include, exclude=self.exclude, **self._name_in_state_key()
        )

    def state_dict(self) -> dict[str, Any]:
        """Epoch counters and the probe samples' identity (count, fingerprint of their inputs per stage)."""
        return {
            **super().state_dict(),
            "probe_samples": self.probe_samples,
            "probe_fingerprints": dict(self._probe_inputs.fingerprints),
        }

    def forget_model(self) -> None:
        super().forget_model()
        self._probe_inputs.fingerprints = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("probe_samples", self.probe_samples)
        if saved != self.probe_samples:
            rank_zero_warn(f"AttentionLogger: checkpoint used probe_samples={saved}, now {self.probe_samples}")
        fingerprints = state_dict.get("probe_fingerprints", {}) if saved == self.probe_samples else {}
        self._probe_inputs.fingerprints = dict(fingerprints)  # of other probe samples: not comparable

    # -- checks at setup (the first batch: FirstBatchCheck) -----------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.save_dir is not None:
            check_output_dir(self.save_dir, f"AttentionLogger(name={self.name!r}): save_dir")

    # -- states and hooks ------------------------------------------------------------------------------
    def _new_state(self) -> AttentionAccumulators:
        return AttentionAccumulators.create(
            self.sparsity_threshold, self.chunk_size, self.max_positions, self.modality_pairs
        )

    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._used = set()
        self._probe = None
        self._probe_inputs.batch = None

    def eval_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        if not self._records(stage, dataloader_idx, batch_idx):
            return
        self._close_recorder()
        self._active = self._state_for(stage, dataloader_idx, pl_module.device)
        if self.probe_samples and probe_batch(trainer, batch_idx, dataloader_idx):
            self._probe = ProbeMaps(self.probe_samples, self.max_map_tokens) if self.log_figures else None
            self._probe_inputs.keep(batch)
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

    def eval_abort(self) -> None:
        self._close_recorder()
        self._probe = None
        self._probe_inputs.batch = None
        self._reset_states()

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)
        if self._active is not None:
            self._active.end_batch()
        self._active = None

    def _on_capture(self, capture: AttentionCapture) -> None:
        if self._active is not None:
            self._active.update(capture, self.chunk_size, self._probe)

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_recorder()
        probe = self._probe.finish() if self._probe is not None else None
        if self._probe_inputs.changed(stage):
            rank_zero_warn(PROBES_CHANGED, category=UserWarning)
        self._probe = None
        first = self._states.get((stage, 0))
        pair_sites = first.pairs.sites() if first is not None and first.pairs is not None else self.modality_pairs
        labels = functools.partial(position_labels, self.token_names)
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        self._finish_epoch(
            trainer,
            pl_module,
            stage,
            compute=lambda acc, key, _: acc.compute(key, epoch, step, self.top_k, labels),
            publish=lambda results, dataloader_idx: self._publish(
                trainer, results, probe if dataloader_idx == 0 else None, pair_sites
            ),
        )

    def _scalars(self, results: AttentionResults) -> dict[str, float]:
        return results.scalars(f"{self.name}/{results.stage}", per_head=self.log_per_head)

    # -- publishing (rank zero) ------------------------------------------------------------------------
    def _publish(
        self,
        trainer: pl.Trainer,
        results: AttentionResults,
        probe: dict[str, Any] | None,
        pair_sites: Mapping[str, tuple[str, str]],
    ) -> None:
        drawn = self.log_figures and bool(results.sites)
        figures = functools.partial(self._figures, results, probe, pair_sites) if drawn else None
        self._publish_results(trainer, results, "head_statistics", *results.table(), figures)

    def _figures(
        self, results: AttentionResults, probe: dict[str, Any] | None, pair_sites: Mapping[str, tuple[str, str]]
    ) -> dict[str, Figure]:
        return attention_epoch_figures(
            results,
            probe,
            sites=self._figure_sites(results.sites),
            probe_samples=self.probe_samples,
            pair_sites=pair_sites,
            token_names=self.token_names,
        )
