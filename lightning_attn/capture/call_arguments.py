"""The parameters of the functions the recorder intercepts, for reading a caller's arguments by name whatever mix of
positional and keyword arguments it used (wrappers pass the call through unchanged)."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F

__all__ = ["ENCODER_LAYER_SIGNATURE", "MHA_SIGNATURE", "NATIVE_MHA_SIGNATURE", "SDPA_SIGNATURE", "bound_arguments"]

SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)

MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _signature(required: str, **optional: Any) -> inspect.Signature:
    """A signature of positional-or-keyword parameters: the space-separated ``required`` ones, then ``optional``."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind) for name in required.split()]
    parameters += [inspect.Parameter(name, kind, default=value) for name, value in optional.items()]
    return inspect.Signature(parameters)


# The private fused entry points' parameters (torch 2.13), for reading the caller's own arguments by name.
NATIVE_MHA_SIGNATURE = _signature(
    "query key value embed_dim num_heads qkv_weight qkv_bias proj_weight proj_bias",
    mask=None,
    need_weights=True,
    average_attn_weights=True,
    mask_type=None,
)
ENCODER_LAYER_SIGNATURE = _signature(
    "src embed_dim num_heads qkv_weight qkv_bias proj_weight proj_bias use_gelu norm_first eps norm_weight_1 "
    "norm_bias_1 norm_weight_2 norm_bias_2 ffn_weight_1 ffn_bias_1 ffn_weight_2 ffn_bias_2",
    mask=None,
    mask_type=None,
)


def bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments
