r"""Calibration measures as pure functions of constant-size bin sums.

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
    - A. Kumar, P. Liang, T. Ma. *Verified Uncertainty Calibration*. NeurIPS 2019 (L2 / RMS calibration error).
    - G. W. Brier. *Verification of forecasts expressed in terms of probability*. Monthly Weather Review 1950.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adaptive_calibration_error",
    "apply_temperature",
    "bin_statistics",
    "brier_score",
    "calibration_error",
    "classwise_calibration_error",
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
def equal_width_edges(n_bins: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``n_bins + 1`` equally spaced edges on ``[0, 1]`` (``torch.linspace(0, 1, n_bins + 1)``)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=dtype, device=device)


def equal_width_bin_index(values: Tensor, n_bins: int, edges: Tensor | None = None) -> Tensor:
    """Bin of each value in ``[0, 1]`` for ``n_bins`` equal-width bins, as ``int64``.

    ``bucketize(values, linspace(0, 1, n_bins + 1), right=True) - 1``, the boundaries torchmetrics
    uses, so a value on an edge goes to the bin above it. A value of exactly ``1.0`` gets index
    ``n_bins`` (the extra trailing entry, merged into bin ``n_bins - 1`` by :func:`fold_last_bin`).
    Values must lie in ``[0, 1]``.
    """
    if edges is None:
        edges = equal_width_edges(n_bins, dtype=values.dtype, device=values.device)
    return torch.bucketize(values, edges, right=True) - 1


def fold_last_bin(x: Tensor) -> Tensor:
    """Merge the trailing "exactly 1.0" entry of a histogram (last dim ``n_bins + 1``) into the last bin."""
    folded = x[..., :-1].clone()
    folded[..., -1] += x[..., -1]
    return folded


def bin_statistics(count: Tensor, conf_sum: Tensor, hit_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin accuracy, mean confidence and proportion of samples (float64).

    Empty bins get ``NaN`` accuracy and confidence (they are left out of every error) and
    proportion 0. With no samples at all the proportions are ``NaN`` too.
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

        \mathrm{RMSCE} = \sqrt{\sum_m \frac{n_m}{N} (\mathrm{acc}(B_m) - \mathrm{conf}(B_m))^2} \quad (\text{l2, Kumar et al. 2019})

    Equal to torchmetrics ``BinaryCalibrationError`` / ``MulticlassCalibrationError`` with the same
    ``n_bins`` and ``norm`` when no confidence equals ``1.0`` exactly; torchmetrics puts such
    samples in a hidden extra bin with accuracy compared against confidence 1.0 on their own,
    here they share the last bin. ``NaN`` when there are no samples.
    """
    count = count.double()
    total = count.sum()
    if norm == "l1":
        return (hit_sum.double() - conf_sum.double()).abs().sum() / total
    accuracy, confidence, proportion = bin_statistics(count, conf_sum, hit_sum)
    gap = torch.nan_to_num(accuracy - confidence, nan=0.0)
    if norm == "l2":
        return torch.sqrt((proportion * gap.square()).sum())
    if norm == "max":
        if not bool(total > 0):
            return torch.tensor(float("nan"), dtype=torch.float64, device=count.device)
        return gap.abs().max()
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


def adaptive_calibration_error(
    fine_count: Tensor, fine_conf_sum: Tensor, fine_hit_sum: Tensor, n_bins: int, norm: Norm = "l1"
) -> Tensor:
    """Adaptive (equal-mass) calibration error (Nixon et al. 2019): :func:`calibration_error` over the
    bins of :func:`equal_mass_bins`. ``NaN`` without samples."""
    count, conf, hits, _ = equal_mass_bins(fine_count, fine_conf_sum, fine_hit_sum, n_bins)
    if count.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=fine_count.device)
    return calibration_error(count, conf, hits, norm)


# ---------------------------------------------------------------------------------------------
# proper scoring rules on samples
# ---------------------------------------------------------------------------------------------
def brier_score(probs: Tensor, target: Tensor, task: Task = "multiclass", reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    r"""Brier score (Brier 1950).

    Multiclass (``probs [N, K]``): :math:`\frac{1}{N} \sum_i \sum_k (p_{ik} - 1[y_i = k])^2`.
    Binary (``probs [N]`` = :math:`P(y = 1)`): :math:`\frac{1}{N} \sum_i (p_i - y_i)^2`, the usual
    binary form (scikit-learn ``brier_score_loss``); a two-column multiclass input gives twice that.
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
    scikit-learn's ``log_loss`` clips).
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
    calibrated probabilities. Accuracy is unchanged since ``T > 0`` keeps the argmax."""
    return logits / temperature


def temperature_nll(logits: Tensor, target: Tensor, temperature: float | Tensor, task: Task = "multiclass") -> Tensor:
    """Mean NLL of ``logits / T`` (multiclass cross-entropy, or binary cross-entropy on one logit)."""
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
    """
    if logits.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one sample")
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().clone().double()
        y = target.detach().clone()
        y = y.double() if task == "binary" else y.long()
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                      tolerance_change=1e-12, line_search_fn="strong_wolfe")

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
