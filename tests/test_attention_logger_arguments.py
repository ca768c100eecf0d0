"""AttentionLogger arguments that name attention sites or paths: a wrong one fails at the first evaluation batch (the
sanity check when it runs) or at setup, with one message naming the wrong value and the close valid names."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import attention_logger_models as models
import pytest
from helpers import cpu_trainer as trainer
from lightning.pytorch.callbacks import Callback
from torch.nn.modules import module as module_globals

from lightning_attn import AttentionLogger

SITES = "'encoder.layers.0.self_attn', 'encoder.layers.1.self_attn', 'eeg_to_spec', 'spec_to_eeg'"


class BatchCounter(Callback):
    """Counts the batches that started, by loop (``sanity`` for the sanity check)."""

    def __init__(self) -> None:
        self.batches: dict[str, int] = {"sanity": 0, "validate": 0, "train": 0, "test": 0}

    def on_validation_batch_start(self, trainer: Any, *args: Any) -> None:
        self.batches["sanity" if trainer.sanity_checking else "validate"] += 1

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches["train"] += 1

    def on_test_batch_start(self, *args: Any) -> None:
        self.batches["test"] += 1


def _fails_at_first_batch(tmp_path: Path, callback: AttentionLogger, loop: str = "validate") -> str:
    counter = BatchCounter()
    run = trainer(tmp_path, [counter, callback], max_epochs=1, limit_train_batches=2, num_sanity_val_steps=2)
    with pytest.raises(ValueError) as error:
        if loop == "fit":
            run.fit(models.CrossModalModule(), models.loader(8, 4), models.loader(8, 4))
        else:
            getattr(run, loop)(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    expected = {"sanity": 0, "validate": 0, "train": 0, "test": 0, ("sanity" if loop == "fit" else loop): 1}
    assert counter.batches == expected
    assert callback._checks._census is None and callback._recorder is None
    assert len(module_globals._global_forward_hooks) == 0
    return str(error.value)


def test_include_that_matches_nothing_fails_the_sanity_check(tmp_path: Path) -> None:
    message = _fails_at_first_batch(tmp_path, AttentionLogger(include=["encoder.layer.*"]), loop="fit")
    assert message.startswith(
        "AttentionLogger(name='attn-encoder.layer'), at the first validate batch: include pattern 'encoder.layer.*' "
        "matches no attention site "
        "(close site names: 'encoder.layers.1.self_attn', 'encoder.layers.0.self_attn')"  # closest first
    )
    assert f"The attention sites of CrossModalModule at the first batch: {SITES}" in message


def test_modality_pair_site_that_matches_nothing(tmp_path: Path) -> None:
    callback = AttentionLogger(modality_pairs={"eeg<->spec": ("eeg_to_spek", "spec_to_eeg")})
    message = _fails_at_first_batch(tmp_path, callback)
    assert "modality_pairs['eeg<->spec'] A->B site 'eeg_to_spek' matches no attention site" in message
    assert "close site names: 'eeg_to_spec'" in message
    assert "spec_to_eeg' matches" not in message  # the valid side is not reported


def test_modality_pair_site_left_out_by_exclude(tmp_path: Path) -> None:
    callback = AttentionLogger(exclude=["spec_*"], modality_pairs=models.PAIRS)
    message = _fails_at_first_batch(tmp_path, callback, loop="test")
    assert (
        "modality_pairs['eeg<->spec'] B->A site 'spec_to_eeg' names only sites that include/exclude leave out: "
        "['spec_to_eeg']" in message
    )


def test_token_names_key_that_matches_nothing(tmp_path: Path) -> None:
    callback = AttentionLogger(token_names={"eeg_to_spec:key": list("abcde"), "encoder.*": list("abcdef")})
    message = _fails_at_first_batch(tmp_path, callback)
    assert "token_names key 'eeg_to_spec:key' matches no attention site (close site names: 'eeg_to_spec'" in message
    assert "'encoder.*'" not in message.split(". The attention sites")[0]


def test_every_mistake_in_one_message(tmp_path: Path) -> None:
    callback = AttentionLogger(include=["decoder.*", "eeg_to_spec"], modality_pairs={"p": ("eeg_to_spec", "nowhere")})
    message = _fails_at_first_batch(tmp_path, callback)
    assert "include pattern 'decoder.*' matches no attention site" in message
    assert "modality_pairs['p'] B->A site 'nowhere' matches no attention site" in message
    assert "include pattern 'eeg_to_spec'" not in message


def test_exclude_that_matches_nothing_warns_and_runs(tmp_path: Path) -> None:
    callback = AttentionLogger(exclude=["eeg_to_spek"], log_figures=False)
    with pytest.warns(UserWarning, match="exclude pattern 'eeg_to_spek' matches no attention site") as caught:
        trainer(tmp_path, [callback]).validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    assert "close site names: 'eeg_to_spec'" in next(str(w.message) for w in caught if "exclude" in str(w.message))
    assert callback.results["val"].sites == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "eeg_to_spec",
        "spec_to_eeg",
    ]


def test_valid_arguments_pass_quietly_and_are_checked_once_per_run(tmp_path: Path) -> None:
    callback = AttentionLogger(
        include=["encoder.*", "*_to_*"],
        exclude=["encoder.layers.1.*"],
        modality_pairs=models.PAIRS,
        token_names={"eeg_to_spec:keys": list("abcde")},
        log_figures=False,
    )
    run = trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=1, num_sanity_val_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*matches no attention site.*")
        run.fit(models.CrossModalModule(), models.loader(8, 4), models.loader(8, 4))
    assert "validate" not in callback._first_batches and callback._checks._census is None  # checked, closed
    assert callback.results["val"].sites == ["encoder.layers.0.self_attn", "eeg_to_spec", "spec_to_eeg"]
    assert callback.results["val"].top_attended["eeg_to_spec"][0][0] in "abcde"


def test_save_dir_that_is_a_file_fails_at_setup(tmp_path: Path) -> None:
    target = tmp_path / "outputs"
    target.write_text("not a folder")
    counter = BatchCounter()
    expected = f"AttentionLogger(name='attn'): save_dir: {target} exists and is a file"
    with pytest.raises(NotADirectoryError, match=re.escape(expected)):
        trainer(tmp_path, [counter, AttentionLogger(save_dir=str(target / "attention"))]).validate(
            models.CrossModalModule(), models.loader(8, 4), verbose=False
        )
    assert counter.batches == {"sanity": 0, "validate": 0, "train": 0, "test": 0}
