r"""Calibration measures as pure functions of constant-size bin sums (smooth ECE:
:mod:`lightning_attn.functional.smooth_calibration`).

Everything a calibration report needs can be computed from *sums* over samples, so a streaming
metric (:class:`lightning_attn.metrics.CalibrationMetric`) keeps only those sums, whose size does
not depend on the number of samples, and the functions here turn them into numbers.

Notation: :math:`N` valid samples, :math:`K` classes, probabilities :math:`p_{ik}`, top-label
confidence :math:`c_i = \max_k p_{ik}`, prediction :math:`\hat y_i = \arg\max_k p_{ik}`, bins
:math:`B_m`. For one histogram the sums per bin are ``count`` :math:`n_m = |B_m|`, ``conf_sum``
:math:`\sum_{i \in B_m} c_i` and ``hit_sum`` :math:`\sum_{i \in B_m} 1[\text{hit}_i]`, so that
:math:`\mathrm{acc}(B_m) = \text{hit\_sum}_m / n_m` and :math:`\mathrm{conf}(B_m) = \text{conf\_sum}_m / n_m`.

Binning convention (``equal-width``): ``n_bins`` bins of width ``1/n_bins`` on ``[0, 1]``,
``[m/n, (m+1)/n)``, the last one closed: a confidence of exactly ``1.0`` belongs to the last bin.
The histograms carry one extra trailing entry that holds the values equal to ``1.0`` exactly,
which :func:`fold_last_bin` merges into the last bin before anything is computed. torchmetrics
(1.9) keeps that entry as a hidden extra bin instead (torchmetrics issue 3510); on data without
confidences of exactly ``1.0`` both agree (see :func:`calibration_error`).

References:
    - C. Guo, G. Pleiss, Y. Sun, K. Q. Weinberger. *On Calibration of Modern Neural Networks*. ICML 2017
      (ECE, MCE, reliability diagrams, temperature scaling).
    - J. Nixon, M. Dusenberry, L. Zhang, G. Jerfel, D. Tran. *Measuring Calibration in Deep Learning*.
      CVPR Workshops 2019 (adaptive / equal-mass ECE, static calibration error SCE = classwise ECE).
    - A. Kumar, P. Liang, T. Ma. *Verified Uncertainty Calibration*. NeurIPS 2019 (L2 / RMS calibration
      error and its debiased estimate).
    - G. W. Brier. *Verification of forecasts expressed in terms of probability*. Monthly Weather Review 1950.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_attn.functional.bootstrap import percentile_interval

__all__ = [
    "adaptive_calibration_error",
    "apply_temperature",
    "bin_statistics",
    "bootstrap_intervals",
    "brier_score",
    "calibration_error",
    "classwise_calibration_error",
    "confidence_histogram",
    "debiased_calibration_error",
    "equal_mass_bins",
    "equal_width_bin_index",
    "equal_width_edges",
    "fit_temperature",
    "fold_last_bin",
    "negative_log_likelihood",
    "temperature_nll",
]

Norm = Literal["l1", "l2", "max"]
Task = Literal["binary", "multiclass"]


# ---------------------------------------------------------------------------------------------
# binning
# ---------------------------------------------------------------------------------------------
def equal_width_edges(
    n_bins: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """``n_bins + 1`` equally spaced edges on ``[0, 1]`` (``torch.linspace(0, 1, n_bins + 1)``).

    Edge ``m`` is ``m / n_bins``: the equal-width bins of Guo et al. 2017's ECE and reliability diagrams.

    Example:
        >>> equal_width_edges(4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000], dtype=torch.float64)
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=dtype, device=device)


