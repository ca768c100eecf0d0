"""What a call tells about its attention site: is the module attention, how many query heads, self or cross.

Pure helpers of the interception layer (:mod:`lightning_attn.capture.backends`): they read a module's attributes,
the arguments it was called with and the tensors handed to the attention entry points, and never change them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, Literal

from torch import Tensor, nn

#: Forward arguments that carry the sequence a cross-attention attends to (Hugging Face ``key_value_states`` in
#: BART/T5/Whisper, ``encoder_hidden_states`` in GPT-2/BERT decoders, ``memory`` in ``nn.Transformer*``).
CROSS_ARGUMENTS = (
    "key_value_states",
    "encoder_hidden_states",
    "cross_attention_states",
    "memory",
    "context",
    "encoder_outputs",
)

#: Forward arguments that carry the queries' sequence ``[batch, queries, features]``.
QUERY_ARGUMENTS = ("hidden_states", "x", "query", "src", "tgt")

#: Attributes that hold a module's number of query heads, in the order they are tried.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")


_ATTENTION_CLASSES: dict[type, bool] = {}


def _class_is_attention_like(cls: type) -> bool:
    known = _ATTENTION_CLASSES.get(cls)
    if known is None:
        known = _ATTENTION_CLASSES[cls] = issubclass(cls, nn.MultiheadAttention) or "attention" in cls.__name__.lower()
    return known


def is_attention_like(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention``, a class named ``*Attention*``, or a module with a head-count attribute.

    >>> is_attention_like(nn.MultiheadAttention(4, 2)), is_attention_like(nn.Linear(2, 2))
    (True, False)
    """
    if _class_is_attention_like(type(module)):
        return True
    return any(isinstance(getattr(module, name, None), int) for name in HEAD_ATTRIBUTES[:2])


