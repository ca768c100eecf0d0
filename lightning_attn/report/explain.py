"""Pieces of the explainability report: batch conventions, per-sample explanations, streamed statistics and
saliency (gradient x input, gradient-weighted attention rollout, head relevance).

Batch conventions (all overridable through the report's arguments):

- **targets**: a mapping batch's ``target_key`` (default: the first of ``target``, ``targets``, ``label``,
  ``labels``, ``y``); the last element of a tuple/list batch of two or more elements; else none.
- **model inputs**: the batch without its targets: a mapping minus the target key, the other elements of a
  tuple/list, or the tensor itself.
- **default forward** (:func:`default_forward`): ``pl_module(**inputs)`` for a mapping, ``pl_module(*inputs)``
  for a tuple/list (``pl_module(x)`` for ``(x, y)``), ``pl_module(batch)`` for a tensor. The output may be
  the logits tensor, a mapping with ``"logits"``, an object with ``.logits`` (Hugging Face) or a tuple whose
  first element is the logits.
- **logits**: ``[B, C]`` class scores, or ``[B]`` / ``[B, 1]`` binary logits (probability of class 1 is the
  sigmoid); probabilities instead of logits with ``outputs_are_probabilities=True``.

**Saliency** for a bounded set of probe samples (the first ``probe_samples``, or ``probe_indices``):
gradient x input on every floating tensor input of the batch (per feature = last axis, named by
``feature_names``), gradient-weighted attention rollout and per-head relevance from
``d(score)/d(attention)`` with negatives clamped, maps and gradients paired by site name
(:func:`~lightning_attn.report.explain.compute_saliency`). The loop runs under ``torch.inference_mode``;
the saliency pass runs under ``torch.inference_mode(False)`` and ``torch.enable_grad()`` on clones of
the batch made outside inference mode. Integer inputs (token ids) get token saliency instead: gradient x
input (or integrated gradients, ``saliency=``) on the output of the input embedding layer, summed over its hidden
axis, shown as coloured tokens; ``gradcam_layer`` adds Grad-CAM over the input image
(:mod:`~lightning_attn.report.attribution`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_attn.capture.backends import INTERCEPTOR
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder, matches
from lightning_attn.functional.attention import gradient_weighted_rollout, modality_agreement, normalized_entropy
from lightning_attn.metrics.attention import key_mask_for

__all__ = [
    "TARGET_KEYS",
    "BatchAttention",
    "ReportError",
    "as_logits",
    "compute_saliency",
    "default_forward",
    "exclusive_recording",
    "explained_score",
    "extract_targets",
    "floating_inputs",
    "model_inputs",
    "probabilities",
    "slice_batch",
]

#: Keys tried, in order, for the targets of a mapping batch (and of a ``test_step`` output mapping).
TARGET_KEYS = ("target", "targets", "label", "labels", "y")


class ReportError(ValueError):
    """A problem with the report's inputs (model, data, checkpoint, configuration), with a one-line message."""


# ---------------------------------------------------------------------------------------------------------
# batch conventions
# ---------------------------------------------------------------------------------------------------------
def _target_key(batch: Mapping[str, Any], target_key: str | None) -> str | None:
    if target_key is not None:
        return target_key if target_key in batch else None
    return next((key for key in TARGET_KEYS if key in batch), None)


def extract_targets(batch: Any, target_key: str | None = None) -> Any:
    """The targets of a batch by the conventions above, or ``None`` when it has none."""
    if isinstance(batch, Mapping):
        key = _target_key(batch, target_key)
        return None if key is None else batch[key]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[-1]
    return None


def model_inputs(batch: Any, target_key: str | None = None) -> Any:
    """The batch without its targets (see the module docstring)."""
    if isinstance(batch, Mapping):
        key = _target_key(batch, target_key)
        return {k: v for k, v in batch.items() if k != key}
    if isinstance(batch, (list, tuple)):
        inputs = list(batch[:-1]) if len(batch) >= 2 else list(batch)
        return inputs[0] if len(inputs) == 1 else tuple(inputs)
    return batch


