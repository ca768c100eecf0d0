"""Head gates: a multiplier of ones on every captured head's output, for gradient-based head importance.

Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") score head ``h`` by ``|dL/d xi_h|`` for a gate
``xi_h`` multiplying the head's output. Hugging Face's bertology script passed ``head_mask``, which transformers 5
removed; here the interceptor (:mod:`lightning_attn.capture.backends`) multiplies the output of each attention call
it captures by a gate of ones that requires grad, so any model the recorder sees can be scored, unchanged:

- ``scaled_dot_product_attention`` (Hugging Face ``sdpa``, timm, custom modules, ``nn.MultiheadAttention`` with
  ``need_weights=False``): the ``[B, H, Q, D]`` output before the heads are merged;
- ``nn.MultiheadAttention`` with ``need_weights=True``: the merged heads before ``out_proj``, which the wrapper
  then applies itself (the forward value equals the model's up to float rounding).

The gates are per sample, ``[B, H]``, so that ``|dL/d xi_{b,h}|`` is taken per sample as in Michel et al.'s
``E_x |dL(x)/d xi_h|`` (and sums of it over samples do not depend on how the samples were batched).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder

__all__ = ["GATED_SOURCES", "HeadGates"]

#: Capture sources whose output the interceptor can gate (see the module docstring).
GATED_SOURCES = ("sdpa", "mha")


class HeadGates(AttentionRecorder):
    """Gate every captured head's output by a ``[B, H]`` tensor of ones that requires grad.

    Used as a context manager around a forward pass with grad enabled; afterwards :attr:`gates` holds each site's
    gate (site names as :class:`~lightning_attn.AttentionRecorder` gives them), ready for
    ``torch.autograd.grad(loss, list(gates.gates.values()))``. The eval fast paths of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` compute the merged output in one kernel, so they are switched off while active.

    Args:
        model: the module whose heads to gate.
        include: glob patterns on site names to gate (default: all).
        exclude: glob patterns on site names to leave ungated.

    Example::

        with torch.enable_grad(), HeadGates(model) as heads:
            loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, list(heads.gates.values()))
    """

    def __init__(
        self, model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
    ) -> None:
        super().__init__(model, include=include, exclude=exclude, keep=False, on_capture=self._remember)
        self.gates: OrderedDict[str, Tensor] = OrderedDict()
        self._pending: AttentionCapture | None = None
        self._fastpath_was: bool | None = None

    def __enter__(self) -> HeadGates:
        self.gates.clear()
        self._fastpath_was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        super().__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self._pending = None
        if self._fastpath_was is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath_was)

    def _remember(self, capture: AttentionCapture) -> None:
        # Modules that return their own weights (Hugging Face ``eager``) merge the heads themselves: not gated.
        if capture.info.source in GATED_SOURCES:
            self._pending = capture

    def _take_gate(self, batch: int, heads: int, like: Tensor) -> Tensor | None:
        """The gate of the call just recorded (``None`` when it was not recorded: excluded, nested)."""
        capture, self._pending = self._pending, None
        if capture is None or not torch.is_grad_enabled():
            return None
        if capture.info.num_heads != heads:
            raise ValueError(
                f"site {capture.site!r}: the output has {heads} heads, the attention {capture.info.num_heads}"
            )
        gate = torch.ones(batch, heads, dtype=like.dtype, device=like.device, requires_grad=True)
        self.gates[capture.site] = gate
        return gate

    def gate(self, out: Tensor) -> Tensor:
        """Multiply an attention output ``[B, H, Q, D]`` (or unbatched ``[H, Q, D]``) by the call's gate."""
        batched = out if out.dim() == 4 else out.reshape(-1, *out.shape[-3:])
        gate = self._take_gate(batched.shape[0], batched.shape[1], out)
        if gate is None:
            return out
        return (batched * gate[:, :, None, None]).reshape(out.shape)

    def gate_merged(self, merged: Tensor, num_heads: int, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``out_proj`` applied to merged heads ``[L, B, E]`` (or ``[L, E]``) multiplied by the call's gate."""
        per_head = merged.reshape(merged.shape[0], -1, num_heads, merged.shape[-1] // num_heads)  # [L, B, H, D]
        gate = self._take_gate(per_head.shape[1], num_heads, merged)
        if gate is not None:
            per_head = per_head * gate[None, :, :, None]
        return F.linear(per_head.reshape(merged.shape), weight, bias)
