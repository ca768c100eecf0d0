"""The shared metric tester (``metric_tester.py``) applied to every Metric class of :mod:`lightning_attn.metrics`."""

from __future__ import annotations

from pathlib import Path

import metric_tester as tester
import pytest
import torch
from helpers import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(tester.CASES)


def test_every_metric_class_has_a_case() -> None:
    found = {cls.__name__ for cls in tester.metric_classes()}
    assert found, "no Metric class found"
    assert found == set(tester.CASES), f"write a Case in tests/metric_tester.py for {sorted(found - set(tester.CASES))}"


@pytest.mark.parametrize("name", NAMES)
def test_one_batch_equals_many(name: str) -> None:
    data = tester.dataset(name)
    one = tester.computed(name, [data])
    many = tester.computed(name, tester.split(data, 5))
    assert one and set(one) == set(many)
    tester.assert_close(many, one)


@pytest.mark.parametrize("name", NAMES)
def test_state_size_is_constant(name: str) -> None:
    at_10, at_1000 = tester.sizes_after(name, (10, 1000))
    assert at_10 == at_1000 > 0


@pytest.mark.parametrize("name", [n for n in NAMES if tester.CASES[n].reference is not None])
def test_float64_reference(name: str) -> None:
    data = tester.dataset(name)
    reference = tester.CASES[name].reference
    assert reference is not None
    tester.assert_close(
        tester.computed(name, tester.split(data, 3)), tester.flatten(reference(data)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.ddp
def test_ddp_two_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    run_script(tester.__file__, "--out", out, cwd=tmp_path)
    ddp = torch.load(out)
    assert set(ddp) == set(NAMES)
    for name in NAMES:
        tester.assert_close(ddp[name], tester.computed(name, [tester.dataset(name)]))
