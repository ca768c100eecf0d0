"""What :class:`~lightning_attn.report.callback.ExplainabilityReport` does around its hooks (a mixin): the report's
runs (one per dataloader: where each goes, its recorder during the step, its end of epoch, alone or gathered from
the ranks), and their end: written (:func:`~lightning_attn.report.write.write_report`, then published to the
dashboards) or left visibly INCOMPLETE.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_attn import sinks
from lightning_attn.callbacks.base import stage_key
from lightning_attn.capture.recorder import AttentionRecorder, close_recorder, open_recorder
from lightning_attn.report.attribution import AttributionSettings
from lightning_attn.report.batches import target_module
from lightning_attn.report.distributed import gather_shards
from lightning_attn.report.explain import BatchAttention, ReportError
from lightning_attn.report.map_history import ProbeMapHistory
from lightning_attn.report.provenance import hash_state_dict, utc_now
from lightning_attn.report.run import NAMESPACE, ReportRun, scalars
from lightning_attn.report.summary import SCHEMA_VERSION, callable_name, jsonable, other_sections
from lightning_attn.report.write import INCOMPLETE, OutputSettings, incomplete_dir, report_destination, write_report
from lightning_attn.sinks.dashboards import publish_report

__all__ = ["ReportRuns"]


class ReportRuns:
    """The runs of :class:`~lightning_attn.report.callback.ExplainabilityReport` (a mixin: the settings below are the
    report's own arguments, documented there; the state is set up by its ``__init__``)."""

    stages: tuple[str, ...]
    every_n_epochs: int
    save_dir: Path | None
    report_dir: Path | None
    forward_fn: Callable[[Any, Any], Any] | None
    target_fn: Callable[[Any], Any] | None
    target_key: str | None
    logits_key: str
    outputs_are_probabilities: bool
    class_names: list[str] | None
    feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None
    include: list[str] | None
    exclude: list[str] | None
    pair_sites: list[str] | None
    top_k: int
    modality_pairs: dict[str, tuple[str, str]]
    calibration_bins: int
    probe_samples: int
    probe_indices: list[int] | None
    saliency_target: str
    chunk_size: int | None
    max_batches: int | None
    html_max_rows: int | None
    max_positions: int
    title: str
    figures: bool
    figure_dpi: int
    attribution: AttributionSettings
    results: dict[str, dict[str, Any]]
    _runs: dict[int, ReportRun]
    _map_history: ProbeMapHistory
    _pending: list[ReportRun]
    _recorder: AttentionRecorder | None
    _attention: BatchAttention | None
    _hook: Any
    _step_output: Any
    _model_sha256: str | None
    _warned_ddp: bool
    _warned_padding: bool
    _distributed: bool  # this epoch's ranks each evaluate their shard and send it to rank zero

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

    def _covers(self, trainer: pl.Trainer) -> bool:
        """Whether this rank evaluates its batches for the report (every rank under DDP, else rank zero)."""
        return trainer.is_global_zero or self._distributed

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

    # -- end of epoch ------------------------------------------------------------------------------------------------
    def _detect_distributed(self, trainer: pl.Trainer) -> None:
        """Whether this epoch's ranks evaluate their shards for rank zero (a ``torch.distributed`` group of them)."""
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

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, float]:
        """Close this epoch's runs: gathered to rank zero (a collective) or kept for the end of the loop; returns the
        scalars to log."""
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
        return logged

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
        sections = other_sections(getattr(trainer, "callbacks", None) or [], run, skip=ReportRuns)
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
