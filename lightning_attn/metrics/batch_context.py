"""What the callbacks read from a batch: the HeadSpecializationTracker's token ids, padding mask, features and feature
masks, looked up by key, dotted path or callable and moved to the model's device without a host synchronisation, and
the ModuleProbe's position mask (:func:`batch_mask`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PADDING_MASK_KEY",
    "TOKEN_IDS_KEY",
    "BatchContext",
    "as_device_tensor",
    "batch_context",
    "batch_mask",
    "batch_paths",
    "lookup",
]

#: The default batch key of the token ids (Hugging Face tokenizers' ``input_ids``): used where the batch has it.
TOKEN_IDS_KEY = "input_ids"

#: The default batch key of the padding mask (Hugging Face tokenizers' ``attention_mask``): used where the batch has
#: it.
PADDING_MASK_KEY = "attention_mask"


@dataclass
class BatchContext:
    """What :class:`HeadSpecializationMetrics` takes from one batch (tensors already on the model's device).

    Attributes:
        tokens: ``[B, L]`` token ids, or ``None``.
        valid: ``[B, L]`` bool, True = real (non-padding) token, or ``None`` (every position is real).
        features: feature name to values ``[B]`` (per sample) or ``[B, K]`` (per key token).
        masks: feature name to a ``[B, K]`` bool key-token mask (the tokens whose attention mass summarizes a
            head for that feature).
        confidence_exclude: ``[B, K]`` bool keys left out of the confidence max, or ``None``.
        probe: whether this batch feeds the probe maps.
    """

    tokens: Tensor | None = None
    valid: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    confidence_exclude: Tensor | None = None
    probe: bool = False


def batch_context(
    batch: Any,
    device: torch.device,
    *,
    probe: bool,
    token_ids_key: str | None,
    padding_mask_key: str | None,
    confidence_exclude_key: str | None,
    features: Mapping[str, str | Callable[[Any], Any]],
    feature_masks: Mapping[str, str | Callable[[Any], Any]],
) -> BatchContext:
    """Everything taken from ``batch``, as tensors on ``device`` (no host synchronization): ``[B, L]`` token ids,
    padding mask and confidence exclusions where their keys are present, every feature (``[B]`` or ``[B, K]``,
    float) and feature mask (bool). Raises ``KeyError`` for a missing feature, ``ValueError`` for a bad shape."""
    context = BatchContext(probe=probe)
    context.tokens = _optional(batch, token_ids_key, device)
    valid = _optional(batch, padding_mask_key, device)
    context.valid = None if valid is None else valid.to(torch.bool)
    exclude = _optional(batch, confidence_exclude_key, device)
    context.confidence_exclude = None if exclude is None else exclude.to(torch.bool)
    for name, source in features.items():
        values = as_device_tensor(lookup(batch, source), device)
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() not in (1, 2):
            raise ValueError(f"feature {name!r} must be [B] or [B, K], got shape {tuple(values.shape)}")
        context.features[name] = values if values.is_floating_point() else values.to(torch.float32)
    for name, source in feature_masks.items():
        context.masks[name] = as_device_tensor(lookup(batch, source), device).to(torch.bool)
    return context


def _optional(batch: Any, key: str | None, device: torch.device) -> Tensor | None:
    """``[B, L]`` values under ``key`` on ``device``; ``None`` when there is no key, no value or another shape."""
    if key is None:
        return None
    try:
        value = lookup(batch, key)
    except KeyError:
        return None
    if value is None:
        return None
    tensor = as_device_tensor(value, device)
    return tensor if tensor.dim() == 2 else None


def lookup(batch: Any, source: str | Callable[[Any], Any]) -> Any:
    """``source(batch)`` for a callable; else ``batch[source]``, then the dotted path ``a.b.0`` through
    mappings, sequences (integer parts) and attributes. Raises ``KeyError`` when absent."""
    if callable(source):
        return source(batch)
    if isinstance(batch, Mapping) and source in batch:
        return batch[source]
    obj = batch
    for part in source.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        elif not isinstance(obj, (Mapping, list, tuple, Tensor)) and hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            available = sorted(map(str, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"{source!r} not found in the batch (available: {available})")
    return obj


def batch_paths(batch: Any) -> list[str]:
    """The names :func:`lookup` finds in ``batch``, one level of nesting deep: mapping keys, sequence indices and
    public attributes, and their children's (``"meta.dist"``, ``"0.ids"``).

    >>> batch_paths({"ids": [1, 2], "meta": {"dist": 3.0}})
    ['ids', 'meta', 'ids.0', 'ids.1', 'meta.dist']
    """
    top = _children(batch)
    return [*top, *(f"{name}.{child}" for name, value in top.items() for child in _children(value))]


def _children(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return {str(key): value for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return {str(index): value for index, value in enumerate(obj)}
    if not isinstance(obj, (Tensor, str, bytes)) and hasattr(obj, "__dict__"):
        return {key: value for key, value in vars(obj).items() if not key.startswith("_")}
    return {}


def as_device_tensor(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor on ``device`` (non-blocking copy for host tensors); lists and arrays are converted."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.device != device:
        value = value.to(device, non_blocking=True)
    return value if dtype is None else value.to(dtype)


def batch_mask(batch: Any, key: str | int) -> Tensor:
    """The ``[batch, positions]`` mask at ``key`` of a mapping batch, or at index ``key`` of a tuple/list batch.

    Raises:
        KeyError: ``key`` selects nothing in the batch.
        ValueError: what it selects is not a 2-D tensor.
    """
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"ModuleProbe: mask_key {key!r} is not in the batch (keys: {sorted(map(str, batch))})")
        mask = batch[key]
    elif isinstance(batch, (tuple, list)) and isinstance(key, int) and -len(batch) <= key < len(batch):
        mask = batch[key]
    else:
        raise KeyError(f"ModuleProbe: mask_key {key!r} does not select an element of a {type(batch).__name__} batch")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(
            f"ModuleProbe: mask_key {key!r} must select a [batch, positions] tensor, got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
        )
    return mask.bool()
