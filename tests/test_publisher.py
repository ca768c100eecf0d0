"""Figures off the training thread: the background publisher gives the same files and dashboard images as the
synchronous path (real TensorBoard event files, a real offline W&B run), returns from the epoch end before the
figures are drawn, keeps what was drawn when the run fails, and leaves no thread behind."""

from __future__ import annotations

import pickle
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_options
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_attn import AttentionLogger, CalibrationMonitor, HeadSpecializationTracker

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = "lightning_attn-publisher"


class Classifier(models.CrossModalModule):
    """Returns its logits to the CalibrationMonitor; ``fail_at_epoch``: its training step raises in that epoch."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        super().__init__()
        self.fail_at_epoch = fail_at_epoch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == self.fail_at_epoch:
            raise RuntimeError("training failed")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        eeg, spec, y = batch
        return {"logits": self(eeg, spec), "target": y}


def callbacks(background: bool) -> list[Any]:
    chosen = [  # every kind of publishing, few figures (drawing them is what takes the time)
        AttentionLogger(probe_samples=0, max_figure_sites=1),
        CalibrationMonitor(n_bins=5, bootstrap=0, plot_classes=1),
        HeadSpecializationTracker(probe_samples=0),
    ]
    for callback in chosen:
        callback.background_publishing = background
    return chosen


def fit(root: Path, chosen: list[Any], logger: Any = False, epochs: int = 2, module: pl.LightningModule | None = None):
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    trainer = pl.Trainer(
        callbacks=chosen,
        **trainer_options(root, logger=logger, max_epochs=epochs, limit_train_batches=2, log_every_n_steps=1),
    )
    trainer.fit(module or Classifier(), models.loader(8, 4), models.loader(8, 4))
    return trainer


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".png", ".csv", ".json"))


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER)]


def tensorboard_images(log_dir: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: sorted(image.step for image in events.Images(tag)) for tag in events.Tags()["images"]}


@pytest.mark.slow
def test_tensorboard_images_and_files_match_the_synchronous_path(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    seen: dict[bool, tuple[list[str], dict[str, list[int]]]] = {}
    for background in (False, True):
        root = tmp_path / str(background)
        torch.manual_seed(0)
        logger = TensorBoardLogger(str(root), name="tb")
        chosen = callbacks(background)
        for callback in chosen:
            callback.save_dir = root / "out"  # files as well as the dashboard
        fit(root, chosen, logger)
        assert not workers()
        seen[background] = (files(root / "out"), tensorboard_images(logger.log_dir))
    (sync_files, sync_images), (async_files, async_images) = seen[False], seen[True]
    assert async_files == sync_files and any(name.endswith(".png") for name in sync_files)
    assert async_images == sync_images
    assert "attn/val/head_statistics" in sync_images and "calibration/val/reliability" in sync_images
    assert sync_images["calibration/val/reliability"] == [2, 4]  # both epochs (2 steps each)


@pytest.mark.slow
def test_wandb_offline_run_gets_every_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    seen: dict[bool, list[str]] = {}
    for background in (False, True):
        wandb.finish()
        root = tmp_path / str(background)
        root.mkdir()
        logger = WandbLogger(project="publisher-test", save_dir=str(root), offline=True)
        try:
            fit(root, callbacks(background), logger)
            run_dir = Path(logger.experiment.dir).parent
        finally:
            wandb.finish()
        media = run_dir / "files" / "media"
        # media names end in _<wandb step>_<content hash>: keep the key, which names the figure and its stage
        seen[background] = sorted(
            re.sub(r"_\d+_[0-9a-f]+\.(png|table\.json)$", "", p.relative_to(media).as_posix())
            for p in media.rglob("*")
            if p.is_file()
        )
    wandb.teardown()
    assert seen[True] == seen[False]
    assert seen[True].count("images/calibration/val/reliability") == 2  # both epochs
    assert any("head_statistics" in name for name in seen[True]) and any("table" in name for name in seen[True])


class Gate(Callback):
    """After the AttentionLogger's epoch end: its figures are still waiting on the gate, then the gate opens."""

    def __init__(self, attention: AttentionLogger, gate: threading.Event, out: Path) -> None:
        self.attention, self.gate, self.out = attention, gate, out
        self.pending_at_epoch_end: list[int] = []
        self.pngs_at_epoch_end: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.pending_at_epoch_end.append(self.attention.publisher.pending)
        self.pngs_at_epoch_end.append(len(list(self.out.rglob("*.png"))))
        self.gate.set()


def test_epoch_end_returns_before_the_figures_are_drawn(tmp_path: Path) -> None:
    gate = threading.Event()

    class SlowFigures(AttentionLogger):
        def _figures(self, *args: Any) -> Any:
            assert gate.wait(timeout=60), "the epoch end never returned"
            gate.clear()
            return super()._figures(*args)

    attention = SlowFigures(probe_samples=1, max_figure_sites=2, save_dir=str(tmp_path / "out"))
    watcher = Gate(attention, gate, tmp_path / "out")
    fit(tmp_path, [attention, watcher], epochs=1)
    assert watcher.pending_at_epoch_end == [1] and watcher.pngs_at_epoch_end == [0]
    assert len(list((tmp_path / "out").rglob("*.png"))) >= 4  # drawn after the epoch end, before fit returned
    assert not workers()


@pytest.mark.slow
def test_a_failing_fit_keeps_what_was_drawn(tmp_path: Path) -> None:
    chosen = callbacks(background=True)
    for callback in chosen:
        callback.save_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="training failed"):
        fit(tmp_path, chosen, epochs=3, module=Classifier(fail_at_epoch=1))
    written = files(tmp_path / "out")
    reference_root = tmp_path / "reference"
    reference = callbacks(background=False)
    for callback in reference:
        callback.save_dir = reference_root / "out"
    fit(reference_root, reference, epochs=1)
    assert written == files(reference_root / "out")  # epoch 0's outputs, all of them
    assert not workers()


def test_a_failing_figure_surfaces_at_the_end_of_fit(tmp_path: Path) -> None:
    class BrokenFigures(AttentionLogger):
        def _figures(self, *args: Any) -> Any:
            raise ValueError("cannot draw")

    with pytest.raises(ValueError, match="cannot draw"):
        fit(tmp_path, [BrokenFigures(probe_samples=1)], epochs=1)
    assert not workers()


def test_the_model_keeps_training_meanwhile(tmp_path: Path) -> None:
    """A training step runs while the previous validation epoch's figures are still being drawn."""
    gate = threading.Event()
    steps_while_drawing: list[int] = []

    class SlowFigures(AttentionLogger):
        def _figures(self, *args: Any) -> Any:
            assert gate.wait(timeout=60), "no training step ran while drawing"
            return super()._figures(*args)

    class Steps(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if attention.publisher.pending:
                steps_while_drawing.append(trainer.global_step)
                gate.set()

    attention = SlowFigures(probe_samples=0, max_figure_sites=1)
    fit(tmp_path, [attention, Steps()], epochs=2)
    assert steps_while_drawing and steps_while_drawing[0] == 3  # epoch 1's first step, before the figures
    assert not workers()


def test_pickled_callback_has_no_thread() -> None:
    """ddp_spawn pickles the callbacks: the worker stays behind."""
    attention = AttentionLogger()
    attention.publisher.submit(type("T", (), {"global_step": 0, "current_epoch": 0, "loggers": []})(), lambda v: None)
    clone = pickle.loads(pickle.dumps(attention))
    attention._finish_publishing()
    assert clone._publisher_of_run is None
