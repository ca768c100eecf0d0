"""Module probes: find modules by glob over their qualified names and hand their outputs to a consumer.

A probe is ``name -> (pattern, kind)``: ``pattern`` is a glob (``fnmatch`` syntax, ``*`` crosses dots, as for
:class:`~lightning_attn.AttentionRecorder`'s ``include``) over the model's qualified module names with DDP, FSDP,
``torch.compile`` and Lightning wrapper components stripped (:func:`~lightning_attn.capture.clean_module_name`),
and ``kind`` says how its output is read:

- ``"activation"``: any activation (a gate's sigmoid, an MLP's hidden units), summarised per position and channel;
- ``"weights"``: a distribution over positions along the last dimension (a pooling softmax ``[batch, L]`` or
  ``[batch, heads, L]``), treated as an attention site of its own.

:class:`ModuleHooks` registers one per-module forward hook on every matched module (registered by the consumer
when it starts, removed when it stops, also on exceptions: no hook outlives it). Unlike the recorder's global
hooks, a per-module hook on a submodule of an ``nn.TransformerEncoderLayer`` takes that layer off its fused eval
fast path (outputs equal up to rounding, padded positions of nested-tensor batches aside); hooks on modules
outside such layers (gates, pooling heads) change nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_attn.capture.recorder import clean_module_name, matches
from lightning_attn.capture.site_names import close_names

__all__ = [
    "PROBE_KINDS",
    "ModuleHooks",
    "ProbeMatchError",
    "ProbeSpec",
    "first_tensor",
    "parse_probes",
    "resolve_probes",
]

#: What a probe's output is: an activation to summarise, or a distribution over positions.
PROBE_KINDS = ("activation", "weights")


@dataclass(frozen=True)
class ProbeSpec:
    """One declared probe: its ``name``, the glob ``pattern`` over module names and its ``kind``."""

    name: str
    pattern: str
    kind: str


class ProbeMatchError(ValueError):
    """Some probe patterns match no module of the model (the message names each and lists close names)."""


def parse_probes(probes: Mapping[str, Sequence[str]]) -> list[ProbeSpec]:
    """Validate ``{name: (pattern, kind)}`` (lists accepted, as YAML gives them) into :class:`ProbeSpec` objects."""
    if not isinstance(probes, Mapping) or not probes:
        raise ValueError("probes must be a non-empty mapping {name: (module glob, 'activation' | 'weights')}")
    specs = []
    for name, value in probes.items():
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(f"probe {name!r}: expected (module glob, kind), got {value!r}")
        pattern, kind = str(value[0]), str(value[1])
        if kind not in PROBE_KINDS:
            raise ValueError(f"probe {name!r}: kind must be one of {PROBE_KINDS}, got {kind!r}")
        if not pattern:
            raise ValueError(f"probe {name!r}: empty module pattern")
        specs.append(ProbeSpec(str(name), pattern, kind))
    return specs


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    seen: dict[int, tuple[str, nn.Module]] = {}
    for raw, module in model.named_modules():
        name = clean_module_name(raw)
        if name and id(module) not in seen:
            seen[id(module)] = (name, module)
    return list(seen.values())


def resolve_probes(model: nn.Module, specs: Iterable[ProbeSpec]) -> dict[ProbeSpec, list[tuple[str, nn.Module]]]:
    """The modules each probe matches, in ``named_modules`` order (the forward order of most models).

    Raises:
        ProbeMatchError: one error for all probes that match nothing, naming each pattern with the closest
            module names (:func:`~lightning_attn.capture.site_names.close_names`) or, when none is close, a few of
            the model's names.
    """
    modules = _named_modules(model)
    names = [name for name, _ in modules]
    resolved: dict[ProbeSpec, list[tuple[str, nn.Module]]] = {}
    problems: list[str] = []
    for spec in specs:
        found = [(name, module) for name, module in modules if name == spec.pattern or matches(name, [spec.pattern])]
        if found:
            resolved[spec] = found
            continue
        hint = close_names(spec.pattern, names, "module names")
        problems.append(
            f"probe {spec.name!r}: pattern {spec.pattern!r} matches no module of {type(model).__name__} ({hint})"
        )
    if problems:
        raise ProbeMatchError(
            "ModuleProbe: "
            + "; ".join(problems)
            + ". Patterns are fnmatch globs over full qualified module names (as in model.named_modules(), wrapper "
            "prefixes such as 'module.' removed); '*' matches across dots."
        )
    return resolved


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a probe reads from a module's output: the output itself, else the first tensor of a
    tuple/list (``(output, weights)``-style returns), else the first tensor value of a mapping."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, Tensor):
                return value
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, Tensor):
                return value
    return None


#: ``on_output(spec, site, tensor)``: ``site`` is the module name, ``#k`` appended for its k-th call (k >= 1)
#: since the last :meth:`ModuleHooks.new_step`.
OutputConsumer = Callable[[ProbeSpec, str, Tensor], None]


class ModuleHooks:
    """Per-module forward hooks on the modules matched by the probes; outputs go to ``on_output``.

    A module matched by several probes of the same kind is hooked once (by the first); probes of different
    kinds on one module each get their own hook. The hooks only detach the output and call ``on_output``: they
    never change it and never synchronize with the host. Use as a context manager or call :meth:`attach` and
    :meth:`remove` (idempotent).

    Args:
        model: the module whose submodules to hook.
        probes: the probes (:func:`parse_probes`).
        on_output: ``on_output(spec, site, output)`` with the detached output tensor (:func:`first_tensor`).
    """

    def __init__(self, model: nn.Module, probes: Sequence[ProbeSpec], on_output: OutputConsumer) -> None:
        self.model = model
        self.specs = list(probes)
        self.on_output = on_output
        self.sites: dict[str, list[str]] = {}  # probe name -> module names, in forward order of registration
        self._handles: list[RemovableHandle] = []
        self._calls: dict[tuple[str, str], int] = {}
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def attach(self) -> ModuleHooks:
        """Resolve the probes (raising :class:`ProbeMatchError` if some match nothing) and register the hooks."""
        if self._handles:
            raise RuntimeError("these ModuleHooks are already attached")
        resolved = resolve_probes(self.model, self.specs)
        hooked: set[tuple[int, str]] = set()
        self.sites = {}
        try:
            for spec in self.specs:
                self.sites[spec.name] = []
                for name, module in resolved[spec]:
                    if (id(module), spec.kind) in hooked:
                        continue
                    hooked.add((id(module), spec.kind))
                    self.sites[spec.name].append(name)
                    self._handles.append(module.register_forward_hook(self._make_hook(spec, name)))
        except BaseException:
            self.remove()
            raise
        self._calls.clear()
        return self

    def remove(self) -> None:
        """Remove every hook (safe to call twice, and after a failed :meth:`attach`)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._calls.clear()

    def new_step(self) -> None:
        """Start counting repeated calls afresh (call it at the start of each batch)."""
        self._calls.clear()

    def _make_hook(self, spec: ProbeSpec, name: str) -> Callable[[nn.Module, Any, Any], None]:
        key = (spec.kind, name)

        @torch.compiler.disable
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls = self._calls.get(key, 0)
            self._calls[key] = calls + 1
            tensor = first_tensor(output)
            if tensor is None:
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(
                        f"ModuleProbe: module {name!r} (probe {spec.name!r}) returned {type(output).__name__}, "
                        "not a tensor; it is skipped",
                        UserWarning,
                        stacklevel=2,
                    )
                return
            self.on_output(spec, name if calls == 0 else f"{name}#{calls}", tensor.detach())

        return hook

    def __enter__(self) -> ModuleHooks:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
