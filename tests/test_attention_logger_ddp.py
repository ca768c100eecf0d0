"""AttentionLogger under DDP: 2 CPU ranks give the statistics of 1 process on the same (evenly split) data.

DDP runs as a subprocess script (``attention_logger_models.py``, through :func:`helpers.run_ddp_script`).
"""

from __future__ import annotations

from pathlib import Path

import attention_logger_models as models
import numpy as np
import pytest
from helpers import run_ddp_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.ddp
def test_ddp_two_ranks_equal_single_process(tmp_path: Path) -> None:
    ddp = run_ddp_script(models.__file__, tmp_path)
    single = models.run(devices=1, root=str(tmp_path / "single"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["sites"] == single["sites"]
    for field in ("mean", "std"):
        for name, values in single[field].items():
            np.testing.assert_allclose(
                np.array(ddp[field][name], dtype=float),
                np.array(values, dtype=float),
                atol=1e-6,
                err_msg=f"{field} {name}",
            )
    np.testing.assert_array_equal(ddp["rows"], single["rows"])
    assert ddp["agreement"].keys() == single["agreement"].keys()
    for pair, value in single["agreement"].items():
        assert ddp["agreement"][pair] == pytest.approx(value, abs=1e-6)
    for site in single["sites"]:
        for field in ("top_attended", "top_attending"):
            got, want = ddp[field][site], single[field][site]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-6)
    # figures and files from rank zero only, once
    pngs = list((tmp_path / "ddp" / "lightning_attn_logs").glob("version_*/attn/val/head_statistics_epoch0_step0.png"))
    assert len(pngs) == 1
