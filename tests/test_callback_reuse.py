"""One callback instance used on a second model (a notebook sweep, a second Trainer) gives what a fresh one gives.

Model A has two encoder layers of 4 heads; model B one encoder layer of 2 heads under the same name (a resized
site) and no second layer (a removed site): the reused callback must neither crash on the head count nor log or
register anything of A's second layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl
import pytest
from callback_cases import FACTORIES, logged, model, outcome
from helpers import cpu_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(root: Path, callback: Any, module: pl.LightningModule) -> dict[str, float]:
    trainer = cpu_trainer(root, [callback], max_epochs=2, limit_train_batches=1, limit_val_batches=2)
    trainer.fit(module, models.loader(8, 4), models.loader(8, 4))
    return logged(trainer)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_reused_callback_on_a_new_model_equals_a_fresh_one(tmp_path: Path, name: str) -> None:
    reused = FACTORIES[name]()
    logged_a = fit(tmp_path / "a", reused, model(layers=2, heads=4))
    assert any(".layers.1." in key for key in logged_a)
    logged_b = fit(tmp_path / "b", reused, model(layers=1, heads=2))
    fresh = FACTORIES[name]()
    logged_fresh = fit(tmp_path / "fresh", fresh, model(layers=1, heads=2))
    assert not any(".layers.1." in key for key in logged_b)  # nothing of A's removed layer
    assert logged_b.keys() == logged_fresh.keys()
    for key, value in logged_fresh.items():
        assert logged_b[key] == pytest.approx(value, abs=1e-9, nan_ok=True) or math.isnan(value), key
    assert outcome(reused) == outcome(fresh)


def test_resume_of_the_same_model_continues_the_history(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    tracker = FACTORIES["heads"]()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = cpu_trainer(
        tmp_path,
        [tracker, checkpoint],
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    first.fit(model(2, 4), models.loader(8, 4), models.loader(8, 4))
    # the same instance, a new Trainer and a new module object restored from the checkpoint: the history goes on
    second = cpu_trainer(tmp_path, [tracker], max_epochs=3, limit_train_batches=1, limit_val_batches=1)
    second.fit(model(2, 4), models.loader(8, 4), models.loader(8, 4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [record["epoch"] for record in tracker.history_for("val")] == [0, 1, 2]
