"""AttentionLogger under DDP: 2 CPU ranks give the statistics of 1 process on the same (evenly split) data.

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

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).with_name("attention_logger_models.py")
_spec = importlib.util.spec_from_file_location("attention_logger_models", SCRIPT)
models = sys.modules.get("attention_logger_models") or importlib.util.module_from_spec(_spec)
if "attention_logger_models" not in sys.modules:
    sys.modules["attention_logger_models"] = models
    _spec.loader.exec_module(models)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (parallel regions only add waiting on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert ddp["sites"] == single["sites"]
    for field in ("mean", "std"):
        for name, values in single[field].items():
            np.testing.assert_allclose(np.array(ddp[field][name], dtype=float), np.array(values, dtype=float), atol=1e-6, err_msg=f"{field} {name}")
    np.testing.assert_array_equal(ddp["rows"], single["rows"])
    assert ddp["agreement"].keys() == single["agreement"].keys()
    for pair, value in single["agreement"].items():
        assert ddp["agreement"][pair] == pytest.approx(value, abs=1e-6)
    for site in single["sites"]:
        for field in ("top_attended", "top_attending"):
            got, want = ddp[field][site], single[field][site]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-6)
    # figures and files from rank zero only, once
    pngs = list((tmp_path / "ddp" / "lightning_attn" / "attn").glob("val_head_statistics_step0.png"))
    assert len(pngs) == 1
