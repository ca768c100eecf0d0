"""Pure tensor measures of attention maps: per-row statistics, head-type scores, rollout and head distances.

Conventions: ``probs`` is ``[..., Q, K]`` post-softmax probabilities ``A[..., i, j]`` (``i`` query, ``j`` key);
per-row measures return ``[..., Q]``. ``key_mask`` is a bool tensor broadcastable to ``[..., Q, K]`` with
True = valid key; without one every key counts as valid. Half-precision inputs are computed in float32.
Nothing here synchronizes with the host except :func:`top_k_pairs` and :func:`top_positions` (reports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_attn.capture.record import as_bhqk

if TYPE_CHECKING:
    from lightning_attn.capture.record import AttentionCapture

__all__ = [
    "attention_rollout",
    "diagonal_mass",
    "duplicate_token_pattern",
    "first_token_mass",
    "gradient_weighted_rollout",
    "head_js_distance",
    "head_type_score",
    "induction_pattern",
    "js_divergence",
    "local_window_mass",
    "max_weight",
    "mean_attention_distance",
    "modality_agreement",
    "normalized_entropy",
    "previous_token_pattern",
    "reduce_in_chunks",
    "rollout_product",
    "sparsity",
    "top_k_pairs",
    "top_positions",
]

HeadFusion = Literal["mean", "max", "min"]
Reducer = Callable[[Tensor, int], Tensor]


def _float(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def rollout_product(step: Tensor, previous: Tensor | None) -> Tensor:
    """One fold of a rollout: ``step @ previous`` (``step`` alone when there is no ``previous``), in float32 or
    wider with autocast off, because under ``bf16-mixed``/``16-mixed`` autocast would run the product in half
    precision and each layer's rounding compounds (and a half-precision result reaches the figures). One step of
    :func:`attention_rollout` (Abnar & Zuidema 2020): ``R_l @ (R_{l-1} @ ... @ R_1)``.

    Example:
        >>> step = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]], dtype=torch.bfloat16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     rollout_product(step, step).dtype
        torch.float32
    """
    step = _float(step)
    if previous is None:
        return step
    device_type = step.device.type
    available = torch.amp.is_autocast_available(device_type)
    with torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext():
        return step @ _float(previous)


def _valid_keys(probs: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(bool mask expanded to ``probs``' shape, number of valid keys per row)."""
    if key_mask is None:
        mask = torch.ones((), dtype=torch.bool, device=probs.device).expand(probs.shape)
        return mask, torch.full(probs.shape[:-1], probs.shape[-1], dtype=probs.dtype, device=probs.device)
    mask = key_mask.to(torch.bool).expand(probs.shape)
    return mask, mask.sum(-1).to(probs.dtype)


def _query_minus_key(probs: Tensor, query_offset: int) -> Tensor:
    """``[Q, K]`` integer ``i - j`` with ``i = query_offset + row index``."""
    rows = torch.arange(probs.shape[-2], device=probs.device) + query_offset
    return rows[:, None] - torch.arange(probs.shape[-1], device=probs.device)


