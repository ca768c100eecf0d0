"""Layer attributions: token saliency on an embedding layer's output and Grad-CAM on a token layer's output.

Pure tensor functions; the passes that produce activations and gradients are in
:mod:`lightning_attn.report.attribution`.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

__all__ = ["gauss_legendre_path", "gradcam_map", "patch_grid", "token_attribution"]


def token_attribution(activation: Tensor, gradient: Tensor) -> Tensor:
    """Per-token attribution ``a_t = sum_d x_td * g_td`` of a ``[B, T, D]`` layer output ``x`` and a gradient
    ``g`` (gradient x activation, Shrikumar et al. 2017; Captum's ``LayerGradientXActivation`` summed over the
    hidden axis), in float64. For integrated gradients pass ``x - baseline`` and the path-averaged gradient.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])
        >>> g = torch.tensor([[[3.0, 1.0], [2.0, 2.0]]])
        >>> token_attribution(x, g)
        tensor([[ 5., -1.]], dtype=torch.float64)
    """
    if activation.shape != gradient.shape:
        raise ValueError(f"activation shape {tuple(activation.shape)} != gradient shape {tuple(gradient.shape)}")
    return (activation.double() * gradient.double()).flatten(2).sum(-1)


def gauss_legendre_path(n_steps: int) -> tuple[list[float], list[float]]:
    """Points ``alpha_k`` on ``[0, 1]`` and weights ``w_k`` of ``n_steps``-point Gauss-Legendre quadrature, for
    ``integral_0^1 f(alpha) d alpha ~ sum_k w_k f(alpha_k)``: the integrated-gradients path of Sundararajan et
    al. 2017 as Captum samples it by default (``method="gausslegendre"``): ``alpha = (1 + x) / 2``, ``w = w_x / 2``
    for the Legendre nodes ``x`` and weights ``w_x`` on ``[-1, 1]``.

    Example:
        >>> alphas, weights = gauss_legendre_path(2)
        >>> [round(a, 4) for a in alphas], [round(w, 4) for w in weights]
        ([0.2113, 0.7887], [0.5, 0.5])
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return [float(a) for a in 0.5 * (1 + nodes)], [float(w) for w in 0.5 * weights]


def gradcam_map(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM over tokens (Selvaraju et al. 2017, as pytorch-grad-cam applies it to transformers): channel weights
    ``w_c = mean_t dS/dA_tc`` (the gradient averaged over tokens), map ``M_t = relu(sum_c w_c A_tc)``. For a ViT pass
    the patch tokens only (a [CLS] token left out of both, see :func:`patch_grid`), as pytorch-grad-cam does.

    Args:
        activation: ``[B, T, C]`` token activations ``A``.
        gradient: ``[B, T, C]`` gradient of the explained score ``S`` with respect to them.

    Returns:
        ``[B, T]`` (float64).

    Example:
        >>> import torch
        >>> a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
        >>> g = torch.tensor([[[3.0, -3.0], [0.0, 0.0], [0.0, 0.0]]])
        >>> gradcam_map(a, g)
        tensor([[1., 0., 0.]], dtype=torch.float64)
    """
    if activation.dim() != 3 or activation.shape != gradient.shape:
        raise ValueError(
            f"Grad-CAM needs [batch, tokens, channels] activations and gradients of one shape, got "
            f"{tuple(activation.shape)} and {tuple(gradient.shape)}"
        )
    weights = gradient.double().mean(1, keepdim=True)
    return (weights * activation.double()).sum(-1).clamp_min(0)


def patch_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, tuple[int, int] | None]:
    """How ``num_tokens`` tokens lie on a patch grid: ``(leading tokens to drop, (rows, cols) or None)``.

    With ``grid``, ``rows * cols`` must be the token count (no [CLS]) or one less (a leading [CLS], dropped).
    Without it the grid is inferred when the count, or the count less one, is a square; else the tokens form no
    grid (``(0, None)``: a map over the sequence).

    Example:
        >>> patch_grid(17), patch_grid(16), patch_grid(12), patch_grid(13, (3, 4))
        ((1, (4, 4)), (0, (4, 4)), (0, None), (1, (3, 4)))
    """
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols == num_tokens:
            return 0, (rows, cols)
        if rows * cols == num_tokens - 1:
            return 1, (rows, cols)
        raise ValueError(
            f"grid {rows}x{cols} does not fit {num_tokens} tokens (expected {rows * cols} patches, "
            "optionally after one [CLS] token)"
        )
    for drop in (0, 1):
        side = math.isqrt(num_tokens - drop) if num_tokens - drop > 0 else 0
        if side > 1 and side * side == num_tokens - drop:
            return drop, (side, side)
    return 0, None
