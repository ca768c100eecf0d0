"""The HeadSpecializationTracker's epoch end: per dataloader used this epoch, the record of the analysed epoch, its
logged scalars and its publication, kept apart from the callback's hook wiring.

Outputs, per epoch and stage key (``val``, ``test_dl1`` ...): scalars ``<name>/<stage>/<score>`` (mean over the
heads; per head ``<name>/<stage>/<site>/h<k>/<score>``), ``<name>/<stage>/specialized`` and
``<name>/<stage>/general``; the figures of :meth:`~lightning_attn.HeadSpecializationTracker.figures`; the registry
``head_functions.json`` (:meth:`~lightning_attn.HeadSpecializationTracker.registry`) and the ``registry``,
``role_events`` (head-role changes since the previous epoch) and ``prunable_heads`` (with ``head_importance``: Michel
et al.'s (2019) gradient importance, :mod:`lightning_attn.callbacks.head_importance`) tables, in
``<save_dir or log_dir/lightning_attn>/<name>/<stage>/``."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
from matplotlib.figure import Figure

from lightning_attn.callbacks.base import log_scalars, stage_key, used_on_any_rank
from lightning_attn.callbacks.budget import BatchBudget, coverage_scalars
from lightning_attn.metrics.head_records import record_tables
from lightning_attn.metrics.head_tracking import HeadTracking
from lightning_attn.sinks import publish_figures, publish_json, publish_table
from lightning_attn.sinks.dashboards import per_head_charts, publish_scalar_layout

__all__ = ["HeadOutputs", "finish_head_epoch", "publish_head_record", "write_json"]


class HeadOutputs(Protocol):
    """What the epoch end reads of its tracker."""

    name: str
    save_dir: Path | None
    head_importance: bool
    export_registry: bool
    log_figures: bool

    def registry(self, stage: str = "val") -> dict[str, Any]: ...

    def figures(self, stage: str = "val", redundancy: dict[str, Any] | None = None) -> dict[str, Figure]: ...


def finish_head_epoch(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stage: str,
    tracker: HeadOutputs,
    tracking: HeadTracking,
    budget: BatchBudget,
    submit: Callable[[pl.Trainer, Callable[[Any], None]], None],
) -> None:
    """For every dataloader that some rank used this epoch: the record (a collective: every rank), its scalars and
    coverage logged, and (global rank zero) its publication handed to ``submit`` (the tracker's publisher)."""
    dataloaders = used_on_any_rank(tracking.used(stage))
    coverage = budget.coverage(trainer, stage, dataloaders)  # a collective: every rank
    for dataloader_idx in dataloaders:
        key = stage_key(stage, dataloader_idx)
        record, redundancy, scalars = tracking.finish(  # collectives: every rank
            stage,
            dataloader_idx,
            pl_module.device,
            key=key,
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            coverage=coverage[dataloader_idx],
            importance=tracker.head_importance,
        )
        log_scalars(pl_module, {**scalars, **coverage_scalars(tracker.name, key, record["coverage"])})
        if trainer.is_global_zero:
            publish_scalar_layout(trainer, tracker.name, per_head_charts(list(scalars)))
            submit(trainer, partial(publish_head_record, tracker=tracker, record=record, redundancy=redundancy))


def publish_head_record(
    trainer: Any, tracker: HeadOutputs, record: dict[str, Any], redundancy: dict[str, Any] | None
) -> None:
    """The registry, the tables and the figures of ``record`` (rank zero, in the publisher)."""
    key, step = record["stage"], int(trainer.global_step)
    where: dict[str, Any] = {"namespace": f"{tracker.name}/{key}", "save_dir": tracker.save_dir}
    registry = tracker.registry(key) if tracker.export_registry else None
    if registry is not None:
        publish_json(trainer, "head_functions", registry, **where)
    for table, (columns, rows) in record_tables(record, registry).items():
        publish_table(trainer, table, columns, rows, step=step, **where)
    if tracker.log_figures:
        publish_figures(trainer, tracker.figures(key, redundancy), step=step, **where)


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` to ``path`` as strict JSON (no NaN), its folder created; any rank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False))
    return path