def equal_width_bin_index(values: Tensor, n_bins: int, edges: Tensor | None = None) -> Tensor:
    """Bin of each value in ``[0, 1]`` for ``n_bins`` equal-width bins, as ``int64``.

    ``bucketize(values, linspace(0, 1, n_bins + 1), right=True) - 1``, the boundaries torchmetrics
    uses, so a value on an edge goes to the bin above it. A value of exactly ``1.0`` gets index
    ``n_bins`` (the extra trailing entry, merged into bin ``n_bins - 1`` by :func:`fold_last_bin`).
    Values must lie in ``[0, 1]``. Equal-width binning of Guo et al. 2017: ``floor(v * n_bins)`` up to rounding.

    Example:
        >>> equal_width_bin_index(torch.tensor([0.0, 0.25, 0.6, 1.0]), 4)  # 0.25: bin above; 1.0: extra entry
        tensor([0, 1, 2, 4])
    """
    if edges is None:
        edges = equal_width_edges(n_bins, dtype=values.dtype, device=values.device)
    return torch.bucketize(values, edges, right=True) - 1


def fold_last_bin(x: Tensor) -> Tensor:
    """Merge the trailing "exactly 1.0" entry of a histogram (last dim ``n_bins + 1``) into the last bin.

    ``folded_m = x_m`` for ``m < n_bins - 1`` and ``folded_{n_bins - 1} = x_{n_bins - 1} + x_{n_bins}``: the last
    bin closed at 1 as in Guo et al. 2017 (torchmetrics keeps the extra entry, torchmetrics issue 3510).

    Example:
        >>> fold_last_bin(torch.tensor([3, 1, 2]))
        tensor([3, 3])
    """
    folded = x[..., :-1].clone()
    folded[..., -1] += x[..., -1]
    return folded


