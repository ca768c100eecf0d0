"""Fixtures shared by the tests (helpers that are not fixtures live in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread (parallel regions only add waiting on a busy 2-core machine).

    Modules of tiny-model tests use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
