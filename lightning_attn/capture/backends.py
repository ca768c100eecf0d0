"""The interception layer shared by every active :class:`~lightning_attn.AttentionRecorder`.

While at least one recorder is active, these torch entry points are replaced by wrappers that call
the original with unchanged arguments (so outputs are bitwise those of the unrecorded model) and
hand the queries/keys or weights to the recorders:

- ``torch.nn.functional.scaled_dot_product_attention``: Hugging Face ``sdpa``, timm fused attention,
  user code, and ``nn.MultiheadAttention`` with ``need_weights=False``;
- ``torch.nn.functional.multi_head_attention_forward``: ``nn.MultiheadAttention`` with ``need_weights=True``;
- ``torch._native_multi_head_attention``: ``nn.MultiheadAttention``'s eval fast path;
- ``torch._transformer_encoder_layer_fwd``: ``nn.TransformerEncoderLayer``'s eval fast path (nested too);
- ``torch.softmax``, ``torch.nn.functional.softmax`` and ``Tensor.softmax``: hand-written attention
  (``(q @ k.transpose(-2, -1)).softmax(-1)`` over ``[B, H, Q, K]``, or ``[B, Q, K]`` in an attention module).

Attribute replacement, rather than a ``TorchFunctionMode``, keeps the fused fast paths running: an
active mode makes ``has_torch_function`` true and silently moves the layers to the slow path, which
changes outputs. Calls are attributed to the innermost running module of the calling thread with *global*
forward hooks, which (unlike per-module hooks) do not disable the fast path either and leave no trace on
the model. When a module returns, the hook reads weights it returned (Hugging Face ``eager``, T5), else
the softmax maps it computed, else (an attention-like module that left no trace) tells its recorders.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.hooks import RemovableHandle

from lightning_attn.capture.call_arguments import (
    ENCODER_LAYER_SIGNATURE,
    MHA_SIGNATURE,
    NATIVE_MHA_SIGNATURE,
    SDPA_SIGNATURE,
    bound_arguments,
)
from lightning_attn.capture.probs import (
    LOWEST,
    attention_probs,
    autocast_off,
    in_projection_qk,
    native_mask,
    scores_and_probs,
)
from lightning_attn.capture.record import AttentionCapture, SiteInfo, as_bhqk, float32_detached, pad_nested_probs
from lightning_attn.capture.sites import (
    attention_kind,
    call_arguments,
    is_attention_like,
    packed_head_factor,
    returned_weights,
    running_call,
    unfold_packed_heads,
)
from lightning_attn.capture.workspace import WORKSPACE

Kind = Literal["self", "cross"]


class CaptureSink(Protocol):
    """What the interceptor needs from a recorder."""

    def owns(self, module: nn.Module) -> bool: ...

    def module_name(self, module: nn.Module) -> str | None: ...

    def mha_name_for_weight(self, weight: Tensor) -> str | None: ...

    def begin_forward(self) -> None: ...

    def end_forward(self) -> None: ...

    def record(self, module: nn.Module, site: str | None, make: Callable[[str], AttentionCapture]) -> None: ...

    def missed(self, module: nn.Module) -> None: ...


#: The softmax entry points of hand-written attention (``F.softmax`` calls ``Tensor.softmax``: one map, seen twice).
_SOFTMAX_ENTRY_POINTS = ((F, "softmax"), (torch, "softmax"), (torch.Tensor, "softmax"))


@dataclass
class _Running:
    """A module of the calling thread's stack: the capture count when it started and its softmax maps."""

    module: nn.Module
    captures_at_entry: int
    softmax_maps: list[Tensor] = field(default_factory=list)


class _ThreadState(threading.local):
    """Attribution state of one thread: two threads running their own models never see each other's calls."""

    def __init__(self) -> None:
        self.stack: list[_Running] = []
        self.captures = 0
        # > 0 inside an intercepted kernel or the recorders' own work: softmax and SDPA calls made there are
        # not attention sites of the model.
        self.quiet = 0
        # sink -> stack depth at which its forward pass began (its first owned module)
        self.open: dict[int, tuple[CaptureSink, int]] = {}
        self.nested_length: int | None = None


