"""Head-role timeline: a planted head that changes role between epochs gives one event at the right epoch, kept in
the state_dict, logged to TensorBoard (read back from the event file), listed in the registry, drawn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import trainer_options
from lightning.pytorch.loggers import TensorBoardLogger
from planted_heads import LAYER_PLANS, PlantedModule, make_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # type: ignore[import-untyped]

from lightning_attn import HeadSpecializationTracker
from lightning_attn.metrics.head_roles import role_events
from lightning_attn.metrics.heads import registry_schema

CHANGING = "model.layers.0/h2"  # uniform ("Broad head") until epoch 1, previous-token from epoch 2
CHANGE_EPOCH = 2


class RoleChangingModule(PlantedModule):
    def on_validation_epoch_start(self) -> None:
        plan = list(LAYER_PLANS[0])
        plan[2] = "previous" if self.current_epoch >= CHANGE_EPOCH else "uniform"
        layer: Any = self.model.layers[0]
        layer.plan = tuple(plan)


def fit_three_epochs(root: Path, logger: Any) -> HeadSpecializationTracker:
    torch.manual_seed(0)
    tracker = HeadSpecializationTracker(probe_samples=0, log_figures=False, logged_scores=())
    options = trainer_options(
        root,
        logger=logger,
        max_epochs=3,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    pl.Trainer(callbacks=[tracker], **options).fit(
        RoleChangingModule(), make_loader(batch_size=16), make_loader(size=32, batch_size=16)
    )
    return tracker


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("roles")
    logger = TensorBoardLogger(str(root), name="tb", version=0)
    return {"tracker": fit_three_epochs(root, logger), "logdir": Path(logger.log_dir)}


def test_the_planted_change_is_one_event_at_its_epoch(run: dict[str, Any]) -> None:
    tracker: HeadSpecializationTracker = run["tracker"]
    assert [r["epoch"] for r in tracker.history_for("val")] == [0, 1, 2]
    events = tracker.events("val")
    assert [(e["epoch"], e["since_epoch"], e["head"]) for e in events] == [(CHANGE_EPOCH, 1, CHANGING)], events
    event = events[0]
    assert (event["label_from"], event["label_to"]) == ("Broad head", "Previous-token head")
    assert "previous_token" in event["types_to"] and "previous_token" not in event["types_from"]
    assert [r["events"] for r in tracker.history_for("val")][:CHANGE_EPOCH] == [[], []]


def test_role_events_by_hand() -> None:
    def record(epoch: int, label: str, types: list[str], hsi: float | None) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "sites": [{"name": "s", "num_heads": 1}],
            "labels": {"s": [label]},
            "types": {"s": [types]},
            "hsi": {"s": [hsi]},
        }

    same = record(0, "General context", [], 0.1)
    assert role_events(None, same, 0.3) == []
    assert role_events(same, record(1, "General context", [], 0.2), 0.3) == []
    crossed = role_events(same, record(1, "General context", [], 0.35), 0.3)  # HSI crossing alone is a change
    assert [(e["hsi_from"], e["hsi_to"]) for e in crossed] == [(0.1, 0.35)]
    typed = role_events(record(3, "Sink head", ["sink"], None), record(5, "Sink head", ["sink", "broad"], None), 0.3)
    assert [(e["epoch"], e["since_epoch"], e["types_to"]) for e in typed] == [(5, 3, ["sink", "broad"])]


def test_state_dict_round_trip_keeps_events(run: dict[str, Any], tmp_path: Path) -> None:
    tracker: HeadSpecializationTracker = run["tracker"]
    path = tmp_path / "state.pt"
    torch.save(tracker.state_dict(), path)
    restored = HeadSpecializationTracker(probe_samples=0)
    restored.load_state_dict(torch.load(path, weights_only=False))
    assert restored.events("val") == tracker.events("val")
    assert restored.registry("val") == tracker.registry("val")


def test_registry_lists_label_history(run: dict[str, Any]) -> None:
    registry = run["tracker"].registry("val")
    jsonschema.validate(registry, registry_schema())
    heads = {h["id"]: h for layer in registry["layers"] for h in layer["heads"]}
    history = [(h["epoch"], h["label"]) for h in heads[CHANGING]["label_history"]]
    assert history == [(0, "Broad head"), (1, "Broad head"), (2, "Previous-token head")]
    assert [h["label"] for h in heads["model.layers.0/h1"]["label_history"]] == ["Sink head"] * 3
    assert "importance" not in heads[CHANGING]  # head_importance off


def test_tensorboard_event_file_holds_the_events_table(run: dict[str, Any]) -> None:
    accumulator = EventAccumulator(str(run["logdir"]), size_guidance={"tensors": 0})
    accumulator.Reload()
    tag = "heads/val/role_events_table/text_summary"
    assert tag in accumulator.Tags()["tensors"]
    texts = {event.step: event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag)}
    steps = [r["global_step"] for r in run["tracker"].history_for("val")]
    assert sorted(texts) == steps
    assert CHANGING in texts[steps[CHANGE_EPOCH]] and "Previous-token head" in texts[steps[CHANGE_EPOCH]]
    assert all(CHANGING not in texts[step] for step in steps[:CHANGE_EPOCH])


def test_timeline_figure_shows_the_change(run: dict[str, Any]) -> None:
    tracker: HeadSpecializationTracker = run["tracker"]
    figure = tracker.figures("val")["timeline"]
    ax = figure.axes[0]
    grid = ax.images[0].get_array()
    assert grid is not None
    heads = [f"{s['name']}/h{h}" for s in tracker.history_for("val")[-1]["sites"] for h in range(s["num_heads"])]
    row = heads.index(CHANGING)
    assert grid.shape == (len(heads), 3)
    assert grid[row, 0] == grid[row, 1] != grid[row, 2]
    assert all(grid[n, 0] == grid[n, 2] for n in range(len(heads)) if n != row)
    legend = [text.get_text() for text in ax.get_legend().get_texts()]  # type: ignore[union-attr]
    assert {"Broad head", "Previous-token head", "Sink head"} <= set(legend)
    marks = np.asarray(ax.collections[0].get_offsets()).tolist()
    assert marks == [[CHANGE_EPOCH, row]]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_events_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.finish()  # a run left active by another test would be reused
    logger = WandbLogger(project="roles-test", save_dir=str(tmp_path), offline=True)
    try:
        fit_three_epochs(tmp_path, logger)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
        wandb.teardown()
    tables = sorted((run_dir / "files" / "media" / "table").rglob("role_events*.table.json"))
    assert len(tables) == 3  # one per evaluated epoch
    rows = [row for path in tables for row in json.loads(path.read_text())["data"]]
    assert [(row[0], row[2], row[4]) for row in rows] == [(CHANGE_EPOCH, CHANGING, "Previous-token head")]
