"""The recording budget: which evaluation batches the attention-reading callbacks record.

Reading attention costs more than the model's own attention kernel on long sequences (the probabilities are
recomputed beside it), so by default the callbacks record a deterministic, evenly spread subset of the batches,
sized so that recording adds at most ``overhead_budget`` (a fraction, 0.2: 20%) to the evaluation epoch. A per-head
mean over a uniform sample of batches estimates the mean over all of them; the results say how many they cover.

How many: with ``N`` batches in the epoch and ``r`` the measured cost of a recorded batch over an unrecorded one,
recording ``n`` batches adds ``(n / N) (r - 1)`` to the epoch, so ``n = floor(N * budget / (r - 1))``, never fewer
than ``min_batches`` nor, when the epoch has fewer, fewer than all. ``r`` is measured on the previous epoch of the
same Trainer (every rank's timings summed at the next epoch start, so every rank derives the same schedule); the
first epoch, with nothing measured yet, records ``min_batches``.

Which: batch ``i`` is recorded when ``(i * n) mod N < n`` (:func:`scheduled`): ``n`` batches evenly spread, batch 0
(the probe samples) always among them, a function of the batch index and of quantities agreed at epoch start only,
so that every rank records the same batch indices and DDP results equal one process recording those batches.

Cost is measured between consecutive batch starts (the step, its hooks and the next batch's loading): process CPU
time on CPU, CUDA events on a GPU (recorded asynchronously in the batch hooks, read at epoch end: no host sync in a
batch hook). The first batch of each dataloader is left out of the measurement (one-off costs: lazy
initialisation, the probe maps).

Several callbacks on one Trainer share one :class:`BudgetCoordinator`: one budget (the smallest), one
``min_batches`` (the largest) and one decision per batch.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

__all__ = [
    "DEFAULT_MIN_BATCHES",
    "DEFAULT_OVERHEAD_BUDGET",
    "BatchBudget",
    "BudgetCoordinator",
    "coverage_scalars",
    "scheduled",
]

#: The default share of the evaluation epoch that recording may add.
DEFAULT_OVERHEAD_BUDGET = 0.2

#: The default least number of batches recorded per epoch and dataloader.
DEFAULT_MIN_BATCHES = 8


def check_budget(overhead_budget: float | None, min_batches: int) -> None:
    """Raise ``ValueError`` unless ``overhead_budget`` is ``None`` or a finite number > 0 and ``min_batches >= 1``."""
    if overhead_budget is not None and (
        isinstance(overhead_budget, bool)
        or not isinstance(overhead_budget, (int, float))
        or not math.isfinite(overhead_budget)
        or overhead_budget <= 0
    ):
        raise ValueError(f"overhead_budget must be a number > 0 or None, got {overhead_budget!r}")
    if isinstance(min_batches, bool) or not isinstance(min_batches, int) or min_batches < 1:
        raise ValueError(f"min_batches must be an int >= 1, got {min_batches!r}")


def batches_to_record(num_batches: int, ratio: float | None, budget: float, min_batches: int) -> int:
    """How many of ``num_batches`` to record: ``floor(N * budget / (ratio - 1))`` within ``[min_batches, N]``;
    ``min_batches`` when ``ratio`` is unknown, all when recording costs nothing measurable.

    >>> batches_to_record(48, None, 0.2, 8), batches_to_record(48, 1.5, 0.2, 8), batches_to_record(48, 2.0, 0.2, 8)
    (8, 19, 9)
    >>> batches_to_record(5, None, 0.2, 8), batches_to_record(48, 0.9, 0.2, 8)
    (5, 48)
    """
    if ratio is None:
        count = min_batches
    elif ratio <= 1.0:
        count = num_batches
    else:
        count = math.floor(num_batches * budget / (ratio - 1.0))
    return min(num_batches, max(min_batches, count))


def scheduled(batch_idx: int, num_batches: int, count: int) -> bool:
    """Whether batch ``batch_idx`` of ``num_batches`` is one of ``count`` evenly spread recorded batches: exactly
    ``count`` indices satisfy ``(i * count) mod N < count``, batch 0 among them.

    >>> [i for i in range(10) if scheduled(i, 10, 4)]
    [0, 3, 5, 8]
    """
    return (batch_idx * count) % num_batches < count


class BudgetCoordinator:
    """The schedule shared by every budgeted callback of one Trainer (:meth:`of`): one decision per batch.

    Callbacks :meth:`join` each evaluation epoch they run in (the first join opens the epoch: a collective that
    agrees the number of batches and the previous epoch's timings over ranks), ask :meth:`records` at each batch
    start, and :meth:`leave` at its end (the first leave closes the epoch and reads its timings).
    """

    _of_trainer: ClassVar[weakref.WeakKeyDictionary[Any, BudgetCoordinator]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        #: Cost of a recorded batch over an unrecorded one, over every rank, from the last measured epoch.
        self.ratio: float | None = None
        self._open = False
        self._stage = ""
        self._budget = math.inf
        self._min_batches = 0
        self._num_batches: list[float] = []
        self._device = torch.device("cpu")
        # the batch being run: ((stage, dataloader, index), recorded, its start stamp)
        self._current: tuple[tuple[str, int, int], bool, Any] | None = None
        self._intervals: list[tuple[bool, Any, Any]] = []  # (recorded, start stamp, end stamp)
        # [recorded seconds, recorded batches, unrecorded seconds, unrecorded batches] of the last closed epoch
        self._pending = [0.0, 0.0, 0.0, 0.0]

    @classmethod
    def of(cls, trainer: pl.Trainer) -> BudgetCoordinator:
        """The coordinator of ``trainer`` (created on first use, dropped with the Trainer)."""
        coordinator = cls._of_trainer.get(trainer)
        if coordinator is None:
            coordinator = cls._of_trainer[trainer] = cls()
        return coordinator

    # -- epochs ---------------------------------------------------------------------------------
    def join(self, trainer: pl.Trainer, stage: str, budget: float, min_batches: int) -> None:
        """Take part in this evaluation epoch (at its start, on every rank)."""
        if self._open:
            self._budget = min(self._budget, budget)
            self._min_batches = max(self._min_batches, min_batches)
            return
        self._open, self._stage = True, stage
        self._budget, self._min_batches = budget, min_batches
        self._current, self._intervals = None, []
        self._device = trainer.strategy.root_device
        self._agree(trainer, stage)

    def _agree(self, trainer: pl.Trainer, stage: str) -> None:
        """Every rank's batch counts (their maximum) and last epoch's timings (their sums): one all-gather."""
        counts = trainer.num_val_batches if stage == "validate" else trainer.num_test_batches
        counts = list(counts) if isinstance(counts, (list, tuple)) else [counts]
        local = torch.tensor([*map(float, counts), *self._pending], dtype=torch.float64, device=self._device)
        gathered = trainer.strategy.all_gather(local)
        gathered = gathered.reshape(-1, local.numel()).cpu()
        self._num_batches = gathered[:, : len(counts)].amax(0).tolist()
        spent, recorded, spent_unrecorded, unrecorded = gathered[:, len(counts) :].sum(0).tolist()
        if recorded and unrecorded and spent_unrecorded > 0:
            self.ratio = (spent / recorded) / (spent_unrecorded / unrecorded)
        self._pending = [0.0, 0.0, 0.0, 0.0]

    def leave(self) -> None:
        """End of this evaluation epoch (host sync allowed): turn its timings into the sums of the next
        agreement."""
        if not self._open:
            return
        self._open = False
        self._close_interval(None)
        for recorded, start, end in self._intervals:
            seconds = start.elapsed_time(end) / 1000.0 if isinstance(start, torch.cuda.Event) else end - start
            self._pending[0 if recorded else 2] += seconds
            self._pending[1 if recorded else 3] += 1
        self._intervals, self._current = [], None

    def abort(self) -> None:
        """The loop raised: forget this epoch's timings."""
        self._open, self._intervals, self._current = False, [], None

    # -- batches --------------------------------------------------------------------------------
    def records(self, stage: str, dataloader_idx: int, batch_idx: int) -> bool:
        """Whether this batch is recorded; the same answer for every callback and rank. No host sync."""
        key = (stage, dataloader_idx, batch_idx)
        current = self._current
        if current is not None and current[0] == key:
            return current[1]
        stamp = self._stamp()
        self._close_interval(stamp)
        decision = self._decide(dataloader_idx, batch_idx)
        self._current = (key, decision, stamp)
        return decision

    def _decide(self, dataloader_idx: int, batch_idx: int) -> bool:
        if not self._open or self._budget == math.inf:
            return True
        total = self._num_batches[dataloader_idx] if dataloader_idx < len(self._num_batches) else math.inf
        if math.isfinite(total) and total > 0:
            count = batches_to_record(int(total), self.ratio, self._budget, self._min_batches)
            return scheduled(batch_idx, int(total), count)
        # unknown length (an iterable dataset): the first min_batches, then a stride within the budget
        if batch_idx < self._min_batches:
            return True
        if self.ratio is None:
            return False
        return batch_idx % max(1, math.ceil((self.ratio - 1.0) / self._budget)) == 0

    def _stamp(self) -> Any:
        if self._device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self._device))
            return event
        return time.process_time()

    def _close_interval(self, end: Any) -> None:
        """The batch that ran until ``end`` (``None``: the epoch's last, not measured) joins the measurement, unless
        it was a dataloader's first batch."""
        current = self._current
        if current is None or end is None:
            return
        (_, _, batch_idx), recorded, start = current
        if batch_idx > 0:
            self._intervals.append((recorded, start, end))


