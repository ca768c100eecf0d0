"""Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): normalization and ranking.

The raw importance of head ``h`` is ``I_h = E_x |dL(x) / d xi_h|`` for a gate ``xi_h`` on the head's output
(streamed by :class:`~lightning_attn.metrics.importance.HeadImportance`); these functions turn the raw scores of
all layers into the comparable scores Michel et al. prune by.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize_head_importance", "pruning_order"]


def normalize_head_importance(per_layer: Sequence[Tensor], exponent: float = 2.0, eps: float = 1e-20) -> list[Tensor]:
    """Michel et al.'s normalization, as Hugging Face's bertology script does it.

    Each layer's scores are divided by their L-``exponent`` norm, ``I_h / (sum_h' I_h'^p)^(1/p)``, then all heads of
    the model are min-max scaled together, ``(I - min) / (max - min)``, to ``[0, 1]``. Layers may have different
    head counts. A model whose heads all score the same gives zeros (no head is more important than another).

    Args:
        per_layer: raw importance ``[H_l]`` per layer.
        exponent: the norm's exponent ``p`` (2 in the paper's code).
        eps: added to each layer's norm (an all-zero layer stays zero).

    Returns:
        The normalized ``[H_l]`` per layer, float64.

    Example:
        >>> [t.tolist() for t in normalize_head_importance([torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])])]
        [[0.6, 0.8], [1.0, 0.0]]
    """
    scaled = [layer.double() / (layer.double().pow(exponent).sum().pow(1.0 / exponent) + eps) for layer in per_layer]
    if not scaled:
        return []
    flat = torch.cat(scaled)
    low, span = flat.min(), flat.max() - flat.min()
    return [(layer - low) / span if span > 0 else torch.zeros_like(layer) for layer in scaled]


def pruning_order(importance: Tensor) -> tuple[Tensor, Tensor]:
    """Heads from least to most important and the cumulative share of the total importance removed with them.

    ``share_k = sum_{i <= k} I_(i) / sum_h I_h`` over the ascending order ``I_(1) <= I_(2) <= ...``: pruning the first
    ``k`` heads of the order removes ``share_k`` of the model's (normalized) importance. Ties keep the input order.

    Args:
        importance: ``[N]`` scores of all heads (normalized, so that layers compare).

    Returns:
        ``(order, share)``: indices into ``importance`` and the ``[N]`` float64 cumulative shares (0 when all are 0).

    Example:
        >>> order, share = pruning_order(torch.tensor([0.5, 0.0, 1.5]))
        >>> order.tolist(), share.tolist()
        ([1, 0, 2], [0.0, 0.25, 1.0])
    """
    values = importance.double()
    order = torch.sort(values, stable=True).indices
    total = values.sum()
    cumulative = values[order].cumsum(0)
    return order, cumulative / total if total > 0 else torch.zeros_like(cumulative)
