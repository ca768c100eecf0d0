"""Per-site states under DDP are reduced by site name, not by order of first sight.

Two CPU ranks (``site_order_models.py`` as a subprocess script) against one process over the same samples, for
every callback that streams per-site sums, on a model that skips a block per sample: the ranks meet the sites in
different orders (``skip``), or one rank never meets a site (``one_rank``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import site_order_models as models
from helpers import run_script

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.ddp, pytest.mark.slow]


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, f"{path}[{index}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
    else:
        assert got == pytest.approx(want, abs=1e-6), path


def test_ddp_equals_one_process_when_ranks_meet_different_sites(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    run_script(models.__file__, "--out", out, "--root", tmp_path / "ddp", cwd=tmp_path, timeout=240)
    ddp = json.loads(out.read_text())
    for scenario, batches in (("skip", 3), ("one_rank", 2)):  # batches holding a flagged sample
        _, single = models.run(scenario, devices=1, root=str(tmp_path / "single"))
        assert ddp[scenario].pop("world_size") == 2
        assert set(single["attn"]) == set(single["heads"]) == set(single["histograms"]) == {"first.attn", "second.attn"}
        assert set(single["probe"]) == {"first.gate", "second.gate"}
        assert single["attn"]["first.attn"]["rows"] == [batches * models.BATCH * models.LENGTH] * 2
        assert_close(ddp[scenario], single, scenario)