def query_heads(module: nn.Module) -> int | None:
    """The module's own number of query heads (``num_heads``, ..., or its ``config.num_attention_heads``).

    >>> query_heads(nn.MultiheadAttention(8, 4)), query_heads(nn.Linear(2, 2))
    (4, None)
    """
    for name in HEAD_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(getattr(module, "config", None), "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


_POSITIONAL_NAMES: dict[type, tuple[str, ...]] = {}


def _positional_names(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s positional parameters after ``self`` (empty when it takes ``*args`` only)."""
    if cls not in _POSITIONAL_NAMES:
        try:
            parameters = list(inspect.signature(getattr(cls, "forward")).parameters.values())[1:]  # noqa: B009
        except (TypeError, ValueError):
            parameters = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        _POSITIONAL_NAMES[cls] = tuple(p.name for p in parameters if p.kind in kinds)
    return _POSITIONAL_NAMES[cls]


def call_arguments(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The module's forward arguments by name (positional ones named from its signature)."""
    named = dict(zip(_positional_names(type(module)), args, strict=False))  # *args beyond the names: unnamed
    named.update(kwargs or {})
    return named


def running_call(module: nn.Module, max_depth: int = 40) -> dict[str, Any] | None:
    """The arguments ``module`` is being called with, read from its ``Module._call_impl`` frame up the stack.

    Global pre-hooks do not see keyword arguments, so the entry-point wrappers look them up here, where the
    call is still running; ``None`` when the frame is not found (a compiled graph, a call from C++).
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            if local.get("self") is module:
                return call_arguments(module, local.get("args", ()), local.get("kwargs"))
        frame = frame.f_back
    return None


def attention_kind(module: nn.Module, arguments: Mapping[str, Any] | None) -> Literal["self", "cross"]:
    """``"cross"`` when the call attended to another sequence, from what the call was given, never from lengths.

    Cross when the module says so (``is_cross_attention``), its keys are another tensor than its queries
    (``forward(query, key, value)``), its forward got a sequence to attend to (:data:`CROSS_ARGUMENTS`), or
    (arguments unknown, as in a compiled graph) its class is named ``*Cross*``.

    >>> import torch
    >>> attention_kind(nn.Linear(2, 2), {"key_value_states": torch.zeros(1)})
    'cross'
    >>> attention_kind(nn.Linear(2, 2), {"hidden_states": torch.zeros(1), "key_value_states": None})
    'self'
    """
    if getattr(module, "is_cross_attention", False) is True:
        return "cross"
    if (
        arguments is not None
        and isinstance(arguments.get("query"), Tensor)
        and isinstance(arguments.get("key"), Tensor)
    ):
        return "self" if arguments["query"] is arguments["key"] else "cross"  # nn.MultiheadAttention(query, key, value)
    if arguments is not None:
        return "cross" if any(isinstance(arguments.get(name), Tensor) for name in CROSS_ARGUMENTS) else "self"
    return "cross" if "cross" in type(module).__name__.lower() else "self"


def query_length(arguments: Mapping[str, Any]) -> int | None:
    """Length of the queries' sequence ``[batch, queries, features]`` among the call's arguments, if any."""
    for name in QUERY_ARGUMENTS:
        value = arguments.get(name)
        if isinstance(value, Tensor) and value.dim() == 3 and not value.is_nested:
            return int(value.shape[-2])
    return None


def packed_head_factor(module: nn.Module, query: Tensor, key: Tensor, is_causal: bool) -> int:
    """How many query heads the caller folded into the query axis (1: none).

    Hugging Face's grouped-query attention, for a one-token step with a mask, reshapes the queries
    ``[B, H, L, E] -> [B, H_kv, (H / H_kv) L, E]`` so that each key head serves its group without repeating keys
    (``pack_gqa``). The fold shows as fewer query heads than the module has, as many as the key heads, and a
    query axis that is a multiple of the fold.
    """
    heads = query_heads(module)
    if heads is None or is_causal or query.dim() < 3 or key.dim() < 3:
        return 1
    call_heads = int(query.shape[-3])
    if heads == call_heads or heads % call_heads or int(key.shape[-3]) != call_heads:
        return 1
    factor = heads // call_heads
    return factor if query.shape[-2] % factor == 0 else 1


def unfold_packed_heads(query: Tensor, attn_mask: Tensor | None, factor: int) -> tuple[Tensor, Tensor | None]:
    """Undo the fold of :func:`packed_head_factor`: queries ``[B, H, L, E]`` and a mask broadcastable to them.

    Key head ``g`` then serves query heads ``g * factor ... (g + 1) * factor - 1``, which is grouped-query
    attention with ``enable_gqa`` (``repeat_interleave`` of the key heads).

    >>> import torch
    >>> q, m = unfold_packed_heads(torch.zeros(2, 2, 4, 8), torch.zeros(2, 1, 1, 5), factor=4)
    >>> tuple(q.shape), tuple(m.shape)
    ((2, 8, 1, 8), (2, 1, 1, 5))
    """
    *batch, call_heads, folded, dim = query.shape
    length = folded // factor
    query = query.reshape(*batch, call_heads * factor, length, dim)
    if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.shape[-2] == folded and folded != 1:
        mask = attn_mask.expand(*attn_mask.shape[:-3], call_heads, folded, attn_mask.shape[-1])
        attn_mask = mask.reshape(*mask.shape[:-3], call_heads * factor, length, mask.shape[-1])
    return query, attn_mask


def is_attention_probs(
    weights: Tensor, num_queries: int | None, rows_sum_to_one: bool, tolerance: float = 1e-2
) -> bool:
    """Whether ``weights`` are attention probabilities ``[..., queries, keys]``.

    Non-negative; when ``rows_sum_to_one`` (no dropout ran) each row sums to 1 or is all zero (a fully masked
    row) and some row sums to 1. This tells weights from what else attention modules return in the same shape:
    T5's position bias (negative, rows not summing to 1), a cache. Costs one host sync.

    >>> import torch
    >>> is_attention_probs(torch.tensor([[0.25, 0.75], [0.0, 0.0]]), 2, True)
    True
    >>> is_attention_probs(torch.tensor([[0.5, -0.5], [1.0, 0.0]]), 2, True)
    False
    """
    if not weights.is_floating_point() or weights.is_nested or weights.dim() < 2:
        return False
    if num_queries is not None and weights.shape[-2] != num_queries:
        return False
    w = weights.detach()
    valid = (w >= 0).all()
    if rows_sum_to_one:
        sums = w.float().sum(-1)
        ones = (sums - 1).abs() <= tolerance
        valid = valid & (ones | (sums.abs() <= tolerance)).all() & ones.any()
    return bool(valid)


def returned_weights(module: nn.Module, arguments: dict[str, Any], output: Any) -> Tensor | None:
    """The attention probabilities among what an attention module returned, ``None`` if there are none.

    Hugging Face ``eager`` returns ``(output, weights)``, T5 ``(output, position_bias, weights)``; each tensor
    after the first is tested (:func:`is_attention_probs`), so that a bias or
    a cache of the same shape is never taken for the map. ``nn.MultiheadAttention`` is read by its wrappers.
    """
    if (
        isinstance(module, nn.MultiheadAttention)
        or not is_attention_like(module)
        or not isinstance(output, (tuple, list))
    ):
        return None
    num_queries = query_length(arguments)
    for candidate in output[1:]:
        # in training, dropout after the softmax leaves rows that do not sum to 1
        if (
            isinstance(candidate, Tensor)
            and 3 <= candidate.dim() <= 4
            and is_attention_probs(candidate, num_queries, rows_sum_to_one=not module.training)
        ):
            return candidate if candidate.dim() == 4 else candidate[:, None]  # one head: [B, Q, K]
    return None
