r"""A streamed, distributed Poisson bootstrap: per-sample weights from a hash of the sample itself.

The Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012) weights every sample by an
independent :math:`w_{ir} \sim \mathrm{Poisson}(1)` in each replicate :math:`r` instead of drawing
:math:`N` samples with replacement, so a replicate's statistic is a weighted sum that can be
accumulated batch by batch without knowing :math:`N`. Drawing the weights from a hash of the
sample's own values (not from a random generator) makes them independent of the batch order and
of which process sees the sample, so replicate sums reduced across DDP processes equal those of
one process.

References:
    - J. A. Hanley, B. MacGibbon. *Creating non-parametric bootstrap samples using Poisson frequencies*.
      Computer Methods and Programs in Biomedicine 2006.
    - N. Chamandy, O. Muralidharan, A. Najmi, S. Naidu. *Estimating Uncertainty for Massive Data Streams*.
      Google technical report 2012.
    - B. Efron, R. Tibshirani. *An Introduction to the Bootstrap*. Chapman & Hall 1993 (percentile interval).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["percentile_interval", "poisson_bootstrap_weights", "replicate_sums", "sample_hash"]

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """In place, a 32-bit integer hash (C. Wellons' ``lowbias32`` constants) on int64 values in
    ``[0, 2^32)``: every product stays below ``2^63``, so the result is exact on every device."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


def sample_hash(scores: Tensor, target: Tensor) -> Tensor:
    """A 32-bit hash (``int64`` in ``[0, 2^32)``) of each sample's scores (their float32 bits) and target.

    ``scores`` ``[N, ...]``, ``target`` ``[N]``. Integer arithmetic only, so the value depends on the
    sample alone, not on the batch, the device or the order of a sum: the same sample hashes the
    same on every rank. Samples with bit-identical scores and target hash the same.

    Example:
        >>> a = sample_hash(torch.tensor([[0.5, 1.5], [2.0, -1.0]]), torch.tensor([0, 1]))
        >>> b = sample_hash(torch.tensor([[2.0, -1.0]]), torch.tensor([1]))
        >>> bool(a[1] == b[0]), bool(a[0] != a[1])
        (True, True)
    """
    n = scores.shape[0]
    bits = scores.detach().float().reshape(n, -1).contiguous().view(torch.int32).long()
    columns = torch.cat([bits, target.detach().long().reshape(n, 1)], 1) & _MASK32
    columns += torch.arange(columns.shape[1], device=columns.device) * 0x9E3779B9  # position matters
    columns &= _MASK32
    return _mix32(_mix32(columns).sum(1) & _MASK32)


@functools.lru_cache(maxsize=8)
def _poisson_thresholds(device: torch.device) -> Tensor:
    """``floor(2^32 F(k))`` for the Poisson(1) CDF ``F``, k = 0, 1, ... while below ``2^32``; one copy per
    device (made once: no host-to-device copy per batch)."""
    thresholds, cdf, term, k = [], 0.0, math.exp(-1.0), 0
    while True:
        cdf += term
        value = math.floor(cdf * 2**32)
        if value >= 2**32:
            break
        thresholds.append(value)
        k += 1
        term /= k
    with torch.inference_mode(False):  # usable outside evaluation too
        return torch.tensor(thresholds, dtype=torch.long, device=device)


def poisson_bootstrap_weights(sample_hash: Tensor, replicates: int) -> Tensor:
    r"""Poisson(1) bootstrap weights ``[N, replicates]`` (``int64``), a deterministic function of each
    sample's hash and the replicate index.

    The Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012, "Estimating uncertainty for
    massive data streams") weights every sample by an independent :math:`w_{ir} \sim \mathrm{Poisson}(1)`
    instead of drawing :math:`N` samples with replacement: the replicates need no knowledge of
    :math:`N`, so they stream, and each replicate's statistics are weighted sums. Here
    :math:`w_{ir} = F^{-1}(u_{ir})` with :math:`u_{ir} = \mathrm{hash}(h_i + r \phi) / 2^{32}`
    (inverse CDF, exact to ``2^-32``), so the weights depend on the sample, not on where or when it
    is seen: sum-reduced replicate histograms are the same in DDP as in one process.

    Example:
        >>> w = poisson_bootstrap_weights(torch.arange(20000), 3)
        >>> w.shape, round(w.double().mean().item(), 1), round(w.double().var().item(), 1)
        (torch.Size([20000, 3]), 1.0, 1.0)
    """
    salt = (torch.arange(1, replicates + 1, device=sample_hash.device, dtype=torch.long) * 0x9E3779B9) & _MASK32
    uniform = _mix32(sample_hash.reshape(-1, 1) + salt)  # below 2^33: _mix32's first product stays below 2^63
    return torch.bucketize(uniform, _poisson_thresholds(uniform.device), right=True)


def percentile_interval(replicates: Tensor, level: float = 0.95) -> tuple[Tensor, Tensor]:
    r"""Percentile bootstrap interval (Efron & Tibshirani 1993): the :math:`(1 - \ell)/2` and
    :math:`(1 + \ell)/2` quantiles over the last dimension (linear interpolation, NaN replicates
    left out).

    Example:
        >>> low, high = percentile_interval(torch.arange(101.0), 0.9)
        >>> float(low), float(high)
        (5.0, 95.0)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=replicates.dtype, device=replicates.device)
    low, high = torch.nanquantile(replicates, q, dim=-1)
    return low, high


def replicate_sums(weights: Tensor, index: Tensor, size: int, values: Tensor | None = None) -> Tensor:
    r"""Weighted histograms of every replicate, ``[R, size]`` float64:
    :math:`S_{rj} = \sum_i w_{ir} v_i 1[\mathrm{index}_i = j]` (``v = 1`` without ``values``).

    ``weights`` ``[N, R]``; an ``index`` equal to ``size`` drops the sample (invalid samples).
    One ``index_add_`` with static shapes (no host synchronisation).

    Example:
        >>> w = torch.tensor([[1, 0], [2, 1], [1, 1]])
        >>> replicate_sums(w, torch.tensor([0, 1, 2]), 2, torch.tensor([0.5, 0.25, 9.0]))
        tensor([[0.5000, 0.5000],
                [0.0000, 0.2500]], dtype=torch.float64)
    """
    weights = weights.double()
    if values is not None:
        weights = weights * values.double().unsqueeze(1)
    sums = weights.new_zeros(size + 1, weights.shape[1]).index_add_(0, index, weights)
    return sums[:size].T
