"""The streaming callbacks over a run's life: a resume equals a straight run, a fault (exception, KeyboardInterrupt)
or ``should_stop`` leaves no hook and the next run equals a fresh one, 30 epochs keep memory, figures and file
descriptors flat. All three callbacks (AttentionLogger, HeadSpecializationTracker, ModuleProbe) run together."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from callback_cases import FACTORIES, logged, model, outcome
from helpers import cpu_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_attn import AttentionLogger, HeadSpecializationTracker, ModuleProbe

pytestmark = pytest.mark.usefixtures("one_thread")


def all_callbacks() -> list[Any]:
    return [make() for make in FACTORIES.values()]


def fit(
    root: Path,
    callbacks: list[Any],
    epochs: int,
    module: pl.LightningModule | None = None,
    ckpt_path: str | None = None,
    **options: Any,
) -> pl.Trainer:
    trainer = cpu_trainer(root, callbacks, max_epochs=epochs, limit_train_batches=1, limit_val_batches=2, **options)
    trainer.fit(module or model(), models.loader(8, 4), models.loader(8, 4), ckpt_path=ckpt_path)
    return trainer


def validate(root: Path, callbacks: list[Any], module: pl.LightningModule) -> dict[str, float]:
    trainer = cpu_trainer(root, callbacks, limit_val_batches=2)
    trainer.validate(module, models.loader(8, 4), verbose=False)
    return logged(trainer)


def last_run(callback: Any) -> str:
    """What the callback computed in its last evaluation epoch, as JSON."""
    if isinstance(callback, HeadSpecializationTracker):
        return json.dumps(callback.history_for("val")[-1], sort_keys=True, default=repr)
    return json.dumps(callback.results["val"].to_dict(), sort_keys=True, default=repr)


def assert_no_hooks(module: torch.nn.Module, callbacks: list[Any]) -> None:
    from torch.nn.modules import module as module_globals

    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert not torch.overrides._get_current_function_mode_stack()
    assert all(getattr(c, "_recorder", None) is None and getattr(c, "_hooks", None) is None for c in callbacks)


def test_resume_from_epoch_2_equals_a_straight_4_epoch_run(tmp_path: Path) -> None:
    straight = all_callbacks()
    straight_logged = logged(fit(tmp_path / "straight", straight, 4))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "split", [*all_callbacks(), checkpoint], 2, enable_checkpointing=True)
    resumed = all_callbacks()
    trainer = fit(tmp_path / "split", resumed, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in resumed[1].history_for("val")] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert outcome(a) == outcome(b), type(a).__name__
    assert logged(trainer) == pytest.approx(straight_logged, abs=1e-12, nan_ok=True)


class Faulty(models.CrossModalModule):
    """Raises ``fault`` in the second validation batch (the callbacks hold recorders, hooks and partial sums)."""

    fault: BaseException | None = None

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 1 and self.fault is not None:
            raise self.fault


@pytest.mark.parametrize("fault", ["exception", "keyboard_interrupt"])
def test_a_fault_leaves_no_hook_and_the_next_run_equals_a_fresh_one(tmp_path: Path, fault: str) -> None:
    pl.seed_everything(0, verbose=False)
    module = Faulty()
    module.fault = RuntimeError("boom") if fault == "exception" else KeyboardInterrupt()
    callbacks = all_callbacks()
    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning turns a KeyboardInterrupt into SystemExit(1), ignoring SIGINT from then on
        with pytest.raises(RuntimeError if fault == "exception" else SystemExit):
            validate(tmp_path / "faulty", callbacks, module)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert_no_hooks(module, callbacks)
    module.fault = None
    again = validate(tmp_path / "again", callbacks, module)
    fresh = all_callbacks()
    assert validate(tmp_path / "fresh", fresh, module) == pytest.approx(again, abs=1e-12, nan_ok=True)
    for a, b in zip(callbacks, fresh, strict=True):
        assert outcome(a) == outcome(b), type(a).__name__


def test_should_stop_leaves_no_hook_and_the_next_run_equals_a_fresh_one(tmp_path: Path) -> None:
    class Stopping(models.CrossModalModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.trainer.should_stop = True  # as EarlyStopping does
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    module = Stopping()
    callbacks = all_callbacks()
    trainer = fit(tmp_path / "stopped", callbacks, 5, module=module)
    assert trainer.should_stop and len(callbacks[1].history_for("val")) == 1  # stopped after the first epoch
    assert_no_hooks(module, callbacks)
    again = validate(tmp_path / "again", callbacks, module)
    fresh = all_callbacks()
    assert validate(tmp_path / "fresh", fresh, module) == pytest.approx(again, abs=1e-12, nan_ok=True)
    for a, b in zip(callbacks, fresh, strict=True):
        assert last_run(a) == last_run(b), type(a).__name__


class Gauge(Callback):
    """Resident memory (MiB) and open file descriptors after each validation epoch."""

    def __init__(self) -> None:
        self.memory: list[float] = []
        self.descriptors: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the epoch's figures are written in the callbacks' background publishers: wait for them, so that a file
        # open in the worker at this moment is not counted (a leak would stay open after the wait)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if hasattr(callback, "publisher"):
                callback.publisher.wait()
        gc.collect()
        with open("/proc/self/statm") as handle:
            self.memory.append(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
        self.descriptors.append(len(os.listdir("/proc/self/fd")))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_30_epochs_keep_memory_figures_and_descriptors_flat(tmp_path: Path) -> None:
    callbacks: list[Any] = [
        AttentionLogger(include=["encoder.layers.0.*"], probe_samples=1, log_figures=False),
        HeadSpecializationTracker(include=["encoder.layers.0.*"], probe_samples=2, log_figures=False),
        # one figure per epoch (no probe samples: no heatmap), drawn and published like every figure
        ModuleProbe(probes={"ff": ("encoder.layers.0.linear1", "activation")}, probe_samples=0),
    ]
    gauge = Gauge()
    trainer = cpu_trainer(
        tmp_path, [*callbacks, gauge], max_epochs=30, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0
    )
    module = models.CrossModalModule(layers=1)
    trainer.fit(module, models.loader(4, 4), models.loader(4, 4))
    assert len(gauge.memory) == 30 and len(callbacks[1].history_for("val")) == 30
    assert max(gauge.memory[5:]) - gauge.memory[5] < 16, gauge.memory  # MiB: no growth with the epochs
    assert max(gauge.descriptors[5:]) <= gauge.descriptors[5], gauge.descriptors
    assert_no_hooks(module, callbacks)
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    assert len(list((tmp_path / "lightning_attn_logs").rglob("*.png"))) == 30  # a figure was drawn every epoch
