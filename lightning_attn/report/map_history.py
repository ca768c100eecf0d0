"""The probe samples' attention maps of a report's earlier epochs, for the epoch slider of its explorer.

A validation report evaluates the same probe samples every epoch (the first ones of dataloader 0), so the maps of each
finished report are kept by stage key and epoch, and the next report of that key shows them beside its own
(:func:`~lightning_attn.report.page_data.probe_explorer`), like the standalone explorer's ``maps[epoch]``
(:func:`~lightning_attn.report.explorer.explorer_data`).
"""

from __future__ import annotations

import numpy as np

from lightning_attn.report.run import MAX_PROBE_MAP_VALUES, ReportRun

__all__ = ["EpochMaps", "ProbeMapHistory"]

#: ``maps[epoch][sample][site]``: the ``[heads, queries, keys]`` maps of the probe samples by epoch.
EpochMaps = dict[int, dict[int, dict[str, np.ndarray]]]


class ProbeMapHistory:
    """The probe maps of finished reports by stage key and epoch, at most ``budget`` weights per key.

    Over the budget, every other epoch between the first and the latest is dropped (again until it fits), so the kept
    epochs stay spread over training; the first goes only when two epochs alone exceed it.

    Args:
        budget: weights kept per stage key, over all its epochs.
    """

    def __init__(self, budget: int = MAX_PROBE_MAP_VALUES) -> None:
        self.budget = budget
        self._maps: dict[str, EpochMaps] = {}

    def earlier(self, key: str, epoch: int) -> EpochMaps:
        """The kept maps of stage ``key`` from epochs before ``epoch``."""
        return {e: maps for e, maps in self._maps.get(key, {}).items() if e < epoch}

    def add(self, run: ReportRun) -> None:
        """Keep the probe maps of a finished report (nothing when it kept none)."""
        maps = {sample: sites for sample, sites in run.probe_maps.items() if sites}
        if not maps:
            return
        epochs = self._maps.setdefault(run.key, {})
        epochs[run.epoch] = maps
        while _size(epochs) > self.budget and len(epochs) > 1:
            order = sorted(epochs)
            for epoch in order[1:-1:2] or order[:1]:
                del epochs[epoch]

    def clear(self) -> None:
        """Forget every kept map (another model)."""
        self._maps = {}


def _size(epochs: EpochMaps) -> int:
    return sum(array.size for maps in epochs.values() for sites in maps.values() for array in sites.values())
