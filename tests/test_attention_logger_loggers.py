"""AttentionLogger through real loggers: W&B (offline run read back), TensorBoard (event files read back),
CSVLogger and no logger (PNG, CSV and JSON on disk)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import attention_logger_models as models
import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_attn import AttentionLogger

SITE = "encoder.layers.0.self_attn"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_validation(logger, tmp_path: Path, **callback_args) -> AttentionLogger:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    callback = AttentionLogger(modality_pairs=models.PAIRS, probe_samples=1, max_figure_sites=2, **callback_args)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    trainer.validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    return callback


def test_wandb_offline_run_has_images_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.finish()  # a run left active by another test would be reused
    logger = WandbLogger(project="attn-test", save_dir=str(tmp_path), offline=True)
    try:
        run_validation(logger, tmp_path)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
        wandb.teardown()
    media = run_dir / "files" / "media"
    images = sorted(p.relative_to(media).as_posix() for p in (media / "images").rglob("*.png"))
    tables = sorted((media / "table").rglob("*.table.json"))
    assert any("head_statistics" in p for p in images), images
    assert any("pairs" in p for p in images) and any("rollout" in p for p in images)
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["site", "head", "entropy_mean"]
    assert len(table["data"]) == 4 + 4 + 2 + 2  # one row per (site, head)
    # scalars: offline runs keep their history in the run's .wandb record file (protobuf, keys verbatim)
    records = b"".join(p.read_bytes() for p in run_dir.glob("run-*.wandb"))
    assert f"attn/val/{SITE}/entropy".encode() in records and b"attn/val/eeg<->spec/agreement" in records


def test_tensorboard_scalars_and_images_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    run_validation(logger, tmp_path)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert f"attn/val/{SITE}/entropy" in tags["scalars"] and "attn/val/eeg<->spec/agreement" in tags["scalars"]
    images = tags["images"]
    assert "attn/val/head_statistics" in images and "attn/val/layer_evolution" in images
    assert tags["tensors"] == ["attn/val/head_statistics_table/text_summary"]  # the table, Markdown, its own key
    table = events.Tensors("attn/val/head_statistics_table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("recorded 2 of 2 batches (budget 20%), 40 to 48 rows per site\n\n| site | head |")
    assert f"attn/val/maps/{SITE}" in images and "attn/val/pairs/eeg<->spec" in images
    image = events.Images("attn/val/head_statistics")[0]
    assert image.width > 100 and image.height > 100 and image.encoded_image_string.startswith(b"\x89PNG")
    value = events.Scalars(f"attn/val/{SITE}/entropy")[0].value
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("kind", ["csv", "none"])
def test_csv_logger_and_no_logger_write_png_and_json(tmp_path: Path, kind: str) -> None:
    logger = CSVLogger(str(tmp_path), name="csv") if kind == "csv" else False
    callback = run_validation(logger, tmp_path)
    run = Path(logger.log_dir) / "lightning_attn" if kind == "csv" else tmp_path / "lightning_attn_logs" / "version_0"
    directory = run / "attn" / "val"  # <run>/<callback>/<stage>/<name>_epoch<E>_step<S>
    pngs = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.png"))
    assert "head_statistics_epoch0_step0.png" in pngs and "pairs/eeg<->spec_epoch0_step0.png" in pngs
    data = json.loads((directory / "statistics_epoch0_step0.json").read_text())
    assert data["sites"][SITE]["statistics"]["entropy"]["mean"] == pytest.approx(
        float(callback.results["val"].site_mean("entropy")[0])
    )
    assert (directory / "head_statistics_epoch0_step0.csv").read_text().startswith("site,head,entropy_mean")
    provenance = json.loads((directory / "provenance.json").read_text())
    assert provenance == {"run_dir": str(run), "epoch": 0, "step": 0, "checkpoint": None}
    if kind == "csv":
        metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
        assert f"attn/val/{SITE}/entropy" in metrics


def test_explicit_save_dir_gets_files_even_with_dashboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_validation(
        TensorBoardLogger(str(tmp_path), name="tb"), tmp_path, save_dir=str(tmp_path / "out"), log_figures=True
    )
    assert (tmp_path / "out" / "attn" / "val" / "statistics_epoch0_step0.json").exists()
    assert (tmp_path / "out" / "attn" / "val" / "rollout_epoch0_step0.png").exists()
