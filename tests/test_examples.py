"""The example configs, run for one short epoch through the documented entry point, and the CLI's plumbing.

Each slow test runs ``python -m lightning_attn.cli fit --config configs/<example>.yaml`` in a subprocess (as a
user would, from a scratch working directory, so the configs' relative ``outputs/`` paths land there; two
runs at a time) with two batches per loop, and checks what the run must leave behind: a checkpoint, the saved config,
TensorBoard event files with the callbacks' figures, and, in the run folder where the callbacks announce it, their
CSV/JSON files and the explainability report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXAMPLES = ["digits_vit", "cross_modal", "minilm_text", "stockformer"]
SHORT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.limit_test_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "NODE_RANK", "LOCAL_RANK"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        WANDB_SILENT="true",
        HOME=str(home),  # no ~/.netrc: W&B must go offline by itself
        NETRC=str(home / ".netrc"),
        # two runs share the two cores: one thread each (two OpenMP threads per run would fight over them)
        OMP_NUM_THREADS="1",
    )
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    home = cwd / "home"
    home.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_attn.cli", *args],
        cwd=cwd,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr "
            f"---\n{result.stderr[-6000:]}"
        )
    return result


#: The line each callback prints at the end of fit and test (:func:`lightning_attn.sinks.dashboards.announce_outputs`).
ANNOUNCED = re.compile(r"^lightning_attn: (\S+) outputs in (.+?)(?:; report (.+))?$", re.MULTILINE)


def announced(result: subprocess.CompletedProcess, cwd: Path) -> dict[str, Path]:
    """Where the run's outputs went, as the callbacks announced them: each callback's folder by name, and the last
    report's ``report.html`` under ``"report.html"``."""
    where: dict[str, Path] = {}
    for name, directory, report in ANNOUNCED.findall(result.stdout + result.stderr):
        where[name] = cwd / directory
        if report:
            where["report.html"] = cwd / report
    return where


