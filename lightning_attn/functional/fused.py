"""Row statistics read off the scores of an attention call, not its probabilities: the fused forms the
statistics engine (:mod:`lightning_attn.metrics.engine`) evaluates once per captured call.

Notation: ``s[..., i, j]`` the masked, scaled scores of one row block (``q k^T * scale + mask``), ``p`` their row
softmax, ``lse_i = log sum_j exp(s_ij)``, ``n_i`` the number of valid (unmasked) keys of row ``i``. Masked keys
carry a very negative *finite* score (:data:`LOWEST`), so that ``p_ij s_ij = 0`` there with no ``masked_fill``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attn.capture.probs import LOWEST

__all__ = [
    "LOWEST",
    "entropy_from_scores",
    "masked_key_counts",
    "normalize_entropy",
    "sparsity_from_counts",
]


def entropy_from_scores(lse: Tensor, expected_score: Tensor) -> Tensor:
    """Row entropy in nats from the scores: ``H_i = lse_i - sum_j p_ij s_ij``, given ``expected_score = sum_j p_ij
    s_ij`` (one multiply-reduce over the row, summed over key blocks in the long-context path).

    Since ``log p_ij = s_ij - lse_i``, ``-sum_j p_ij log p_ij = lse_i - sum_j p_ij s_ij``: no logarithm of ``L^2``
    values. Masked keys must hold a finite score (:data:`LOWEST`, where ``p = 0``, so that ``p s = 0``).
    Cancellation costs about ``|lse| * 1e-7`` absolute in float32.

    Example:
        >>> scores = torch.tensor([[0.0, 1.0, 2.0]])
        >>> probs = scores.softmax(-1)
        >>> fused = entropy_from_scores(scores.logsumexp(-1), torch.linalg.vecdot(probs, scores))
        >>> bool(torch.allclose(fused, -(probs * probs.log()).sum(-1)))
        True
    """
    return lse - expected_score


def normalize_entropy(entropy: Tensor, num_valid: Tensor) -> Tensor:
    """``H_i / log(n_i)`` clamped to ``[0, 1]`` (rounding), 0 for rows with ``n_i <= 1`` (Clark et al. 2019).

    Example:
        >>> normalize_entropy(torch.tensor([4.0, 2.0]).log(), torch.tensor([4.0, 1.0]))
        tensor([1., 0.])
    """
    normalized = entropy / num_valid.clamp_min(2).log()
    return torch.where(num_valid > 1, normalized, torch.zeros_like(normalized)).clamp(0, 1)


def sparsity_from_counts(below: Tensor, num_keys: int, num_valid: Tensor) -> Tensor:
    """Fraction of valid keys with weight below a threshold, from the count ``below`` over *all* keys: masked keys
    have weight 0, so ``(below - (K - n_i)) / n_i``; 0 for rows without a valid key.

    Example:
        >>> sparsity_from_counts(torch.tensor([3.0]), 4, torch.tensor([2.0]))
        tensor([0.5000])
    """
    return ((below - (num_keys - num_valid)) / num_valid.clamp_min(1)).clamp_min(0)


def masked_key_counts(
    allowed: Tensor | None, is_causal: bool, query_offset: int, num_rows: int, num_keys: int, device: torch.device
) -> Tensor:
    """Valid keys per row, ``n_i``, from the mask the call already has, never from the probabilities.

    Args:
        allowed: bool "may attend" mask broadcastable to ``[..., num_rows, num_keys]`` (already sliced to the rows;
            a size-1 query dim for key-padding masks), or ``None``.
        is_causal: top-left aligned causal mask (``j <= i``) on top of ``allowed``.
        query_offset: index of the first row.

    Returns:
        Float counts broadcastable to ``[..., num_rows]``: ``[num_rows]`` for causal-only calls, a scalar for
        unmasked ones, ``allowed``'s leading dims otherwise (a key-padding mask ``[B, 1, 1, K]`` gives
        ``[B, 1, 1]``: one count per sample, not per head and row).

    Example:
        >>> masked_key_counts(None, True, 2, 2, 6, torch.device("cpu"))
        tensor([3., 4.])
    """
    rows = torch.arange(query_offset, query_offset + num_rows, device=device)
    if allowed is None:
        if not is_causal:
            return torch.tensor(float(num_keys), device=device)
        return (rows + 1).clamp_max(num_keys).to(torch.float32)
    if is_causal:
        allowed = allowed & (torch.arange(num_keys, device=device) <= rows[:, None])
    return allowed.sum(-1, dtype=torch.int32).to(torch.float32)
