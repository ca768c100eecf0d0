"""A bounded uniform sample of an epoch's logits (for temperature scaling), merged exactly under DDP."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LogitReservoir", "reservoir_input"]


class LogitReservoir:
    """A uniform sample without replacement of at most ``size`` (logits, target) pairs of an epoch.

    Bottom-k sampling: every valid sample gets a random key in ``[0, 1)`` (from a private generator,
    so the global RNG stream and hence training are untouched) and the ``size`` samples with the
    smallest keys are kept: a uniform sample over the epoch, whatever the batch order. A batch is
    merged without synchronisation and with static shapes: its smallest ``m = min(batch, size)``
    keys, ascending, are paired with the reservoir's ``m`` largest, descending, and each pair
    swaps where the batch key is smaller (exactly the bottom-``size`` of the union). Under DDP the
    bottom-``size`` of the gathered reservoirs is a uniform sample of the global epoch
    (:meth:`merge`). Memory: ``size x K`` float32 logits plus ``size`` keys and targets.

    Args:
        size: the most samples kept.
        seed: seed of the private generator (add the global rank under DDP).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size = size
        self.seed = seed
        self.keys: Tensor | None = None
        self.logits: Tensor | None = None
        self.target: Tensor | None = None
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        self.keys = self.logits = self.target = None

    def _allocate(self, like: Tensor) -> None:
        device = like.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        self.keys = torch.full((self.size,), float("inf"), device=device)
        self.logits = torch.zeros((self.size, *like.shape[1:]), dtype=torch.float32, device=device)
        self.target = torch.zeros(self.size, dtype=torch.long, device=device)

    def contents(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, logits and targets of every slot (unfilled slots have an infinite key, which :meth:`merge` drops);
        allocated for logits shaped like ``like`` when nothing was offered yet, so that a rank that saw no batch
        still joins a gather with tensors of the others' shapes."""
        if self.keys is None:
            self._allocate(like)
        assert self.keys is not None and self.logits is not None and self.target is not None
        return self.keys, self.logits, self.target

    def update(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> None:
        """Offer a batch: ``logits [n, K]`` (or ``[n]`` binary), ``target [n]``, ``valid [n]`` (others never enter)."""
        if logits.shape[0] == 0:
            return
        if self.keys is None or self.logits is None or self.logits.shape[1:] != logits.shape[1:]:
            self._allocate(logits)
        assert self.keys is not None and self.logits is not None and self.target is not None
        keys = torch.rand(logits.shape[0], device=logits.device, generator=self._generator)
        if valid is not None:
            keys = torch.where(valid, keys, float("inf"))
        m = min(logits.shape[0], self.size)
        new_keys, order = torch.topk(keys, m, largest=False, sorted=True)
        old_keys, slots = torch.topk(self.keys, m, largest=True, sorted=True)
        swap = new_keys < old_keys
        shape = (m,) + (1,) * (logits.ndim - 1)
        self.keys[slots] = torch.where(swap, new_keys, old_keys)
        self.logits[slots] = torch.where(swap.view(shape), logits[order].float(), self.logits[slots])
        self.target[slots] = torch.where(swap, target[order].long(), self.target[slots])

    def sample(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, target, keys)`` of the filled slots (synchronises: call at epoch end)."""
        if self.keys is None or self.logits is None or self.target is None:
            empty = torch.zeros(0)
            return empty, empty.long(), empty
        keep = torch.isfinite(self.keys)
        return self.logits[keep], self.target[keep], self.keys[keep]

    @staticmethod
    def merge(keys: Tensor, logits: Tensor, target: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Bottom-``size`` by key of gathered reservoirs (``keys [R]``, ``logits [R, ...]``); infinite keys dropped."""
        keep = torch.isfinite(keys)
        keys, logits, target = keys[keep], logits[keep], target[keep]
        if keys.numel() > size:
            idx = torch.topk(keys, size, largest=False, sorted=True).indices
            logits, target = logits[idx], target[idx]
        return logits, target


def reservoir_input(
    scores: Tensor, target: Tensor, *, binary: bool, num_classes: int, probs: bool, ignore_index: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, target, valid)`` for :meth:`LogitReservoir.update` from a flattened batch (``scores [N, K]``, or
    ``[N]`` binary; ``target [N]``): probabilities (``probs``) become log-probabilities (log-odds for ``binary``),
    which stand in for logits; samples with non-finite scores, an ``ignore_index`` target or a target outside the
    classes are not valid, and their target is set to 0.

    >>> logits, target, valid = reservoir_input(
    ...     torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([1, 0]),
    ...     binary=False, num_classes=2, probs=False, ignore_index=None)
    >>> valid.tolist(), target.tolist()
    ([True, False], [1, 0])
    """
    x = scores
    if probs:
        x = x.clamp(1e-12, 1.0)
        x = x.log() - torch.log1p(-x.clamp_max(1 - 1e-7)) if binary else x.log()
    row_max = x if x.ndim == 1 else x.amax(1)
    valid = torch.isfinite(row_max)
    if ignore_index is not None:
        valid &= target != ignore_index
    if target.is_floating_point():
        valid &= (target == 0) | (target == 1)
    else:
        valid &= (target >= 0) & (target < num_classes)
    return x, torch.where(valid, target.long(), 0), valid