def tensorboard_images(run: Path) -> list[str]:
    """The image tags of a TensorBoard run: the callbacks' figures (``<name>/<stage>/<figure>``), which go to the
    dashboard logger and, with no ``save_dir``, not to PNG files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 1})
    events.Reload()
    return sorted(events.Tags()["images"])


def run_example(example: str, cwd: Path) -> tuple[Path, str, dict[str, Path]]:
    """Fit ``configs/<example>.yaml`` for one short epoch in ``cwd``; returns ``cwd``, the run's stderr and where its
    outputs went (:func:`announced`)."""
    extra: list[str] = []
    if example == "stockformer":  # the logger variant: TensorBoard and W&B (offline: no key in this environment)
        extra = ["--config", str(CONFIGS / "loggers" / "tensorboard_wandb.yaml")]
    result = run_cli(["fit", "--config", str(CONFIGS / f"{example}.yaml"), *extra, *SHORT], cwd)
    return cwd, result.stderr, announced(result, cwd)


@pytest.fixture(scope="module")
def example_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """The selected examples' runs, two at a time in the background (most of a short run is single-threaded
    Python: imports, figures), so the whole file takes about half the time of running them one by one."""
    wanted: set[str] = set()
    for item in request.session.items:
        if item.module is not request.module:
            continue
        if item.originalname == "test_example_config_runs_one_short_epoch":
            wanted.add(item.callspec.params["example"])
        elif item.originalname == "test_report_subcommand_on_a_trained_checkpoint":
            wanted.add("digits_vit")
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    longest_first = ["minilm_text", "digits_vit", "cross_modal", "stockformer"]
    futures = {
        name: pool.submit(run_example, name, tmp_path_factory.mktemp(name)) for name in longest_first if name in wanted
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _one(paths: list[Path], what: str) -> Path:
    assert paths, f"no {what}"
    return paths[0]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_config_runs_one_short_epoch(example: str, example_runs: dict[str, Future]) -> None:
    cwd, stderr, where = example_runs[example].result()
    out = cwd / "outputs" / example
    version = out / "tensorboard" / "version_0"
    _one(sorted(version.glob("checkpoints/*.ckpt")), "checkpoint")
    _one(sorted(version.glob("events.out.tfevents.*")), "TensorBoard event file")
    assert (version / "config.yaml").is_file()
    # no save_dir in the configs: every callback writes into the run folder of the first logger
    assert {where[name].parent.resolve() for name in ("attn", "calibration", "heads", "report")} == {
        (version / "lightning_attn").resolve()
    }, where

    images = tensorboard_images(version)
    for name in ("attn/val/", "attn/test/", "calibration/test/", "heads/test/"):
        assert any(tag.startswith(name) for tag in images), f"no {name} figures in TensorBoard: {images}"
    attn = where["attn"]
    stats = json.loads(_one(sorted(attn.glob("test/statistics_epoch*.json")), "AttentionLogger JSON").read_text())
    assert stats, "empty AttentionLogger JSON"
    calibration = where["calibration"]
    assert sorted(calibration.glob("test/summary_epoch*.json")), "CalibrationMonitor outputs"
    heads = where["heads"]
    registry = json.loads(_one(sorted(heads.glob("test/head_functions_epoch*.json")), "registry").read_text())
    assert registry, "empty head-function registry"
    report = where["report.html"].parent
    assert (report / "report.html").is_file()
    assert json.loads((report / "report.json").read_text())["dataset"]["num_samples"] > 0
    assert "saliency failed" not in stderr, "the report could not call the model on the batch (forward_fn)"
    # saliency: gradient x input for float inputs; token ids get token saliency on the embedding layer instead
    assert sorted(report.glob("figures/saliency*.png" if example != "minilm_text" else "figures/rollout.png")), (
        "report saliency"
    )
    probes = json.loads((report / "report.json").read_text())["saliency"]["probes"]
    if example == "minilm_text":
        assert probes and all(p["tokens"]["tokens"][0] == "[CLS]" for p in probes), "token saliency with token strings"
    if example == "digits_vit":
        assert (report / "figures" / "gradcam.png").is_file(), "Grad-CAM over the digits"

    if example == "cross_modal":
        assert any(tag.startswith("attn/") and "/pairs/" in tag and "signal" in tag for tag in images), "modality pair"
        assert "signal<->spectrogram" in json.dumps(stats)
    if example == "stockformer":
        assert "volatility" in json.dumps(registry)
        assert sorted(where["probe"].glob("test/statistics_epoch*.json")), "ModuleProbe JSON"
        assert any(tag.startswith("probe/test/") for tag in images), "ModuleProbe figures"
        _one(sorted((out / "wandb").glob("offline-run-*")), "offline W&B run")


@pytest.mark.slow
def test_report_subcommand_on_a_trained_checkpoint(example_runs: dict[str, Future], tmp_path: Path) -> None:
    cwd, _, _ = example_runs["digits_vit"].result()
    checkpoint = _one(sorted((cwd / "outputs" / "digits_vit").rglob("*.ckpt")), "checkpoint")
    result = run_cli(
        [
            "report",
            "--config",
            str(CONFIGS / "digits_vit.yaml"),
            "--checkpoint",
            str(checkpoint),
            "--out",
            "post_hoc",
            "--max-batches",
            "1",
            "--no-figures",
            "--no-progress",
        ],
        tmp_path,
    )
    assert (tmp_path / "post_hoc" / "report.html").is_file()
    assert "report.html" in result.stdout


@pytest.mark.slow
@pytest.mark.ddp
def test_digits_config_under_two_process_ddp(tmp_path: Path) -> None:
    """The documented multi-process command (README, GPU and DDP) on 2 CPU processes: fit, test and the report
    run through, rank zero writes the files once, and the report holds both ranks' test samples."""
    from test_report import read_csv

    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    where = announced(run_cli(["fit", "--config", str(CONFIGS / "digits_vit.yaml"), *SHORT, *ddp], tmp_path), tmp_path)
    out = tmp_path / "outputs" / "digits_vit"
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["version_0"], "one TensorBoard run (rank zero's)"
    _one(sorted((out / "tensorboard" / "version_0").glob("checkpoints/*.ckpt")), "checkpoint")
    assert sorted(where["calibration"].glob("test/summary_epoch*.json"))
    report_dir = where["report.html"].parent
    report = json.loads((report_dir / "report.json").read_text())
    _, header, rows = read_csv(report_dir / "samples.csv")
    ranks = [row[header.index("rank")] for row in rows]
    # 2 test batches of 64 per rank (limit_test_batches=2), rank zero's rows first
    assert report["dataset"]["num_samples"] == len(rows) == 256
    assert ranks == ["0"] * 128 + ["1"] * 128
    assert report["provenance"]["world_size"] == 2


# -- fast: the CLI and logger plumbing ----------------------------------------------------------------------------
def test_report_subcommand_missing_module_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lightning_attn import cli

    monkeypatch.setitem(sys.modules, "lightning_attn.report.cli", None)  # import raises ImportError
    assert cli.main(["report", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report" in err[0]


def test_wandb_offline_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_attn.loggers import has_wandb_credentials, resolve_wandb_offline

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / ".netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()
    assert resolve_wandb_offline(None) is True
    with pytest.warns(UserWarning, match="offline instead"):
        assert resolve_wandb_offline(False) is True  # online asked, no key: offline, never a prompt
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert has_wandb_credentials() and resolve_wandb_offline(None) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_offline(None) is True
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_offline(None) is False
    assert resolve_wandb_offline(True) is True


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_example_modules_follow_the_contracts() -> None:
    """Batches are dicts with "target"; eval steps return logits and target; the probe names exist."""
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.stockformer import MarketDataModule, StockFormer

    data = MarketDataModule(num_train=8, num_val=8, num_test=8, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"x", "context", "volatility", "target"} and batch["volatility"].shape == (4,)
    model = StockFormer(num_layers=2)
    names = dict(model.named_modules())
    assert isinstance(names["pool.softmax"], torch.nn.Softmax)
    assert all(isinstance(names[f"layers.{i}.gate"][-1], torch.nn.Sigmoid) for i in range(2))
    with torch.no_grad():
        out = model.validation_step(batch, 0)
    assert out["logits"].shape == (4, 2) and out["target"].shape == (4,)