def normalized_entropy(probs: Tensor, key_mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Row entropy divided by its maximum: ``H_i / log(n_i)``, in ``[0, 1]``.

    ``H_i = -sum_j A_ij log A_ij`` over the valid keys (nats, ``0 log 0 = 0``, the log argument is clamped to
    ``eps``), ``n_i`` the number of valid keys of row ``i``. Rows with ``n_i <= 1`` and all-zero (fully masked)
    rows give 0. The result is clamped to ``[0, 1]`` against rounding. Rows are assumed normalized; train-mode
    maps after dropout are not. Reference: Clark et al. 2019, "What Does BERT Look At?" (entropy of heads).

    Returns:
        ``[..., Q]``.

    Example:
        >>> probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
        >>> torch.round(normalized_entropy(probs), decimals=4)  # log 4 / log 4, log 2 / log 4
        tensor([1.0000, 0.5000])
        >>> normalized_entropy(torch.tensor([[0.5, 0.5, 0.0]]), key_mask=torch.tensor([True, True, False]))
        tensor([1.])
    """
    probs = _float(probs)
    mask, n = _valid_keys(probs, key_mask)
    weights = probs.masked_fill(~mask, 0)
    entropy = -(weights * weights.clamp_min(eps).log()).sum(-1)
    normalized = entropy / n.clamp_min(2).log()
    return torch.where(n > 1, normalized, torch.zeros_like(normalized)).clamp(0, 1)


def max_weight(probs: Tensor) -> Tensor:
    """Largest weight of each row, ``max_j A_ij`` (``[..., Q]``).

    Its mean over rows is the "confidence" of a head in Voita et al. 2019, "Analyzing Multi-Head Self-Attention".

    Example:
        >>> max_weight(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
        tensor([0.8000, 0.5000])
    """
    return probs.amax(-1)


def sparsity(probs: Tensor, threshold: float = 0.01, key_mask: Tensor | None = None) -> Tensor:
    """Fraction of the valid keys whose weight is below ``threshold``: ``#{j valid: A_ij < t} / n_i``.

    Rows without valid keys give 0. Returns ``[..., Q]``. Softmax weights are never exactly 0, so this thresholds
    the exact-zero sparsity of Correia et al. 2019 ("Adaptively Sparse Transformers").

    Example:
        >>> probs = torch.tensor([[0.995, 0.005, 0.0], [0.5, 0.5, 0.0]])
        >>> sparsity(probs)  # 2 of 3 and 1 of 3 keys below 0.01
        tensor([0.6667, 0.3333])
        >>> sparsity(probs, key_mask=torch.tensor([True, True, False]))  # 1 of 2 and 0 of 2 valid keys
        tensor([0.5000, 0.0000])
    """
    probs = _float(probs)
    mask, n = _valid_keys(probs, key_mask)
    below = ((probs < threshold) & mask).sum(-1).to(probs.dtype)
    return below / n.clamp_min(1)


def first_token_mass(probs: Tensor) -> Tensor:
    """Weight on key 0, ``A_i0`` (``[..., Q]``): [CLS]/BOS "attention sink" mass (Clark et al. 2019; Xiao et al.
    2023, "Efficient Streaming Language Models with Attention Sinks").

    Example:
        >>> first_token_mass(torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
        tensor([0.7000, 0.4000])
    """
    return probs[..., 0]


def mean_attention_distance(probs: Tensor, query_offset: int = 0, scratch: Tensor | None = None) -> Tensor:
    """Expected key distance of each row, ``sum_j A_ij |i - j|`` with ``i = query_offset + row index``.

    ``query_offset`` lets query chunks (rows ``query_offset ...``) give the same values as the full map. For
    cross-attention (``Q != K``) the distance is still the index distance ``|i - j|``, which only means something
    when the two sequences are aligned. Rows are assumed normalized (all-zero rows give 0). Returns ``[..., Q]``.
    ``scratch``: an optional float tensor of ``probs``' shape the product is written to (its content is lost), so
    that a caller reducing many maps allocates nothing of their size. Reference: Dosovitskiy et al. 2021 (ViT,
    "mean attention distance"), here in token units.

    Example:
        >>> mean_attention_distance(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """
    probs = _float(probs)
    # one multiply-reduce against the [Q, K] distance matrix (broadcast over batch and heads)
    return _row_dot(probs, _query_minus_key(probs, query_offset).abs().to(probs.dtype), scratch)


def diagonal_mass(probs: Tensor, offset: int = 0, query_offset: int = 0) -> Tensor:
    """Weight on key ``j = i + offset`` with ``i = query_offset + row index``; 0 where that key does not exist.

    ``offset=-1`` is the previous token, ``0`` the token itself, ``+1`` the next one (Clark et al. 2019;
    Kovaleva et al. 2019, "Revealing the Dark Secrets of BERT"). Returns ``[..., Q]``.

    Example:
        >>> probs = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.8, 0.2]])
        >>> diagonal_mass(probs, offset=-1)  # previous token: A_{i, i-1}, row 0 has none
        tensor([0.0000, 0.9000, 0.8000])
    """
    num_queries, num_keys = probs.shape[-2:]
    target = torch.arange(num_queries, device=probs.device) + (query_offset + offset)
    exists = (target >= 0) & (target < num_keys)
    index = target.clamp(0, max(num_keys - 1, 0)).expand(*probs.shape[:-1])[..., None]
    picked = probs.gather(-1, index)[..., 0]
    return torch.where(exists, picked, torch.zeros_like(picked))


def local_window_mass(probs: Tensor, window: int, query_offset: int = 0, scratch: Tensor | None = None) -> Tensor:
    """Weight within ``window`` positions of the query: ``sum_{j: |i - j| <= window} A_ij`` (``[..., Q]``).

    ``i = query_offset + row index``; index distance also for cross-attention. ``scratch`` as in
    :func:`mean_attention_distance`. Local-attention measure as in Kovaleva et al. 2019 and Vig & Belinkov 2019.

    Example:
        >>> local_window_mass(torch.tensor([[0.2, 0.3, 0.5]]), window=1)
        tensor([0.5000])
    """
    probs = _float(probs)
    near = (_query_minus_key(probs, query_offset).abs() <= window).to(probs.dtype)
    return _row_dot(probs, near, scratch)


def _row_dot(probs: Tensor, weights: Tensor, scratch: Tensor | None) -> Tensor:
    """``sum_j probs_ij weights_ij`` over the last dim, the product written to ``scratch`` when one is given."""
    if scratch is None:
        return torch.linalg.vecdot(probs, weights)
    return torch.mul(probs, weights, out=scratch).sum(-1)


def top_k_pairs(probs2d: Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest entries of one ``[Q, K]`` map as ``(query, key, weight)``, by weight descending.

    The ``(i, j)`` of the ``k`` largest ``A_ij`` (``topk`` over the flattened map), e.g. to list a head's strongest
    token pairs as Clark et al. 2019 do. Synchronizes with the host (meant for reports). ``k`` is capped at the
    number of entries.

    Example:
        >>> top_k_pairs(torch.tensor([[0.25, 0.75], [0.375, 0.625]]), 2)
        [(0, 1, 0.75), (1, 1, 0.625)]
    """
    if probs2d.dim() != 2:
        raise ValueError(f"top_k_pairs expects a single [Q, K] map, got shape {tuple(probs2d.shape)}")
    num_keys = probs2d.shape[1]
    values, flat = probs2d.detach().flatten().topk(min(k, probs2d.numel()))
    return [(i // num_keys, i % num_keys, v) for i, v in zip(flat.tolist(), values.tolist(), strict=False)]


def top_positions(scores_1d: Tensor, k: int, names: Sequence[str] | None = None) -> list[tuple[str | int, float]]:
    """The ``k`` highest scores as ``(name or index, score)``, descending. Synchronizes (meant for reports).

    ``topk`` of ``scores_1d``, each index ``i`` replaced by ``names[i]`` when names are given.

    Example:
        >>> top_positions(torch.tensor([0.5, 2.0, 1.0]), 2, names=["a", "b", "c"])
        [('b', 2.0), ('c', 1.0)]
    """
    if scores_1d.dim() != 1:
        raise ValueError(f"top_positions expects a 1-D tensor, got shape {tuple(scores_1d.shape)}")
    if names is not None and len(names) != scores_1d.numel():
        raise ValueError(f"{len(names)} names for {scores_1d.numel()} scores")
    values, index = scores_1d.detach().topk(min(k, scores_1d.numel()))
    return [(i if names is None else names[i], v) for i, v in zip(index.tolist(), values.tolist(), strict=False)]


def _check_maps(maps: Sequence[Tensor], what: str = "maps") -> None:
    if len(maps) == 0:
        raise ValueError(f"{what} is empty: need at least one [B, H, L, L] attention map")
    first = maps[0].shape
    for layer, attn in enumerate(maps):
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ValueError(f"{what}[{layer}] must be a square [B, H, L, L] map, got shape {tuple(attn.shape)}")
        if attn.shape[0] != first[0] or attn.shape[-1] != first[-1]:
            raise ValueError(
                f"{what}[{layer}] has shape {tuple(attn.shape)}, incompatible with {what}[0] shape {tuple(first)}"
                " (batch and sequence length must match)"
            )


def _rollout(fused: Sequence[Tensor], discard_ratio: float, residual_weight: float) -> Tensor:
    """Roll fused ``[B, L, L]`` maps (first layer first) into ``A_L @ ... @ A_1``."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not 0.0 <= residual_weight <= 1.0:
        raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight}")
    batch, length = fused[0].shape[0], fused[0].shape[-1]
    eye = torch.eye(length, device=fused[0].device, dtype=fused[0].dtype)
    num_discard = int(discard_ratio * length * length)
    result = None
    for layer in fused:
        if num_discard:
            smallest = layer.reshape(batch, -1).topk(num_discard, dim=-1, largest=False).indices
            drop = torch.zeros(batch, length * length, dtype=torch.bool, device=layer.device)
            drop = drop.scatter(1, smallest, True).view(batch, length, length) & ~eye.bool()
            layer = layer.masked_fill(drop, 0)
        step = residual_weight * eye + (1 - residual_weight) * layer
        step = step / step.sum(-1, keepdim=True).clamp_min(torch.finfo(step.dtype).tiny)
        result = rollout_product(step, result)
    assert result is not None  # fused is non-empty: fused[0] is read above
    return result


def attention_rollout(
    maps: Sequence[Tensor],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    residual_weight: float = 0.5,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    Per layer ``l`` (``maps`` first layer first, each ``[B, H, L, L]``): ``F_l = fuse_h(A_l)`` (mean, max or min
    over heads, as in jacobgil/vit-explain); if ``discard_ratio > 0`` the ``int(discard_ratio * L^2)`` smallest
    entries of ``F_l`` are zeroed per batch element, diagonal excepted; then
    ``R_l = residual_weight * I + (1 - residual_weight) * F_l`` with rows renormalized to sum to 1, and
    ``rollout = R_L @ ... @ R_1``. Unlike vit-explain, rows (not columns) are renormalized and the discard applies
    to every batch element. With ``residual_weight=0`` a row left without mass stays zero.

    Returns:
        ``[B, L, L]``; row ``i`` is how much each input token contributes to output token ``i``.

    Raises:
        ValueError: empty ``maps``, non-square maps, mismatched batch or sequence sizes, bad ratios.

    Example:
        >>> a = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 2, 2, 2)  # [B=1, H=2, L=2, L=2]
        >>> attention_rollout([a, a])  # R = 0.5 I + 0.5 A = [[0.5, 0.5], [0, 1]], then R @ R
        tensor([[[0.2500, 0.7500],
                 [0.0000, 1.0000]]])
    """
    _check_maps(maps)
    fusions: dict[str, Callable[..., Tensor]] = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}
    fuse = fusions.get(head_fusion)
    if fuse is None:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    return _rollout([fuse(_float(attn), dim=1) for attn in maps], discard_ratio, residual_weight)


def gradient_weighted_rollout(maps: Sequence[Tensor], grads: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Gradient-weighted rollout: per layer ``F_l = mean_h(max(A_l * dA_l, 0))``, then :func:`attention_rollout`'s
    residual (0.5), discard and renormalization steps.

    ``dA_l`` is the gradient of the explained output w.r.t. ``A_l``. ``maps`` and ``grads`` must already be paired
    by site, first layer first (hooks deliver gradients in reverse layer order: vit-explain issue 6). Negatives
    are clamped before the head mean, as in Chefer et al. 2021 ("Generic Attention-model Explainability");
    jacobgil/vit-explain averages first.

    Returns:
        ``[B, L, L]``.

    Example:
        >>> a = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 2, 2, 2)
        >>> grads = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)])[None]  # head 1's negative part is dropped
        >>> gradient_weighted_rollout([a], [grads])  # F = A / 2, R = [[0.5, 0.25], [0, 0.75]] renormalized
        tensor([[[0.6667, 0.3333],
                 [0.0000, 1.0000]]])
    """
    _check_maps(maps)
    _check_maps(grads, "grads")
    if len(maps) != len(grads):
        raise ValueError(f"{len(maps)} maps but {len(grads)} grads: pair them by site")
    for layer, (attn, grad) in enumerate(zip(maps, grads, strict=False)):
        if attn.shape != grad.shape:
            raise ValueError(f"maps[{layer}] shape {tuple(attn.shape)} != grads[{layer}] shape {tuple(grad.shape)}")
    fused = [(_float(attn) * _float(grad)).clamp_min(0).mean(dim=1) for attn, grad in zip(maps, grads, strict=False)]
    return _rollout(fused, discard_ratio, 0.5)


def modality_agreement(a_to_b: Tensor, b_to_a: Tensor) -> Tensor:
    """Pearson correlation between ``a_to_b`` ``[..., La, Lb]`` and ``b_to_a.transpose(-1, -2)``.

    ``r = sum (x - x̄)(y - ȳ) / sqrt(sum (x - x̄)^2 sum (y - ȳ)^2)`` over the flattened last two dims, clamped to
    ``[-1, 1]``; 0 where either map is constant (correlation undefined). High values mean the two cross-attention
    directions pick the same token pairs (co-attention symmetry, cf. Lu et al. 2019, ViLBERT).

    Returns:
        ``[...]``.

    Raises:
        ValueError: when the shapes do not match after the transpose.

    Example:
        >>> a_to_b = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(float(modality_agreement(a_to_b, a_to_b.T)), 4)  # both directions pick the same pairs
        1.0
        >>> round(float(modality_agreement(a_to_b, (1 - a_to_b).T)), 4)  # opposite pairs
        -1.0
    """
    y = b_to_a.transpose(-1, -2)
    if a_to_b.shape != y.shape:
        raise ValueError(
            f"a_to_b shape {tuple(a_to_b.shape)} needs b_to_a of shape "
            f"{(*tuple(a_to_b.shape[:-2]), a_to_b.shape[-1], a_to_b.shape[-2])}, got {tuple(b_to_a.shape)}"
        )
    x, y = _float(a_to_b).flatten(-2), _float(y).flatten(-2)
    constant = (x.amax(-1) == x.amin(-1)) | (y.amax(-1) == y.amin(-1))
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    denominator = ((x * x).sum(-1) * (y * y).sum(-1)).sqrt()
    r = (x * y).sum(-1) / denominator.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(constant, torch.zeros_like(r), r.clamp(-1, 1))


def js_divergence(p: Tensor, q: Tensor, smoothing: float = 0.001, dim: int = -1) -> Tensor:
    """Jensen-Shannon divergence in nats between distributions along ``dim`` (Clark et al. 2019).

    ``P' = smoothing / n + (1 - smoothing) P`` (same for ``Q``), ``M = (P' + Q') / 2``,
    ``JS = 1/2 sum [P' log(P'/M) + Q' log(Q'/M)]``, in ``[0, log 2]``; ``0 log 0 = 0``. ``p`` and ``q`` broadcast;
    ``dim`` is reduced. Divergence of Lin 1991 ("Divergence Measures Based on the Shannon Entropy").

    Example:
        >>> round(float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), smoothing=0.0)), 4)  # log 2
        0.6931
        >>> float(js_divergence(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])))
        0.0
    """
    p, q = _float(p), _float(q)
    n = p.shape[dim]
    p = smoothing / n + (1 - smoothing) * p
    q = smoothing / n + (1 - smoothing) * q
    m = (p + q) / 2
    # Grouped so that swapping p and q gives bit-identical results.
    terms = (torch.xlogy(p, p) - torch.xlogy(p, m)) + (torch.xlogy(q, q) - torch.xlogy(q, m))
    return (terms.sum(dim) / 2).clamp_min(0)


def head_js_distance(maps: Tensor) -> Tensor:
    """Pairwise head distance: :func:`js_divergence` between heads' rows, averaged over query rows and batch.

    ``D[g, h] = mean_{b, i} JS(A[b, g, i, :], A[b, h, i, :])`` (Clark et al. 2019 sum over rows and documents; the
    mean keeps it in ``[0, log 2]``). All rows count, padding rows included. Symmetric with a zero diagonal. Memory
    is ``O(B H Q K)``: one head against all others at a time.

    Args:
        maps: ``[B, H, Q, K]`` or ``[H, Q, K]``.

    Returns:
        ``[H, H]``.

    Example:
        >>> maps = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [H=2, Q=1, K=2]: disjoint heads
        >>> torch.round(head_js_distance(maps), decimals=4)  # just below log 2 (smoothing 0.001)
        tensor([[0.0000, 0.6888],
                [0.6888, 0.0000]])
    """
    if maps.dim() == 3:
        maps = maps[None]
    if maps.dim() != 4:
        raise ValueError(f"head_js_distance expects [B, H, Q, K] or [H, Q, K], got shape {tuple(maps.shape)}")
    distance = torch.stack([js_divergence(maps[:, h : h + 1], maps).mean(dim=(0, 2)) for h in range(maps.shape[1])])
    return (distance + distance.T) / 2  # exactly symmetric whatever the reduction order


def head_type_score(probs: Tensor, pattern: Tensor) -> Tensor:
    """TransformerLens ``head_detector`` "mul" score: ``sum(A * P) / sum(A)`` over the last two dims.

    The share of attention that falls on the pattern's (0/1) pairs; 0 where ``sum(A) = 0``. ``pattern`` broadcasts
    against ``probs`` the usual way: a ``[B, L, L]`` token pattern scores ``[B, H, L, L]`` maps as
    ``pattern[:, None]``. Unlike TransformerLens, scores are per map, not averaged over sequences.

    Returns:
        The broadcast shape without the last two dims, e.g. ``[..., H]`` for ``[..., H, Q, K]`` probs.

    Example:
        >>> probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
        >>> head_type_score(probs, previous_token_pattern(3))  # (1 + 0.5) / 3
        tensor(0.5000)
    """
    probs = _float(probs)
    total = probs.sum((-2, -1))
    on_pattern = (probs * pattern.to(probs.dtype)).sum((-2, -1))
    return torch.where(total > 0, on_pattern / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def previous_token_pattern(length: int, *, device: torch.device | str | None = None) -> Tensor:
    """``[L, L]`` float pattern with ``P[i, i-1] = 1`` (TransformerLens previous-token head).

    Example:
        >>> previous_token_pattern(3)
        tensor([[0., 0., 0.],
                [1., 0., 0.],
                [0., 1., 0.]])
    """
    return torch.ones(max(length - 1, 0), device=device).diag(-1)


def duplicate_token_pattern(tokens: Tensor) -> Tensor:
    """``[..., L, L]`` float pattern with ``P[i, j] = 1`` iff ``tok_i == tok_j`` and ``j < i`` (TransformerLens
    duplicate-token head), for ``tokens`` ``[..., L]``.

    Example:
        >>> duplicate_token_pattern(torch.tensor([5, 7, 5, 7]))
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [1., 0., 0., 0.],
                [0., 1., 0., 0.]])
    """
    return (tokens[..., :, None] == tokens[..., None, :]).float().tril(-1)


def induction_pattern(tokens: Tensor) -> Tensor:
    """``[..., L, L]`` induction pattern exactly as TransformerLens ``get_induction_head_detection_pattern``.

    The duplicate pattern shifted right one column, column 0 zero, then ``tril``: ``P[i, j] = 1`` iff
    ``tok_i == tok_{j-1}`` and ``1 <= j <= i``. So ``j = i`` counts when ``tok_i == tok_{i-1}`` (a repeated
    token attending to itself), as in TransformerLens. Induction heads: Olsson et al. 2022, "In-context Learning
    and Induction Heads".

    Example:
        >>> induction_pattern(torch.tensor([5, 7, 5, 7]))  # the second 5 attends to the 7 that followed the first
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [0., 1., 0., 0.],
                [0., 0., 1., 0.]])
    """
    duplicate = duplicate_token_pattern(tokens)
    shifted = torch.zeros_like(duplicate)
    shifted[..., 1:] = duplicate[..., :-1]
    return shifted.tril()


def _tensor_chunks(probs: Tensor, chunk_size: int | None) -> Iterator[tuple[int, Tensor]]:
    probs = as_bhqk(probs)
    step = probs.shape[-2] if chunk_size is None else chunk_size
    for start in range(0, probs.shape[-2], max(step, 1)):
        yield start, probs[..., start : start + step, :]


def reduce_in_chunks(
    capture_or_probs: AttentionCapture | Tensor,
    reducers: Mapping[str, Reducer],
    chunk_size: int | None,
) -> dict[str, tuple[Tensor, Tensor] | int]:
    """Stream per-row measures over query chunks without materializing ``[B, H, L, L]``.

    Each reducer maps ``(probs_chunk [B, H, q, K], query_offset)`` to per-row values ``[B, H, q]``. For each name
    the result holds ``(sum_i v_i, sum_i v_i^2)`` over all query rows, both ``[B, H]`` (float64; float32 on MPS,
    which has no float64), and ``"_rows"`` holds the number of rows (a Python int), so that
    ``mean = sum / rows`` and ``var = sumsq / rows - mean^2``.

    Args:
        capture_or_probs: an :class:`~lightning_attn.capture.record.AttentionCapture` (read through its
            ``chunks``) or a probability tensor ``[..., Q, K]`` (reshaped to ``[B, H, Q, K]``, sliced here).
        reducers: name to reducer; names must not start with ``_``.
        chunk_size: query rows per chunk; ``None`` for all rows at once.

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])[None, None]  # [B=1, H=1, Q=3, K=2]
        >>> out = reduce_in_chunks(probs, {"max": lambda chunk, start: max_weight(chunk)}, chunk_size=2)
        >>> out["_rows"], out["max"][0].tolist(), out["max"][1].tolist()  # 0.5 + 1 + 0.75, 0.25 + 1 + 0.5625
        (3, [[2.25]], [[1.8125]])
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if any(name.startswith("_") for name in reducers):
        raise ValueError(f"reducer names must not start with '_': {sorted(reducers)}")
    if isinstance(capture_or_probs, Tensor):
        chunks = _tensor_chunks(capture_or_probs, chunk_size)
    else:
        chunks = capture_or_probs.chunks(chunk_size)
    sums: dict[str, Tensor] = {}
    sumsq: dict[str, Tensor] = {}
    rows = 0
    for start, chunk in chunks:
        rows += chunk.shape[-2]
        for name, reducer in reducers.items():
            values = reducer(chunk, start)
            values = values.to(torch.float32 if values.device.type == "mps" else torch.float64)
            sums[name] = sums.get(name, 0) + values.sum(-1)
            sumsq[name] = sumsq.get(name, 0) + (values * values).sum(-1)
    totals: dict[str, tuple[Tensor, Tensor] | int] = {name: (sums[name], sumsq[name]) for name in sums}
    totals["_rows"] = rows
    return totals
