"""Smooth ECE (Blasiok & Nakkiran 2023) from the same constant-size bin sums as
:mod:`lightning_attn.functional.calibration`: the residuals ``hit - conf`` kernel-smoothed over confidence with a
reflected Gaussian, the bandwidth chosen where the smooth ECE equals it.

Reference: J. Blasiok, P. Nakkiran. *Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing*. 2023
(reference implementation: the ``relplot`` package, which the tests compare against).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["smooth_calibration_error", "smooth_ece_at"]


def _round_to_grid(position: Tensor, weight: Tensor, points: int) -> Tensor:
    """Each ``weight`` split linearly between the two grid points (``linspace(0, 1, points)``) around
    its ``position``; rows of ``weight`` are separate grids."""
    scaled = position * (points - 1)
    left = scaled.long().clamp(0, points - 2)
    right_share = scaled - left
    grid = weight.new_zeros(weight.shape[0], points)
    grid.index_add_(1, left, weight * (1 - right_share))
    grid.index_add_(1, left + 1, weight * right_share)
    return grid


def _reflected_gaussian(grid: Tensor, sigma: float) -> Tensor:
    """Convolution of each row with a Gaussian of width ``sigma`` sampled on the same grid, the
    values mirrored at 0 and 1 (so no mass leaves ``[0, 1]``); by FFT, the grid having up to
    ``10 / eps`` points."""
    points = grid.shape[-1]
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=grid.device)
    kernel = torch.exp(-(t - 0.5).square() / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    mirrored = torch.cat([grid.flip(-1)[:, :-1], grid, grid.flip(-1)[:, 1:]], -1)
    size = mirrored.shape[-1] + points - 1
    full = torch.fft.irfft(torch.fft.rfft(mirrored, size) * torch.fft.rfft(kernel, size), size)
    start = points - 1 + points // 2  # the centred window of the "valid" part of the full convolution
    return full[:, start : start + points]


def _interpolate(grid: Tensor, at: Tensor) -> Tensor:
    """Rows of ``grid`` (values at ``linspace(0, 1, points)``) linearly interpolated at ``at``."""
    points = grid.shape[-1]
    left = (at * (points - 1)).long().clamp(0, points - 2)
    right_share = at * (points - 1) - left
    return grid[:, left] * (1 - right_share) + grid[:, left + 1] * right_share


def smooth_ece_at(count: Tensor, conf_sum: Tensor, hit_sum: Tensor, sigma: float) -> Tensor:
    r"""Smooth ECE at a fixed bandwidth ``sigma`` (Blasiok & Nakkiran 2023), from a fine histogram.

    With residuals :math:`r_i = c_i - y_i` (``y`` the hit), the kernel-smoothed residual and density
    :math:`R(t) = \sum_i K_\sigma(t, c_i) r_i`, :math:`D(t) = \sum_i K_\sigma(t, c_i)` (Gaussian
    kernel reflected at 0 and 1), on an evaluation mesh :math:`t_j`:

    .. math::
        \mathrm{smECE}_\sigma = \frac{\sum_j |R(t_j)|}{\sum_j (D(t_j) + 10^{-4})}

    computed as ``relplot.smECE_sigma`` does (grids of ``max(2000, 20/sigma)/2 + 1`` points, mesh of
    ``max(10/sigma, 200)`` points), the samples of each fine bin placed at the bin's mean
    confidence (their exact positions within ``1/fine_bins`` are not kept).

    Example:
        >>> count = torch.tensor([0, 50, 0, 50])  # confidence 0.3 (15 hits of 50), 0.9 (40 hits of 50)
        >>> conf, hits = torch.tensor([0.0, 15.0, 0.0, 45.0]), torch.tensor([0, 15, 0, 40])
        >>> round(float(smooth_ece_at(count, conf, hits, 0.05)), 4)
        0.0501
    """
    nonempty = count > 0
    n = count.double()[nonempty]
    position = conf_sum.double()[nonempty] / n
    residual = conf_sum.double()[nonempty] - hit_sum.double()[nonempty]
    points = max(2000, round(20 / sigma)) // 2 + 1
    grid = _round_to_grid(position, torch.stack([residual, n]), points)
    smoothed = _reflected_gaussian(grid, sigma)
    mesh = torch.linspace(0.0, 1.0, max(round(10 / sigma), 200), dtype=torch.float64, device=count.device)
    residual_at, density_at = _interpolate(smoothed, mesh)
    return residual_at.abs().sum() / (density_at + 1e-4).sum()


def smooth_calibration_error(count: Tensor, conf_sum: Tensor, hit_sum: Tensor, eps: float = 1e-3) -> Tensor:
    r"""Smooth ECE (Blasiok & Nakkiran 2023, *Smooth ECE: Principled Reliability Diagrams via Kernel
    Smoothing*) with its automatic bandwidth, from a fine histogram (folded, ``[fine_bins]``).

    The bandwidth is the fixed point :math:`\sigma^* = \mathrm{smECE}_{\sigma^*}` (see
    :func:`smooth_ece_at`), found as ``relplot.smECE`` finds it: 10 bisection steps on ``(0, 1]``
    keeping the smallest :math:`\sigma` with :math:`\sigma \ge \mathrm{smECE}_\sigma` (or
    :math:`\sigma < \text{eps}`); the result is :math:`\mathrm{smECE}_{\sigma^*}`. Equal to
    ``relplot.smECE(confidences, hits)`` on the samples up to the fine-bin resolution (tested
    within 2e-3). Unlike the binned ECE it is continuous in the predictions and needs no bin count.
    ``NaN`` without samples.

    Example:
        >>> count = torch.tensor([0, 50, 0, 50])  # 100 samples: confidence 0.3 (15 hits), 0.9 (40 hits)
        >>> conf, hits = torch.tensor([0.0, 15.0, 0.0, 45.0]), torch.tensor([0, 15, 0, 40])
        >>> round(float(smooth_calibration_error(count, conf, hits)), 3)
        0.05
    """
    if not bool(count.sum() > 0):
        return torch.tensor(float("nan"), dtype=torch.float64, device=count.device)

    def small_enough(sigma: float) -> bool:
        return sigma < eps or sigma < float(smooth_ece_at(count, conf_sum, hit_sum, sigma))

    sigma = 1.0
    if not small_enough(sigma):
        low = 0.0
        for _ in range(10):
            middle = (sigma + low) / 2
            if small_enough(middle):
                low = middle
            else:
                sigma = middle
    return smooth_ece_at(count, conf_sum, hit_sum, sigma)
