"""``ModuleProbe``: gates, attention pooling and any named activation, streamed and drawn like attention."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor

from lightning_attn.callbacks.base import (
    Stage,
    StreamingCallback,
    check_min,
    probe_batch,
)
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, DEFAULT_OVERHEAD_BUDGET
from lightning_attn.capture.probes import ModuleHooks, ProbeSpec, parse_probes, resolve_probes
from lightning_attn.capture.recorder import AttentionRecorder, close_recorder, open_recorder
from lightning_attn.metrics.batch_context import batch_mask
from lightning_attn.metrics.probe_results import ProbeResults, probe_results, probe_scalars, summary_table
from lightning_attn.metrics.probe_stream import ProbeStream
from lightning_attn.metrics.probes import ProbeStatistics
from lightning_attn.plots.probes import probe_figures
from lightning_attn.sinks.layout import check_output_dir

__all__ = ["ModuleProbe"]


class ModuleProbe(StreamingCallback):
    """Streamed statistics and figures of named module outputs: gates, attention pooling, any activation.

    Probes are declared by glob over qualified module names with a kind::

        ModuleProbe(probes={"gate": ("layers.*.gate", "activation"), "pool": ("pool.softmax", "weights")})

    Forward hooks (:class:`~lightning_attn.capture.probes.ModuleHooks`, live for each evaluation epoch that runs,
    outputs unchanged) on the modules whose qualified names a probe's ``fnmatch`` glob matches (``*`` crosses dots):
    each module is a site (its k-th call in a batch ``<name>#k``). Patterns that match nothing raise one
    ``ProbeMatchError`` naming each with close module names before the first evaluation batch, sanity check included
    (not at setup: ``configure_model`` builds modules after it). States: :mod:`lightning_attn.metrics.probes`
    (``"activation"``: per position and channel; ``"weights"``: a distribution over positions, an attention site of
    its own); logged: :func:`~lightning_attn.metrics.probe_results.probe_scalars`; published under
    ``probe/<stage>/``: :func:`~lightning_attn.plots.probes.probe_figures`, a summary table and the statistics JSON;
    ``results[<stage>]``: the last epoch's :class:`~lightning_attn.metrics.probe_results.ProbeResults`.

    Args:
        probes: probe name to ``(module glob, kind)``, kind ``"activation"`` or ``"weights"``; in YAML
            ``{gate: [layers.*.gate, activation], pool: [pool.softmax, weights]}``.
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        max_batches: analyse at most this many batches per dataloader and epoch (``None``: all).
        every_n_batches: analyse only batches whose index is a multiple of this.
        probe_samples: samples whose outputs are drawn (0: none; ``None``: an AttentionLogger's, else 2).
        saturation_threshold: a value ``<= t`` counts as saturated low, ``>= 1 - t`` as saturated high.
        sparsity_threshold: weight below which a position counts as not attended (weights sites).
        histogram_sites: globs of attention sites (``layers.*.cross_attn``) whose weight histograms are streamed.
        histogram_bins: equal-width bins on ``[0, 1]`` of the histograms.
        chunk_size: query rows of an attention map reduced at a time for histograms (``None``: whole maps).
        position_names: labels of the positions (``[t-31, ..., t0]``) where the length matches.
        max_channels: channels shown in the activation heatmaps (those with the largest std over the epoch).
        max_figure_sites: at most this many sites per figure (evenly spaced over depth, first and last kept).
        top_k: number of top positions reported per weights site.
        max_positions: positions tracked per site (fixed state size).
        mask_key: key (mapping batch) or index (tuple batch) of a ``[batch, positions]`` mask, true where valid: padded
            positions left out of activations with that many positions (other lengths raise; weights need none).
        log_figures: draw and publish figures (statistics, table and JSON are published regardless).
        save_dir: directory for PNG/JSON/CSV outputs (a file raises at setup); default the run folder's
            ``<name>/<stage>`` (:mod:`lightning_attn.sinks.layout`).
        name: replaces ``probe`` in the keys, published names and output folder (two instances: different names).
        overhead_budget: share of the epoch recording may add (:mod:`~lightning_attn.callbacks.budget`; ``None``: all).
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader (all when fewer).
        exact_outputs: ``False``: SDPA outputs computed from the probabilities recorded (within 1e-5).
    """

    namespace = "probe"

    def __init__(
        self,
        probes: dict[str, tuple[str, str]],
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        every_n_batches: int = 1,
        probe_samples: int | None = None,
        saturation_threshold: float = 0.05,
        sparsity_threshold: float = 0.01,
        histogram_sites: Sequence[str] | None = None,
        histogram_bins: int = 20,
        chunk_size: int | None = 256,
        position_names: Sequence[str] | None = None,
        max_channels: int = 16,
        max_figure_sites: int = 6,
        top_k: int = 10,
        max_positions: int = 4096,
        mask_key: str | int | None = None,
        log_figures: bool = True,
        save_dir: str | None = None,
        name: str | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        min_batches: int = DEFAULT_MIN_BATCHES,
        exact_outputs: bool = True,
    ) -> None:
        super().__init__(stages, every_n_epochs, max_batches, every_n_batches, max_figure_sites, save_dir, name=name)
        self._set_budget(overhead_budget, min_batches)
        self.exact_outputs = exact_outputs
        self.specs: list[ProbeSpec] = parse_probes(probes)
        self.probes = {spec.name: (spec.pattern, spec.kind) for spec in self.specs}
        check_min(1, histogram_bins=histogram_bins, max_channels=max_channels, top_k=top_k, max_positions=max_positions)
        check_min(0, optional=True, probe_samples=probe_samples)
        check_min(1, optional=True, chunk_size=chunk_size)
        if not 0.0 <= saturation_threshold < 0.5:
            raise ValueError(f"saturation_threshold must be in [0, 0.5), got {saturation_threshold}")
        if not 0.0 < sparsity_threshold < 1.0:
            raise ValueError(f"sparsity_threshold must be in (0, 1), got {sparsity_threshold}")
        self.probe_samples = probe_samples
        self.saturation_threshold = saturation_threshold
        self.sparsity_threshold = sparsity_threshold
        self.histogram_sites = list(histogram_sites) if histogram_sites else None
        self.histogram_bins = histogram_bins
        self.chunk_size = chunk_size
        self.position_names = None if position_names is None else [str(n) for n in position_names]
        self.max_channels = max_channels
        self.top_k = top_k
        self.max_positions = max_positions
        self.mask_key = mask_key
        self.log_figures = log_figures

        self._stream = ProbeStream(chunk_size, max_positions)
        self._hooks: ModuleHooks | None = None
        self._recorder: AttentionRecorder | None = None
        self._probe_info: dict[str, dict[str, Any]] = {}
        self._warned_histograms = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            stages=self.stages, probes=sorted(self.probes.items()), **self._name_in_state_key()
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail early on a ``save_dir`` that is a file; the probes are matched before the first evaluation batch."""
        super().setup(trainer, pl_module, stage)
        if self.save_dir is not None:
            check_output_dir(self.save_dir, f"{type(self).__name__} save_dir")

    def forget_model(self) -> None:
        super().forget_model()
        self._stream = ProbeStream(self.chunk_size, self.max_positions)
        self._probe_info = {}
        self._warned_histograms = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()

    def first_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, stage: str) -> None:
        """Before the first evaluation batch, sanity check included: every pattern must match a module."""
        resolve_probes(pl_module, self.specs)

    def _num_samples(self, trainer: pl.Trainer) -> int:
        if self.probe_samples is not None:
            return self.probe_samples
        from lightning_attn.callbacks.attention_logger import AttentionLogger

        # Trainer.callbacks is a property of the mixin
        loggers = [c for c in trainer.callbacks if isinstance(c, AttentionLogger)]  # type: ignore[attr-defined]
        return int(loggers[0].probe_samples) if loggers else 2

    def _new_state(self) -> ProbeStatistics:
        return ProbeStatistics(
            self.saturation_threshold, self.sparsity_threshold, self.histogram_bins, self.max_positions, self.chunk_size
        )

    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._used = set()
        self._stream.samples = None
        self._hooks = ModuleHooks(pl_module, self.specs, self._stream.on_output).attach()
        self._probe_info = {  # the ProbeResults.probes of the epoch's results
            name: {"pattern": pattern, "kind": kind, "sites": list(self._hooks.sites.get(name, []))}
            for name, (pattern, kind) in self.probes.items()
        }

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
        self._close_batch()
        self._stream.start_batch(
            self._state_for(stage, dataloader_idx, pl_module.device),
            batch_mask(batch, self.mask_key) if self.mask_key is not None else None,
            self._num_samples(trainer) if probe_batch(trainer, batch_idx, dataloader_idx) else 0,
        )
        if self._hooks is not None:
            self._hooks.new_step()
        if self.histogram_sites:
            self._recorder = open_recorder(
                pl_module, self._stream.on_capture, self.histogram_sites, exact_outputs=self.exact_outputs
            )

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
        self._close_batch()

    def eval_abort(self) -> None:
        self._release()
        self._stream.samples = None
        self._reset_states()

    def _close_batch(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder, quiet=True)  # "no attention found": reported once per epoch instead
        self._stream.end_batch()

    def _release(self) -> None:
        self._close_batch()
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        samples = self._stream.finish_samples()
        analysed = bool(self._used)
        self._finish_epoch(
            trainer,
            pl_module,
            stage,
            compute=partial(self._compute, trainer=trainer, samples=samples),
            publish=lambda results, _: self._publish(trainer, results),
        )
        if self.histogram_sites and analysed and not self._stream.attention_sites and not self._warned_histograms:
            self._warned_histograms = True
            rank_zero_warn(
                f"ModuleProbe: histogram_sites {self.histogram_sites} matched no attention site of "
                f"{type(pl_module).__name__}",
                category=UserWarning,
            )

    def _compute(
        self,
        statistics: ProbeStatistics,
        key: str,
        dataloader_idx: int,
        trainer: pl.Trainer,
        samples: dict[str, Tensor],
    ) -> ProbeResults:
        """One dataloader's results (the probe samples belong to dataloader 0)."""
        return probe_results(
            statistics,
            stage=key,
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            probes=self._probe_info,
            top_k=self.top_k,
            position_names=self.position_names,
            samples=samples if dataloader_idx == 0 else {},
        )

    def _scalars(self, results: ProbeResults) -> dict[str, float]:
        return probe_scalars(results, f"{self.name}/{results.stage}")

    def _publish(self, trainer: pl.Trainer, results: ProbeResults) -> None:
        columns, rows = summary_table(results)
        figures = partial(self._figures, results) if self.log_figures else None
        self._publish_results(trainer, results, "summary", columns, rows, figures)

    def _figures(self, results: ProbeResults) -> dict[str, Figure]:
        sites, names = self._figure_sites, self.position_names
        return probe_figures(results, figure_sites=sites, max_channels=self.max_channels, position_names=names)