class BatchBudget:
    """One callback's share of the budget: ``overhead_budget`` (``None``: every batch its own sampling allows),
    ``min_batches``, and the count of the batches it recorded and saw (:meth:`coverage`)."""

    def __init__(self, overhead_budget: float | None, min_batches: int) -> None:
        check_budget(overhead_budget, min_batches)
        self.overhead_budget = overhead_budget
        self.min_batches = min_batches
        self._coordinator: BudgetCoordinator | None = None
        self._counts: dict[tuple[str, int], list[int]] = {}  # (stage, dataloader) -> [recorded, seen]

    def start(self, trainer: pl.Trainer, stage: str) -> None:
        """Start of an evaluation epoch the callback runs in (every rank)."""
        self._counts = {key: value for key, value in self._counts.items() if key[0] != stage}
        if self.overhead_budget is None:
            self._coordinator = None
            return
        self._coordinator = BudgetCoordinator.of(trainer)
        self._coordinator.join(trainer, stage, float(self.overhead_budget), self.min_batches)

    def records(self, stage: str, dataloader_idx: int, batch_idx: int, sampled: bool = True) -> bool:
        """Whether the callback records this batch: its own sampling (``sampled``) and the shared budget agree."""
        recorded = sampled and (
            self._coordinator is None or self._coordinator.records(stage, dataloader_idx, batch_idx)
        )
        counts = self._counts.setdefault((stage, dataloader_idx), [0, 0])
        counts[0] += int(recorded)
        counts[1] += 1
        return recorded

    def end(self) -> None:
        """End of the epoch (before its results are computed)."""
        if self._coordinator is not None:
            self._coordinator.leave()

    def abort(self) -> None:
        if self._coordinator is not None:
            self._coordinator.abort()
        self._counts = {}

    def coverage(self, trainer: pl.Trainer, stage: str, dataloaders: list[int]) -> dict[int, dict[str, int]]:
        """``{dataloader: {"batches": recorded, "batches_seen": seen}}`` summed over ranks (a collective: every rank,
        with the same ``dataloaders``)."""
        local = torch.tensor(
            [self._counts.get((stage, index), [0, 0]) for index in dataloaders],
            dtype=torch.float64,
            device=trainer.strategy.root_device,
        ).reshape(len(dataloaders), 2)
        total = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        return {
            index: {"batches": int(row[0]), "batches_seen": int(row[1])}
            for index, row in zip(dataloaders, total.cpu().tolist(), strict=True)
        }


def coverage_scalars(name: str, stage_key: str, coverage: dict[str, int]) -> dict[str, float]:
    """The logged coverage of one stage: ``<name>/<stage>/batches``, the batches recorded (over ranks). The batches
    seen are in :attr:`coverage` (and the tracker's records); one scalar keeps a 144-head model's dashboard small."""
    return {f"{name}/{stage_key}/batches": float(coverage["batches"])}
