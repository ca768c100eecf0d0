"""Two CPU ranks equal one process over the same samples in the scenarios of ``ddp_scenarios.py`` (run once as a
subprocess script, all scenarios in one process group), for every callback that streams per-site sums:

- per-site states are reduced by site name, not by order of first sight: the ranks meet the sites in different
  orders (``skip``), or one rank never meets a site (``one_rank``);
- uneven shards: 37, 11 and 1 samples over three validation loaders, different numbers of batches per rank, no
  batch at all of the last loader on rank 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ddp_scenarios as scenarios
import pytest
from helpers import run_script

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.ddp, pytest.mark.slow]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    out = root / "ddp.json"
    run_script(scenarios.__file__, "--out", out, "--root", root / "runs", cwd=root, timeout=300)
    results = json.loads(out.read_text())
    assert {data.pop("world_size") for data in results.values()} == {2}
    return results


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert got == pytest.approx(want, abs=1e-6), path
    else:
        assert got == want, path


def test_ranks_that_meet_different_sites_equal_one_process(ddp: dict[str, Any], tmp_path: Path) -> None:
    for scenario, batches in (("skip", 3), ("one_rank", 2)):  # batches holding a flagged sample
        _, single = scenarios.run_sites(scenario, devices=1, root=str(tmp_path))
        assert set(single["attn"]) == set(single["heads"]) == set(single["histograms"]) == {"first.attn", "second.attn"}
        assert set(single["probe"]) == {"first.gate", "second.gate"}
        assert single["attn"]["first.attn"]["rows"] == [batches * scenarios.BATCH * scenarios.LENGTH] * 2
        assert_close(ddp[scenario], single, scenario)


def test_uneven_shards_over_two_loaders_equal_one_process(ddp: dict[str, Any], tmp_path: Path) -> None:
    _, single = scenarios.run_uneven(devices=1, root=str(tmp_path))
    single = json.loads(json.dumps(single, default=repr))  # the JSON round trip the DDP results made
    rows = single["attn"]["val"]["sites"]["encoder.layers.0.self_attn"]["rows_per_head"]
    assert rows == [37 * scenarios.models.EEG_LEN] * 4  # every sample once
    assert single["heads"]["val_dl1"]["rows"]["encoder.layers.0.self_attn"] == [11 * scenarios.models.EEG_LEN] * 4
    assert single["probe"]["val_dl2"]["sites"]  # the one-sample loader has results (rank 1 joined with zeros)
    assert [single["calibration"][key]["n_samples"] for key in ("val", "val_dl1", "val_dl2")] == [37, 11, 1]
    assert_close(ddp["uneven"], single, "uneven")
