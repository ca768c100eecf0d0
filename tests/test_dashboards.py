"""What a person meets after a run with every callback: the output folders, the TensorBoard scalar count, the console
table, the W&B run (read back from its ``.wandb`` record log) and files that csv, pandas and strict JSON open.

One 6-layer, 12-head text classifier (tiny widths) stands for a BERT-size model: 72 heads.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_attn import (
    AttentionLogger,
    CalibrationMonitor,
    ExplainabilityReport,
    HeadSpecializationTracker,
    ModuleProbe,
)

LAYERS, HEADS, WIDTH, VOCAB, LENGTH, CLASSES = 6, 12, 24, 16, 8, 3
pytestmark = pytest.mark.usefixtures("one_thread")


class TextClassifier(pl.LightningModule):
    """Token ids -> 6 encoder layers of 12 heads (width 24) -> mean pooling -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["input_ids"]), batch["target"])

    def _eval(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits, batch["target"])
        self.log(f"{stage}_loss", loss)
        return {"logits": logits, "loss": loss}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(samples: int = 16, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (samples, LENGTH), generator=generator)
    target = ids[:, 0] % CLASSES
    rows = [{"input_ids": i, "target": t} for i, t in zip(ids, target, strict=True)]
    return torch.utils.data.DataLoader(rows, batch_size=8)


def every_callback() -> list[Any]:
    """Every callback at its defaults, figures off (they change no scalar, file layout or key); the ModuleProbe on the
    last layer's feed-forward input (4 scalars per probed site: probing every layer would add 20)."""
    return [
        AttentionLogger(log_figures=False),
        HeadSpecializationTracker(stages=("validate", "test"), log_figures=False),
        ModuleProbe(probes={"ff": ("encoder.layers.5.linear1", "activation")}, log_figures=False),
        CalibrationMonitor(plot=False, bootstrap=0),
        ExplainabilityReport(figures=False),
    ]


