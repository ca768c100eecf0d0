"""Post-softmax attention probabilities recomputed from queries and keys.

Every backend that cannot read the weights from the kernel (SDPA, the fused
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` fast paths) ends here, so that
mask, causal and grouped-query conventions are implemented exactly once and match
``torch.nn.functional.scaled_dot_product_attention``'s math kernel.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

# Bound at import, before any recorder replaces ``torch.softmax``: a recomputation is never taken for
# hand-written attention of the model.
_softmax = torch.softmax


def autocast_off(tensor: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast disabled on ``tensor``'s device while active (a no-op context when it is not enabled).

    Recomputations run inside the caller's forward: under ``torch.autocast`` their matmuls would run in
    bfloat16/float16 and the maps would not be the float32 probabilities the recorder promises.
    """
    device = tensor.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


def _additive_or_bool_mask(attn_mask: Tensor | None, *, true_means_masked: bool) -> tuple[Tensor | None, Tensor | None]:
    """Split a mask into (additive float mask, boolean 'may attend' mask)."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return None, ~attn_mask if true_means_masked else attn_mask
    return attn_mask.float(), None


def attention_probs(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_slice: slice | None = None,
    mask_true_means_masked: bool = False,
) -> Tensor:
    """``softmax(q k^T * scale + mask)`` in float32, with SDPA's semantics.

    Args:
        query: ``[..., Hq, L, E]``.
        key: ``[..., Hk, S, E]``; ``Hq`` must be a multiple of ``Hk`` when ``enable_gqa``.
        attn_mask: broadcastable to ``[..., Hq, L, S]``. Boolean ``True`` means *may attend*
            (SDPA's convention) unless ``mask_true_means_masked`` (``nn.MultiheadAttention``'s);
            a float mask is added to the scores.
        is_causal: top-left aligned lower-triangular ``[L, S]`` mask, also when ``L != S``.
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: repeat key heads (``repeat_interleave`` over the head dim) as SDPA does.
        query_slice: compute only these query rows (the query-chunked path); masks are sliced to match.

    Returns:
        ``[..., Hq, L', S]`` float32 probabilities, also under ``torch.autocast`` (recomputed with it off);
        rows with no key left to attend are 0, as in SDPA's math kernel.
    """
    with autocast_off(query):
        return _probs(query, key, attn_mask, is_causal, scale, enable_gqa, query_slice, mask_true_means_masked)


def _probs(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    query_slice: slice | None,
    mask_true_means_masked: bool,
) -> Tensor:
    scores = _scores(query, key, attn_mask, is_causal, scale, enable_gqa, query_slice, None, mask_true_means_masked)
    probs = _softmax(scores, dim=-1)
    if attn_mask is not None or is_causal:
        probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return probs


def attention_scores(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_slice: slice | None = None,
    key_slice: slice | None = None,
    mask_true_means_masked: bool = False,
) -> Tensor:
    """The masked, scaled scores ``q k^T * scale + mask`` (``-inf`` where a key is masked) whose row softmax
    :func:`attention_probs` returns, for the rows ``query_slice`` and the keys ``key_slice`` (a key block of the
    long-context statistics); float32 with autocast off. Same arguments as :func:`attention_probs`."""
    with autocast_off(query):
        return _scores(
            query, key, attn_mask, is_causal, scale, enable_gqa, query_slice, key_slice, mask_true_means_masked
        )


def _scores(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    query_slice: slice | None,
    key_slice: slice | None,
    mask_true_means_masked: bool,
) -> Tensor:
    q = query.float()
    k = key.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    rows = query_slice if query_slice is not None else slice(0, num_queries)
    cols = key_slice if key_slice is not None else slice(0, num_keys)
    q = q[..., rows, :]
    k = k[..., cols, :]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)

    additive, allowed = _additive_or_bool_mask(attn_mask, true_means_masked=mask_true_means_masked)
    if additive is not None:
        scores = scores + _cols(_rows(additive, rows, num_queries), cols, num_keys)
    if allowed is not None:
        scores = scores.masked_fill(~_cols(_rows(allowed, rows, num_queries), cols, num_keys), float("-inf"))
    if is_causal:
        query_index = torch.arange(num_queries, device=scores.device)[rows, None]
        key_index = torch.arange(num_keys, device=scores.device)[None, cols]
        scores = scores.masked_fill(key_index > query_index, float("-inf"))
    return scores


def _rows(mask: Tensor, rows: slice, num_queries: int) -> Tensor:
    """Slice the query dimension of a broadcastable mask (size-1 query dims stay as they are)."""
    if mask.dim() >= 2 and mask.shape[-2] == num_queries and num_queries != 1:
        return mask[..., rows, :]
    return mask


def _cols(mask: Tensor, cols: slice, num_keys: int) -> Tensor:
    """Slice the key dimension of a broadcastable mask (a size-1 key dim stays as it is)."""
    if mask.dim() >= 1 and mask.shape[-1] == num_keys and num_keys != 1:
        return mask[..., cols]
    return mask


def in_projection_qk(
    x_query: Tensor, x_key: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor]:
    """Queries and keys ``[B, H, L, E/H]`` of a packed ``nn.MultiheadAttention`` in-projection (batch first)."""
    embed_dim = in_proj_weight.shape[1]
    w_q, w_k = in_proj_weight[:embed_dim], in_proj_weight[embed_dim : 2 * embed_dim]
    b_q = b_k = None
    if in_proj_bias is not None:
        b_q, b_k = in_proj_bias[:embed_dim], in_proj_bias[embed_dim : 2 * embed_dim]
    q = torch.nn.functional.linear(x_query, w_q, b_q)
    k = torch.nn.functional.linear(x_key, w_k, b_k)
    head_dim = embed_dim // num_heads
    q = q.unflatten(-1, (num_heads, head_dim)).transpose(-3, -2)
    k = k.unflatten(-1, (num_heads, head_dim)).transpose(-3, -2)
    return q, k


def native_mask(mask: Tensor | None, mask_type: int | None, batch: int, num_heads: int) -> Tensor | None:
    """Bring the merged mask of the fused MHA kernels to a shape broadcastable to ``[B, H, L, S]``.

    ``mask_type`` as produced by ``nn.MultiheadAttention.merge_masks``: 0 ``[L, S]``,
    1 key padding ``[B, S]``, 2 ``[B, H, L, S]``.
    """
    if mask is None:
        return None
    if mask_type == 1:
        return mask.view(batch, 1, 1, -1)
    return mask
