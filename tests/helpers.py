"""What the tests share: a quiet one-CPU Trainer, a guard against host syncs, and the DDP subprocess runner.

Imported as ``helpers``: ``tests/`` is on ``sys.path`` under pytest, and it is the script directory of the DDP
scripts (``attention_logger_models.py``, ``module_probe_models.py``) that run in a subprocess.

DDP jobs run as subprocess scripts because an in-process ``strategy="ddp"`` under pytest relaunches pytest itself
as rank 1 and leaks ``MASTER_ADDR``/``MASTER_PORT``/... into this process; results come back through JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from lightning_attn.cli import end_process_group

ROOT = Path(__file__).resolve().parents[1]

#: Variables of a torch/Lightning launcher: inherited by a subprocess, they make its DDP job join (or wait for)
#: a process group that does not exist.
LAUNCHER_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GLOBAL_RANK",
    "RANK",
    "LOCAL_WORLD_SIZE",
)


# -- in-process runs ---------------------------------------------------------------------------------------------
def trainer_options(root: str | Path | None, **overrides: Any) -> dict[str, Any]:
    """Options of a quiet Trainer on one CPU: no logger, checkpoints, progress bar or model summary."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=None if root is None else str(root),
    )
    options.update(overrides)
    return options


def cpu_trainer(root: str | Path, callbacks: list[Any], **overrides: Any) -> pl.Trainer:
    """A quiet Trainer on one CPU (:func:`trainer_options`) with ``callbacks``."""
    return pl.Trainer(callbacks=callbacks, **trainer_options(root, **overrides))


class NoHostSync(torch.overrides.TorchFunctionMode):
    """Raise on every Tensor -> host transfer (item, tolist, bool, cpu, numpy) while active."""

    FORBIDDEN: ClassVar[set] = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN or (
            func is torch.Tensor.to and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        ):
            raise AssertionError(f"host sync in a batch hook: {func}")
        return func(*args, **(kwargs or {}))


class GuardedHooks:
    """Mixin of a callback under test (``class Guarded(GuardedHooks, AttentionLogger)``): its batch hooks and its
    attention captures run under :class:`NoHostSync`; ``Guarded.captures`` counts the captures."""

    captures = 0

    def _on_capture(self, capture: Any) -> None:
        type(self).captures += 1
        with NoHostSync():
            super()._on_capture(capture)  # type: ignore[misc]

    def eval_batch_start(self, *args: Any) -> None:
        with NoHostSync():
            super().eval_batch_start(*args)  # type: ignore[misc]

    def eval_batch_end(self, *args: Any) -> None:
        with NoHostSync():
            super().eval_batch_end(*args)  # type: ignore[misc]


# -- DDP scripts (the subprocess side) ---------------------------------------------------------------------------
def reproducible(seed: int = 0) -> None:
    """Before building a script's model: no warnings, one intra-op thread (tiny models: parallel regions only add
    waiting, and the ranks share the cores), every seed set."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(seed, workers=True, verbose=False)


def validate_to_json(
    module: pl.LightningModule,
    callback: Any,
    loader: Any,
    results_json: Callable[[Any], dict[str, Any]],
    devices: int,
    strategy: str = "auto",
    out: str | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """``trainer.validate`` with ``callback`` on ``devices`` CPU processes; returns ``results_json(callback)`` plus
    ``world_size``, also written to ``out`` (JSON) by global rank zero."""
    trainer = pl.Trainer(callbacks=[callback], **trainer_options(root, devices=devices, strategy=strategy))
    trainer.validate(module, loader, verbose=False)
    data = results_json(callback)
    data["world_size"] = trainer.world_size
    if out is not None and trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump(data, handle)
    return data


def script_main(run: Callable[[int, str, str, str | None], Any]) -> None:
    """Command line of a DDP script: ``--devices 2 --out results.json [--strategy ddp] [--root DIR]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=None)
    arguments = parser.parse_args()
    run(arguments.devices, arguments.strategy, arguments.out, arguments.root)
    end_process_group()


# -- DDP scripts (the test side) ---------------------------------------------------------------------------------
def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (:data:`LAUNCHER_VARIABLES`, ``PL_*``), with the
    repository on ``PYTHONPATH``, the Agg backend for matplotlib, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


def run_script(
    script: str | Path, *args: str | Path, cwd: str | Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """Run ``python script *args`` in ``cwd`` with :func:`subprocess_env` (plus ``env``); assert that it succeeded,
    showing the end of its output otherwise."""
    completed = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=subprocess_env(**env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed


def run_ddp_script(script: str | Path, tmp_path: Path, devices: int = 2) -> dict[str, Any]:
    """Run a DDP script (:func:`script_main`) with ``devices`` processes in ``tmp_path`` (its files under
    ``tmp_path/ddp``); the JSON results of rank zero."""
    out = tmp_path / "ddp.json"
    run_script(
        script, "--devices", str(devices), "--strategy", "ddp", "--out", out, "--root", tmp_path / "ddp", cwd=tmp_path
    )
    return json.loads(out.read_text())
