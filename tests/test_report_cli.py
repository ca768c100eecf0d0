"""``lightning-attn report`` (lightning_attn.report.cli): end to end from a fitted checkpoint, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from report_helpers import TinyClassifier, fit_checkpoint

from lightning_attn.report import hash_state_dict
from lightning_attn.report.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fit_checkpoint(str(tmp_path_factory.mktemp("fit")), epochs=1)


def write_config(
    path: Path, model: dict | None = None, data: dict | None = None, callbacks: list | None = None
) -> Path:
    config = {
        "seed_everything": 0,
        "model": model or {"class_path": "report_helpers.TinyClassifier", "init_args": {"d_model": 16}},
        "data": data or {"class_path": "report_helpers.TinyData", "init_args": {"num_test": 40, "batch_size": 16}},
        "trainer": {
            "max_epochs": 1,
            "callbacks": callbacks
            if callbacks is not None
            else [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
                {
                    "class_path": "lightning_attn.ExplainabilityReport",
                    "init_args": {"class_names": ["low", "mid", "high"], "top_k": 2},
                },
                {
                    "class_path": "lightning_attn.CalibrationMonitor",
                    "init_args": {
                        "stages": ["test"],
                        "target_key": "label",
                        "plot": False,
                        "save_dir": "outputs/calibration",
                    },
                },
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-attn report")
    for text in (
        "--config",
        "--entry",
        "--checkpoint",
        "--out",
        "report.html",
        "INCOMPLETE",
        "examples:",
        "exit status",
    ):
        assert text in out, text


def test_end_to_end_from_checkpoint_and_config(checkpoint: str, tmp_path: Path) -> None:
    """The real command in a subprocess: python -m lightning_attn.report.cli, with its tqdm progress bar."""
    config = write_config(tmp_path / "config.yaml")
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_attn.report.cli",
            "--config",
            str(config),
            "--checkpoint",
            checkpoint,
            "--out",
            str(out),
            "--modality-pair",
            "a<->b=cross_ab,cross_ba",
            "--feature-names",
            "a=a0,a1,a2,a3,a4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out / "report.html")
    assert "Testing" in result.stderr and "it/s" in result.stderr  # tqdm bar
    assert "wrote" in result.stderr and "Traceback" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    model = TinyClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    assert report["provenance"]["model_sha256"] == hash_state_dict(model.state_dict())
    assert report["dataset"]["num_samples"] == 40
    assert [c["name"] for c in report["classwise"]] == [
        "low",
        "mid",
        "high",
    ]  # init_args of the config's report callback
    assert report["config"]["top_k"] == 2
    assert "agreement/a<->b" in report["correct_vs_incorrect"]
    assert report["saliency"]["aggregate"]["a"]["feature_names"] == ["a0", "a1", "a2", "a3", "a4"]
    # the config's calibration callback ran (its section is in the report) but wrote nothing where training did
    assert report["sections"]["calibration"]["results"]["metrics"]["ece"] == pytest.approx(
        report["dataset"]["ece"], abs=1e-5
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "report"]
    rows = (out / "samples.csv").read_text().splitlines()
    assert len(rows) == 1 + 40  # header, one row per sample
    assert (out / "report.html").stat().st_size > 10_000


def test_entry_point_in_process(checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "entry"
    status = main(
        [
            "--entry",
            "report_helpers:entry",
            "--checkpoint",
            checkpoint,
            "--out",
            str(out),
            "--no-progress",
            "--no-figures",
            "--probe-samples",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    model = TinyClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    assert report["provenance"]["model_sha256"] == hash_state_dict(model.state_dict())
    assert report["saliency"]["num_probes"] == 2 and not list(out.glob("figures/*.png"))


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lightning-attn report: error: ") and match in lines[0], lines[0]
    return lines[0]


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "config.yaml")
    _fails(
        ["--config", str(config), "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "r")],
        capsys,
        "checkpoint not found",
    )
    _fails(
        ["--entry", "report_helpers:entry", "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "r")],
        capsys,
        "checkpoint not found",
    )
    assert not (tmp_path / "r").exists()


def test_config_naming_an_unknown_class(checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "a.yaml", model={"class_path": "no_such_package.Model"})
    _fails(
        ["--config", str(config), "--checkpoint", checkpoint, "--out", str(tmp_path / "r")],
        capsys,
        "unknown class 'no_such_package.Model'",
    )
    config = write_config(tmp_path / "b.yaml", data={"class_path": "report_helpers.NoSuchData"})
    _fails(
        ["--config", str(config), "--checkpoint", checkpoint, "--out", str(tmp_path / "r")], capsys, "has no attribute"
    )
    config = write_config(
        tmp_path / "c.yaml", model={"class_path": "report_helpers.TinyClassifier", "init_args": {"d_model": 32}}
    )
    _fails(
        ["--config", str(config), "--checkpoint", checkpoint, "--out", str(tmp_path / "r")],
        capsys,
        "does not fit TinyClassifier",
    )
    _fails(["--entry", "report_helpers:no_such_function", "--out", str(tmp_path / "r")], capsys, "has no attribute")
    assert not (tmp_path / "r").exists()


def test_dataloader_without_targets(checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        data={"class_path": "report_helpers.TinyData", "init_args": {"num_test": 16, "with_targets": False}},
        callbacks=[],
    )
    out = tmp_path / "r"
    _fails(
        ["--config", str(config), "--checkpoint", checkpoint, "--out", str(out), "--no-progress"], capsys, "no targets"
    )
    assert not out.exists()
    partial = list(tmp_path.glob(".r.incomplete-*"))
    assert len(partial) == 1 and (partial[0] / "INCOMPLETE").is_file()
    assert not (partial[0] / "report.json").exists()


def test_usage_error_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "r")]) == 2  # neither --config nor --entry
    assert "one of the arguments --config --entry is required" in capsys.readouterr().err


def test_out_over_the_checkpoint_or_config_it_reads_is_refused(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: --out containing (or being) an input would once have been replaced by the report, input and all."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(Path(checkpoint).read_bytes())
    config = write_config(run / "config.yaml")
    before = {p: p.read_bytes() for p in (ckpt, config)}
    for out in (run, run / "checkpoints"):
        for source in (["--config", str(config)], ["--entry", "report_helpers:entry"]):
            _fails([*source, "--checkpoint", str(ckpt), "--out", str(out)], capsys, "contains the checkpoint")
    _fails(["--config", str(config), "--checkpoint", checkpoint, "--out", str(run)], capsys, "contains the config")
    assert {p: p.read_bytes() for p in (ckpt, config)} == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_pickled_checkpoint_is_refused_unless_trusted(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint holding arbitrary Python objects is not unpickled without --trust-checkpoint (safe loading)."""
    import torch
    from report_helpers import DictDataset

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    payload["pickled_object"] = DictDataset([])  # any class: unpickling it runs code of the file's choosing
    pickled = tmp_path / "pickled.ckpt"
    torch.save(payload, pickled)
    config = write_config(tmp_path / "config.yaml", callbacks=[])
    argv = [
        "--config",
        str(config),
        "--checkpoint",
        str(pickled),
        "--no-progress",
        "--no-figures",
        "--probe-samples",
        "0",
    ]
    line = _fails([*argv, "--out", str(tmp_path / "refused")], capsys, "--trust-checkpoint")
    assert "safe loading refuses" in line and not (tmp_path / "refused").exists()
    assert main([*argv, "--out", str(tmp_path / "trusted"), "--trust-checkpoint"]) == 0, capsys.readouterr().err
    assert (tmp_path / "trusted" / "report.json").is_file()
