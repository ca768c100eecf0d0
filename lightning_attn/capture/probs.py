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

from lightning_attn.capture.workspace import Buffer

# Bound at import, before any recorder replaces ``torch.softmax``: a recomputation is never taken for
# hand-written attention of the model.
_softmax = torch.softmax

#: The score of a masked key where a finite one is needed (the statistics engine's ``p * s``, which must be 0 there,
#: not ``0 * -inf``): far enough below any real score that its probability is exactly 0 in float32. Additive masks
#: at or below ``LOWEST / 2`` mask their key.
LOWEST = torch.finfo(torch.float32).min


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
        args = (attn_mask, is_causal, scale, enable_gqa, query_slice, mask_true_means_masked)
        return scores_and_probs(query, key, *args)[1]


def scores_and_probs(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    query_slice: slice | None = None,
    mask_true_means_masked: bool = False,
    masked_score: float = float("-inf"),
    out: tuple[Buffer, Buffer] | None = None,
) -> tuple[Tensor, Tensor]:
    """The scores of :func:`attention_scores` and the probabilities of :func:`attention_probs` of the same rows,
    computed together (one matmul, one softmax; the caller's autocast state applies). Same arguments as
    :func:`attention_scores`; ``out``: where to write the scores and the probabilities (reusable buffers)."""
    num_keys = key.shape[-2]
    bias = _mask_bias(attn_mask, is_causal, query, num_keys, query_slice, None, mask_true_means_masked)
    dead = None
    if bias is not None:
        # rows with no key left to attend are 0 (SDPA's math kernel), read off the small bias, not the scores
        dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
        if masked_score != float("-inf"):
            bias = bias.clamp_min(masked_score)
    scores = _scores(query, key, bias, scale, enable_gqa, query_slice, None, None if out is None else out[0])
    probs = _softmax(scores, dim=-1) if out is None else softmax_into(scores, out[1])
    if dead is not None and (probs.device.type != "cpu" or dead.any()):  # the check syncs on an accelerator
        # in place unless autograd needs the softmax's output for its backward
        probs = probs.masked_fill(dead, 0.0) if probs.requires_grad else probs.masked_fill_(dead, 0.0)
    return scores, probs


def softmax_into(scores: Tensor, out: Buffer) -> Tensor:
    """The row softmax of ``scores`` written to ``out(shape, device)`` (a reusable buffer; ``torch.softmax`` has no
    ``out=``)."""
    return torch._softmax(scores, -1, False, out=out(scores.shape, scores.device))


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
    masked_score: float = float("-inf"),
    out: Buffer | None = None,
) -> Tensor:
    """The masked, scaled scores ``q k^T * scale + mask`` whose row softmax :func:`attention_probs` returns, for the
    rows ``query_slice`` and the keys ``key_slice`` (a key block of the long-context statistics); float32 with
    autocast off. Same arguments as :func:`attention_probs`, and ``masked_score``: the score of a masked key
    (``-inf``, or a finite floor such as :data:`LOWEST` so that ``p * s = 0`` there; additive mask values below it
    are raised to it); ``out(shape, device)``: the float32 tensor to write the scores to (a reusable buffer)."""
    with autocast_off(query):
        bias = _mask_bias(
            attn_mask, is_causal, query, key.shape[-2], query_slice, key_slice, mask_true_means_masked, masked_score
        )
        return _scores(query, key, bias, scale, enable_gqa, query_slice, key_slice, out)


def _scores(
    query: Tensor,
    key: Tensor,
    bias: Tensor | None,
    scale: float | None,
    enable_gqa: bool,
    query_slice: slice | None,
    key_slice: slice | None,
    out: Buffer | None = None,
) -> Tensor:
    """``q k^T * scale + bias`` for the rows and keys asked: one matmul and one in-place add (the scale is folded
    into the queries, which are ``E / K`` times smaller than the scores), into ``out(shape, device)`` if given."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q = query[..., query_slice or slice(None), :].float() * scale
    k = key[..., key_slice or slice(None), :].float()
    heads, kv_heads = q.shape[-3], k.shape[-3]
    grouped = enable_gqa and kv_heads != heads
    if grouped:  # grouped queries against their shared key head: [.., Hk, group * rows, E] @ [.., Hk, E, S]
        q = q.reshape(*q.shape[:-3], kv_heads, (heads // kv_heads) * q.shape[-2], q.shape[-1])
    if out is None:
        scores = torch.matmul(q, k.transpose(-2, -1))
    else:
        shape = torch.Size((*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2]))
        scores = torch.matmul(q, k.transpose(-2, -1), out=out(shape, q.device))
    if grouped:
        scores = scores.view(*scores.shape[:-3], heads, -1, scores.shape[-1])
    if bias is None:
        return scores
    if torch.broadcast_shapes(scores.shape, bias.shape) == scores.shape:
        return scores.add_(bias)
    return scores + bias


def _mask_bias(
    attn_mask: Tensor | None,
    is_causal: bool,
    query: Tensor,
    num_keys: int,
    query_slice: slice | None,
    key_slice: slice | None,
    mask_true_means_masked: bool,
    masked_score: float = float("-inf"),
) -> Tensor | None:
    """The call's masks as one additive float32 bias broadcastable to the scores of the rows and keys asked:
    ``masked_score`` where a key is masked (bool mask, causal, an additive mask at or below it), the additive mask's
    value elsewhere. It has the mask's size, not the scores' (no head dimension for padding masks)."""
    num_queries = query.shape[-2]
    rows = query_slice or slice(0, num_queries)
    cols = key_slice or slice(0, num_keys)
    additive, allowed = _additive_or_bool_mask(attn_mask, true_means_masked=mask_true_means_masked)
    if allowed is not None:
        allowed = _cols(_rows(allowed, rows, num_queries), cols, num_keys)
    if is_causal:
        query_index = torch.arange(num_queries, device=query.device)[rows, None]
        key_index = torch.arange(num_keys, device=query.device)[None, cols]
        causal = key_index <= query_index
        allowed = causal if allowed is None else allowed & causal
    if additive is None and allowed is None:
        return None
    if additive is not None:
        additive = _cols(_rows(additive, rows, num_queries), cols, num_keys).clamp_min(masked_score)
        if allowed is None:
            return additive
        return additive.masked_fill(~allowed, masked_score)
    assert allowed is not None
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, masked_score)


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
    """Queries and keys ``[B, H, L, E/H]`` of a packed ``nn.MultiheadAttention`` in-projection (batch first), in the
    wider of the inputs' and the weights' dtypes (a float32 layer fed half-precision activations is computed in
    float32)."""
    dtype = torch.promote_types(x_query.dtype, in_proj_weight.dtype)
    x_query, x_key, in_proj_weight = x_query.to(dtype), x_key.to(dtype), in_proj_weight.to(dtype)
    in_proj_bias = None if in_proj_bias is None else in_proj_bias.to(dtype)
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
