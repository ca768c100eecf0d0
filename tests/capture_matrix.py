"""What the capture model matrix shares (imported as ``capture_matrix``: ``tests/`` is on ``sys.path``).

Each case runs a model plain and recorded (:func:`record`: outputs bitwise equal, no recorder warning, nothing left
installed) and compares the maps with an independent reference (:func:`compare`: float32, same shape, within a
tolerance on valid query rows); the max |diff| of each family and path is kept in :data:`DIFFS` for the table that
``pytest -s`` prints.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_attn import AttentionRecorder

ATOL = 1e-5
ORIGINALS = {
    "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
    "F.softmax": F.softmax,
    "torch.softmax": torch.softmax,
    "F.multi_head_attention_forward": F.multi_head_attention_forward,
}
DIFFS: dict[tuple[str, str], float] = {}


def print_table() -> None:
    """The closing table: family, path, max |diff| against the reference, outputs bitwise equal."""
    if DIFFS:
        print("\nfamily | path | max |diff| vs reference | outputs bitwise equal")
        for (family, path), diff in DIFFS.items():
            print(f"{family} | {path} | {diff:.1e} | yes")


def eager_twin(model: nn.Module) -> nn.Module:
    """The same weights on Hugging Face's eager attention (the call mutates the config: copy first)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin.eval()


def assert_restored(model: nn.Module) -> None:
    from torch.nn.modules import module as module_globals

    current = {
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "F.softmax": F.softmax,
        "torch.softmax": torch.softmax,
        "F.multi_head_attention_forward": F.multi_head_attention_forward,
    }
    assert current == ORIGINALS
    assert "softmax" not in torch.Tensor.__dict__
    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]


def record(
    model: nn.Module, run: Callable[[], Any], **recorder_args: Any
) -> tuple[AttentionRecorder, list[tuple[str, Tensor]], Any]:
    """Run once plain and once recorded; assert outputs bitwise equal, no recorder warning, nothing left behind.

    Returns the recorder, every ``(site, map)`` of the recorded run in call order, and the recorded output."""
    with torch.no_grad():
        plain = run()
        streamed: list[tuple[str, Tensor]] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with AttentionRecorder(
                model, on_attention=lambda site, probs: streamed.append((site, probs)), **recorder_args
            ) as recorder:
                recorded = run()
    assert torch.equal(first_tensor(plain), first_tensor(recorded))
    assert not [str(w.message) for w in caught if "AttentionRecorder" in str(w.message)]
    assert_restored(model)
    return recorder, streamed, recorded


def compare(
    family: str,
    path: str,
    got: list[Tensor],
    expected: list[Tensor] | tuple[Tensor, ...],
    valid_queries: Tensor | None = None,
    atol: float = ATOL,
) -> None:
    """Maps equal to the eager ones (float32, same shape) on valid query rows; the max |diff| goes to the table."""
    assert len(got) == len(expected) and got
    worst = 0.0
    for probs, reference in zip(got, expected, strict=True):
        assert probs.dtype == torch.float32 and probs.shape == reference.shape, (probs.shape, reference.shape)
        diff = (probs - reference.float()).abs()
        if valid_queries is not None:
            diff = diff * valid_queries[:, None, -diff.shape[-2] :, None]
        worst = max(worst, float(diff.max()))
    assert worst <= atol, f"{family} {path}: max |diff| {worst:.2e}"
    DIFFS[(family, path)] = max(worst, DIFFS.get((family, path), 0.0))


def maps_of(streamed: list[tuple[str, Tensor]], pattern: str) -> list[Tensor]:
    return [probs for site, probs in streamed if pattern in site]