class _Interceptor:
    """Process-wide installer of the wrappers; reference-counted by the active recorders."""

    def __init__(self) -> None:
        self.sinks: list[CaptureSink] = []
        self.state = _ThreadState()
        self._lock = threading.RLock()
        self._originals: dict[tuple[Any, str], Any] = {}
        self._class_attributes: set[tuple[Any, str]] = set()
        self._handles: list[RemovableHandle] = []

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
        self.state.stack.clear()
        self.state.open.clear()
        patches: dict[tuple[Any, str], Callable] = {
            (F, "scaled_dot_product_attention"): self._sdpa,
            (F, "multi_head_attention_forward"): self._mha_forward,
            (torch, "_native_multi_head_attention"): self._native_mha,
            (torch, "_transformer_encoder_layer_fwd"): self._encoder_layer_fwd,
            (torch, "_nested_tensor_from_mask"): self._nested_from_mask,
        }
        for owner, name in _SOFTMAX_ENTRY_POINTS:
            patches[(owner, name)] = self._softmax_wrapper(getattr(owner, name))
        for (owner, name), wrapper in patches.items():
            if hasattr(owner, name):  # private entry points may be absent in other torch releases
                self._originals[(owner, name)] = getattr(owner, name)
                if isinstance(owner, type) and name in owner.__dict__:
                    self._class_attributes.add((owner, name))
                setattr(owner, name, wrapper)
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._push),
            nn.modules.module.register_module_forward_hook(self._pop, with_kwargs=True, always_call=True),
        ]

    def _uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            if isinstance(owner, type) and (owner, name) not in self._class_attributes:
                delattr(owner, name)  # inherited (Tensor.softmax from TensorBase): leave no attribute behind
            else:
                setattr(owner, name, original)
        self._originals.clear()
        self._class_attributes.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.state.stack.clear()
        self.state.open.clear()
        self.state.nested_length = None

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
        owners = [sink for sink in tuple(self.sinks) if sink.owns(module)]
        if not owners:
            return
        state = self.state
        if not state.stack:
            state.nested_length = None
        for sink in owners:  # a recorder's forward pass begins at the first module it owns
            if id(sink) not in state.open:
                state.open[id(sink)] = (sink, len(state.stack))
                sink.begin_forward()
        state.stack.append(_Running(module, state.captures))

    @torch.compiler.disable
    def _pop(self, module: nn.Module, args: Any, *kwargs_and_output: Any) -> None:
        # (kwargs, output); torch calls it with (output,) alone, None, when the forward raised
        kwargs, output = kwargs_and_output if len(kwargs_and_output) == 2 else ({}, None)
        state = self.state
        if not state.stack or state.stack[-1].module is not module:
            return
        running = state.stack[-1]
        if state.captures == running.captures_at_entry and output is not None:
            self._end_of_site(running, args, kwargs, output)
        state.stack.pop()
        depth = len(state.stack)
        for key, (sink, begun_at) in list(state.open.items()):
            if begun_at == depth:
                del state.open[key]
                sink.end_forward()

    def _end_of_site(self, running: _Running, args: Any, kwargs: Any, output: Any) -> None:
        """A module that made no intercepted call returns: read the weights it returned, else its softmax maps,
        else (an attention-like module) tell its recorders that attention ran where they cannot see it."""
        module = running.module
        if not running.softmax_maps and not is_attention_like(module):
            return  # most modules (linear layers, norms): nothing to read
        arguments = call_arguments(module, args, kwargs)
        kind = attention_kind(module, arguments)
        weights = returned_weights(module, arguments, output)
        if weights is not None:
            self._emit(
                module,
                "weights",
                kind,
                lambda info: AttentionCapture(info, weights=self._keep_graph(weights)),
                weights.shape,
            )
        elif running.softmax_maps:
            for softmax in running.softmax_maps:
                probs = softmax if softmax.dim() == 4 else softmax[:, None]  # one head: [B, Q, K]
                self._emit(module, "softmax", kind, weights_capture(self._keep_graph(probs)), probs.shape)
        elif is_attention_like(module):
            for sink in tuple(self.sinks):
                if sink.owns(module):
                    sink.missed(module)

    def _emit(
        self,
        module: nn.Module,
        source: str,
        kind: Kind,
        build: Callable[[SiteInfo], AttentionCapture],
        shape: tuple[int, ...] | torch.Size,
        mha_weight: Tensor | None = None,
    ) -> None:
        """Hand one call to every recorder that owns a module on the calling thread's stack.

        Fused paths run inside the encoder layer, not its ``self_attn``: ``mha_weight`` (the packed
        in-projection) names the ``nn.MultiheadAttention`` so that both paths give the same site.
        """
        state = self.state
        state.captures += 1
        made: list[AttentionCapture] = []
        state.quiet += 1
        try:
            for sink in tuple(self.sinks):
                owner = next((r.module for r in reversed(state.stack) if sink.owns(r.module)), None)
                if owner is None:
                    continue
                name = sink.mha_name_for_weight(mha_weight) if mha_weight is not None else None

                def make(full_name: str, _owner: nn.Module = owner) -> AttentionCapture:
                    info = SiteInfo(
                        name=full_name,
                        kind=kind,
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
        finally:
            state.quiet -= 1
        for capture in made:
            capture.release()

    def _keep_graph(self, weights: Tensor) -> Tensor:
        """Float32 weights, detached unless a recorder wants gradients through them."""
        return weights.float() if self.differentiable and weights.requires_grad else float32_detached(weights)

    def _innermost(self) -> nn.Module | None:
        stack = self.state.stack
        return stack[-1].module if stack else None

    def _gate_sink(self) -> Any:
        """The active :class:`~lightning_attn.capture.gates.HeadGates` (head importance), if any."""
        return next((sink for sink in self.sinks if hasattr(sink, "gate_merged")), None)

    def _gated(self, out: Tensor) -> Tensor:
        gates = self._gate_sink()
        return out if gates is None else gates.gate(out)

    @property
    def differentiable(self) -> bool:
        return any(getattr(sink, "differentiable", False) for sink in self.sinks)

    # -- hand-written attention ------------------------------------------------------------
    def _softmax_wrapper(self, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
        record = self._record_softmax

        def softmax(*args: Any, **kwargs: Any) -> Tensor:
            out = original(*args, **kwargs)
            if isinstance(out, Tensor) and 3 <= out.dim() <= 4:  # the only check paid by other softmax calls
                record(out, args, kwargs)
            return out

        return softmax

    @torch.compiler.disable
    def _record_softmax(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        """Keep a softmax over the keys of ``[B, H, Q, K]`` (or ``[B, Q, K]`` in an attention module) for the
        innermost module; it becomes a capture when that module returns without returning its weights."""
        state = self.state
        # Dynamo runs a patched Tensor.softmax on fake tensors while it traces: shapes, not attention
        if state.quiet or not state.stack or out.is_nested or is_fake(out):
            return
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(dim, int) or dim not in (-1, out.dim() - 1):
            return
        running = state.stack[-1]
        if isinstance(running.module, nn.Softmax) and len(state.stack) > 1:  # the module that owns the nn.Softmax
            running = state.stack[-2]
        if out.dim() == 3 and not is_attention_like(running.module):
            return
        if not any(seen is out for seen in running.softmax_maps):
            running.softmax_maps.append(out)

    # -- scaled_dot_product_attention -------------------------------------------------------
    def _sdpa(self, *args: Any, **kwargs: Any) -> Tensor:
        if self._innermost() is not None and not self.state.quiet and self._through_probs(args, kwargs):
            return self._sdpa_through_probs(args, kwargs)
        out = self.original(F, "scaled_dot_product_attention")(*args, **kwargs)
        self._record_sdpa(args, kwargs)
        return self._gated(out)

    def _through_probs(self, args: tuple, kwargs: dict) -> bool:
        """Compute this SDPA call as ``probs @ v``: differentiable mode with grad, or no recorder wants it exact."""
        if self.differentiable and torch.is_grad_enabled():
            return True
        exact = [getattr(sink, "exact_outputs", True) for sink in self.sinks if hasattr(sink, "record")]
        query = args[0] if args else kwargs.get("query")
        dense = isinstance(query, Tensor) and not query.is_nested and not is_fake(query)
        return bool(exact) and not any(exact) and dense and not torch.compiler.is_compiling()

    def _sdpa_through_probs(self, args: tuple, kwargs: dict) -> Tensor:
        """``probs @ v`` eagerly, capturing the probabilities used: the autograd graph's in the differentiable mode
        (d output / d attention), or, with ``exact_outputs=False``, scores and probabilities computed once and kept
        on the capture for the statistics. Equal to the kernel's output up to float rounding, not bitwise; only used
        when a recorder asks for it."""
        a = bound_arguments(SDPA_SIGNATURE, args, kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        is_causal, enable_gqa = bool(a["is_causal"]), bool(a["enable_gqa"])
        module = self._innermost()
        assert module is not None
        factor = packed_head_factor(module, query, key, is_causal)
        statistics_only = not self.differentiable and factor == 1  # no graph to keep: the capture holds q and k
        # reused buffers lent to the capture, unless autograd must see the computation (out= refuses it)
        lend = statistics_only and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
        # scores with finite masked entries: the statistics engine's form, the same probabilities
        with autocast_off(query):
            scores, probs = scores_and_probs(
                query,
                key,
                a["attn_mask"],
                is_causal,
                a["scale"],
                enable_gqa,
                masked_score=LOWEST,
                out=(WORKSPACE.scores, WORKSPACE.probs) if lend else None,
            )
        probs_used = F.dropout(probs, a["dropout_p"]) if a["dropout_p"] else probs
        if enable_gqa and value.shape[-3] != query.shape[-3]:
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        out = torch.matmul(probs_used, value.float()).to(query.dtype)
        kind = self._sdpa_kind(module, query, key)
        build: Callable[[SiteInfo], AttentionCapture]
        shape: tuple[int, ...] | torch.Size = (*query.shape[:-1], key.shape[-2])
        if not statistics_only:
            weights = as_bhqk(probs if self.differentiable else probs.detach())
            if factor > 1:  # rows of the folded query axis are (head in group, query): unfold them to heads
                weights = weights.reshape(weights.shape[0], weights.shape[1] * factor, -1, weights.shape[-1])
            build, shape = weights_capture(weights), weights.shape
        else:
            q, k = query.detach(), key.detach()
            mask = a["attn_mask"].detach() if isinstance(a["attn_mask"], Tensor) else None

            def build(info: SiteInfo) -> AttentionCapture:
                capture = AttentionCapture(
                    info, query=q, key=k, attn_mask=mask, is_causal=is_causal, scale=a["scale"], enable_gqa=enable_gqa
                )
                capture.adopt_probs(as_bhqk(probs.detach()), as_bhqk(scores.detach()), LOWEST, borrowed=lend)
                return capture

        self._emit(module, "sdpa", kind, build, shape)
        return self._gated(out)

    def _sdpa_kind(self, module: nn.Module, query: Tensor, key: Tensor) -> Kind:
        return "self" if query is key else attention_kind(module, running_call(module))

    @torch.compiler.disable
    def _record_sdpa(self, args: tuple, kwargs: dict) -> None:
        module = self._innermost()
        if module is None or self.state.quiet:
            return
        a = bound_arguments(SDPA_SIGNATURE, args, kwargs)
        query, key = a["query"], a["key"]
        if query.is_nested or key.is_nested or is_fake(query):
            return
        q, k = query.detach(), key.detach()
        mask = a["attn_mask"].detach() if isinstance(a["attn_mask"], Tensor) else None
        is_causal, enable_gqa = bool(a["is_causal"]), bool(a["enable_gqa"])
        factor = packed_head_factor(module, q, k, is_causal)
        if factor > 1:
            q, mask = unfold_packed_heads(q, mask, factor)
            enable_gqa = True
        shape = (*q.shape[:-1], k.shape[-2])
        self._emit(
            module,
            "mha" if isinstance(module, nn.MultiheadAttention) else "sdpa",
            self._sdpa_kind(module, query, key),
            lambda info: AttentionCapture(
                info, query=q, key=k, attn_mask=mask, is_causal=is_causal, scale=a["scale"], enable_gqa=enable_gqa
            ),
            shape,
        )

    # -- nn.MultiheadAttention and nn.TransformerEncoderLayer -------------------------------
    def _mha_forward(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original(F, "multi_head_attention_forward")
        bound = MHA_SIGNATURE.bind(*args, **kwargs)
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
        self.state.quiet += 1
        try:
            out, weights = original(*bound.args, **bound.kwargs)
        finally:
            self.state.quiet -= 1
        query, key = a["query"], a["key"]
        kind: Kind = "self" if query is key else "cross"
        per_head = as_bhqk(weights)
        self._emit(
            module, "mha", kind, lambda info: AttentionCapture(info, weights=self._keep_graph(per_head)), per_head.shape
        )
        if gates is not None:
            out = gates.gate_merged(out, a["num_heads"], *out_proj)
        return out, (weights.mean(dim=-3) if average else weights)

    def _native_mha(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(torch, "_native_multi_head_attention")(*args, **kwargs)
        a = bound_arguments(NATIVE_MHA_SIGNATURE, args, kwargs)
        query, key, num_heads = a["query"], a["key"], a["num_heads"]
        qkv_weight, qkv_bias, mask, mask_type = a["qkv_weight"], a["qkv_bias"], a["mask"], a["mask_type"]
        need_weights, average_attn_weights = a["need_weights"], a["average_attn_weights"]
        module = self._innermost()
        if module is None:
            return out
        kind: Kind = "self" if query is key else "cross"
        if need_weights and not average_attn_weights and not query.is_nested:
            weights = as_bhqk(out[1])  # the kernel computed the per-head weights anyway
            self._emit(
                module,
                "mha_fastpath",
                kind,
                lambda info: AttentionCapture(info, weights=float32_detached(weights)),
                weights.shape,
                mha_weight=qkv_weight,
            )
        else:
            self._emit_fused(module, query, key, qkv_weight, qkv_bias, num_heads, mask, mask_type, "mha_fastpath", kind)
        return out

    def _encoder_layer_fwd(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(torch, "_transformer_encoder_layer_fwd")(*args, **kwargs)
        a = bound_arguments(ENCODER_LAYER_SIGNATURE, args, kwargs)
        src, embed_dim, num_heads, eps, norm_first = a["src"], a["embed_dim"], a["num_heads"], a["eps"], a["norm_first"]
        norm_weight_1, norm_bias_1 = a["norm_weight_1"], a["norm_bias_1"]
        qkv_weight, qkv_bias, mask, mask_type = a["qkv_weight"], a["qkv_bias"], a["mask"], a["mask_type"]
        module = self._innermost()
        if module is not None:
            with autocast_off(src):
                x = (
                    F.layer_norm(src, (embed_dim,), norm_weight_1, norm_bias_1, eps)
                    if norm_first and not src.is_nested
                    else src
                )
                if norm_first and src.is_nested:
                    x = torch.nested.as_nested_tensor(
                        [F.layer_norm(t, (embed_dim,), norm_weight_1, norm_bias_1, eps) for t in src.unbind()]
                    )
            self._emit_fused(module, x, x, qkv_weight, qkv_bias, num_heads, mask, mask_type, "encoder_fastpath", "self")
        return out

    def _nested_from_mask(self, *args: Any, **kwargs: Any) -> Tensor:
        # nn.TransformerEncoder converts a padded batch to a nested tensor before its fast path; the
        # padded length is needed to give fast-path maps the same shape as slow-path ones.
        out = self.original(torch, "_nested_tensor_from_mask")(*args, **kwargs)
        padded = args[0] if args else kwargs.get("t")
        if isinstance(padded, Tensor) and padded.dim() == 3:
            self.state.nested_length = int(padded.shape[1])
        return out

    def _emit_fused(
        self, module, x_query, x_key, qkv_weight, qkv_bias, num_heads, mask, mask_type, source, kind
    ) -> None:
        with torch.no_grad(), autocast_off(qkv_weight):
            if x_query.is_nested:
                per_sample = []
                for xq in x_query.unbind():
                    q, k = in_projection_qk(xq[None], xq[None], qkv_weight, qkv_bias, num_heads)
                    per_sample.append(attention_probs(q, k)[0])
                length = max(self.state.nested_length or 0, max(p.shape[-1] for p in per_sample))
                probs = pad_nested_probs(per_sample, length)
                build = weights_capture(probs)
                shape: tuple[int, ...] = tuple(probs.shape)
            else:
                q, k = in_projection_qk(
                    x_query.detach(),
                    x_key.detach(),
                    qkv_weight.detach(),
                    None if qkv_bias is None else qkv_bias.detach(),
                    num_heads,
                )
                m = native_mask(mask, mask_type, q.shape[0], num_heads)
                m = m.detach() if m is not None else None
                build = lambda info: AttentionCapture(info, query=q, key=k, attn_mask=m, mask_true_means_masked=True)  # noqa: E731
                shape = (*q.shape[:-1], k.shape[-2])
        self._emit(module, source, kind, build, shape, mha_weight=qkv_weight)


def weights_capture(weights: Tensor) -> Callable[[SiteInfo], AttentionCapture]:
    """Builder of the capture of a call whose probabilities are already computed."""
    return lambda info: AttentionCapture(info, weights=weights)


INTERCEPTOR = _Interceptor()
