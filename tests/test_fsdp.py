"""AttentionLogger, CalibrationMonitor and HeadSpecializationTracker under FSDP equal one process (issue 13).

Lightning's FSDPStrategy runs on CUDA only, so the FSDP comparison needs 2 GPUs and is skipped elsewhere; CI checks
the same comparison under CPU DDP (gloo) here and in the ``*_ddp`` tests. The job runs as a subprocess script
(``fsdp_script.py``, like the DDP tests) and global rank zero reports through a JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsdp_script as script
import pytest
import torch
from helpers import run_script

#: Scalars summed in a different order over ranks (and on GPU): equal up to float rounding.
TOLERANCE = 1e-5


def _run(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    run_script(script.__file__, *args, "--out", out, "--root", tmp_path / name, cwd=tmp_path, timeout=600)
    return json.loads(out.read_text())


def _assert_equal(distributed: dict[str, Any], single: dict[str, Any]) -> None:
    assert distributed["world_size"] == 2 and single["world_size"] == 1
    assert distributed["sites"] == single["sites"] and distributed["rows"] == single["rows"]
    assert distributed["calibration_count"] == single["calibration_count"]
    for prefix in ("attn/val/", "calibration/val/", "heads/val/"):
        assert any(key.startswith(prefix) for key in single["logged"]), prefix
    assert distributed["logged"].keys() == single["logged"].keys()
    for key, want in single["logged"].items():
        assert distributed["logged"][key] == pytest.approx(want, abs=TOLERANCE, nan_ok=True), key


@pytest.mark.ddp
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP needs 2 CUDA GPUs (Lightning's FSDPStrategy runs on CUDA only); CPU DDP is checked in CI",
)
def test_fsdp_on_two_gpus_equals_one_process(tmp_path: Path) -> None:
    fsdp = _run(tmp_path, "fsdp", "--devices", "2", "--strategy", "fsdp", "--accelerator", "gpu")
    single = _run(tmp_path, "single", "--devices", "1", "--strategy", "auto", "--accelerator", "gpu")
    _assert_equal(fsdp, single)


@pytest.mark.ddp
@pytest.mark.slow
def test_the_fsdp_script_under_cpu_ddp_equals_one_process(tmp_path: Path) -> None:
    """The same script and comparison under CPU DDP: what CI can run of the FSDP check."""
    ddp = _run(tmp_path, "ddp", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    script.run(1, "auto", "cpu", str(tmp_path / "single.json"), str(tmp_path / "single"))  # one process: in this one
    _assert_equal(ddp, json.loads((tmp_path / "single.json").read_text()))
