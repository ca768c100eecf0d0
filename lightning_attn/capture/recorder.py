"""``AttentionRecorder``: exact per-head attention of any PyTorch model, without changing it."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from torch import Tensor, nn

from lightning_attn.capture.backends import INTERCEPTOR
from lightning_attn.capture.record import AttentionCapture, SiteInfo

log = logging.getLogger(__name__)

#: Path components that wrappers insert between the user's module names.
WRAPPER_PREFIXES = ("module", "_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "_forward_module")


def clean_module_name(name: str) -> str:
    """Strip DDP (``module.``), FSDP (``_fsdp_wrapped_module.``), torch.compile (``_orig_mod.``) and
    Lightning/checkpoint wrapper components from a qualified module name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PREFIXES)


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``name`` matches any glob in ``patterns`` (``fnmatch`` syntax, ``*`` crosses dots)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())


def site_selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Whether ``include``/``exclude`` globs keep the site ``name``; a repeated call ``<site>#k`` is included with
    its ``<site>``."""
    included = not include or matches(name, include) or matches(name.partition("#")[0], include)
    return included and not matches(name, exclude)


class AttentionRecorder:
    """Record the post-softmax attention of every attention site of ``model``.

    Sites are found at run time, with no change to the model:

    - ``nn.MultiheadAttention`` (standalone or inside ``nn.Transformer*`` layers), in train and eval,
      with grad, ``no_grad`` or ``inference_mode``, including the fused eval fast paths;
    - every call of ``torch.nn.functional.scaled_dot_product_attention`` made inside the model
      (Hugging Face ``sdpa``, timm-style fused attention, custom modules), with probabilities
      recomputed exactly from ``q`` and ``k`` with the call's ``attn_mask``, ``is_causal``,
      ``scale`` and ``enable_gqa``;
    - attention modules that return their weights (Hugging Face ``eager``: ``(output, weights)``, T5:
      ``(output, position_bias, weights)``), read only when they are probabilities;
    - hand-written attention: a ``softmax`` over the last dimension of ``[batch, heads, queries, keys]``
      (or ``[batch, queries, keys]`` inside an attention module) in a module's forward (source ``"softmax"``).

    Maps are float32 ``[batch, heads, queries, keys]``, per query head, also under ``torch.autocast`` and when
    the caller folded query heads into the query axis (Hugging Face grouped-query decoding steps). A site's
    kind is ``"cross"`` when the call attended to another sequence than its queries'. A model compiled with
    ``torch.compile(fullgraph=True)`` runs its eager module while recording (an info message says so).
    Attention-like modules that ran without a capture (a custom kernel) are named in one warning. Recording
    is per thread: a recorder sees the forward passes of its model made in any thread, but only its own.

    A site is named by the qualified
    name of the module that made the call (DDP, FSDP and ``torch.compile`` wrapper components
    stripped); the k-th repeated call of a site within one forward pass gets ``name#k`` (k >= 1).
    Probabilities recomputed for SDPA are pre-dropout; weights returned by modules in train mode are
    what the module returned (after dropout).

    Args:
        model: the module whose attention to record.
        include: glob patterns on site names to keep (default: all).
        exclude: glob patterns on site names to drop.
        keep: store the maps of the latest forward pass in :attr:`maps`. ``False`` streams: pair it
            with ``on_attention`` or ``on_capture`` and nothing is kept.
        on_attention: ``on_attention(site, probs)`` called for every capture.
        on_capture: ``on_capture(capture)`` with the lazy :class:`AttentionCapture`, which can be
            reduced in query chunks (:meth:`AttentionCapture.chunks`) for long sequences.
        differentiable: keep the maps in the autograd graph (when grad is enabled) so that
            ``torch.autograd.grad(output, recorder.maps[site])`` works: SDPA calls are then computed as
            ``softmax(q k^T) @ v`` in float32 instead of the fused kernel (outputs equal up to rounding,
            no longer bitwise). For gradient-weighted rollout and head relevance.
        exact_outputs: ``True`` (default): the model's outputs are bitwise those of the unrecorded model, and
            the probabilities of SDPA calls are recomputed beside the fused kernel. ``False``: SDPA calls are
            computed as ``P v`` with ``P = softmax(q k^T * scale + mask)`` in float32, computed once and handed to
            the captures (nothing recomputed): about the cost of the attention itself, outputs within 1e-5 of the
            kernel's in float32 (masks, causal, grouped-query, packed heads and train-mode dropout as SDPA does).
            Applies while every active recorder allows it; not under ``torch.compile`` tracing.

    Example::

        with AttentionRecorder(model) as recorder:
            model(x)
        recorder.maps["encoder.layers.0.self_attn"].shape  # [batch, heads, L, L]
    """

    def __init__(
        self,
        model: nn.Module,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        keep: bool = True,
        on_attention: Callable[[str, Tensor], None] | None = None,
        on_capture: Callable[[AttentionCapture], None] | None = None,
        differentiable: bool = False,
        exact_outputs: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"AttentionRecorder needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.keep = keep
        self.on_attention = on_attention
        self.on_capture = on_capture
        self.differentiable = differentiable
        self.exact_outputs = exact_outputs
        self.maps: OrderedDict[str, Tensor] = OrderedDict()
        self.sites: OrderedDict[str, SiteInfo] = OrderedDict()
        self._names: dict[int, str] = {}
        self._mha_by_weight: dict[int, str] = {}
        self._calls: dict[str, int] = {}
        self._active = False
        self._forwards = 0
        self._captures = 0
        self._seen: set[str] = set()
        self._missed: dict[str, str] = {}
        self._bypassed: list[tuple[nn.Module, Any]] = []
        self._warned = False

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        if self._active:
            raise RuntimeError("this AttentionRecorder is already active")
        self._names = {id(m): clean_module_name(n) for n, m in self.model.named_modules()}
        self._mha_by_weight = {
            id(m.in_proj_weight): self._names[id(m)]
            for m in self.model.modules()
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None
        }
        self._forwards = self._captures = 0
        self._seen.clear()
        self._missed.clear()
        self._bypass_fullgraph_compile()
        self._active = True
        INTERCEPTOR.attach(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        INTERCEPTOR.detach(self)
        for compiled, compiled_forward in self._bypassed:
            compiled.__dict__["forward"] = compiled_forward
        self._bypassed = []
        self._active = False
        self._names = {}
        self._mha_by_weight = {}
        if exc_type is None and self._forwards and not self._warned:
            if not self._captures:
                self._warn_nothing_captured()
            elif self._missed:
                self._warn_missed()

    def _bypass_fullgraph_compile(self) -> None:
        """Run ``torch.compile(fullgraph=True)`` modules eagerly while recording.

        A full graph cannot call back into Python: the recorder's hooks make Dynamo raise. Their original
        module computes the same function, so its attention is captured; outside recording the compiled
        graph runs again, untouched.
        """
        for name, module in self.model.named_modules():
            context = getattr(module, "dynamo_ctx", None)
            if hasattr(module, "_orig_mod") and getattr(context, "fullgraph", False) and "forward" in module.__dict__:
                log.info(
                    "AttentionRecorder: %s was compiled with torch.compile(fullgraph=True), which cannot call the "
                    "recorder; its eager module runs while recording (the compiled graph runs again afterwards).",
                    clean_module_name(name) or type(self.model).__name__,
                )
                self._bypassed.append((module, module.__dict__["forward"]))
                module.__dict__["forward"] = module._orig_mod.__call__

    def clear(self) -> None:
        """Forget every stored map and site (no tensor stays referenced)."""
        self.maps.clear()
        self.sites.clear()
        self._calls.clear()

    # -- interceptor protocol -------------------------------------------------------------------
    def owns(self, module: nn.Module) -> bool:
        return id(module) in self._names

    def module_name(self, module: nn.Module) -> str | None:
        return self._names.get(id(module))

    def mha_name_for_weight(self, weight: Tensor) -> str | None:
        return self._mha_by_weight.get(id(weight))

    def begin_forward(self) -> None:
        self._forwards += 1
        self._calls.clear()
        if self.keep:
            self.maps.clear()

    def end_forward(self) -> None:
        pass

    def record(self, module: nn.Module, site: str | None, make: Callable[[str], AttentionCapture]) -> None:
        base = site if site is not None else self._names[id(module)]
        base = base or type(self.model).__name__
        calls = self._calls.get(base, 0)
        self._calls[base] = calls + 1
        name = base if calls == 0 else f"{base}#{calls}"
        self._seen.add(base)
        if not site_selected(name, self.include, self.exclude):
            return
        capture = make(name)
        self._captures += 1
        self.sites[name] = capture.info
        if self.on_capture is not None:
            self.on_capture(capture)
        if self.keep or self.on_attention is not None:
            probs = capture.probs()
            if self.keep:
                self.maps[name] = probs
            if self.on_attention is not None:
                self.on_attention(name, probs)

    def missed(self, module: nn.Module) -> None:
        name = self._names[id(module)] or type(self.model).__name__
        if site_selected(name, self.include, self.exclude):
            self._missed.setdefault(name, type(module).__name__)

    # -- diagnostics --------------------------------------------------------------------------
    def _missed_list(self) -> str:
        return ", ".join(f"{name} ({module_type})" for name, module_type in self._missed.items())

    def _warn_missed(self) -> None:
        self._warned = True
        warnings.warn(
            f"AttentionRecorder captured no attention from these attention-like modules of "
            f"{type(self.model).__name__}, which ran during recording: {self._missed_list()}. They compute attention "
            "in a way the recorder cannot see (a custom CUDA/Triton kernel, flash_attn_func, xFormers, FlexAttention, "
            "or an attention function bound at import time); their maps are missing. See the README's limits section.",
            UserWarning,
            stacklevel=3,
        )

    def _warn_nothing_captured(self) -> None:
        self._warned = True
        if self._seen:
            warnings.warn(
                f"AttentionRecorder captured nothing because include={self.include} / exclude={self.exclude} "
                f"filtered out every attention site of {type(self.model).__name__}; the sites that ran: "
                f"{sorted(self._seen)}.",
                UserWarning,
                stacklevel=3,
            )
            return
        compiled = [
            n or "<root>" for n, m in self.model.named_modules() if hasattr(m, "_orig_mod") and hasattr(m, "dynamo_ctx")
        ]
        if compiled or _is_compiled(self.model):
            warnings.warn(
                "AttentionRecorder captured no attention from a model compiled with torch.compile: the compiled "
                "graph does not call the attention functions the recorder intercepts. Record the uncompiled module "
                "(`model._orig_mod`), or compile after recording, or call `torch._dynamo.reset()` before the "
                "forward pass so that the graph is traced with the recorder active.",
                UserWarning,
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"AttentionRecorder found no attention in {type(self.model).__name__}: no nn.MultiheadAttention, "
                "scaled_dot_product_attention call, attention softmax or weight-returning attention module ran in the "
                "forward pass"
                + (
                    f"; attention-like modules that ran without a capture: {self._missed_list()}"
                    if self._missed
                    else ""
                )
                + ". See the README's limits section for attention the recorder cannot see (custom kernels).",
                UserWarning,
                stacklevel=3,
            )


def _is_compiled(model: Any) -> bool:
    return type(model).__name__ == "OptimizedModule" or hasattr(model, "_orig_mod")


def open_recorder(
    module: nn.Module,
    on_capture: Callable[[AttentionCapture], None],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exact_outputs: bool = True,
) -> AttentionRecorder:
    """An entered streaming :class:`AttentionRecorder` (nothing kept: ``on_capture`` gets every
    capture) on the attention sites of ``module`` matched by ``include``/``exclude``; close it with
    :func:`close_recorder`."""
    recorder = AttentionRecorder(
        module, include=include, exclude=exclude, keep=False, on_capture=on_capture, exact_outputs=exact_outputs
    )
    recorder.__enter__()
    return recorder


def close_recorder(recorder: AttentionRecorder | None, quiet: bool = False) -> None:
    """Exit ``recorder`` (``None``: nothing to do); ``quiet`` drops its "no attention found" warning (reported once
    per epoch, or in a report, instead)."""
    if recorder is None:
        return
    if not quiet:
        recorder.__exit__(None, None, None)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorder.__exit__(None, None, None)
