"""``AttentionRecorder(exact_outputs=False)``: SDPA calls computed once as ``P v``, the captures reading that ``P``.

Each case runs the same inputs through the default (bitwise) recorder and the shared-computation one, and checks
the model's outputs (within 1e-5 in float32) and the captured maps (within 1e-6) against the default's, and the
model's outputs against the unrecorded model's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lightning_attn import AttentionRecorder

OUTPUT_TOLERANCE = 1e-5
MAP_TOLERANCE = 1e-6


class SDPAModule(nn.Module):
    """Attention through ``F.scaled_dot_product_attention`` with the call's options fixed at construction."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, width: int = 32, dropout: float = 0.0, **options: Any):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * kv_heads * self.head_dim)
        self.dropout = dropout
        self.options = options

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **self.options)
        return out.transpose(1, 2).reshape(batch, length, -1)


def run(model: nn.Module, call: Callable[[], Any], exact: bool) -> tuple[Any, dict[str, Tensor]]:
    with torch.no_grad(), AttentionRecorder(model, exact_outputs=exact) as recorder:
        out = call()
    return out, dict(recorder.maps)


def assert_same(model: nn.Module, call: Callable[[], Any], pick: Callable[[Any], Tensor] = lambda out: out) -> None:
    """Outputs and maps of the shared computation against the bitwise recorder's (and the unrecorded model's)."""
    with torch.no_grad():
        plain = pick(call())
    exact_out, exact_maps = run(model, call, exact=True)
    shared_out, shared_maps = run(model, call, exact=False)
    assert torch.equal(pick(exact_out), plain)  # the default stays bitwise
    assert (pick(shared_out) - plain).abs().max() <= OUTPUT_TOLERANCE
    assert not torch.equal(pick(shared_out), plain)  # P v, not the kernel: rounding differs somewhere
    assert list(shared_maps) == list(exact_maps) and exact_maps
    for site, probs in exact_maps.items():
        assert shared_maps[site].shape == probs.shape
        assert (shared_maps[site] - probs).abs().max() <= MAP_TOLERANCE, site


@pytest.mark.parametrize(
    ("options", "mask"),
    [
        ({}, None),
        ({"is_causal": True}, None),
        ({}, "bool"),
        ({}, "float"),
        ({"enable_gqa": True, "is_causal": True}, None),
        ({"scale": 0.3}, "bool"),
    ],
    ids=["plain", "causal", "bool-mask", "float-mask", "gqa-causal", "scale-bool-mask"],
)
def test_sdpa_module_outputs_and_maps(options: dict[str, Any], mask: str | None) -> None:
    torch.manual_seed(0)
    kv_heads = 2 if options.get("enable_gqa") else 4
    model = SDPAModule(kv_heads=kv_heads, **options).eval()
    x = torch.randn(3, 10, 32)
    attn_mask: Tensor | None = None
    if mask == "bool":
        attn_mask = torch.rand(3, 1, 10, 10) > 0.3
        attn_mask[..., 0] = True  # every row keeps a key
    elif mask == "float":
        attn_mask = torch.randn(3, 4, 10, 10)
    assert_same(model, lambda: model(x, attn_mask))


def test_train_mode_dropout_applies_to_the_probabilities_and_captures_them_before() -> None:
    """With one-hot values the output rows are the dropped-out probabilities themselves: every weight is either 0
    or ``P / (1 - p)`` of the captured (pre-dropout) map, as SDPA's dropout does."""
    torch.manual_seed(0)
    length, p = 16, 0.5
    q, k = torch.randn(2, 4, length, 8), torch.randn(2, 4, length, 8)
    values = torch.eye(length).expand(2, 4, length, length)

    class Attention(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    model = Attention().train()
    with torch.no_grad(), AttentionRecorder(model, exact_outputs=False) as recorder:
        dropped = model(q, k, values)
    probs = recorder.maps[""] if "" in recorder.maps else next(iter(recorder.maps.values()))
    reference = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 8**0.5, dim=-1)
    assert (probs.double() - reference).abs().max() < 1e-6
    kept = dropped != 0
    assert 0.3 < kept.double().mean() < 0.7
    assert (dropped[kept].double() - probs.double()[kept] / (1 - p)).abs().max() < 1e-5


def test_llama_with_padding_mask_and_a_packed_grouped_query_step() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    assert_same(model, lambda: model(ids, attention_mask=mask), pick=lambda out: out.logits)
    # a one-token step with a mask: transformers folds the query heads into the query axis
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    step, step_mask = torch.randint(1, 64, (2, 1)), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert_same(
        model,
        lambda: model(step, attention_mask=step_mask, cache=copy.deepcopy(cache)),
        pick=lambda out: out.logits,
    )


def test_bert_with_padding_mask() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 7:] = 0
    assert_same(model, lambda: model(ids, attention_mask=mask), pick=lambda out: out.last_hidden_state)


def test_a_bitwise_recorder_keeps_the_kernel_for_everyone() -> None:
    """Two recorders active: the fused kernel runs unless every one of them allows inexact outputs."""
    torch.manual_seed(0)
    model = SDPAModule().eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        plain = model(x)
        with AttentionRecorder(model, exact_outputs=False), AttentionRecorder(model):
            both = model(x)
    assert torch.equal(both, plain)
