"""Two instances of one callback on one Trainer keep their files, logged keys and checkpoint states apart (``name=``);
a resume with other ``features=`` says why the head-specialization history was dropped."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attention_logger_models as models
import pytest
import torch
from helpers import cpu_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_attn import AttentionLogger, HeadSpecializationTracker, ModuleProbe

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
CROSS = ["eeg_to_spec", "spec_to_eeg"]


def test_two_attention_loggers_keep_files_keys_and_states_apart(tmp_path: Path) -> None:
    encoder = AttentionLogger(include=["encoder.*"], probe_samples=1, max_figure_sites=1)
    cross = AttentionLogger(include=CROSS, probe_samples=1, max_figure_sites=1)
    assert (encoder.name, cross.name) == ("attn-encoder", "attn-eeg_to_spec-spec_to_eeg")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = cpu_trainer(
        tmp_path, [encoder, cross, checkpoint], max_epochs=1, limit_train_batches=1, enable_checkpointing=True
    )
    trainer.fit(models.CrossModalModule(), models.loader(8, 4), models.loader(8, 4))
    assert encoder.results["val"].sites == ENCODER and cross.results["val"].sites == CROSS
    for callback, sites in ((encoder, ENCODER), (cross, CROSS)):
        logged = {key for key in trainer.callback_metrics if key.startswith(f"{callback.name}/")}
        assert logged == {
            f"{callback.name}/val/{site}/{stat}" for site in sites for stat in callback.results["val"].statistics
        } | {f"{callback.name}/val/batches"}
        folder = tmp_path / "lightning_attn_logs" / "version_0" / callback.name / "val"
        names = {path.name for path in folder.iterdir()}
        expected = {
            "statistics_epoch0_step1.json",
            "head_statistics_epoch0_step1.csv",
            "head_statistics_epoch0_step1.png",
        }
        assert expected <= names, names
        statistics = json.loads((folder / "statistics_epoch0_step1.json").read_text())
        assert list(statistics["sites"]) == sites  # its own sites only
    assert not (tmp_path / "lightning_attn_logs" / "version_0" / "attn").exists()
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert encoder.state_key != cross.state_key and {encoder.state_key, cross.state_key} <= states.keys()


def test_default_names_and_named_instances(tmp_path: Path) -> None:
    assert AttentionLogger().name == "attn" and ModuleProbe(probes={"ff": ("*.linear1", "activation")}).name == "probe"
    assert (
        HeadSpecializationTracker().name == "heads"
        and HeadSpecializationTracker(include=["layers.*"]).name == "heads-layers"
    )
    # the state keys of unnamed instances are those of their earlier versions (their checkpoints still load)
    assert (
        AttentionLogger().state_key
        == "AttentionLogger{'stages': ('validate', 'test'), 'include': None, 'exclude': None}"
    )
    assert AttentionLogger(name="a").state_key != AttentionLogger(name="b").state_key
    first = HeadSpecializationTracker(name="heads_a", probe_samples=0, log_figures=False)
    second = HeadSpecializationTracker(name="heads_b", probe_samples=0, log_figures=False)
    probes = [
        ModuleProbe(probes={"ff": ("encoder.layers.*.linear1", "activation")}, name=n, log_figures=False)
        for n in ("p1", "p2")
    ]
    trainer = cpu_trainer(tmp_path, [first, second, *probes])
    trainer.validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    for prefix in ("heads_a/val/", "heads_b/val/", "p1/val/", "p2/val/"):
        assert any(key.startswith(prefix) for key in trainer.callback_metrics), prefix
    for folder in (
        "heads_a/val/head_functions_epoch0_step0.json",
        "heads_b/val/head_functions_epoch0_step0.json",
        "p1/val/statistics_epoch0_step0.json",
        "p2/val/statistics_epoch0_step0.json",
    ):
        assert (tmp_path / "lightning_attn_logs" / "version_0" / folder).exists(), folder
    assert json.dumps(first.history_for("val"), default=repr) == json.dumps(second.history_for("val"), default=repr)


def test_equal_names_raise_at_setup(tmp_path: Path) -> None:
    twins = [AttentionLogger(include=["encoder.*"], exclude=["*.1.*"]), AttentionLogger(include=["encoder.*"])]
    with pytest.raises(ValueError, match=r"two AttentionLogger callbacks are named 'attn-encoder'.*name="):
        cpu_trainer(tmp_path, twins).validate(models.CrossModalModule(), models.loader(4, 4), verbose=False)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        AttentionLogger(name="")


def test_resume_with_other_features_warns_that_the_history_was_dropped(tmp_path: Path) -> None:
    def features(names: list[str]) -> dict[str, Callable[[Any], Any]]:
        return {name: (lambda batch: batch[2].float()) for name in names}

    def fit(tracker: HeadSpecializationTracker, epochs: int, ckpt_path: str | None) -> None:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = cpu_trainer(
            tmp_path, [tracker, checkpoint], max_epochs=epochs, limit_train_batches=1, enable_checkpointing=True
        )
        trainer.fit(models.CrossModalModule(), models.loader(8, 4), models.loader(8, 4), ckpt_path=ckpt_path)

    fit(HeadSpecializationTracker(features=features(["a"]), probe_samples=0, log_figures=False), 2, None)
    same = HeadSpecializationTracker(features=features(["a"]), probe_samples=0, log_figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(same, 3, str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r["epoch"] for r in same.history_for("val")] == [0, 1, 2]
    assert not [
        w for w in caught if "callbacks used to create the checkpoint" in str(w.message) or "dropped" in str(w.message)
    ]
    other = HeadSpecializationTracker(features=features(["a", "b"]), probe_samples=0, log_figures=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(other, 4, str(tmp_path / "ckpt" / "last.ckpt"))
    messages = [str(w.message) for w in caught]
    dropped = [m for m in messages if "history" in m and "dropped" in m]
    assert len(dropped) == 1 and "['a']" in dropped[0] and "['a', 'b']" in dropped[0], messages
    assert not [m for m in messages if "callbacks used to create the checkpoint" in m]  # not Lightning's generic one
    assert [r["epoch"] for r in other.history_for("val")] == [3]