def bin_statistics(count: Tensor, conf_sum: Tensor, hit_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin accuracy, mean confidence and proportion of samples (float64).

    Empty bins get ``NaN`` accuracy and confidence (they are left out of every error) and
    proportion 0. With no samples at all the proportions are ``NaN`` too.

    ``acc(B_m) = hit_sum_m / n_m``, ``conf(B_m) = conf_sum_m / n_m``, ``proportion_m = n_m / N``: the points of
    a reliability diagram (Guo et al. 2017).

    Example:
        >>> count, conf, hits = torch.tensor([2, 0]), torch.tensor([1.5, 0.0]), torch.tensor([1, 0])
        >>> accuracy, confidence, proportion = bin_statistics(count, conf, hits)
        >>> accuracy.tolist(), confidence.tolist(), proportion.tolist()  # bin 1 is empty
        ([0.5, nan], [0.75, nan], [1.0, 0.0])
    """
    count = count.double()
    total = count.sum(-1, keepdim=True)
    nonempty = count > 0
    safe = count.clamp_min(1)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=count.device)
    accuracy = torch.where(nonempty, hit_sum.double() / safe, nan)
    confidence = torch.where(nonempty, conf_sum.double() / safe, nan)
    proportion = count / total
    return accuracy, confidence, proportion


def calibration_error(count: Tensor, conf_sum: Tensor, hit_sum: Tensor, norm: Norm = "l1") -> Tensor:
    r"""Calibration error of one histogram (folded: ``n_bins`` entries), float64 scalar.

    .. math::
        \mathrm{ECE} = \sum_m \frac{n_m}{N} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)|
                     = \frac{1}{N} \sum_m |\text{hit\_sum}_m - \text{conf\_sum}_m| \quad (\text{l1, Guo et al. 2017})

        \mathrm{MCE} = \max_{m: n_m > 0} |\mathrm{acc}(B_m) - \mathrm{conf}(B_m)| \quad (\text{max})

        \mathrm{RMSCE} = \sqrt{\sum_m \frac{n_m}{N} (\mathrm{acc}(B_m) - \mathrm{conf}(B_m))^2} \quad (\text{l2,
        Kumar et al. 2019})

    Equal to torchmetrics ``BinaryCalibrationError`` / ``MulticlassCalibrationError`` with the same
    ``n_bins`` and ``norm`` when no confidence equals ``1.0`` exactly; torchmetrics puts such
    samples in a hidden extra bin with accuracy compared against confidence 1.0 on their own,
    here they share the last bin. ``NaN`` when there are no samples. Leading dimensions are
    independent histograms (e.g. ``[R, n_bins]`` bootstrap replicates give ``[R]`` errors).

    Example:
        >>> count, conf, hits = torch.tensor([10, 30]), torch.tensor([3.0, 27.0]), torch.tensor([5, 24])
        >>> # acc (0.5, 0.8), conf (0.3, 0.9): gaps 0.2 and 0.1, bin weights 1/4 and 3/4
        >>> [round(float(calibration_error(count, conf, hits, norm)), 4) for norm in ("l1", "l2", "max")]
        [0.125, 0.1323, 0.2]
    """
    count = count.double()
    total = count.sum(-1)
    if norm == "l1":
        return (hit_sum.double() - conf_sum.double()).abs().sum(-1) / total
    accuracy, confidence, proportion = bin_statistics(count, conf_sum, hit_sum)
    gap = torch.nan_to_num(accuracy - confidence, nan=0.0)
    if norm == "l2":
        return torch.sqrt((proportion * gap.square()).sum(-1))
    if norm == "max":
        return torch.where(total > 0, gap.abs().amax(-1), float("nan"))
    raise ValueError(f"norm must be one of 'l1', 'l2', 'max', got {norm!r}")


def classwise_calibration_error(count: Tensor, conf_sum: Tensor, hit_sum: Tensor, num_samples: Tensor | int) -> Tensor:
    r"""Classwise ECE, the static calibration error (SCE) of Nixon et al. 2019, from ``[K, n_bins]`` sums.

    Every class probability :math:`p_{ik}` (not only the top one) is binned per class; a "hit" is
    :math:`y_i = k`:

    .. math::
        \mathrm{SCE} = \frac{1}{K} \sum_{k=1}^{K} \sum_{b} \frac{n_{bk}}{N} |\mathrm{acc}(b, k) - \mathrm{conf}(b, k)|
                     = \frac{1}{K N} \sum_{k, b} |\text{hit\_sum}_{kb} - \text{conf\_sum}_{kb}|

    with :math:`\mathrm{acc}(b, k)` the fraction of samples of bin ``b`` of class ``k`` whose label
    is ``k`` and :math:`N` the number of samples. (Nixon et al.'s reference code,
    google/uncertainty-metrics, defaults to 30 bins; the bin count is the caller's choice.)

    Example:
        >>> # 3 samples, 2 classes, 2 bins: p = (0.3, 0.7) y = 1, (0.8, 0.2) y = 0, (0.1, 0.9) y = 1
        >>> count = torch.tensor([[2, 1], [1, 2]])
        >>> conf, hits = torch.tensor([[0.4, 0.8], [0.2, 1.6]]), torch.tensor([[0, 1], [0, 2]])
        >>> round(float(classwise_calibration_error(count, conf, hits, 3)), 4)  # (0.4 + 0.2 + 0.2 + 0.4) / (2 * 3)
        0.2
    """
    num_classes = count.shape[0]
    n = torch.as_tensor(num_samples, dtype=torch.float64, device=count.device)
    return (hit_sum.double() - conf_sum.double()).abs().sum() / (num_classes * n)


def equal_mass_bins(
    fine_count: Tensor, fine_conf_sum: Tensor, fine_hit_sum: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Equal-mass ("adaptive") bins assembled from a fine equal-width histogram.

    The fine histogram (``F`` bins of width ``1/F``, folded) is cut into at most ``n_bins`` groups
    of consecutive fine bins: with cumulative counts :math:`C_j` and :math:`r_m = \lceil m N / n \rceil`
    the group ``m`` ends at the first fine bin :math:`j` with :math:`C_j \ge r_m`, i.e. at the fine
    bin holding the :math:`r_m`-th smallest confidence. Groups that would be empty are merged, so
    when more than ``N / n_bins`` samples share one fine bin there are fewer, heavier bins: the
    resolution of adaptive binning is ``1/F``. With all samples in distinct fine bins this is the
    equal-mass binning of Nixon et al. 2019 (bins of :math:`\lceil N/n \rceil` sorted samples).

    Returns:
        ``(count, conf_sum, hit_sum, edges)`` for the non-empty groups; ``edges`` has one more
        entry, the grid edges (multiples of ``1/F``) delimiting the groups, from 0 to 1.

    Example:
        >>> fine_count, fine_hits = torch.tensor([2, 0, 1, 1]), torch.tensor([1, 0, 0, 1])  # F = 4
        >>> fine_conf = torch.tensor([0.2, 0.0, 0.6, 0.9], dtype=torch.float64)
        >>> count, conf, hits, edges = equal_mass_bins(fine_count, fine_conf, fine_hits, 2)
        >>> count.tolist(), hits.tolist(), edges.tolist()  # 2 samples per bin
        ([2, 2], [1, 1], [0.0, 0.25, 1.0])
    """
    fine = fine_count.shape[-1]
    device = fine_count.device
    cumulative = torch.cumsum(fine_count.long(), 0)
    total = int(cumulative[-1]) if fine else 0
    if total == 0:
        return (
            fine_count.new_zeros(0),
            fine_conf_sum.new_zeros(0),
            fine_hit_sum.new_zeros(0),
            torch.tensor([0.0, 1.0], dtype=torch.float64, device=device),
        )
    m = torch.arange(1, n_bins + 1, device=device, dtype=torch.long)
    ranks = (m * total + n_bins - 1) // n_bins  # ceil(m N / n), exact integer arithmetic
    ends = torch.unique_consecutive(torch.searchsorted(cumulative, ranks, side="left"))
    group = torch.searchsorted(ends, torch.arange(fine, device=device), side="left").clamp_max(ends.numel() - 1)
    size = ends.numel()
    count = torch.zeros(size, dtype=fine_count.dtype, device=device).index_add_(0, group, fine_count)
    conf = torch.zeros(size, dtype=fine_conf_sum.dtype, device=device).index_add_(0, group, fine_conf_sum)
    hits = torch.zeros(size, dtype=fine_hit_sum.dtype, device=device).index_add_(0, group, fine_hit_sum)
    edges = torch.cat([torch.zeros(1, device=device, dtype=torch.float64), (ends.double() + 1) / fine])
    edges[-1] = 1.0
    return count, conf, hits, edges


def confidence_histogram(
    fine_count: Tensor, fine_hits: Tensor, bins: int, binary: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-label confidence histogram ``(edges, correct, incorrect)``, ``bins`` equal-width bins,
    re-binned from a fine histogram (folded, ``F`` entries: fine bin ``j`` goes to ``floor(j bins / F)``).

    ``binary``: the fine histogram is of ``p = P(y = 1)`` with hits the positives; it is mirrored
    (``max(p, 1 - p)``, correct = positives above 0.5, negatives below), a fine bin straddling 0.5
    counted with the upper half. The confidence histogram drawn under a reliability diagram (Guo et al. 2017, Fig. 1).

    Example:
        >>> edges, correct, incorrect = confidence_histogram(torch.tensor([1, 0, 2, 1]), torch.tensor([1, 0, 1, 1]), 2)
        >>> edges.tolist(), correct.tolist(), incorrect.tolist()
        ([0.0, 0.5, 1.0], [1.0, 2.0], [0.0, 1.0])
    """
    fine = fine_count.shape[-1]
    device = fine_count.device
    j = torch.arange(fine, device=device)
    correct, count = fine_hits.double(), fine_count.double()
    if binary:
        upper = (j + 0.5) / fine >= 0.5
        correct = torch.where(upper, correct, count - correct)
        j = torch.where(upper, j, fine - 1 - j)
    coarse = torch.div(j * bins, fine, rounding_mode="floor").clamp_max(bins - 1)
    hits = torch.zeros(bins, dtype=torch.float64, device=device).index_add_(0, coarse, correct)
    total = torch.zeros(bins, dtype=torch.float64, device=device).index_add_(0, coarse, count)
    return equal_width_edges(bins, device=device), hits, total - hits


def adaptive_calibration_error(
    fine_count: Tensor, fine_conf_sum: Tensor, fine_hit_sum: Tensor, n_bins: int, norm: Norm = "l1"
) -> Tensor:
    """Adaptive (equal-mass) calibration error (Nixon et al. 2019): :func:`calibration_error` over the
    bins of :func:`equal_mass_bins`. ``NaN`` without samples.

    ``ACE = sum_m (n_m / N) |acc(B_m) - conf(B_m)|`` with bins :math:`B_m` of (about) ``N / n_bins`` samples each.

    Example:
        >>> fine_count, fine_hits = torch.tensor([2, 0, 1, 1]), torch.tensor([1, 0, 0, 1])
        >>> fine_conf = torch.tensor([0.2, 0.0, 0.6, 0.9], dtype=torch.float64)
        >>> # bins of equal_mass_bins' example: (|1 - 0.2| + |1 - 1.5|) / 4
        >>> round(float(adaptive_calibration_error(fine_count, fine_conf, fine_hits, 2)), 4)
        0.325
    """
    count, conf, hits, _ = equal_mass_bins(fine_count, fine_conf_sum, fine_hit_sum, n_bins)
    if count.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=fine_count.device)
    return calibration_error(count, conf, hits, norm)


def bootstrap_intervals(
    count: Tensor, conf_sum: Tensor, hit_sum: Tensor, correct: Tensor, brier_sum: Tensor, level: float = 0.95
) -> dict[str, Tensor]:
    r"""Percentile bootstrap intervals of the ECE, accuracy and Brier score, and of each bin's accuracy.

    Inputs are the weighted sums of ``R`` replicates (:mod:`lightning_attn.functional.bootstrap`):
    histograms ``[R, n_bins]`` (folded) and ``[R]`` totals of correct predictions and of per-sample
    Brier scores. Replicate :math:`r` gives :math:`\mathrm{ECE}_r` (:func:`calibration_error`),
    :math:`\mathrm{acc}_r = \text{correct}_r / N_r` and :math:`\mathrm{Brier}_r = \text{brier}_r / N_r`
    with :math:`N_r = \sum_m \text{count}_{rm}`; the interval is their :math:`(1 \mp \ell)/2` quantiles
    (:func:`~lightning_attn.functional.bootstrap.percentile_interval`).

    Returns:
        ``ece_ci_low``, ``ece_ci_high``, ``accuracy_ci_*``, ``brier_ci_*`` (0-d) and
        ``bin_accuracy_ci_low``/``_high`` (``[n_bins]``, NaN for bins empty in every replicate).

    Example:
        >>> count = torch.tensor([[10.0, 10.0], [8.0, 12.0], [12.0, 8.0]])
        >>> conf, hits = count * torch.tensor([0.3, 0.9]), count * torch.tensor([0.5, 0.8])
        >>> out = bootstrap_intervals(count, conf, hits, hits.sum(1), count.sum(1) * 0.2)
        >>> [round(float(out[k]), 4) for k in ("ece_ci_low", "ece_ci_high")]  # replicates' ECE: 0.15, 0.14, 0.16
        [0.1405, 0.1595]
    """
    total = count.double().sum(-1)
    out: dict[str, Tensor] = {}
    per_replicate = {
        "ece": calibration_error(count, conf_sum, hit_sum, "l1"),
        "accuracy": correct.double() / total,
        "brier": brier_sum.double() / total,
    }
    for name, values in per_replicate.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = percentile_interval(values, level)
    accuracy, _, _ = bin_statistics(count, conf_sum, hit_sum)
    out["bin_accuracy_ci_low"], out["bin_accuracy_ci_high"] = percentile_interval(accuracy.T, level)
    return out


# ---------------------------------------------------------------------------------------------
# debiased and smooth estimates
# ---------------------------------------------------------------------------------------------
def debiased_calibration_error(count: Tensor, conf_sum: Tensor, hit_sum: Tensor) -> Tensor:
    r"""Debiased L2 calibration error of Kumar et al. 2019 (*Verified Uncertainty Calibration*), float64.

    The plug-in squared error :math:`\sum_b p_b (\mathrm{conf}_b - \mathrm{acc}_b)^2` over-estimates
    the true one by the sampling variance of each bin's accuracy; their estimator subtracts it:

    .. math::
        \widehat{\mathrm{CE}}^2 = \sum_b p_b \Big[ (\mathrm{conf}_b - \mathrm{acc}_b)^2
            - \frac{\mathrm{acc}_b (1 - \mathrm{acc}_b)}{n_b - 1} \Big], \qquad
        \mathrm{ece\_debiased} = \sqrt{\max(\widehat{\mathrm{CE}}^2, 0)}

    with :math:`p_b = n_b / N`; bins with fewer than two samples contribute 0 (as their reference
    code, p-lambda/verified_calibration ``unbiased_l2_ce``). It is the debiased counterpart of the
    L2 error (``calibration_error(..., "l2")``) over the same bins. ``NaN`` without samples.

    Example:
        >>> count, conf, hits = torch.tensor([10, 10]), torch.tensor([3.0, 9.0]), torch.tensor([6, 6])
        >>> round(float(calibration_error(count, conf, hits, "l2")), 4)  # plug-in: |0.3 - 0.6| = |0.9 - 0.6|
        0.3
        >>> round(float(debiased_calibration_error(count, conf, hits)), 4)  # sqrt(0.09 - 0.24 / 9)
        0.2517
    """
    count = count.double()
    accuracy, confidence, proportion = bin_statistics(count, conf_sum, hit_sum)
    variance = torch.where(count > 1, accuracy * (1 - accuracy) / (count - 1).clamp_min(1), 0.0)
    term = torch.where(count > 1, (confidence - accuracy).square() - variance, 0.0)
    squared = (proportion * term).sum(-1)
    return torch.where(count.sum(-1) > 0, squared.clamp_min(0).sqrt(), float("nan"))


# ---------------------------------------------------------------------------------------------
# proper scoring rules on samples
# ---------------------------------------------------------------------------------------------
def brier_score(
    probs: Tensor, target: Tensor, task: Task = "multiclass", reduction: Literal["mean", "sum", "none"] = "mean"
) -> Tensor:
    r"""Brier score (Brier 1950).

    Multiclass (``probs [N, K]``): :math:`\frac{1}{N} \sum_i \sum_k (p_{ik} - 1[y_i = k])^2`.
    Binary (``probs [N]`` = :math:`P(y = 1)`): :math:`\frac{1}{N} \sum_i (p_i - y_i)^2`, the usual
    binary form (scikit-learn ``brier_score_loss``); a two-column multiclass input gives twice that.

    Example:
        >>> probs, target = torch.tensor([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([0, 0])
        >>> round(float(brier_score(probs, target)), 4)  # (0.08 + 0.72) / 2
        0.4
        >>> round(float(brier_score(torch.tensor([0.8, 0.4]), torch.tensor([1, 0]), task="binary")), 4)  # 0.2 / 2
        0.1
    """
    if task == "binary":
        per = (probs.double() - target.double()).square()
    else:
        p = probs.double()
        p_y = p.gather(1, target.long().unsqueeze(1)).squeeze(1)
        per = p.square().sum(1) - 2 * p_y + 1
    return _reduce(per, reduction)


def negative_log_likelihood(
    scores: Tensor,
    target: Tensor,
    task: Task = "multiclass",
    score_type: Literal["logits", "probs"] = "logits",
    eps: float = 1e-12,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    r"""Negative log-likelihood :math:`-\frac{1}{N} \sum_i \log p_{i, y_i}` (cross-entropy).

    From logits it is exact (``log_softmax`` / ``logsigmoid``); from probabilities the likelihood is
    clamped at ``eps`` (1e-12) so one zero-probability label does not make it infinite (as
    scikit-learn's ``log_loss`` clips). The objective temperature scaling minimizes (Guo et al. 2017).

    Example:
        >>> round(float(negative_log_likelihood(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))), 4)  # log 2
        0.6931
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> # -(log 0.5 + log 0.75) / 2
        >>> round(float(negative_log_likelihood(probs, torch.tensor([0, 1]), score_type="probs")), 4)
        0.4904
    """
    if task == "binary":
        y = target.double()
        if score_type == "logits":
            z = scores.double()
            per = F.softplus(-z) * y + F.softplus(z) * (1 - y)
        else:
            p = scores.double()
            per = -(y * p.clamp_min(eps).log() + (1 - y) * (1 - p).clamp_min(eps).log())
    else:
        idx = target.long().unsqueeze(1)
        if score_type == "logits":
            per = -torch.log_softmax(scores.double(), 1).gather(1, idx).squeeze(1)
        else:
            per = -scores.double().gather(1, idx).squeeze(1).clamp_min(eps).log()
    return _reduce(per, reduction)


def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------------------------
# temperature scaling
# ---------------------------------------------------------------------------------------------
def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Temperature-scaled logits ``logits / T`` (Guo et al. 2017); softmax (or sigmoid) of them are the
    calibrated probabilities. Accuracy is unchanged since ``T > 0`` keeps the argmax.

    Example:
        >>> apply_temperature(torch.tensor([2.0, -1.0]), 2.0)
        tensor([ 1.0000, -0.5000])
    """
    return logits / temperature


def temperature_nll(logits: Tensor, target: Tensor, temperature: float | Tensor, task: Task = "multiclass") -> Tensor:
    """Mean NLL of ``logits / T`` (multiclass cross-entropy, or binary cross-entropy on one logit).

    ``-1/N sum_i log softmax(z_i / T)_{y_i}``: the objective of temperature scaling (Guo et al. 2017).

    Example:
        >>> round(float(temperature_nll(torch.tensor([[2.0, 0.0]]), torch.tensor([1]), 2.0)), 4)  # log(1 + e)
        1.3133
    """
    scaled = logits.double() / temperature
    if task == "binary":
        return F.binary_cross_entropy_with_logits(scaled, target.double())
    return F.cross_entropy(scaled, target.long())


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    task: Task = "multiclass",
    max_iter: int = 100,
    bounds: tuple[float, float] = (1e-2, 1e2),
) -> float:
    r"""Fit the temperature of Guo et al. 2017: :math:`T^* = \arg\min_{T > 0} \mathrm{NLL}(\mathrm{softmax}(z / T), y)`.

    One scalar, optimized as :math:`\log T` (so ``T`` stays positive) with L-BFGS and a strong-Wolfe
    line search from ``T = 1``, in float64; the result is clipped to ``bounds`` (a model at chance
    level drives ``T`` to infinity). Works inside ``torch.inference_mode`` / ``no_grad`` (as in
    Lightning's evaluation loop): the data are cloned out of inference mode and gradients are
    enabled locally. ``logits``: ``[N, K]`` (multiclass) or ``[N]`` (binary, logit of class 1).

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0]]).repeat(4, 1), torch.tensor([0, 0, 0, 1])
        >>> round(fit_temperature(logits, target), 4)  # sigmoid(2 / T) = 3/4: T = 2 / log 3
        1.8205
    """
    if logits.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one sample")
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().clone().double()
        y = target.detach().clone()
        y = y.double() if task == "binary" else y.long()
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-10,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = temperature_nll(z, y, log_t.exp(), task)
            loss.backward()
            return loss

        optimizer.step(closure)
        value = float(log_t.detach().exp())
    if not math.isfinite(value):
        raise FloatingPointError("temperature scaling diverged (non-finite temperature): check the logits")
    return min(max(value, bounds[0]), bounds[1])
