"""The CPU fast path of :class:`~lightning_attn.metrics.CalibrationMetric`'s multiclass update: one batch's sums.

On the CPU a data-dependent shape costs no device synchronisation, so the batch's sums are taken from only the
class probabilities of at least ``1/classwise_bins`` (at most ``classwise_bins`` per row, since a row sums to 1), on
NumPy views of the tensors: at these sizes torch's per-operator dispatch would cost more than the arithmetic. The
sums equal those of the metric's static-shape path; the metric adds them to its states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["SparseBatchSums", "equal_width_index", "sparse_multiclass_sums"]


@dataclass(frozen=True)
class SparseBatchSums:
    """One batch's additions to the metric's states, and the per-sample values its bootstrap replicates weight.

    Attributes:
        n_correct: correct top-label predictions.
        conf_sum: sum of the top-label confidences.
        conf_correct_sum: sum of the confidences of the correct predictions.
        bins: count, confidence sum and hit count of the ``n_bins + 1`` reliability bins.
        fine: the same three sums over the ``fine_bins + 1`` fine bins.
        class_count: ``[K, classwise_bins + 1]`` samples per class bin.
        class_conf: ``[K, classwise_bins + 1]`` probability sums per class bin.
        class_hits: ``[K, classwise_bins + 1]`` samples of that label per class bin.
        brier_sum: sum of the Brier scores.
        nll_sum: sum of the negative log-likelihoods.
        bin_index: per sample, the reliability bin (1.0 -> ``n_bins``).
        confidence: per sample, the float64 top-label confidence.
        correct: per sample, whether the prediction is right.
        brier: per sample, the float64 Brier score.
    """

    n_correct: int
    conf_sum: float
    conf_correct_sum: float
    bins: tuple[Tensor, Tensor, Tensor]
    fine: tuple[Tensor, Tensor, Tensor]
    class_count: Tensor
    class_conf: Tensor
    class_hits: Tensor
    brier_sum: float
    nll_sum: float
    bin_index: Tensor
    confidence: Tensor
    correct: Tensor
    brier: Tensor


def equal_width_index(values: np.ndarray, padded_edges: np.ndarray, n_bins: int) -> np.ndarray:
    """``bucketize(values, edges, right=True) - 1`` (torchmetrics' boundaries, 1.0 -> ``n_bins``) for values in
    ``[0, 1]``: the floor of ``value * n_bins``, moved by one where rounding put it across an edge (``bucketize``
    itself costs several times more). ``padded_edges``: the ``n_bins + 1`` edges in the values' precision, then
    ``+inf`` so that ``index + 1`` stays in range.

    >>> edges = np.array([0.0, 0.5, 1.0, np.inf], dtype=np.float32)
    >>> equal_width_index(np.array([0.0, 0.49, 0.5, 1.0], dtype=np.float32), edges, 2).tolist()
    [0, 0, 1, 2]
    """
    index = (values * n_bins).astype(np.int64)
    index -= values < padded_edges[index]
    index += values >= padded_edges[index + 1]
    return index


def sparse_multiclass_sums(
    x: Tensor,
    probs: Tensor,
    t: Tensor,
    conf: Tensor,
    *,
    padded_edges: np.ndarray,
    n_bins: int,
    fine_bins: int,
    classwise_bins: int,
    logits: bool,
) -> SparseBatchSums:
    """The sums of a batch whose rows are all valid, CPU tensors.

    Classwise bins from the entries ``p >= 1/classwise_bins``; everything below is bin 0, whose sums are the column
    sums minus the selected entries. The prediction comes from the same entries.

    Args:
        x: ``[N, K]`` scores as given (logits when ``logits``).
        probs: ``[N, K]`` contiguous class probabilities.
        t: ``[N]`` int64 targets in ``[0, K)``.
        conf: ``[N]`` row maxima of ``probs``.
        padded_edges: the reliability edges in ``conf``'s precision, then ``+inf`` (:func:`equal_width_index`).
        n_bins: reliability bins.
        fine_bins: fine bins.
        classwise_bins: bins per class.
        logits: whether ``x`` holds logits (the NLL is then read from them) or probabilities.
    """
    n, k = probs.shape
    bc, b, fb = classwise_bins, n_bins, fine_bins
    stride = bc + 1
    p = probs.numpy()
    p_max = conf.numpy()
    target = t.numpy()
    threshold = p.dtype.type((1.0 / bc) * (1 - 1e-6))  # a little below 1/bc: the exact bin is recomputed below
    pos = np.flatnonzero(p.reshape(-1) >= threshold)
    rows, cols = np.divmod(pos, k)
    vals = p.reshape(-1)[pos]

    # prediction: the first column holding the row maximum, as ``max(1)``; pos is row-major sorted
    at_max = np.flatnonzero(vals == p_max[rows])
    max_rows, max_cols = rows.take(at_max), cols.take(at_max)
    first = np.ones(max_rows.shape[0], dtype=bool)
    np.not_equal(max_rows[1:], max_rows[:-1], out=first[1:])
    pred = np.full(n, -1, dtype=np.int64)
    pred[max_rows[first]] = max_cols[first]
    missing = pred < 0  # rows whose maximum is below the threshold (near-uniform rows)
    if missing.any():
        pred[missing] = p[missing].argmax(1)
    row_start = np.arange(0, n * k, k)
    correct = pred == target
    conf64 = p_max.astype(np.float64)
    p_y64 = p.reshape(-1).take(row_start + target).astype(np.float64)

    # top label: equal-width bins with torchmetrics' boundaries (1.0 -> index b), fine bins by exact floor
    bin_index = equal_width_index(p_max, padded_edges, b)
    fine_index = (conf64 * fb).astype(np.int64)

    def histogram(index: np.ndarray, size: int) -> tuple[Tensor, Tensor, Tensor]:
        counts = np.bincount(index, minlength=size)
        weights = np.bincount(index, weights=conf64, minlength=size)
        hit_counts = np.bincount(index[correct], minlength=size)
        return torch.from_numpy(counts), torch.from_numpy(weights), torch.from_numpy(hit_counts)

    # classwise: selected entries binned exactly, the rest of each column in bin 0
    size = k * stride
    class_index = cols * stride + (vals.astype(np.float64) * bc).astype(np.int64)
    count = np.bincount(class_index, minlength=size).reshape(k, stride)
    conf_sum = np.bincount(class_index, weights=vals, minlength=size).reshape(k, stride)
    count[:, 0] += n - count.sum(1)
    conf_sum[:, 0] += probs.sum(0).double().numpy() - conf_sum.sum(1)  # torch's column sums: cascaded, ~1e-7
    hits = np.bincount(target * stride + (p_y64 * bc).astype(np.int64), minlength=size).reshape(k, stride)

    sum_sq_rows = torch.linalg.vector_norm(probs, dim=1).double().square()
    sum_sq = sum_sq_rows.sum().item()
    if logits:
        # log p_y = z_y - logsumexp(z) and logsumexp(z) = z_pred - log p_pred: no second pass over [N, K]
        z = x.numpy().reshape(-1)
        nll = float((z.take(row_start + pred).astype(np.float64) - z.take(row_start + target) - np.log(conf64)).sum())
    else:
        nll = float(-np.log(np.maximum(p_y64, 1e-12)).sum())

    return SparseBatchSums(
        n_correct=int(correct.sum()),
        conf_sum=float(conf64.sum()),
        conf_correct_sum=float(conf64[correct].sum()),
        bins=histogram(bin_index, b + 1),
        fine=histogram(fine_index, fb + 1),
        class_count=torch.from_numpy(count),
        class_conf=torch.from_numpy(conf_sum),
        class_hits=torch.from_numpy(hits),
        brier_sum=sum_sq - 2 * float(p_y64.sum()) + n,
        nll_sum=nll,
        bin_index=torch.from_numpy(bin_index),
        confidence=torch.from_numpy(conf64),
        correct=torch.from_numpy(correct),
        brier=sum_sq_rows - 2 * torch.from_numpy(p_y64) + 1,
    )
