"""The probe samples' inputs: the first samples of a batch, and a fingerprint that tells whether they changed
between epochs (a shuffled dataloader draws other probe samples each epoch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["ProbeInputs", "batch_fingerprint", "slice_batch"]


def slice_batch(batch: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor of a batch (detached clones on the same device: no sync);
    mappings stay mappings, tuples and lists become lists, anything else ``None``."""
    if isinstance(batch, Tensor):
        return batch[:count].detach().clone() if batch.dim() else batch.detach().clone()
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, count) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [slice_batch(v, count) for v in batch]
    return None


def batch_fingerprint(sliced: Any) -> list[list[float]]:
    """Per tensor of a :func:`slice_batch` result: its shape, sum, absolute sum and position-weighted sum (a host
    sync: epoch end only). JSON-ready, for checkpoints."""
    out: list[list[float]] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            data = value.detach().to("cpu", torch.float64)
            positions = torch.arange(1, data.numel() + 1, dtype=torch.float64)
            weighted = float((data * positions.view_as(data)).sum()) if data.numel() else 0.0
            out.append([float(d) for d in value.shape] + [float(data.sum()), float(data.abs().sum()), weighted])
        elif isinstance(value, Mapping):
            for k in sorted(value, key=str):
                visit(value[k])
        elif isinstance(value, list):
            for v in value:
                visit(v)

    visit(sliced)
    return out


class ProbeInputs:
    """The probe samples' inputs of the running epoch, and per stage the fingerprint of the last epoch's (kept in
    checkpoints), to tell when the probe samples change.

    Args:
        count: number of probe samples (the first samples of the probe batch).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.batch: Any = None
        self.fingerprints: dict[str, list[list[float]]] = {}

    def keep(self, batch: Any) -> None:
        """Keep the first samples of ``batch`` (no host sync)."""
        self.batch = slice_batch(batch, self.count)

    def changed(self, stage: str) -> bool:
        """Whether the kept inputs differ from the last ones of ``stage`` (a host sync); they become the last ones and
        are let go. ``False`` when nothing was kept."""
        if self.batch is None:
            return False
        fingerprint = batch_fingerprint(self.batch)
        self.batch = None
        previous = self.fingerprints.get(stage)
        self.fingerprints[stage] = fingerprint
        return previous is not None and fingerprint != previous