def default_forward(pl_module: nn.Module, batch: Any, target_key: str | None = None) -> Any:
    """``pl_module(**inputs)`` / ``pl_module(*inputs)`` / ``pl_module(x)`` for the batch's model inputs."""
    inputs = model_inputs(batch, target_key)
    if isinstance(inputs, Mapping):
        return pl_module(**inputs)
    if isinstance(inputs, tuple):
        return pl_module(*inputs)
    return pl_module(inputs)


def as_logits(output: Any, logits_key: str = "logits") -> Tensor | None:
    """The logits in a model or ``test_step`` output: a tensor, ``output[logits_key]``, ``output.logits`` or
    the first tensor of a tuple; ``None`` when there is none."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get(logits_key)
        return value if isinstance(value, Tensor) else None
    value = getattr(output, "logits", None)
    if isinstance(value, Tensor):
        return value
    if isinstance(output, (list, tuple)):
        return next((item for item in output if isinstance(item, Tensor)), None)
    return None


def probabilities(logits: Tensor, outputs_are_probabilities: bool = False) -> Tensor:
    """``[B, C]`` class probabilities (float32) from ``[B, C]`` logits or ``[B]``/``[B, 1]`` binary logits."""
    scores = logits.detach().float()
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.dim() == 1:
        p1 = scores if outputs_are_probabilities else scores.sigmoid()
        return torch.stack([1 - p1, p1], dim=1)
    if scores.dim() != 2:
        raise ReportError(
            f"the model's output has shape {tuple(logits.shape)}; the report explains per-sample classifiers "
            "([batch, classes] logits, or [batch] binary logits)"
        )
    return scores if outputs_are_probabilities else scores.softmax(-1)


def class_targets(target: Any, batch_size: int, num_classes: int) -> Tensor:
    """``[B]`` int64 class indices from ``[B]`` indices, ``[B, 1]`` indices or ``[B, C]`` one-hot/soft labels."""
    if not isinstance(target, Tensor):
        raise ReportError(f"the batch's targets are a {type(target).__name__}, not a tensor of class indices")
    t = target.detach()
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2 and t.shape[1] == num_classes and t.is_floating_point():
        t = t.argmax(-1)
    if t.dim() != 1 or t.shape[0] != batch_size:
        raise ReportError(
            f"the batch's targets have shape {tuple(target.shape)}, not [{batch_size}] class indices: does the "
            "dataloader yield targets? (pass target_key= or target_fn= to say where they are)"
        )
    if t.is_floating_point() and not bool(torch.all(t == t.round())):
        raise ReportError("the batch's targets are fractional numbers, not class indices")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ReportError(f"target class {int(t.max())} out of range for a model with {num_classes} classes")
    return t


def slice_batch(batch: Any, index: Tensor | slice) -> Any:
    """The samples ``index`` of every batched tensor of a batch (other leaves unchanged)."""
    if isinstance(batch, Tensor):
        return batch[index] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(v, index) for v in batch)
    if isinstance(batch, list):
        return [slice_batch(v, index) for v in batch]
    return batch


def _clone_structure(batch: Any) -> Any:
    """Clone every tensor (call outside inference mode: the clones are then ordinary tensors)."""
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, Mapping):
        return {k: _clone_structure(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_clone_structure(v) for v in batch)
    if isinstance(batch, list):
        return [_clone_structure(v) for v in batch]
    return batch


def batch_device(batch: Any) -> torch.device | None:
    """The device of the first tensor in ``batch`` (nested mappings, lists and tuples), ``None`` when it has none."""
    if isinstance(batch, Tensor):
        return batch.device
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        device = batch_device(value)
        if device is not None:
            return device
    return None


def floating_inputs(batch: Any, target_key: str | None = None) -> dict[str, Tensor]:
    """Floating-point tensors among the model inputs of a batch, by name: mapping keys, ``input<k>`` for the
    k-th element of a tuple/list, ``input`` for a tensor batch. Targets are never included."""
    found: dict[str, Tensor] = {}
    if isinstance(batch, Mapping):
        key = _target_key(batch, target_key)
        for name, value in batch.items():
            if name != key and isinstance(value, Tensor) and value.is_floating_point():
                found[str(name)] = value
    elif isinstance(batch, (list, tuple)):
        items = batch[:-1] if len(batch) >= 2 else batch
        for index, value in enumerate(items):
            if isinstance(value, Tensor) and value.is_floating_point():
                found[f"input{index}"] = value
    elif isinstance(batch, Tensor) and batch.is_floating_point():
        found["input"] = batch
    return found


def _replace_inputs(batch: Any, leaves: Mapping[str, Tensor]) -> Any:
    if isinstance(batch, Mapping):
        return {k: leaves.get(str(k), v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [leaves.get(f"input{i}", v) for i, v in enumerate(batch)]
        return tuple(out) if isinstance(batch, tuple) else out
    return leaves.get("input", batch)


def exclusive_recording(recorder: AttentionRecorder) -> contextlib.AbstractContextManager[None]:
    """Attention goes to ``recorder`` only while active (see ``_Interceptor.exclusive``)."""
    return INTERCEPTOR.exclusive(recorder)


# ---------------------------------------------------------------------------------------------------------
# per-sample attention of one batch
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SiteSample:
    """Per-sample reductions of one site for one batch (all on the model's device)."""

    num_heads: int
    num_keys: int
    entropy: Tensor  # [B, H] mean normalized entropy over valid query rows
    top_values: Tensor | None = None  # [B, k] largest entries of the head-averaged map (pair sites)
    top_index: Tensor | None = None  # [B, k] their flat indices query * num_keys + key
    head_mean: Tensor | None = None  # [B, Q, K] head-averaged map (modality-pair sites only)

    def top_pairs(self) -> list[list[tuple[int, int, float]]]:
        """Per sample ``[(query, key, weight), ...]`` by weight descending (host sync)."""
        if self.top_values is None or self.top_index is None:
            return []
        values, index = self.top_values.detach().cpu().tolist(), self.top_index.detach().cpu().tolist()
        return [
            [(i // self.num_keys, i % self.num_keys, v) for v, i in zip(vs, ix, strict=False)]
            for vs, ix in zip(values, index, strict=False)
        ]


class BatchAttention:
    """``on_capture`` sink of an :class:`AttentionRecorder` for one batch: per-sample, per-head mean normalized
    entropy of every site and the ``top_k`` largest entries of the head-averaged map of the pair sites, both
    reduced in query chunks (no ``[B, H, L, L]`` or ``[B, L, L]`` is kept); the head-averaged ``[B, Q, K]`` map
    is kept only for sites of declared modality pairs (their agreement correlates two whole maps).

    Args:
        chunk_size: query rows reduced at a time (``None``: whole maps).
        pair_sites: glob patterns of sites whose top attention pairs are reported; ``None``: the last site of
            the forward pass (every site is reduced, only the latest one's pairs are kept).
        modality_sites: glob patterns of sites in declared modality pairs.
        top_k: pairs per sample.
    """

    def __init__(
        self, chunk_size: int | None, pair_sites: Sequence[str] | None, modality_sites: Sequence[str], top_k: int = 3
    ) -> None:
        self.chunk_size = chunk_size
        self.pair_sites = list(pair_sites) if pair_sites is not None else None
        self.modality_sites = list(modality_sites)
        self.top_k = top_k
        self.sites: dict[str, SiteSample] = {}
        self.infos: dict[str, Any] = {}
        self.last_site: str | None = None

    def _is_pair_site(self, site: str) -> bool:
        if self.pair_sites is None:
            return True
        return matches(site, self.pair_sites) or site.split("#")[0] in self.pair_sites

    def __call__(self, capture: AttentionCapture) -> None:
        info = capture.info
        site = info.name
        pairs = self._is_pair_site(site)
        keep_map = matches(site, self.modality_sites) or site in self.modality_sites
        entropy_sum: Tensor | None = None
        rows: Tensor | None = None
        top_values: Tensor | None = None
        top_index: Tensor | None = None
        head_mean: Tensor | None = None
        for offset, chunk in capture.chunks(self.chunk_size):
            chunk = chunk.detach()
            key_mask = key_mask_for(capture, chunk)
            entropy = normalized_entropy(chunk, key_mask)  # [B, H, q]
            if key_mask is None:
                valid = torch.ones_like(entropy)
            else:
                valid = key_mask.expand(chunk.shape).any(-1).to(entropy.dtype)
            part_sum = (entropy * valid).sum(-1)
            part_rows = valid.sum(-1)
            entropy_sum = part_sum if entropy_sum is None else entropy_sum + part_sum
            rows = part_rows if rows is None else rows + part_rows
            if pairs or keep_map:
                mean = chunk.float().mean(1)  # [B, q, K]
                if pairs:
                    flat = mean.reshape(mean.shape[0], -1)
                    values, index = flat.topk(min(self.top_k, flat.shape[1]), dim=1)
                    index = index + offset * info.num_keys
                    if top_values is not None and top_index is not None:
                        values, index = torch.cat([top_values, values], 1), torch.cat([top_index, index], 1)
                        values, pick = values.topk(min(self.top_k, values.shape[1]), dim=1)
                        index = index.gather(1, pick)
                    top_values, top_index = values, index
                if keep_map:
                    if head_mean is None:
                        head_mean = mean.new_zeros(mean.shape[0], info.num_queries, info.num_keys)
                    head_mean[:, offset : offset + mean.shape[1]] = mean
        if entropy_sum is None or rows is None:
            return
        mean_entropy = entropy_sum / rows.clamp_min(1)
        if self.pair_sites is None and self.last_site in self.sites:
            previous = self.sites[self.last_site]
            previous.top_values = previous.top_index = None  # only the last site's pairs are reported
        self.sites[site] = SiteSample(
            num_heads=int(mean_entropy.shape[1]),
            num_keys=info.num_keys,
            entropy=mean_entropy,
            top_values=top_values,
            top_index=top_index,
            head_mean=head_mean,
        )
        self.infos[site] = info
        self.last_site = site

    def select(self, rows: Tensor) -> None:
        """Keep only the samples ``rows`` (``[n]`` indices into the batch) of every site."""
        for site, sample in self.sites.items():
            self.sites[site] = replace(
                sample,
                entropy=sample.entropy[rows],
                top_values=None if sample.top_values is None else sample.top_values[rows],
                top_index=None if sample.top_index is None else sample.top_index[rows],
                head_mean=None if sample.head_mean is None else sample.head_mean[rows],
            )

    def pair_site_names(self) -> list[str]:
        """Sites whose top pairs are reported, in forward order."""
        if self.pair_sites is None:
            return [self.last_site] if self.last_site is not None else []
        return [s for s in self.sites if self._is_pair_site(s)]


def resolve_modality_pairs(
    pairs: Mapping[str, tuple[str, str]], sites: Sequence[str]
) -> dict[str, tuple[str | None, str | None]]:
    """Bind each declared pair's two globs to the first matching site name (``None`` when no site matches)."""
    bound: dict[str, tuple[str | None, str | None]] = {}
    for name, (a, b) in pairs.items():
        site_a = next((s for s in sites if s == a or matches(s, [a])), None)
        site_b = next((s for s in sites if s == b or matches(s, [b])), None)
        bound[name] = (site_a, site_b)
    return bound


def pair_agreement(attention: BatchAttention, site_a: str | None, site_b: str | None) -> Tensor | None:
    """``[B]`` modality agreement of one declared pair, ``None`` when a site is missing or shapes disagree."""
    if site_a is None or site_b is None:
        return None
    a = attention.sites.get(site_a)
    b = attention.sites.get(site_b)
    if a is None or b is None or a.head_mean is None or b.head_mean is None:
        return None
    if a.head_mean.shape[1:] != b.head_mean.shape[1:][::-1]:
        return None
    return modality_agreement(a.head_mean, b.head_mean)


# ---------------------------------------------------------------------------------------------------------
# streamed statistics
# ---------------------------------------------------------------------------------------------------------
def _square_group(sites: Mapping[str, Tensor]) -> list[str]:
    """Sites of the largest group of square maps with one sequence length, in forward order."""
    groups: dict[int, list[str]] = {}
    for site, attn in sites.items():
        if attn.dim() == 4 and attn.shape[-1] == attn.shape[-2]:
            groups.setdefault(int(attn.shape[-1]), []).append(site)
    if not groups:
        return []
    return max(groups.values(), key=len)


def explained_score(logits: Tensor, explain: Tensor) -> Tensor:
    """The score the saliency explains, ``s = sum_b z[b, c_b]`` for ``[B, C]`` logits and classes ``c_b = explain[b]``;
    for ``[B]``/``[B, 1]`` binary logits ``z`` for class 1 and ``-z`` for class 0. One sum over the batch: each
    sample's gradient is its own (samples do not interact in evaluation mode)."""
    z = logits.float()
    if z.dim() == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.dim() == 1:
        return torch.where(explain == 1, z, -z).sum()
    return z.gather(1, explain[:, None]).sum()


def _graph_base(attn: Tensor) -> Tensor | None:
    """The tensor a returned attention view was made from (``nn.MultiheadAttention`` returns its weights as a
    view taken after they were used; gradients reach the base, not the view)."""
    base = attn._base
    if base is None or base.numel() != attn.numel() or not attn.is_contiguous() or not base.is_contiguous():
        return None
    if base.data_ptr() != attn.data_ptr():
        return None
    return base


def _feature_reduce(attribution: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(abs [B, F], signed [B, F], position map [B, P, F] or None)``; the feature axis is the last one."""
    if attribution.dim() == 1:
        attribution = attribution[:, None]
    if attribution.dim() == 2:
        return attribution.abs(), attribution, None
    flat = attribution.reshape(attribution.shape[0], -1, attribution.shape[-1])
    return flat.abs().sum(1), flat.sum(1), flat.abs()


def _block_pool(values: Tensor, max_rows: int) -> Tensor:
    """Average consecutive rows of ``[B, P, F]`` so that at most ``max_rows`` remain."""
    rows = values.shape[1]
    if rows <= max_rows:
        return values
    bins = torch.linspace(0, rows, max_rows + 1).long()
    return torch.stack(
        [values[:, int(bins[i]) : max(int(bins[i + 1]), int(bins[i]) + 1)].mean(1) for i in range(max_rows)], dim=1
    )


def compute_saliency(
    module: nn.Module,
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    *,
    explain: Tensor,
    target_key: str | None = None,
    logits_key: str = "logits",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_positions: int = 64,
) -> dict[str, Any]:
    """Gradient x input and gradient-weighted attention rollout for the samples of ``batch``.

    Runs one forward pass with gradients enabled, also inside Lightning's evaluation loop (which runs under
    ``torch.inference_mode``): ``torch.inference_mode(False)`` and ``torch.enable_grad()``, with every batch
    tensor cloned outside inference mode (tensors created under inference mode can never enter autograd).
    The attention of every site is recorded with ``differentiable=True``; one ``torch.autograd.grad`` call
    gives the gradient of the explained score ``s = sum_b z[b, c_b]`` (``c_b = explain[b]``; for binary
    logits ``z`` for class 1 and ``-z`` for class 0) with respect to the floating inputs and to every map.
    Gradients are paired with maps by site name, never by position (hooks deliver them in reverse order:
    vit-explain issue 6). No parameter's ``.grad`` is touched.

    - **gradient x input** (Shrikumar et al. 2017; Simonyan et al. 2014 for the gradient): ``a = x * ds/dx``
      per floating input tensor; per feature (last axis) ``|a|`` summed over the other axes, its share of
      the input's total, and the signed sum. Integer inputs (token ids) get none here: their saliency is taken on
      the embedding layer's output (:mod:`~lightning_attn.report.attribution`).
    - **gradient-weighted rollout** (Chefer et al. 2021; jacobgil/vit-explain): per layer
      ``mean_h(max(A * dA, 0))`` rolled out over the largest group of square maps of one length, in forward
      order (:func:`~lightning_attn.functional.gradient_weighted_rollout`); reported as the relevance of each
      token averaged over output rows and for row 0 ([CLS]).
    - **head relevance**: per site and head ``sum_{i,j} max(A * dA, 0)``, and each head's share in its site.

    Returns:
        ``{"explained": [B], "logits": [B, C], "inputs": {...}, "rollout": {...} | None,
        "head_relevance": {site: [B, H]}, "sites_without_gradient": [...], "attention": {site: [B, H, Q, K]}}``
        with host tensors (each input entry also holds the input ``values``).
    """
    with torch.inference_mode(False), torch.enable_grad():
        cloned = _clone_structure(batch)
        leaves = {name: tensor.requires_grad_(True) for name, tensor in floating_inputs(cloned, target_key).items()}
        cloned = _replace_inputs(cloned, leaves)
        with (
            AttentionRecorder(module, include=include, exclude=exclude, differentiable=True) as recorder,
            exclusive_recording(recorder),
        ):
            logits = as_logits(forward_fn(module, cloned), logits_key)
        if logits is None:
            raise ReportError("forward_fn returned no logits tensor for the saliency pass")
        explain = (
            explain.detach().clone().to(device=logits.device, dtype=torch.long)
        )  # a normal tensor, not an inference one
        score = explained_score(logits, explain)
        maps = {site: attn for site, attn in recorder.maps.items() if attn.requires_grad}
        targets: list[Tensor] = list(leaves.values())
        slots: dict[str, tuple[int, int | None]] = {}
        for site, attn in maps.items():
            base = _graph_base(attn)
            slots[site] = (len(targets), None if base is None else len(targets) + 1)
            targets.append(attn)
            if base is not None:
                targets.append(base)
        grads = (
            torch.autograd.grad(score, targets, allow_unused=True)
            if targets and score.requires_grad
            else [None] * len(targets)
        )

    result: dict[str, Any] = {
        "explained": explain.detach().cpu(),
        "logits": logits.detach().float().cpu(),
        "inputs": {},
    }
    for index, (name, leaf) in enumerate(leaves.items()):
        grad = grads[index]
        if grad is None:
            grad = torch.zeros_like(leaf)
        attribution = (leaf.detach() * grad.detach()).float().cpu()
        absolute, signed, positions = _feature_reduce(attribution)
        total = absolute.sum(-1, keepdim=True)
        share = torch.where(
            total > 0, absolute / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(absolute)
        )
        entry = {"shape": list(leaf.shape[1:]), "abs": absolute, "signed": signed, "share": share}
        entry["values"] = leaf.detach().float().cpu()  # the probe's input itself, for the report's drill-down
        if positions is not None:
            entry["positions"] = _block_pool(positions, max_positions)
            entry["positions_pooled"] = positions.shape[1] > max_positions
        result["inputs"][name] = entry

    paired: dict[str, tuple[Tensor, Tensor]] = {}
    missing: list[str] = []
    for site, attn in maps.items():
        first, second = slots[site]
        grad = grads[first]
        base_grad = grads[second] if second is not None else None
        if grad is None and base_grad is not None:
            grad = base_grad.reshape(attn.shape)
        if grad is None:
            missing.append(site)
            continue
        paired[site] = (attn.detach().float(), grad.detach().float())
    missing += [site for site in recorder.maps if site not in maps]
    result["sites_without_gradient"] = missing
    result["head_relevance"] = {
        site: (attn * grad).clamp_min(0).sum((-2, -1)).cpu() for site, (attn, grad) in paired.items()
    }
    group = _square_group({site: attn for site, (attn, _) in paired.items()})
    if group:
        rollout = gradient_weighted_rollout([paired[s][0] for s in group], [paired[s][1] for s in group]).cpu()
        result["rollout"] = {"sites": group, "mean_row": rollout.mean(1), "row0": rollout[:, 0], "matrix": rollout}
    else:
        result["rollout"] = None
    result["attention"] = {site: attn.detach().float().cpu() for site, attn in recorder.maps.items()}
    recorder.clear()
    return result
