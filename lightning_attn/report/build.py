""":func:`build_report`: the explainability report of a model on a dataloader (or datamodule), with no Trainer
script: a quiet Trainer runs the test (or validation) loop with an
:class:`~lightning_attn.report.callback.ExplainabilityReport`.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_attn.callbacks.base import STAGE_KEYS
from lightning_attn.report.batches import ReportModule, ReportWrapper
from lightning_attn.report.callback import ExplainabilityReport
from lightning_attn.report.explain import ReportError

__all__ = ["build_report", "lightning_namespace"]


def lightning_namespace(model: Any, data: Any) -> ModuleType:
    """The Lightning package whose Trainer runs ``model`` on ``data``: ``pytorch_lightning`` when either is one of its
    LightningModules or LightningDataModules (a Trainer accepts only its own package's), else ``lightning.pytorch``.

    ``pytorch_lightning`` is looked up only among the imported modules: an object of its types means it was imported,
    and an environment without it never imports it.

    Raises:
        ReportError: the model and the data are of the two different packages.
    """
    standalone = sys.modules.get("pytorch_lightning")
    if standalone is None:
        return pl
    kinds = (standalone.LightningModule, standalone.LightningDataModule)
    unified = (pl.LightningModule, pl.LightningDataModule)
    packages = {isinstance(item, kinds) for item in (model, data) if isinstance(item, kinds + unified)}
    if len(packages) == 2:
        raise ReportError(
            "the model and the data are of different Lightning packages (lightning.pytorch and pytorch_lightning): "
            "one Trainer runs only its own package's modules"
        )
    return standalone if True in packages else pl


@functools.cache
def _report_module_class(namespace: ModuleType) -> type[ReportWrapper]:
    """:class:`ReportWrapper` as a LightningModule of ``namespace`` (the library's :class:`ReportModule` for
    ``lightning.pytorch``)."""
    if namespace is pl:
        return ReportModule
    return type("ReportModule", (ReportWrapper, namespace.LightningModule), {"__module__": ReportWrapper.__module__})


def _stderr_progress_bar(namespace: ModuleType) -> Any:
    """Lightning's tqdm progress bar (of ``namespace``, the Trainer's package), drawn on stderr (Lightning's own draws
    on stdout, which a command keeps for its result)."""
    import contextlib

    class StderrTQDMProgressBar(namespace.callbacks.TQDMProgressBar):  # type: ignore[name-defined]
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
        data: a DataLoader (or any iterable of batches), or a LightningDataModule. ``lightning.pytorch`` and
            ``pytorch_lightning`` modules both work: the Trainer is of their package (:func:`lightning_namespace`).
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
    if stage not in ("test", "validate"):
        raise ValueError(f"stage must be 'test' or 'validate', got {stage!r}")
    if not isinstance(model, nn.Module):
        raise ReportError(f"build_report needs an nn.Module, got {type(model).__name__}")
    namespace = lightning_namespace(model, data)
    step = "test_step" if stage == "test" else "validation_step"
    is_overridden = importlib.import_module(f"{namespace.__name__}.utilities.model_helpers").is_overridden
    own_step = isinstance(model, namespace.LightningModule) and is_overridden(step, model)
    module = model if own_step else _report_module_class(namespace)(model)
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
    if kwargs.get("enable_progress_bar") and not any(isinstance(c, namespace.callbacks.ProgressBar) for c in extra):
        extra.append(_stderr_progress_bar(namespace))
    trainer = namespace.Trainer(callbacks=[report, *extra], **kwargs)
    run = trainer.test if stage == "test" else trainer.validate
    if isinstance(data, namespace.LightningDataModule):
        run(module, datamodule=data, verbose=False)
    else:
        run(module, dataloaders=data, verbose=False)
    key = STAGE_KEYS[stage]
    if not trainer.is_global_zero:  # rank zero wrote the report
        return Path(out_dir)
    if key not in report.results:
        raise ReportError(f"the {stage} loop evaluated no batch: is the dataloader empty?")
    return Path(report.results[key]["directory"])