def fit_and_test(root: Path, logger: Any, callbacks: list[Any]) -> tuple[pl.Trainer, str, list[dict[str, float]]]:
    """Fit two epochs (a checkpoint per epoch), then test the first epoch's checkpoint."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[*callbacks, checkpoints],
    )
    trainer.fit(TextClassifier(), loader(16, 0), loader(16, 1))
    first = str((root / "ckpt" / "epoch=0.ckpt").resolve())
    tested = trainer.test(ckpt_path=first, dataloaders=loader(16, 2), verbose=False)
    return trainer, first, tested


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("tensorboard_run")
    logger = TensorBoardLogger(str(root), name="tb")
    lines = _Lines()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(lines)
    try:
        trainer, checkpoint, tested = fit_and_test(root, logger, every_callback())
    finally:
        rank_zero.removeHandler(lines)
    logger.experiment.flush()
    yield {"root": root, "trainer": trainer, "checkpoint": checkpoint, "tested": tested, "lines": lines.lines}


def scalar_tags(log_dir: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return list(events.Tags()["scalars"])


def per_stage(tags: list[str], stage: str) -> list[str]:
    return [tag for tag in tags if f"/{stage}/" in tag or tag.startswith(f"{stage}_")]


def test_tensorboard_scalars_scale_to_72_heads(tensorboard_run: dict[str, Any]) -> None:
    tags = scalar_tags(tensorboard_run["trainer"].logger.log_dir)
    counts = {stage: len(per_stage(tags, stage)) for stage in ("val", "test")}
    assert 0 < counts["val"] <= 60 and 0 < counts["test"] <= 60, counts
    assert not [tag for tag in tags if re.search(r"/h\d+/", tag)]  # no per-head scalar by default
    # site-level scalars stay (one per site and statistic), model-level ones too
    statistics = tensorboard_run["trainer"].callbacks[0].results["test"].statistics
    for stage in ("val", "test"):
        assert {f"attn/{stage}/encoder.layers.{i}.self_attn/{s}" for i in range(LAYERS) for s in statistics} <= set(
            tags
        )
        assert {f"heads/{stage}/entropy", f"heads/{stage}/general", f"calibration/{stage}/ece"} <= set(tags)
    # Markdown tables say n/a for a missing value (no features: no primary feature), never Python's None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_run["trainer"].logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    markdown = events.Tensors("heads/val/registry_table/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| n/a |" in markdown and "None" not in markdown
    # Lightning's end-of-test table: site- and model-level keys only, each distinct
    keys = list(tensorboard_run["tested"][0])
    assert keys and not [key for key in keys if re.search(r"/h\d+/", key)], keys
    assert len(keys) <= 60


def test_per_head_scalars_get_one_multiline_chart_per_site(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    attention = AttentionLogger(log_figures=False, log_per_head=True, stages=("validate",))
    heads = HeadSpecializationTracker(log_figures=False, log_per_head=True, probe_samples=0, logged_scores=("entropy",))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[attention, heads],
    )
    trainer.validate(TextClassifier(), loader(8), verbose=False)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    per_head = [tag for tag in events.Tags()["scalars"] if re.search(r"/h\d+/", tag)]
    assert len(per_head) == LAYERS * HEADS * (len(attention.results["val"].statistics) + 1)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    site = "encoder.layers.3.self_attn"
    for title in (f"attn/val/{site}/entropy", f"heads/val/{site}/entropy"):
        prefix = title.rsplit("/", 1)[0]
        assert charts[title] == [f"^{re.escape(f'{prefix}/h{h}/entropy')}$" for h in range(HEADS)]
    # every per-head tag is in exactly one chart
    patterns = [pattern for tags in charts.values() for pattern in tags]
    assert sorted(re.sub(r"\\(.)", r"\1", p[1:-1]) for p in patterns) == sorted(per_head)


def test_one_folder_per_run_callback_and_stage(tensorboard_run: dict[str, Any]) -> None:
    trainer = tensorboard_run["trainer"]
    run = Path(trainer.logger.log_dir) / "lightning_attn"
    assert sorted(p.name for p in run.iterdir()) == ["attn", "calibration", "heads", "probe", "report"]
    for name in ("attn", "calibration", "heads", "probe", "report"):
        assert sorted(p.name for p in (run / name).iterdir()) == ["test", "val"] if name != "report" else ["test"]
    # the tested checkpoint (epoch 0, 2 steps) names the test outputs, not the Trainer's last epoch (1, 4 steps)
    test_files = [p.name for p in (run / "attn" / "test").iterdir()]
    assert "statistics_epoch0_step2.json" in test_files, test_files
    assert not [name for name in test_files if "epoch1" in name or "step4" in name]
    provenance = json.loads((run / "attn" / "test" / "provenance.json").read_text())
    assert provenance == {"run_dir": str(run), "epoch": 0, "step": 2, "checkpoint": tensorboard_run["checkpoint"]}
    report = json.loads((run / "report" / "test" / "report.json").read_text())
    assert report["provenance"]["checkpoint"] == tensorboard_run["checkpoint"]
    assert (report["provenance"]["epoch"], report["provenance"]["global_step"]) == (0, 2)
    # validation outputs of both epochs, side by side
    val_files = {p.name for p in (run / "attn" / "val").iterdir()}
    assert {"statistics_epoch0_step2.json", "statistics_epoch1_step4.json"} <= val_files
    # one line per callback at the end of fit and of test, saying where its outputs went
    lines = [line for line in tensorboard_run["lines"] if line.startswith("lightning_attn: ")]
    for name in ("attn", "calibration", "heads", "probe"):
        assert lines.count(f"lightning_attn: {name} outputs in {run / name}") == 2, lines
    assert f"lightning_attn: report outputs in {run / 'report'}; report {run / 'report' / 'test' / 'report.html'}" in (
        lines
    )


def test_no_logger_gets_a_new_version_per_run(tmp_path: Path) -> None:
    for _ in range(2):
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
            callbacks=[AttentionLogger(log_figures=False, include=["encoder.layers.0.*"])],
        )
        trainer.validate(TextClassifier(), loader(8), verbose=False)
    runs = sorted(p.name for p in (tmp_path / "lightning_attn_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = tmp_path / "lightning_attn_logs" / run / "attn-encoder.layers.0" / "val"
        assert (folder / "statistics_epoch0_step0.json").is_file()


def _strict_json(path: Path) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_every_csv_and_json_opens_with_no_options(tensorboard_run: dict[str, Any]) -> None:
    run = Path(tensorboard_run["trainer"].logger.log_dir) / "lightning_attn"
    csvs = sorted(run.rglob("*.csv"))
    jsons = sorted(run.rglob("*.json"))
    assert len(csvs) >= 10 and len(jsons) >= 10
    names = {p.name for p in csvs}
    assert {"samples.csv", "per_head.csv", "classwise.csv", "batches.csv"} <= names
    for path in csvs:
        frame = pd.read_csv(path)
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
        assert reader.fieldnames == list(frame.columns), path
        assert not reader.fieldnames[0].startswith("#"), path
        assert len(rows) == len(frame), path
    for path in jsons:
        _strict_json(path)
    provenance = _strict_json(run / "report" / "test" / "provenance.json")
    assert (
        provenance["report_sha256"]
        == _strict_json(run / "report" / "test" / "report.json")["provenance"]["report_sha256"]
    )


@pytest.mark.slow
def test_wandb_run_reads_back_with_one_type_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from wandb_records import read_run

    from lightning_attn.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wandb.finish()  # a run left active by another test would be reused
    logger = WandbLogger(project="dashboards", save_dir=str(tmp_path), offline=True)
    callbacks = every_callback()
    callbacks[0] = AttentionLogger(log_figures=True, probe_samples=1, max_figure_sites=1)
    try:
        fit_and_test(tmp_path, logger, callbacks)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
        wandb.teardown()
    run = read_run(run_dir)
    types: dict[str, set[str]] = {}
    for key, values in run["history"].items():
        for value in values:
            types.setdefault(key, set()).add(value["_type"] if isinstance(value, dict) else type(value).__name__)
    mixed = {key: kinds for key, kinds in types.items() if len(kinds) > 1}
    assert not mixed, mixed
    assert "attn/val/head_statistics" in types, sorted(types)
    assert types["attn/val/head_statistics"] == {"images/separated"}
    assert types["attn/val/head_statistics_table"] == {"table-file"}
    assert types["heads/test/registry_table"] == {"table-file"}
    # the heads table: site, head, label, types, HSI and every statistic, one row per head
    table = run["history"]["heads/test/registry_table"][-1]
    stored = json.loads((run_dir / "files" / table["path"]).read_text())
    assert stored["columns"][:7] == ["site", "head", "label", "types", "hsi", "primary_feature", "correlation"]
    assert {"entropy", "confidence"} <= set(stored["columns"]) and len(stored["data"]) == LAYERS * HEADS
    assert types["report/test"] == {"html-file"}
    assert types["report/test/explorer"] == {"html-file"}
    image = run["history"]["attn/val/head_statistics"][0]
    assert image["captions"] == ["Per-head attention statistics (val, epoch 0) (epoch 0, step 2)"]
    assert ("explainability-report", "report-test") in run["artifacts"]
    config = run["config"]
    assert config["lightning_attn/attn/log_per_head"] is False
    assert config["lightning_attn/attn/max_figure_sites"] == 1
    assert config["lightning_attn/heads/stages"] == ["validate", "test"]
    assert config["lightning_attn/calibration/n_bins"] == 15
    assert config["lightning_attn/report/calibration_bins"] == 15
    assert config["lightning_attn/probe/probes"] == {"ff": ["encoder.layers.5.linear1", "activation"]}
