"""ModuleProbe under DDP: 2 CPU ranks give the statistics of 1 process on the same (evenly split) data.

DDP runs as a subprocess script (``module_probe_models.py``, through :func:`helpers.run_ddp_script`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import module_probe_models as models
import numpy as np
import pytest
from helpers import run_ddp_script

pytestmark = pytest.mark.usefixtures("one_thread")


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
    ddp = run_ddp_script(models.__file__, tmp_path)
    single = models.run(devices=1, root=str(tmp_path / "single"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert (
        list(ddp["sites"])
        == list(single["sites"])
        == ["layers.0.gate", "layers.1.gate", "pool.softmax", "heads_pool.softmax"]
    )
    assert ddp["probes"] == single["probes"]
    _assert_close(ddp["sites"], single["sites"], "sites")
    _assert_close(ddp["histograms"], single["histograms"], "histograms")
    assert sum(map(sum, ddp["histograms"]["attn"]["per_head_counts"])) == 16 * 2 * models.LENGTH**2
    # figures and files from rank zero only, once
    directory = tmp_path / "ddp" / "lightning_attn_logs"
    assert len(list(directory.glob("version_*/probe/val/gate/over_time_epoch0_step*.png"))) == 1
    assert len(list(directory.glob("version_*/probe/val/statistics_epoch0_step*.json"))) == 1
