"""One batch's share of :class:`~lightning_attn.metrics.CalibrationMetric`'s Poisson bootstrap replicates.

Every sample is weighted in each replicate by a Poisson(1) count drawn from a hash of its own scores and target
(:mod:`lightning_attn.functional.bootstrap`), so the replicate sums do not depend on the batch or the process and
reduce by ``sum`` exactly like the metric's other states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_attn.functional.bootstrap import poisson_bootstrap_weights, replicate_sums, sample_hash

__all__ = ["BootstrapSums", "bootstrap_sums"]


@dataclass(frozen=True)
class BootstrapSums:
    """Weighted sums of one batch in each of ``R`` replicates (float64).

    Attributes:
        count: ``[R, n_bins]`` weighted samples per reliability bin.
        conf: ``[R, n_bins]`` weighted confidence sums per bin.
        hits: ``[R, n_bins]`` weighted hits per bin.
        correct: ``[R]`` weighted correct predictions.
        brier: ``[R]`` weighted Brier scores.
    """

    count: Tensor
    conf: Tensor
    hits: Tensor
    correct: Tensor
    brier: Tensor


def bootstrap_sums(
    x: Tensor,
    t: Tensor,
    index: Tensor,
    valid: Tensor | None,
    value64: Tensor,
    hits: Tensor,
    correct: Tensor,
    brier: Tensor,
    *,
    n_bins: int,
    replicates: int,
) -> BootstrapSums:
    """The replicate sums of a batch.

    Args:
        x: the scores (hashed with ``t`` into each sample's weights).
        t: the targets.
        index: per sample, the reliability bin (1.0 -> ``n_bins``, folded into the last bin here).
        valid: per sample, whether it counts (``None``: all do).
        value64: per sample, the binned float64 value (confidence, or ``P(y = 1)`` for binary).
        hits: per sample, whether it is a hit of its bin.
        correct: per sample, whether the top-label prediction is right.
        brier: per sample, the Brier score (0 for invalid samples).
        n_bins: reliability bins.
        replicates: number of replicates ``R``.
    """
    pair = index.clamp_max(n_bins - 1) * 2 + hits  # count and hits from one histogram of (bin, hit) pairs
    if valid is not None:
        pair = torch.where(valid, pair, 2 * n_bins)  # dropped by replicate_sums
    weights = poisson_bootstrap_weights(sample_hash(x, t), replicates).double()
    pairs = replicate_sums(weights, pair, 2 * n_bins).view(replicates, n_bins, 2)
    return BootstrapSums(
        count=pairs.sum(-1),
        conf=replicate_sums(weights, pair // 2, n_bins, value64),
        hits=pairs[..., 1],
        correct=correct.double() @ weights,
        brier=brier @ weights,
    )
