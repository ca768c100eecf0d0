"""What every lightning_attn callback shares: stage and epoch gating, and hook routing.

Subclasses implement :meth:`eval_epoch_start`, :meth:`eval_batch_start`, :meth:`eval_batch_end`
and :meth:`eval_epoch_end` once, for validation and test alike; the base class skips the sanity
check, stages that were not asked for and epochs between ``every_n_epochs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

Stage = Literal["validate", "test"]

#: Short stage names used in logged keys: ``<namespace>/<val|test>/...``.
STAGE_KEYS: dict[str, str] = {"validate": "val", "test": "test"}


class EvaluationCallback(Callback):
    """Base of the evaluation-time callbacks.

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
    """

    def __init__(self, stages: Sequence[Stage] = ("validate",), every_n_epochs: int = 1, save_dir: str | None = None) -> None:
        super().__init__()
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in stages if s not in STAGE_KEYS]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: choose from {sorted(STAGE_KEYS)}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.stages: tuple[str, ...] = stages
        self.every_n_epochs = every_n_epochs
        self.save_dir = None if save_dir is None else Path(save_dir)
        self._running: str | None = None

    # -- gating ---------------------------------------------------------------------------------
    def _should_run(self, trainer: pl.Trainer, stage: str) -> bool:
        if trainer.sanity_checking or stage not in self.stages:
            return False
        return stage == "test" or trainer.current_epoch % self.every_n_epochs == 0

    # -- subclass interface ---------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called at the start of an evaluation epoch that runs."""

    def eval_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        """Called before ``validation_step``/``test_step`` of a batch that runs."""

    def eval_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int, stage: str) -> None:
        """Called after the step. No host synchronisation here: it runs for every batch."""

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called at the end of the epoch: compute (a collective: every rank), log, publish (rank zero)."""

    def eval_abort(self) -> None:
        """Called when the loop raised: release whatever the batch hooks hold."""

    # -- routing --------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._running = stage if self._should_run(trainer, stage) else None
        if self._running:
            self.eval_epoch_start(trainer, pl_module, stage)

    def _batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx, stage) -> None:  # noqa: ANN001
        if self._running == stage:
            self.eval_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, stage)

    def _batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, stage) -> None:  # noqa: ANN001
        if self._running == stage:
            self.eval_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, stage)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._running == stage:
            self._running = None
            self.eval_epoch_end(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "test")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._running = None
        self.eval_abort()


def stage_key(stage: str, dataloader_idx: int = 0) -> str:
    """``val``/``test``, with ``_dl<k>`` for the k-th (k >= 1) dataloader of a multi-loader evaluation."""
    return STAGE_KEYS[stage] + (f"_dl{dataloader_idx}" if dataloader_idx else "")


def log_scalars(pl_module: pl.LightningModule, values: dict[str, Any]) -> None:
    """Log already-reduced scalars (``Metric.compute`` synced them) through the module, so that
    ModelCheckpoint and EarlyStopping can monitor them; no dataloader suffix.

    The values are equal on every rank; ``sync_dist`` with a ``max`` reduction keeps them exactly so
    (a mean could round) while telling Lightning they are global, which silences its per-key
    "use sync_dist=True" warning under DDP at the cost of one scalar all-reduce per key and epoch."""
    for key, value in values.items():
        pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", add_dataloader_idx=False)
