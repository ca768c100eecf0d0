"""ModuleProbe under DDP: 2 CPU ranks give the statistics of 1 process on the same (evenly split) data.

DDP runs as a subprocess script (an in-process ``strategy="ddp"`` under pytest relaunches pytest itself as
rank 1 and leaks MASTER_ADDR/MASTER_PORT into this process); results come back through a JSON file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).with_name("module_probe_models.py")
_spec = importlib.util.spec_from_file_location("module_probe_models", SCRIPT)
models = sys.modules.get("module_probe_models") or importlib.util.module_from_spec(_spec)
if "module_probe_models" not in sys.modules:
    sys.modules["module_probe_models"] = models
    _spec.loader.exec_module(models)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_close(got: Any, want: Any, path: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            _assert_close(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list) and want and isinstance(want[0], list) and want[0] and isinstance(want[0][0], str):
        assert [label for label, _ in got] == [label for label, _ in want], path  # top positions
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-6, err_msg=path)
    elif isinstance(want, (list, int, float)) and not isinstance(want, bool):
        np.testing.assert_allclose(np.array(got, dtype=float), np.array(want, dtype=float), atol=1e-6, err_msg=path)
    else:
        assert got == want, path


@pytest.mark.ddp
def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"}}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "2", "--strategy", "ddp", "--out", str(out), "--root", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    ddp = json.loads(out.read_text())
    single = models.run(devices=1, root=str(tmp_path / "single"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert list(ddp["sites"]) == list(single["sites"]) == ["layers.0.gate", "layers.1.gate", "pool.softmax", "heads_pool.softmax"]
    assert ddp["probes"] == single["probes"]
    _assert_close(ddp["sites"], single["sites"], "sites")
    _assert_close(ddp["histograms"], single["histograms"], "histograms")
    assert sum(map(sum, ddp["histograms"]["attn"]["per_head_counts"])) == 16 * 2 * models.LENGTH**2
    # figures and files from rank zero only, once
    directory = tmp_path / "ddp" / "lightning_attn" / "probe"
    assert len(list(directory.glob("val_gate_over_time_step0.png"))) == 1
    assert len(list(directory.glob("val_epoch0.json"))) == 1
