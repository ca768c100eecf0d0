""":func:`build_report`: the explainability report of a model on a dataloader (or datamodule), with no Trainer
script: a quiet Trainer runs the test (or validation) loop with an
:class:`~lightning_attn.report.callback.ExplainabilityReport`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_attn.callbacks.base import STAGE_KEYS
from lightning_attn.report.callback import ExplainabilityReport, ReportModule
from lightning_attn.report.explain import ReportError

__all__ = ["build_report"]


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
        out_dir: the report's directory; replaced on success when it holds a previous report of this library and
            nothing else, else the report goes to a sibling ``<out_dir>-1``, ... (see :class:`ExplainabilityReport`);
            untouched on failure (the partial output stays in a sibling ``.<name>.incomplete-*`` directory with an
            ``INCOMPLETE`` marker).
        stage: ``"test"`` or ``"validate"``.
        callbacks: more callbacks for the Trainer.
        accelerator: Trainer accelerator (``"cpu"`` for hashes comparable across machines).
        devices: Trainer devices; with several (``trainer_kwargs={"strategy": "ddp"}``) every rank evaluates its shard
            and global rank zero writes the report of all of them (see :class:`ExplainabilityReport`).
        progress: show the progress bar.
        trainer_kwargs: more Trainer arguments.

    Returns:
        The directory the report was written to (``report.html``, ``report.json``, CSVs, ``summary.md``,
        ``figures/``), written by global
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
    module = model if isinstance(model, pl.LightningModule) and is_overridden(step, model) else ReportModule(model)
    report = ExplainabilityReport(stages=(stage,), report_dir=str(out_dir), **report_kwargs)
    kwargs: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": devices,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
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
