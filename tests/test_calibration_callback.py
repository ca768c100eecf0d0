"""CalibrationMonitor inside real Lightning runs, with real loggers (no mocks)."""

from __future__ import annotations

import csv
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer as trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import CalibrationMonitor
from lightning_attn.metrics.calibration import CalibrationMetric

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")

FIGURES = ("reliability", "confidence_histogram", "classwise_reliability")


class FixedLogits(pl.LightningModule):
    """Returns the dataset's logits times a learnable scale: evaluation outputs are known exactly."""

    def __init__(self, output: str = "logits", binary: bool = False) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.output = output
        self.binary = binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self(x)
        return F.binary_cross_entropy_with_logits(z, y.float()) if self.binary else F.cross_entropy(z, y)

    def _eval(self, batch):
        x, y = batch
        z = self(x)
        if self.output == "probs":
            return {"probs": torch.sigmoid(z) if self.binary else torch.softmax(z, 1), "target": y}
        if self.output == "none":
            return None
        return {"logits": z, "target": y}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self._eval(batch)

    def test_step(self, batch, batch_idx):
        return self._eval(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int = 768, k: int = 6, temperature: float = 2.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * temperature, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def reference(x: torch.Tensor, y: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    metric = CalibrationMetric("multiclass", x.shape[1], "logits", **kwargs)
    metric.update(x, y)
    return metric.compute()


# ---------------------------------------------------------------------------------------------
def test_no_logger_writes_png_and_json(tmp_path: Path) -> None:
    x, y = data()
    cb = CalibrationMonitor()
    tr = trainer(tmp_path, [cb])
    tr.validate(FixedLogits(), loader(x, y))
    expected = reference(x, y)
    got = cb.results["val"]["metrics"]
    for name in ("ece", "mce", "rmsce", "adaptive_ece", "classwise_ece", "brier", "nll", "accuracy"):
        # batching only changes float32 rounding of the per-class column sums (bin 0 of the classwise ECE)
        assert got[name] == pytest.approx(float(expected[name]), abs=1e-8), name
    out = tmp_path / "lightning_attn_logs" / "version_0" / "calibration"
    for name in FIGURES:
        assert (out / "val" / f"{name}_epoch0_step0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "val" / "summary_epoch0_step0.json").read_text())
    assert summary["metrics"]["ece"] == pytest.approx(got["ece"])
    assert len(summary["bins"]["count"]) == 15 and sum(summary["bins"]["count"]) == len(y)
    assert summary["history"][0]["stage"] == "val"
    assert np.array_equal(cb.results["val"]["bins"]["count"], expected["bin_count"].numpy())
    with (out / "val" / "bins_epoch0_step0.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15 and sum(int(r["count"]) for r in rows) == len(y)
    # logged for checkpoint/early stopping
    assert float(tr.callback_metrics["calibration/val/ece"]) == pytest.approx(got["ece"], rel=1e-6)


def test_csv_logger_and_monitoring_during_fit(tmp_path: Path) -> None:
    x, y = data(512)
    cb = CalibrationMonitor(n_bins=10, plot_classes=4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="calibration/val/ece", mode="min")
    stop = EarlyStopping(monitor="calibration/val/nll", mode="min", patience=5)
    logger = CSVLogger(tmp_path, name="csv")
    tr = trainer(tmp_path, [cb, checkpoint, stop], logger=logger, max_epochs=3, enable_checkpointing=True)
    tr.fit(FixedLogits(), loader(x, y), loader(x, y))
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("calibration/val/ece")]
    assert len(rows) == 3
    assert float(rows[-1]["calibration/val/ece"]) == pytest.approx(cb.results["val"]["metrics"]["ece"], rel=1e-6)
    assert checkpoint.best_model_path and checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(min(h["ece"] for h in cb.history), rel=1e-6)
    pngs = sorted(p.name for p in (Path(logger.log_dir) / "lightning_attn" / "calibration" / "val").glob("*.png"))
    assert {f"{n}_epoch{e}_step{4 * (e + 1)}.png" for n in FIGURES for e in (0, 1, 2)} <= set(pngs)
    assert {"trend_epoch1_step8.png", "trend_epoch2_step12.png"} <= set(pngs)
    # the per-epoch history is in the checkpoint and comes back
    ckpt = torch.load(checkpoint.best_model_path, weights_only=False)
    state = ckpt["callbacks"][cb.state_key]
    restored = CalibrationMonitor(n_bins=10, plot_classes=4)
    restored.load_state_dict(state)
    assert [h["epoch"] for h in restored.history] == [h["epoch"] for h in cb.history if h["epoch"] <= ckpt["epoch"]]
    assert restored.state_dict()["history"][0]["ece"] == cb.history[0]["ece"]


def test_tensorboard_scalars_and_images_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = data(384)
    cb = CalibrationMonitor(fit_temperature=True)
    logger = _ProjectTensorBoard(tmp_path, name="tb")  # a subclass is still recognised as TensorBoard
    tr = trainer(tmp_path, [cb], logger=logger, max_epochs=2, limit_train_batches=1)
    tr.fit(FixedLogits(), loader(x, y), loader(x, y))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("ece", "adaptive_ece", "classwise_ece", "brier", "nll", "temperature", "ece_scaled"):
        assert f"calibration/val/{name}" in tags["scalars"], name
    ece = acc.Scalars("calibration/val/ece")
    assert len(ece) == 2 and ece[-1].value == pytest.approx(cb.results["val"]["metrics"]["ece"], rel=1e-6)
    for name in FIGURES:
        images = acc.Images(f"calibration/val/{name}")
        assert len(images) == 2 and images[0].encoded_image_string[:4] == b"\x89PNG"
    assert len(acc.Images("calibration/val/trend")) == 1  # from the second epoch on
    # a dashboard logger is attached: no PNG copies on disk (the JSON summary is still written)
    out = Path(logger.log_dir) / "lightning_attn" / "calibration"
    assert not list((out / "val").glob("*.png")) and list((out / "val").glob("summary_epoch*_step*.json"))


class _ProjectTensorBoard(TensorBoardLogger):
    pass


def test_wandb_offline_run_has_metrics_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    x, y = data(256)
    cb = CalibrationMonitor()
    logger = WandbLogger(project="calibration-test", save_dir=str(tmp_path), offline=True)
    tr = trainer(tmp_path, [cb], logger=logger)
    try:
        tr.validate(FixedLogits(), loader(x, y))
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
        wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    images = [p.relative_to(media).as_posix() for p in media.rglob("*.png")]
    for name in FIGURES:
        assert any(f"calibration/val/{name}" in p for p in images), (name, images)
    assert any("calibration/val/bins_table" in p.as_posix() for p in (media / "table").rglob("*.json"))
    assert summary["calibration/val/ece"] == pytest.approx(cb.results["val"]["metrics"]["ece"], rel=1e-6)
    # offline runs keep history and summary in the binary .wandb record log (no wandb-summary.json)
    record_log = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"calibration/val/ece" in record_log and b"calibration/val/reliability" in record_log


# ---------------------------------------------------------------------------------------------
def test_temperature_scaling_through_lightning(tmp_path: Path) -> None:
    x, y = data(6000, k=8, temperature=2.5, seed=1)
    cb = CalibrationMonitor(fit_temperature=True, reservoir_size=4000, plot=False)
    tr = trainer(tmp_path, [cb])
    tr.validate(FixedLogits(), loader(x, y, 500))  # runs under torch.inference_mode
    assert cb.temperature == pytest.approx(2.5, abs=0.15)
    metrics = cb.results["val"]["metrics"]
    scaling = cb.results["val"]["temperature_scaling"]
    assert scaling["sample_size"] == 4000 and scaling["in_sample"]
    assert metrics["ece_scaled"] < 0.5 * scaling["before"]["ece"]
    assert metrics["nll_scaled"] < scaling["before"]["nll"]
    assert float(tr.callback_metrics["calibration/val/temperature"]) == pytest.approx(cb.temperature, rel=1e-6)
    assert torch.allclose(cb.apply_temperature(x), x / cb.temperature)
    assert torch.allclose(cb.calibrated_probs(x).sum(1), torch.ones(len(x)))
    # test: the validation temperature applied to held-out data
    xt, yt = data(2000, k=8, temperature=2.5, seed=2)
    tr.test(FixedLogits(), loader(xt, yt, 500))
    test = cb.results["test"]
    assert test["metrics"]["temperature"] == cb.temperature and not test["temperature_scaling"]["in_sample"]
    assert test["metrics"]["ece_scaled"] < test["metrics"]["ece"]
    assert cb.state_dict()["temperature"] == cb.temperature


def test_probs_binary_extract_and_custom_keys(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(400, generator=g) * 2
    y = (torch.rand(400, generator=g) < torch.sigmoid(z)).long()
    cb = CalibrationMonitor(plot=False)  # task and score type inferred: binary, "probs" key
    trainer(tmp_path, [cb]).validate(FixedLogits(output="probs", binary=True), loader(z, y))
    metric = CalibrationMetric("binary", score_type="logits")
    metric.update(z, y)
    expected = metric.compute()
    assert cb.results["val"]["task"] == "binary"
    assert cb.results["val"]["metrics"]["ece"] == pytest.approx(float(expected["ece"]), abs=1e-6)

    x, t = data(256)
    cb2 = CalibrationMonitor(
        extract=lambda out, batch: (out["logits"][:, :4], batch[1] % 4), score_type="logits", plot=False
    )
    trainer(tmp_path, [cb2]).validate(FixedLogits(), loader(x, t))
    assert cb2.results["val"]["num_classes"] == 4
    assert cb2.results["val"]["metrics"]["ece"] == pytest.approx(float(reference(x[:, :4], t % 4)["ece"]), abs=1e-9)


def test_multiple_dataloaders_get_their_own_keys(tmp_path: Path) -> None:
    x, y = data(256)
    cb = CalibrationMonitor(plot=False, fit_temperature=True)
    tr = trainer(tmp_path, [cb])
    tr.validate(FixedLogits(), [loader(x, y), loader(x[:128] * 0.1, y[:128])])
    assert set(cb.results) == {"val", "val_dl1"}
    assert cb.results["val_dl1"]["metrics"]["n_samples"] == 128
    assert "calibration/val_dl1/ece" in tr.callback_metrics and "calibration/val/ece" in tr.callback_metrics
    # the temperature is fitted on the first dataloader; the second is scored with it
    assert cb.results["val"]["temperature_scaling"]["in_sample"]
    assert not cb.results["val_dl1"]["temperature_scaling"]["in_sample"]
    assert (
        cb.results["val_dl1"]["metrics"]["temperature"] == cb.temperature == cb.results["val"]["metrics"]["temperature"]
    )


def test_bad_input_errors_name_the_problem(tmp_path: Path) -> None:
    x, y = data(256)
    with pytest.raises(KeyError, match="no 'logits' or 'probs'"):
        trainer(tmp_path, [CalibrationMonitor()]).validate(_Renamed(), loader(x, y))
    with pytest.raises(TypeError, match=r"return \{'logits'"):
        trainer(tmp_path, [CalibrationMonitor()]).validate(FixedLogits(output="none"), loader(x, y))
    bad = y.clone()
    bad[5] = 6  # num_classes is 6: labels 0..5
    with pytest.raises(ValueError, match=r"1 target\(s\) outside \[0, 6\)"):
        trainer(tmp_path, [CalibrationMonitor(plot=False)]).validate(FixedLogits(), loader(x, bad))
    with pytest.raises(ValueError, match="num_classes=5"):
        trainer(tmp_path, [CalibrationMonitor(num_classes=5, task="multiclass")]).validate(FixedLogits(), loader(x, y))
    with pytest.raises(ValueError, match="score_type"):
        CalibrationMonitor(score_key="scores")
    nan_x = x.clone()
    nan_x[3] = float("nan")
    cb = CalibrationMonitor(plot=False)
    with pytest.warns(UserWarning, match="1 sample"):
        trainer(tmp_path, [cb]).validate(FixedLogits(), loader(nan_x, y))
    assert cb.results["val"]["metrics"]["n_skipped"] == 1 and cb.results["val"]["metrics"]["n_samples"] == 255


class _Renamed(FixedLogits):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return {"scores": self(batch[0]), "target": batch[1]}


def test_lightning_cli_ready_signature() -> None:
    from jsonargparse import ArgumentParser

    signature = inspect.signature(CalibrationMonitor.__init__)
    doc = inspect.getdoc(CalibrationMonitor) or ""
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert f"    {name}:" in doc, f"{name} missing from the docstring"
        default = parameter.default
        assert default is inspect.Parameter.empty or isinstance(default, (int, float, str, bool, tuple, type(None))), (
            name
        )
    parser = ArgumentParser()
    parser.add_class_arguments(CalibrationMonitor, "calibration")
    cfg = parser.parse_args(
        ["--calibration.n_bins=20", "--calibration.fit_temperature=true", "--calibration.stages=[validate]"]
    )
    init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    assert isinstance(init.calibration, CalibrationMonitor) and init.calibration.n_bins == 20
    assert init.calibration.fit_temperature and init.calibration.stages == ("validate",)


def test_sanity_check_is_skipped_and_state_resets_between_epochs(tmp_path: Path) -> None:
    x, y = data(256)
    cb = CalibrationMonitor(plot=False)
    tr = trainer(tmp_path, [cb], max_epochs=2, num_sanity_val_steps=2)
    tr.fit(FixedLogits(), loader(x, y), loader(x, y))
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert all(h["n_samples"] == 256 for h in cb.history)
    assert os.path.isdir(tmp_path / "lightning_attn_logs")


def test_two_monitors_keep_keys_files_and_states_apart(tmp_path: Path) -> None:
    """A second monitor on sharpened logits (as one per output head of a multi-task model would be), named apart,
    logs its own keys and files and keeps its own checkpoint state; its numbers equal a monitor alone on them."""

    def sharpened(outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs["logits"] * 4, outputs["target"]

    x, y = data(256)
    plain = CalibrationMonitor(bootstrap=0, plot=False)
    sharp = CalibrationMonitor(bootstrap=0, plot=False, extract=sharpened, score_type="logits", name="calib-sharp")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, [plain, sharp, checkpoint], max_epochs=1, enable_checkpointing=True)
    module = FixedLogits()
    tr.fit(module, loader(x, y), loader(x, y))
    got_plain, got_sharp = plain.results["val"]["metrics"]["ece"], sharp.results["val"]["metrics"]["ece"]
    assert got_plain != got_sharp
    assert float(tr.callback_metrics["calibration/val/ece"]) == pytest.approx(got_plain, abs=1e-6)
    assert float(tr.callback_metrics["calib-sharp/val/ece"]) == pytest.approx(got_sharp, abs=1e-6)
    alone = CalibrationMonitor(bootstrap=0, plot=False, extract=sharpened, score_type="logits")
    trainer(tmp_path / "alone", [alone]).validate(module, loader(x, y), verbose=False)  # the fitted weights
    assert alone.results["val"]["metrics"]["ece"] == pytest.approx(got_sharp, abs=1e-9)
    run = tmp_path / "lightning_attn_logs" / "version_0"
    assert (run / "calibration" / "val").is_dir() and (run / "calib-sharp" / "val").is_dir()
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert plain.state_key != sharp.state_key and {plain.state_key, sharp.state_key} <= states.keys()
    # two unnamed monitors: Lightning refuses their equal state keys before our own check names the clash
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `CalibrationMonitor`"):
        trainer(tmp_path / "twins", [CalibrationMonitor(), CalibrationMonitor()]).validate(
            FixedLogits(), loader(x, y), verbose=False
        )


class _Counting(FixedLogits):
    """Counts its training and validation steps, to tell when an error came."""

    def __init__(self, output_key: str = "logits") -> None:
        super().__init__()
        self.output_key = output_key
        self.steps = {"train": 0, "val": 0}

    def training_step(self, batch, batch_idx):
        self.steps["train"] += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.steps["val"] += 1
        return {self.output_key: self(batch[0]), "target": batch[1]}


def test_wrong_score_key_raises_at_the_sanity_checks_first_batch(tmp_path: Path) -> None:
    x, y = data(256)
    module = _Counting()
    cb = CalibrationMonitor(score_key="logit", score_type="logits")
    with pytest.raises(KeyError) as raised:
        trainer(tmp_path, [cb], max_epochs=1, num_sanity_val_steps=2).fit(module, loader(x, y), loader(x, y))
    message = str(raised.value)
    assert message.startswith("CalibrationMonitor: score_key='logit' is not in the step's outputs")
    assert "close keys: 'logits'" in message, message
    assert module.steps == {"train": 0, "val": 1}  # the first sanity batch, before any training


def test_wrong_target_key_raises_at_the_first_validation_batch(tmp_path: Path) -> None:
    x, y = data(256)
    module = _Counting()
    with pytest.raises(KeyError) as raised:
        trainer(tmp_path, [CalibrationMonitor(target_key="targets")]).validate(module, loader(x, y))
    message = str(raised.value)
    # an (x, y) batch does not stand in for a key that was asked for by name
    assert "target_key='targets' is not in the step's outputs (keys: ['logits', 'target'])" in message, message
    assert "close keys: 'target'" in message
    assert module.steps["val"] == 1


def test_default_keys_missing_name_the_close_ones(tmp_path: Path) -> None:
    x, y = data(256)
    module = _Counting(output_key="logit")
    with pytest.raises(KeyError, match="no 'logits' or 'probs' in the step's outputs") as raised:
        trainer(tmp_path, [CalibrationMonitor()], max_epochs=1).fit(module, loader(x, y), loader(x, y))
    assert "close keys: 'logit'" in str(raised.value)
    assert module.steps == {"train": 0, "val": 1}


def test_save_dir_that_is_a_file_raises_at_setup(tmp_path: Path) -> None:
    x, y = data(256)
    taken = tmp_path / "outputs.txt"
    taken.write_text("not a folder")
    module = _Counting()
    with pytest.raises(NotADirectoryError, match=r"save_dir: .*outputs\.txt exists and is a file") as raised:
        trainer(tmp_path, [CalibrationMonitor(save_dir=str(taken))], max_epochs=1).fit(
            module, loader(x, y), loader(x, y)
        )
    assert str(taken) in str(raised.value)
    assert module.steps == {"train": 0, "val": 0}  # at setup, before any batch
