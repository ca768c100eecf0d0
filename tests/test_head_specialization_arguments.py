"""HeadSpecializationTracker arguments that name something in the batch or the model fail at the first evaluation
batch (the sanity check's when it runs) with one message naming the wrong value and the close valid names."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from planted_heads import PlantedData, PlantedModule, make_loader, make_module, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_attn import HeadSpecializationTracker


class BatchCounter(pl.Callback):
    """How many evaluation steps ran (a check must come before the second)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.steps += 1


def validate(
    tmp_path: Path, tracker: HeadSpecializationTracker, counter: BatchCounter | None = None, sanity: bool = False
) -> None:
    """``fit`` for one training batch after the sanity check (``sanity``), else ``validate``, on the planted model,
    ``counter`` counting the evaluation steps."""
    options = trainer_kwargs(tmp_path, limit_val_batches=3, num_sanity_val_steps=2 if sanity else 0)
    callbacks = [tracker, counter or BatchCounter()]
    trainer = pl.Trainer(callbacks=callbacks, max_epochs=1, limit_train_batches=1, **options)
    data: DataLoader = make_loader(64, batch_size=8)
    if sanity:
        trainer.fit(make_module(), train_dataloaders=data, val_dataloaders=data)
    else:
        trainer.validate(make_module(), data, verbose=False)


def quiet(**arguments: Any) -> HeadSpecializationTracker:
    return HeadSpecializationTracker(log_figures=False, export_registry=False, probe_samples=0, **arguments)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"features": {"ttc": "tcc"}}, "features['ttc']='tcc' is not in the batch (close batch keys: 'ttc')"),
        (
            {"features": {"ttc": "ttc"}, "feature_masks": {"ttc": "agent_msk"}},
            "feature_masks['ttc']='agent_msk' is not in the batch (close batch keys: 'agent_mask')",
        ),
        ({"token_ids_key": "input_id"}, "token_ids_key='input_id' is not in the batch (close batch keys: 'input_ids')"),
        ({"padding_mask_key": "ttc"}, "padding_mask_key='ttc' gives shape (8,), not the [batch, tokens] it needs"),
        ({"confidence_exclude_key": "special"}, "confidence_exclude_key='special' is not in the batch (no close"),
    ],
)
def test_wrong_batch_keys_fail_at_the_sanity_check(tmp_path: Path, arguments: dict[str, Any], expected: str) -> None:
    counter = BatchCounter()
    with pytest.raises(ValueError, match="at the first validate batch") as raised:
        validate(tmp_path, quiet(**arguments), counter, sanity=True)
    assert expected in str(raised.value)
    assert counter.steps == 0  # before the first step: the sanity check's first batch


def test_all_wrong_keys_in_one_message_on_validate(tmp_path: Path) -> None:
    tracker = quiet(features={"ttc": "tc", "distance": "dist"}, token_ids_key="ids")
    with pytest.raises(ValueError) as raised:
        validate(tmp_path, tracker)
    message = str(raised.value)
    assert message.startswith("HeadSpecializationTracker, at the first validate batch: ")
    assert "features['ttc']='tc'" in message and "token_ids_key='ids'" in message
    assert "features['distance']" not in message  # 'dist' is in the batch


def test_token_ids_key_on_a_tuple_batch_names_the_indices(tmp_path: Path) -> None:
    class TupleModule(PlantedModule):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            ids, ttc = batch
            self.log("val_loss", self._loss({"input_ids": ids, "ttc": ttc}))

    rows = [(sample["input_ids"], sample["ttc"]) for sample in PlantedData(16, seed=1)]
    trainer = pl.Trainer(callbacks=[quiet(token_ids_key="tokens")], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError) as raised:
        trainer.validate(TupleModule(), DataLoader(rows, batch_size=4), verbose=False)
    message = str(raised.value)
    assert "token_ids_key='tokens' is not in the batch (no close batch keys; the batch keys are '0', '1'" in message
    assert "the batch is a list: name an element by its index" in message


def test_default_keys_absent_from_the_batch_are_not_errors(tmp_path: Path) -> None:
    tracker = quiet()  # token_ids_key="input_ids" is there; padding_mask_key="attention_mask" is not: no error
    validate(tmp_path, tracker, sanity=True)
    assert tracker.history_for("val")[-1]["labels"]["model.layers.1"][1] == "Induction head"  # token ids were read


def test_include_matching_no_site_fails_after_the_first_step(tmp_path: Path) -> None:
    tracker = quiet(include=["model.layer.*", "model.layers.1"])
    counter = BatchCounter()
    with pytest.raises(ValueError) as raised:
        validate(tmp_path, tracker, counter, sanity=True)
    message = str(raised.value)
    assert "include pattern 'model.layer.*' matches no attention site" in message
    close = message.split("(close site names: ", 1)[1].split(")", 1)[0]
    assert sorted(close.split(", ")) == ["'model.layers.0'", "'model.layers.1'"]
    assert "'model.layers.1' matches" not in message
    assert counter.steps == 0  # raised at the end of the sanity check's first step


def test_exclude_matching_no_site_warns(tmp_path: Path) -> None:
    tracker = quiet(exclude=["model.layers.2"])
    with pytest.warns(UserWarning, match="exclude pattern 'model.layers.2' matches no attention site .*'model.layers"):
        validate(tmp_path, tracker)
    assert [s["name"] for s in tracker.history_for("val")[-1]["sites"]] == ["model.layers.0", "model.layers.1"]


def test_save_dir_that_is_a_file_fails(tmp_path: Path) -> None:
    target = tmp_path / "outputs"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=r"save_dir='.*outputs' is a file, not a directory"):
        validate(tmp_path, quiet(save_dir=str(target)), sanity=True)


def test_right_names_raise_nothing_and_check_once(tmp_path: Path) -> None:
    tracker = quiet(include=["model.layers.*"], features={"ttc": "ttc"}, feature_masks={"ttc": "agent_mask"})
    counter = BatchCounter()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*matches no attention site")
        validate(tmp_path, tracker, counter, sanity=True)
    assert counter.steps == 2 + 3  # the sanity check, then the epoch
    assert tracker.history_for("val")[-1]["labels"]["model.layers.0"][3] == "Safety Head"
