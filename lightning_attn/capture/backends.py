"""The interception layer shared by every active :class:`~lightning_attn.AttentionRecorder`.

While at least one recorder is active, four torch entry points are replaced by wrappers that call
the original with unchanged arguments (so outputs are bitwise those of the unrecorded model) and
hand the queries/keys or weights to the recorders:

- ``torch.nn.functional.scaled_dot_product_attention``: Hugging Face ``sdpa``, timm fused attention,
  user code, and ``nn.MultiheadAttention`` with ``need_weights=False``;
- ``torch.nn.functional.multi_head_attention_forward``: ``nn.MultiheadAttention`` with ``need_weights=True``;
- ``torch._native_multi_head_attention``: ``nn.MultiheadAttention``'s eval fast path;
- ``torch._transformer_encoder_layer_fwd``: ``nn.TransformerEncoderLayer``'s eval fast path (nested too).

Attribute replacement, rather than a ``TorchFunctionMode``, keeps the fused fast paths running: an
active mode makes ``has_torch_function`` true and silently moves the layers to the slow path, which
changes outputs. Calls are attributed to the innermost running module with *global* forward hooks,
which (unlike per-module hooks) do not disable the fast path either and leave no trace on the model.
Modules that return their own weights (Hugging Face ``eager``) are read in the global forward hook.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_attn.capture.probs import in_projection_qk, native_mask
from lightning_attn.capture.probs import attention_probs
from lightning_attn.capture.record import AttentionCapture, SiteInfo, as_bhqk, float32_detached, pad_nested_probs


class CaptureSink(Protocol):
    """What the interceptor needs from a recorder."""

    def owns(self, module: nn.Module) -> bool: ...

    def module_name(self, module: nn.Module) -> str | None: ...

    def mha_name_for_weight(self, weight: Tensor) -> str | None: ...

    def begin_forward(self) -> None: ...

    def end_forward(self) -> None: ...

    def record(self, module: nn.Module, site: str | None, make: Callable[[str], AttentionCapture]) -> None: ...


_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)


class _Interceptor:
    """Process-wide installer of the wrappers; reference-counted by the active recorders."""

    def __init__(self) -> None:
        self.sinks: list[CaptureSink] = []
        self.stack: list[nn.Module] = []
        self._counts_at_entry: list[int] = []
        self.capture_count = 0
        self._lock = threading.RLock()
        self._originals: dict[tuple[Any, str], Any] = {}
        self._handles: list[RemovableHandle] = []
        self._mha_weights_depth = 0
        self._nested_length: int | None = None

    # -- installation -----------------------------------------------------------------------
    def attach(self, sink: CaptureSink) -> None:
        with self._lock:
            if not self.sinks:
                self._install()
            self.sinks.append(sink)

    def detach(self, sink: CaptureSink) -> None:
        with self._lock:
            if sink in self.sinks:
                self.sinks.remove(sink)
            if not self.sinks:
                self._uninstall()

    def _install(self) -> None:
        self.stack.clear()
        self._counts_at_entry.clear()
        patches: dict[tuple[Any, str], Callable] = {
            (F, "scaled_dot_product_attention"): self._sdpa,
            (F, "multi_head_attention_forward"): self._mha_forward,
            (torch, "_native_multi_head_attention"): self._native_mha,
            (torch, "_transformer_encoder_layer_fwd"): self._encoder_layer_fwd,
            (torch, "_nested_tensor_from_mask"): self._nested_from_mask,
        }
        for (owner, name), wrapper in patches.items():
            if hasattr(owner, name):  # private entry points may be absent in other torch releases
                self._originals[(owner, name)] = getattr(owner, name)
                setattr(owner, name, wrapper)
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._push),
            nn.modules.module.register_module_forward_hook(self._pop, always_call=True),
        ]

    def _uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.stack.clear()
        self._counts_at_entry.clear()
        self._nested_length = None

    @contextlib.contextmanager
    def exclusive(self, sink: CaptureSink) -> Iterator[None]:
        """Deliver captures to ``sink`` alone while active: other active recorders (a logger's, open for
        the current batch) are suspended, so extra forward passes (a report's saliency) never enter
        their statistics."""
        with self._lock:
            others = [s for s in self.sinks if s is not sink] if sink in self.sinks else []
            for other in others:
                self.sinks.remove(other)
        try:
            yield
        finally:
            with self._lock:
                self.sinks[:0] = [other for other in others if other not in self.sinks]

    def original(self, owner: Any, name: str) -> Callable:
        return self._originals[(owner, name)]

    # -- attribution ------------------------------------------------------------------------
    # Bookkeeping runs eagerly under torch.compile (a graph break), so Dynamo neither traces nor
    # guards on the recorder's Python state and compiled models are captured with stable graphs.
    @torch.compiler.disable
    def _push(self, module: nn.Module, args: Any) -> None:
        if not any(sink.owns(module) for sink in self.sinks):
            return
        if not self.stack:
            self._nested_length = None
            for sink in self.sinks:
                sink.begin_forward()
        self.stack.append(module)
        self._counts_at_entry.append(self.capture_count)

    @torch.compiler.disable
    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.stack or self.stack[-1] is not module:
            return
        if self.capture_count == self._counts_at_entry[-1]:
            self._maybe_returned_weights(module, args, output)
        self.stack.pop()
        self._counts_at_entry.pop()
        if not self.stack:
            for sink in list(self.sinks):
                sink.end_forward()

    def _maybe_returned_weights(self, module: nn.Module, args: Any, output: Any) -> None:
        """Read ``(output, weights, ...)`` of attention modules that compute their weights themselves."""
        if isinstance(module, nn.MultiheadAttention) or "attention" not in type(module).__name__.lower():
            return
        if not isinstance(output, (tuple, list)) or len(output) < 2:
            return
        weights = output[1]
        if not (isinstance(weights, Tensor) and weights.dim() == 4 and weights.is_floating_point()):
            return
        kind = "self" if weights.shape[-1] == weights.shape[-2] else "cross"
        self._emit(module, "weights", kind, lambda info: AttentionCapture(info, weights=self._keep_graph(weights)), weights.shape)

    def _emit(
        self,
        module: nn.Module,
        source: str,
        kind: str,
        build: Callable[[SiteInfo], AttentionCapture],
        shape: tuple[int, ...] | torch.Size,
        mha_weight: Tensor | None = None,
    ) -> None:
        """Hand one call to every recorder that owns a module on the stack.

        Fused paths run inside the encoder layer, not its ``self_attn``: ``mha_weight`` (the packed
        in-projection) names the ``nn.MultiheadAttention`` so that both paths give the same site.
        """
        self.capture_count += 1
        made: list[AttentionCapture] = []
        for sink in self.sinks:
            owner = next((m for m in reversed(self.stack) if sink.owns(m)), None)
            if owner is None:
                continue
            name = sink.mha_name_for_weight(mha_weight) if mha_weight is not None else None

            def make(full_name: str, _owner: nn.Module = owner) -> AttentionCapture:
                info = SiteInfo(
                    name=full_name,
                    kind=kind,  # type: ignore[arg-type]
                    num_heads=int(shape[-3]) if len(shape) >= 3 else 1,
                    num_queries=int(shape[-2]),
                    num_keys=int(shape[-1]),
                    module_type="MultiheadAttention" if mha_weight is not None else type(_owner).__name__,
                    source=source,
                )
                capture = build(info)
                # Several recorders (a logger, a tracker) see the same call: probabilities one of them
                # materialized are reused rather than recomputed.
                capture.share_cache_from(made)
                made.append(capture)
                return capture

            sink.record(owner, name, make)
        for capture in made:
            capture.release()

    def _keep_graph(self, weights: Tensor) -> Tensor:
        """Float32 weights, detached unless a recorder wants gradients through them."""
        return weights.float() if self.differentiable and weights.requires_grad else float32_detached(weights)

    def _innermost(self) -> nn.Module | None:
        return self.stack[-1] if self.stack else None

    # -- wrappers ---------------------------------------------------------------------------
    def _sdpa(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.differentiable and torch.is_grad_enabled() and self._innermost() is not None and not self._mha_weights_depth:
            return self._sdpa_through_probs(args, kwargs)
        out = self.original(F, "scaled_dot_product_attention")(*args, **kwargs)
        self._record_sdpa(args, kwargs)
        return self._gated(out)

    def _gate_sink(self) -> Any:
        """The active :class:`~lightning_attn.capture.gates.HeadGates` (head importance), if any."""
        return next((sink for sink in self.sinks if hasattr(sink, "gate_merged")), None)

    def _gated(self, out: Tensor) -> Tensor:
        gates = self._gate_sink()
        return out if gates is None else gates.gate(out)

    @property
    def differentiable(self) -> bool:
        return any(getattr(sink, "differentiable", False) for sink in self.sinks)

    def _sdpa_through_probs(self, args: tuple, kwargs: dict) -> Tensor:
        """Differentiable mode: compute ``probs @ v`` eagerly so that the captured probabilities are the
        ones in the autograd graph (gradient-weighted rollout needs d output / d attention). Equal to the
        kernel's output up to float rounding, not bitwise; only used when a recorder asks for it."""
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        probs = attention_probs(query, key, a["attn_mask"], bool(a["is_causal"]), a["scale"], bool(a["enable_gqa"]))
        if a["dropout_p"]:
            probs_used = F.dropout(probs, a["dropout_p"])
        else:
            probs_used = probs
        if bool(a["enable_gqa"]) and value.shape[-3] != query.shape[-3]:
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        out = torch.matmul(probs_used, value.float()).to(query.dtype)
        module = self._innermost()
        assert module is not None
        weights = as_bhqk(probs)
        kind = "self" if query is key else "cross"
        self._emit(module, "sdpa", kind, lambda info: AttentionCapture(info, weights=weights), weights.shape)
        return self._gated(out)

    @torch.compiler.disable
    def _record_sdpa(self, args: tuple, kwargs: dict) -> None:
        module = self._innermost()
        if module is None or self._mha_weights_depth:
            return
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key = a["query"], a["key"]
        if query.is_nested or key.is_nested:
            return
        q, k = query.detach(), key.detach()
        mask = a["attn_mask"].detach() if isinstance(a["attn_mask"], Tensor) else None
        kind = "self" if (query is key or q.shape[-2] == k.shape[-2] and module_is_self(module)) else "cross"
        shape = (*q.shape[:-1], k.shape[-2])
        self._emit(
            module,
            "mha" if isinstance(module, nn.MultiheadAttention) else "sdpa",
            kind,
            lambda info: AttentionCapture(
                info, query=q, key=k, attn_mask=mask, is_causal=bool(a["is_causal"]), scale=a["scale"], enable_gqa=bool(a["enable_gqa"])
            ),
            shape,
        )

    def _mha_forward(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original(F, "multi_head_attention_forward")
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        module = self._innermost()
        if module is None or not a["need_weights"]:
            return original(*args, **kwargs)
        average = a["average_attn_weights"]
        a["average_attn_weights"] = False
        gates = self._gate_sink()
        if gates is not None:  # gate the heads between the merge and out_proj: project with the identity first
            out_proj = a["out_proj_weight"], a["out_proj_bias"]
            weight = out_proj[0]
            a["out_proj_weight"] = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            a["out_proj_bias"] = None
        self._mha_weights_depth += 1
        try:
            out, weights = original(*bound.args, **bound.kwargs)
        finally:
            self._mha_weights_depth -= 1
        query, key = a["query"], a["key"]
        kind = "self" if query is key else "cross"
        per_head = as_bhqk(weights)
        self._emit(module, "mha", kind, lambda info: AttentionCapture(info, weights=self._keep_graph(per_head)), per_head.shape)
        if gates is not None:
            out = gates.gate_merged(out, a["num_heads"], *out_proj)
        return out, (weights.mean(dim=-3) if average else weights)

    def _native_mha(self, query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask=None, need_weights=True, average_attn_weights=True, mask_type=None):  # noqa: ANN001, ANN202
        out = self.original(torch, "_native_multi_head_attention")(
            query, key, value, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, need_weights, average_attn_weights, mask_type
        )
        module = self._innermost()
        if module is None:
            return out
        kind = "self" if query is key else "cross"
        if need_weights and not average_attn_weights and not query.is_nested:
            weights = as_bhqk(out[1])  # the kernel computed the per-head weights anyway
            self._emit(module, "mha_fastpath", kind, lambda info: AttentionCapture(info, weights=float32_detached(weights)), weights.shape, mha_weight=qkv_weight)
        else:
            self._emit_fused(module, query, key, qkv_weight, qkv_bias, num_heads, mask, mask_type, "mha_fastpath", kind)
        return out

    def _encoder_layer_fwd(self, src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):  # noqa: ANN001, ANN202
        out = self.original(torch, "_transformer_encoder_layer_fwd")(
            src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps,
            norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask, mask_type,
        )
        module = self._innermost()
        if module is not None:
            x = F.layer_norm(src, (embed_dim,), norm_weight_1, norm_bias_1, eps) if norm_first and not src.is_nested else src
            if norm_first and src.is_nested:
                x = torch.nested.as_nested_tensor([F.layer_norm(t, (embed_dim,), norm_weight_1, norm_bias_1, eps) for t in src.unbind()])
            self._emit_fused(module, x, x, qkv_weight, qkv_bias, num_heads, mask, mask_type, "encoder_fastpath", "self")
        return out

    def _nested_from_mask(self, *args: Any, **kwargs: Any) -> Tensor:
        # nn.TransformerEncoder converts a padded batch to a nested tensor before its fast path; the
        # padded length is needed to give fast-path maps the same shape as slow-path ones.
        out = self.original(torch, "_nested_tensor_from_mask")(*args, **kwargs)
        padded = args[0] if args else kwargs.get("t")
        if isinstance(padded, Tensor) and padded.dim() == 3:
            self._nested_length = int(padded.shape[1])
        return out

    def _emit_fused(self, module, x_query, x_key, qkv_weight, qkv_bias, num_heads, mask, mask_type, source, kind) -> None:  # noqa: ANN001
        with torch.no_grad():
            if x_query.is_nested:
                per_sample = []
                for xq in x_query.unbind():
                    q, k = in_projection_qk(xq[None], xq[None], qkv_weight, qkv_bias, num_heads)
                    per_sample.append(attention_probs(q, k)[0])
                length = max(self._nested_length or 0, max(p.shape[-1] for p in per_sample))
                probs = pad_nested_probs(per_sample, length)
                build = lambda info: AttentionCapture(info, weights=probs)  # noqa: E731
                shape = probs.shape
            else:
                q, k = in_projection_qk(x_query.detach(), x_key.detach(), qkv_weight.detach(), None if qkv_bias is None else qkv_bias.detach(), num_heads)
                m = native_mask(mask, mask_type, q.shape[0], num_heads)
                m = m.detach() if m is not None else None
                build = lambda info: AttentionCapture(info, query=q, key=k, attn_mask=m, mask_true_means_masked=True)  # noqa: E731
                shape = (*q.shape[:-1], k.shape[-2])
        self._emit(module, source, kind, build, shape, mha_weight=qkv_weight)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def module_is_self(module: nn.Module) -> bool:
    """Heuristic for SDPA calls whose q and k are distinct tensors of equal length: 'cross' in the name means cross."""
    return "cross" not in type(module).__name__.lower()


INTERCEPTOR = _Interceptor()
