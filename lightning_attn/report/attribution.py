"""Layer attributions of the report's probe samples: token saliency on the input embedding layer (for models fed
integer token ids, which gradient x input on the batch cannot explain) and Grad-CAM on a token layer.

Each pass runs like :func:`~lightning_attn.report.explain.compute_saliency`: under ``torch.inference_mode(False)``
and ``torch.enable_grad()`` on clones of the batch, other recorders suspended, no parameter ``.grad`` touched. A
forward hook replaces the layer's output ``x`` by a leaf tensor ``b + alpha (x - b)`` (``alpha = 1``: ``x`` itself)
and one ``torch.autograd.grad`` gives the gradient of the explained score
(:func:`~lightning_attn.report.explain.explained_score`) with respect to it; the maths are in
:mod:`lightning_attn.functional.attribution`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.functional.attribution import gauss_legendre_path, gradcam_map, patch_grid, token_attribution
from lightning_attn.report.explain import (
    ReportError,
    _clone_structure,
    as_logits,
    exclusive_recording,
    explained_score,
    floating_inputs,
    model_inputs,
)
from lightning_attn.report.run import ReportRun
from lightning_attn.report.summary import callable_name

__all__ = [
    "SALIENCY_METHODS",
    "AttributionSettings",
    "compute_attributions",
    "find_embedding",
    "gradcam",
    "probe_entries",
    "record_attributions",
    "token_saliency",
]

#: Token saliency methods: gradient x activation, or integrated gradients along the straight path from the baseline.
SALIENCY_METHODS = ("gradient_x_input", "integrated_gradients")


@dataclass(frozen=True)
class AttributionSettings:
    """The report's layer-attribution arguments (see :class:`~lightning_attn.report.callback.ExplainabilityReport`).

    Raises:
        ValueError: an unknown ``saliency`` method, ``n_steps < 1``, a ``grid`` that is not two positive integers.
    """

    embedding: str | None = None
    saliency: str = "gradient_x_input"
    n_steps: int = 32
    tokenizer: Any = None
    id_to_token: Callable[[int], str] | None = None
    gradcam_layer: str | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.saliency not in SALIENCY_METHODS:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCY_METHODS)}, got {self.saliency!r}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if self.grid is not None:
            if len(self.grid) != 2 or any(int(side) < 1 for side in self.grid):
                raise ValueError(f"grid must be (rows, cols) of positive integers, got {self.grid!r}")
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "convert_ids_to_tokens", None)):
            raise ValueError(
                "tokenizer must have convert_ids_to_tokens (a Hugging Face tokenizer); pass id_to_token= otherwise"
            )

    def config(self) -> dict[str, Any]:
        """The settings as plain values (hashed into the report's provenance)."""
        return {
            "embedding": self.embedding,
            "saliency": self.saliency,
            "n_steps": self.n_steps,
            "tokenizer": None if self.tokenizer is None else type(self.tokenizer).__name__,
            "id_to_token": callable_name(self.id_to_token),
            "gradcam_layer": self.gradcam_layer,
            "grid": list(self.grid) if self.grid else None,
        }

    def pad_id(self, layer: nn.Module) -> int | None:
        """The padding token id: the tokenizer's, else the embedding's ``padding_idx``; ``None`` when neither says."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(layer, "padding_idx", None)
        return None if pad is None else int(pad)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Strings of token ``ids`` (the tokenizer's, ``id_to_token``'s, else the ids themselves).

        Raises:
            ReportError: the tokenizer or ``id_to_token`` fails on one of the ids (a tokenizer of another vocabulary).
        """
        try:
            if self.tokenizer is not None:
                return [str(t) for t in self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
            if self.id_to_token is not None:
                return [str(self.id_to_token(int(i))) for i in ids]
        except Exception as error:  # the user's callable: any failure becomes one line at the first probe batch
            source = "the tokenizer" if self.tokenizer is not None else "id_to_token"
            raise ReportError(
                f"{source} failed on the token ids {list(ids)[:8]}...: {type(error).__name__}: {error}"
            ) from None
        return [str(int(i)) for i in ids]


def find_embedding(module: nn.Module, name: str | None = None) -> tuple[str, nn.Module] | None:
    """The input embedding layer of ``module`` and its name: ``name`` if given; else the module returned by the
    first ``get_input_embeddings()`` (Hugging Face models, also nested); else the first ``nn.Embedding``.

    Raises:
        ReportError: ``name`` names no submodule.
    """
    modules = dict(module.named_modules())
    if name is not None:
        if name not in modules:
            embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
            raise ReportError(
                f"embedding={name!r} names no submodule of {type(module).__name__} "
                f"(its nn.Embedding layers: {embeddings})"
            )
        return name, modules[name]
    by_identity = {id(m): n for n, m in modules.items()}
    for candidate in modules.values():
        getter = getattr(candidate, "get_input_embeddings", None)
        if callable(getter):
            try:
                layer = getter()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(layer, nn.Module) and id(layer) in by_identity:
                return by_identity[id(layer)], layer
    return next(((n, m) for n, m in modules.items() if isinstance(m, nn.Embedding)), None)


def has_integer_inputs(batch: Any, target_key: str | None) -> bool:
    """Whether the model inputs of ``batch`` hold an integer tensor of token ids (a boolean mask does not count)."""
    inputs = model_inputs(batch, target_key)
    leaves = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, tuple) else [inputs]
    return any(
        isinstance(t, Tensor)
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype != torch.bool
        and t.dim() >= 2
        for t in leaves
    )


@dataclass
class _LayerPass:
    """One forward pass with a layer's output replaced by a leaf, and the score's gradient with respect to it."""

    output: Tensor  # the layer's own output x (detached)
    gradient: Tensor  # d score / d leaf
    first_input: Any  # the layer's first positional input (token ids for an embedding)


def _layer_pass(
    module: nn.Module,
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    layer: nn.Module,
    explain: Tensor,
    *,
    logits_key: str,
    baseline: Tensor | None = None,
    alpha: float = 1.0,
) -> _LayerPass:
    captured: dict[str, Any] = {}

    def replace(_: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        if "leaf" in captured:  # a second call of the layer in the same forward (tied weights) is left alone
            return output
        if not isinstance(output, Tensor):
            raise ReportError(
                f"the attributed layer {type(layer).__name__} returns a {type(output).__name__}, not a tensor"
            )
        x = output.detach()
        point = x if baseline is None else baseline + alpha * (x - baseline)
        leaf = point.clone().requires_grad_(True)
        captured.update(leaf=leaf, output=x, first=args[0] if args else None)
        return leaf

    with torch.inference_mode(False), torch.enable_grad():
        cloned = _clone_structure(batch)
        handle = layer.register_forward_hook(replace)
        try:
            with AttentionRecorder(module, keep=False) as silent, exclusive_recording(silent):
                logits = as_logits(forward_fn(module, cloned), logits_key)
        finally:
            handle.remove()
        if logits is None:
            raise ReportError("forward_fn returned no logits tensor for the attribution pass")
        if "leaf" not in captured:
            raise ReportError(f"the attributed layer {type(layer).__name__} was not called by the model's forward")
        score = explained_score(logits, explain.detach().clone().to(device=logits.device, dtype=torch.long))
        (gradient,) = torch.autograd.grad(score, [captured["leaf"]], allow_unused=True)
    if gradient is None:
        gradient = torch.zeros_like(captured["leaf"])
    first = captured["first"]
    return _LayerPass(
        output=captured["output"],
        gradient=gradient.detach(),
        first_input=first.detach() if isinstance(first, Tensor) else first,
    )


def token_saliency(
    module: nn.Module,
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    *,
    explain: Tensor,
    layer: nn.Module,
    settings: AttributionSettings,
    logits_key: str = "logits",
) -> dict[str, Tensor]:
    """Per-token attribution of the explained score on the output of the embedding ``layer``, summed over the hidden
    axis (:func:`~lightning_attn.functional.attribution.token_attribution`).

    - ``gradient_x_input``: ``x * dS/dx`` (Captum's ``LayerGradientXActivation`` on the layer);
    - ``integrated_gradients``: ``(x - b) * sum_k w_k dS/dx(b + alpha_k (x - b))`` over ``n_steps`` Gauss-Legendre
      points (Captum's ``LayerIntegratedGradients`` with its default method), baseline ``b`` the layer's output for
      the padding token (``settings.pad_id``), else zeros.

    Returns:
        ``{"ids": [B, T] token ids (the layer's input), "attribution": [B, T] float64}`` on the host.
    """
    if settings.saliency == "gradient_x_input":
        layer_pass = _layer_pass(module, batch, forward_fn, layer, explain, logits_key=logits_key)
        attribution = token_attribution(layer_pass.output, layer_pass.gradient)
        ids = layer_pass.first_input
    else:
        first = _layer_pass(module, batch, forward_fn, layer, explain, logits_key=logits_key)
        ids = first.first_input
        pad = settings.pad_id(layer)
        baseline = torch.zeros_like(first.output)
        if pad is not None and isinstance(ids, Tensor):
            with torch.inference_mode(False), torch.no_grad():
                baseline = layer(torch.full_like(ids, pad)).detach().to(first.output.dtype)
        alphas, weights = gauss_legendre_path(settings.n_steps)
        total = torch.zeros_like(first.output, dtype=torch.float64)
        for alpha, weight in zip(alphas, weights, strict=True):
            step = _layer_pass(
                module, batch, forward_fn, layer, explain, logits_key=logits_key, baseline=baseline, alpha=alpha
            )
            total += weight * step.gradient.double()
        attribution = token_attribution(first.output.double() - baseline.double(), total)
    if not isinstance(ids, Tensor) or ids.shape != attribution.shape:
        ids = torch.full(attribution.shape, -1, dtype=torch.long)
    return {"ids": ids.cpu().long(), "attribution": attribution.cpu()}


def _named_layer(module: nn.Module, pattern: str) -> tuple[str, nn.Module]:
    matched = [(n, m) for n, m in module.named_modules() if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
    if not matched:
        raise ReportError(f"gradcam_layer={pattern!r} matches no submodule of {type(module).__name__}")
    return matched[-1]


def gradcam(
    module: nn.Module,
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    *,
    explain: Tensor,
    layer_glob: str,
    grid: tuple[int, int] | None = None,
    logits_key: str = "logits",
) -> dict[str, Any]:
    """Grad-CAM (:func:`~lightning_attn.functional.attribution.gradcam_map`) on the output ``[B, tokens, channels]`` of
    the last submodule whose name matches ``layer_glob``, over the patch tokens: a leading [CLS] token is dropped from
    the activations and gradients first (as pytorch-grad-cam's ViT ``reshape_transform`` does, so that the channel
    weights average the patches' gradients only) and the map is reshaped to the patch grid when ``grid`` is given or
    the token count is a square (:func:`~lightning_attn.functional.attribution.patch_grid`).
    For a ViT name the last block's first norm (``...layers.<last>.norm1``), as pytorch-grad-cam does: the
    classifier reads [CLS] only, so after the last block's attention the patch tokens get no gradient.

    Returns:
        ``{"layer": name, "map": [B, rows, cols] or [B, T'] float64, "grid": (rows, cols) | None,
        "dropped_cls": bool}``.

    Raises:
        ReportError: no matching module, an output that is not ``[batch, tokens, channels]``, a ``grid`` that does not
            fit.
    """
    name, layer = _named_layer(module, layer_glob)
    layer_pass = _layer_pass(module, batch, forward_fn, layer, explain, logits_key=logits_key)
    batch_size = int(explain.shape[0])
    if layer_pass.output.dim() != 3 or layer_pass.output.shape[0] != batch_size:
        raise ReportError(
            f"gradcam_layer {name!r} outputs shape {tuple(layer_pass.output.shape)}, not [batch={batch_size}, tokens, "
            "channels] (a batch-first token layer, e.g. a ViT block's norm1)"
        )
    try:
        drop, shape = patch_grid(int(layer_pass.output.shape[1]), grid)
    except ValueError as error:
        raise ReportError(f"gradcam_layer {name!r}: {error}") from None
    cam = gradcam_map(layer_pass.output[:, drop:], layer_pass.gradient[:, drop:]).cpu()
    if shape is not None:
        cam = cam.reshape(batch_size, *shape)
    return {"layer": name, "map": cam, "grid": shape, "dropped_cls": bool(drop)}


def _probe_image(batch: Any, target_key: str | None) -> Tensor | None:
    """``[B, H, W]`` or ``[B, H, W, 3]`` images of the first floating input shaped like images, scaled to [0, 1]."""
    for tensor in floating_inputs(batch, target_key).values():
        x = tensor.detach().float().cpu()
        if x.dim() == 4 and x.shape[1] in (1, 3):
            x = x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
        elif x.dim() != 3 or min(x.shape[1:]) < 2:
            continue
        low = x.flatten(1).min(1).values.view(-1, *[1] * (x.dim() - 1))
        high = x.flatten(1).max(1).values.view(-1, *[1] * (x.dim() - 1))
        return (x - low) / (high - low).clamp_min(1e-12)
    return None


def compute_attributions(
    module: nn.Module,
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    *,
    explain: Tensor,
    settings: AttributionSettings,
    target_key: str | None = None,
    logits_key: str = "logits",
) -> dict[str, Any]:
    """The layer attributions of the probe samples in ``batch``: token saliency when the model inputs hold token ids
    (or ``settings.embedding`` names a layer), Grad-CAM when ``settings.gradcam_layer`` is set.

    Returns:
        ``{"tokens": token_saliency(...) + {"layer", "method"} | None, "gradcam": gradcam(...) + {"image"} | None,
        "attribution_notes": [...]}``.
    """
    out: dict[str, Any] = {"tokens": None, "gradcam": None, "attribution_notes": []}
    if settings.embedding is not None or has_integer_inputs(batch, target_key):
        found = find_embedding(module, settings.embedding)
        if found is None:
            out["attribution_notes"].append(
                "the inputs hold token ids but the model has no nn.Embedding or get_input_embeddings(): "
                "no token saliency (name the layer with embedding=)"
            )
        else:
            name, layer = found
            try:
                tokens = token_saliency(
                    module, batch, forward_fn, explain=explain, layer=layer, settings=settings, logits_key=logits_key
                )
            except ReportError as error:
                if settings.embedding is not None:  # the layer the user named does not fit: say so at once
                    raise
                out["attribution_notes"].append(
                    f"no token saliency on the layer found, {name}: {error} (name the "
                    "input embedding layer with embedding=)"
                )
            else:
                out["tokens"] = {**tokens, "layer": name, "method": settings.saliency, "pad_id": settings.pad_id(layer)}
    if settings.gradcam_layer is not None:
        cam = gradcam(
            module,
            batch,
            forward_fn,
            explain=explain,
            layer_glob=settings.gradcam_layer,
            grid=settings.grid,
            logits_key=logits_key,
        )
        out["gradcam"] = {**cam, "image": _probe_image(batch, target_key) if cam["grid"] is not None else None}
    return out


def probe_entries(
    result: dict[str, Any], row: int, settings: AttributionSettings
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The ``tokens`` and ``gradcam`` entries of one probe (row ``row`` of :func:`compute_attributions`'s ``result``)
    for
    report.json, and the probe's image for the Grad-CAM overlay (kept out of the JSON)."""
    entries: dict[str, Any] = {}
    tokens = result.get("tokens")
    if tokens is not None:
        ids = tokens["ids"][row].tolist()
        values = tokens["attribution"][row]
        keep = len(ids)
        while keep > 1 and tokens["pad_id"] is not None and ids[keep - 1] == tokens["pad_id"]:
            keep -= 1  # trailing padding carries no text
        values = values[:keep]
        total = float(values.abs().sum())
        share = (values.abs() / total).tolist() if total > 0 else [0.0] * keep
        entries["tokens"] = {
            "layer": tokens["layer"],
            "method": tokens["method"],
            "ids": ids[:keep],
            "tokens": settings.token_strings(ids[:keep]),
            "attribution": values.tolist(),
            "share": share,
        }
    image = None
    cam = result.get("gradcam")
    if cam is not None:
        entries["gradcam"] = {
            "layer": cam["layer"],
            "grid": list(cam["grid"]) if cam["grid"] else None,
            "dropped_cls": cam["dropped_cls"],
            "map": cam["map"][row].tolist(),
        }
        if cam["image"] is not None:
            image = cam["image"][row].numpy()
    return entries, image


def record_attributions(
    run: ReportRun, result: dict[str, Any], positions: Sequence[int], settings: AttributionSettings
) -> None:
    """Add :func:`compute_attributions`'s ``result`` for the probes at ``positions`` (just recorded by
    :func:`~lightning_attn.report.run.record_probes`, the last ``len(positions)`` of ``run.probes``) to them, their
    images to ``run.probe_images`` and the result's notes to ``run.notes``."""
    for note in result.get("attribution_notes", []):
        if note not in run.notes:
            run.notes.append(note)
    for row, probe in enumerate(run.probes[len(run.probes) - len(positions) :]):
        entries, image = probe_entries(result, row, settings)
        probe.update(entries)
        if image is not None:
            run.probe_images[int(probe["sample"])] = image
        cam = probe.get("gradcam")
        if cam is not None and not np.any(np.asarray(cam["map"]) > 0):
            note = (
                f"Grad-CAM on {cam['layer']} is zero for some probes (sample {probe['sample']}): no channel of "
                "that layer speaks for the explained class there; an earlier layer may show more"
            )
            if not any(n.startswith(f"Grad-CAM on {cam['layer']} is zero") for n in run.notes):
                run.notes.append(note)
