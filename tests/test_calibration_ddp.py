"""CalibrationMonitor under DDP (2 CPU processes, gloo) gives what one process gives.

In-process ``strategy="ddp"`` under pytest relaunches pytest itself as rank 1 and leaks
``MASTER_ADDR``/``MASTER_PORT``/... into this process, so the DDP job runs as a subprocess script
(``calibration_ddp_worker.py``) with those variables removed and reports through JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script

WORKER = Path(__file__).with_name("calibration_ddp_worker.py")


@pytest.mark.ddp
def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run_script(WORKER, ddp, 2, cwd=ddp, OMP_NUM_THREADS="1")
    from calibration_ddp_worker import run  # the same job in this process, one device

    one = run(single, 1)
    ranks = [json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:
        # counts are exact; float64 sums differ only by summation order, except the classwise bins'
        # bin 0, taken from per-batch float32 column sums (relative rounding ~1e-7)
        assert rank["bin_count"] == one["bin_count"] and rank["class_count"] == one["class_count"]
        assert rank["metrics"]["n_samples"] == one["metrics"]["n_samples"] == 2048
        for name, value in one["metrics"].items():
            if name in ("temperature", "ece_scaled", "nll_scaled"):
                continue
            rel = 1e-6 if name == "classwise_ece" else 1e-9
            assert rank["metrics"][name] == pytest.approx(value, rel=rel, abs=1e-12), name
        assert rank["logged_ece"] == pytest.approx(one["metrics"]["ece"], rel=1e-6)
        assert rank["state_bytes"] == one["state_bytes"]
        # bootstrap: hash-keyed weights, so the reduced replicate states are one process's (counts exactly)
        assert rank["boot"]["boot_count"] == one["boot"]["boot_count"]
        assert rank["boot"]["boot_hits"] == one["boot"]["boot_hits"]
        assert rank["boot"]["boot_correct"] == one["boot"]["boot_correct"]
        for name in ("boot_conf", "boot_brier"):
            np.testing.assert_allclose(rank["boot"][name], one["boot"][name], rtol=1e-12)
        np.testing.assert_allclose(rank["bin_accuracy_ci_low"], one["bin_accuracy_ci_low"], rtol=1e-12)
        assert rank["logged_ece_ci_high"] == pytest.approx(one["metrics"]["ece_ci_high"], rel=1e-6)
        # the gathered reservoirs hold the whole epoch, like the single process's
        assert rank["sample_size"] == one["sample_size"] == 2048
    # the same temperature on every rank (fitted on rank 0, broadcast), and the single-process one
    assert ranks[0]["temperature"] == ranks[1]["temperature"]
    assert ranks[0]["metrics"]["ece_scaled"] == ranks[1]["metrics"]["ece_scaled"]
    assert ranks[0]["temperature"] == pytest.approx(one["temperature"], rel=1e-5)
    assert ranks[0]["temperature"] == pytest.approx(2.5, abs=0.25)
    # figures and JSON written once (rank zero)
    outputs = ddp / "outputs" / "calibration"
    assert list((outputs / "val").glob("summary_epoch0_step*.json"))
    assert len(list((outputs / "val").glob("reliability_epoch0_step*.png"))) == 1
