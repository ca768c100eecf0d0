"""The recorder on the paths real models take, each against the eager copy of the same weights.

Every case: maps equal to the eager twin's ``output_attentions`` (``copy.deepcopy`` then
``set_attn_implementation("eager")``) to 1e-5 on valid query rows, outputs bitwise those of the unrecorded model,
no recorder warning, nothing left installed. Tiny configs built here, no hub; one model per family (module scope).
Run with ``-s`` to print the table of max |diff| per family and path.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_at_import

from lightning_attn import AttentionRecorder

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
ORIGINALS = {
    "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
    "F.softmax": F.softmax,
    "torch.softmax": torch.softmax,
    "F.multi_head_attention_forward": F.multi_head_attention_forward,
}
DIFFS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    if DIFFS:
        print("\nfamily | path | max |diff| vs eager | outputs bitwise equal")
        for (family, path), diff in DIFFS.items():
            print(f"{family} | {path} | {diff:.1e} | yes")


# -- helpers -------------------------------------------------------------------------------------------------------
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


# -- decoders: Llama (grouped-query heads, left padding, cache steps, generate), Mistral, GPT-2, Gemma 2 ------------
@pytest.fixture(scope="module")
def llama() -> nn.Module:
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
    return transformers.LlamaForCausalLM(config).eval()


def left_padded(batch: int = 2, length: int = 6, pad: int = 2) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, 64, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def test_llama_grouped_query_left_padding_and_cache_steps(llama: nn.Module) -> None:
    torch.manual_seed(1)
    ids, mask = left_padded()
    eager = eager_twin(llama)
    with torch.no_grad():
        prefill = llama(ids, attention_mask=mask, use_cache=True)
        eager_prefill = eager(ids, attention_mask=mask, use_cache=True, output_attentions=True)
    valid = mask.bool()
    recorder, streamed, _ = record(llama, lambda: llama(ids, attention_mask=mask))
    assert list(recorder.sites) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.kind == "self" and s.num_heads == 4 for s in recorder.sites.values())
    compare("Llama", "sdpa GQA, left padding", [p for _, p in streamed], eager_prefill.attentions, valid)

    # one-token steps with the mask: transformers folds the query heads into the query axis (pack_gqa)
    step_ids = torch.randint(1, 64, (2, 1))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    cache, eager_cache = prefill.past_key_values, eager_prefill.past_key_values
    recorder, streamed, _ = record(llama, lambda: llama(step_ids, attention_mask=step_mask, cache=copy.deepcopy(cache)))
    with torch.no_grad():
        reference = eager(
            step_ids, attention_mask=step_mask, cache=copy.deepcopy(eager_cache), output_attentions=True
        ).attentions
    assert [tuple(p.shape) for _, p in streamed] == [(2, 4, 1, 7)] * 2
    assert {s.kind for s in recorder.sites.values()} == {"self"}
    compare("Llama", "sdpa cache step (packed GQA)", [p for _, p in streamed], reference)


def test_llama_generate_step_by_step_equals_eager(llama: nn.Module) -> None:
    torch.manual_seed(2)
    ids, mask = left_padded(length=5)
    eager = eager_twin(llama)
    options: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    _, streamed, tokens = record(llama, lambda: llama.generate(ids, **options))
    with torch.no_grad():
        reference = eager.generate(ids, **options, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(tokens, reference.sequences)
    per_step = [list(step) for step in reference.attentions]
    assert len(streamed) == sum(len(step) for step in per_step)
    got = [p for _, p in streamed]
    prefill = len(per_step[0])
    compare("Llama", "generate prefill (left padded)", got[:prefill], per_step[0], mask.bool())
    compare("Llama", "generate steps (packed GQA)", got[prefill:], [m for step in per_step[1:] for m in step])


def test_mistral_sliding_window_shorter_than_the_sequence() -> None:
    torch.manual_seed(3)
    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=3,
        max_position_embeddings=64,
    )
    model = transformers.MistralModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    _, streamed, _ = record(model, lambda: model(ids))
    with torch.no_grad():
        reference = eager_twin(model)(ids, output_attentions=True).attentions
    assert torch.all(reference[0][..., 7, :5] == 0)  # the window is really shorter than the sequence
    compare("Mistral", "sdpa sliding window 3 < 8", [p for _, p in streamed], reference)


def test_gpt2_cache_step() -> None:
    torch.manual_seed(4)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2Model(config).eval()
    eager = eager_twin(model)
    ids, step = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 1))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        eager_cache = eager(ids, use_cache=True).past_key_values
        reference = eager(step, cache=eager_cache, output_attentions=True).attentions
    recorder, streamed, _ = record(model, lambda: model(step, cache=copy.deepcopy(cache)))
    assert {s.kind for s in recorder.sites.values()} == {"self"}
    compare("GPT-2", "sdpa cache step", [p for _, p in streamed], reference)


def test_gemma2_softcapping() -> None:
    torch.manual_seed(5)
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attn_logit_softcapping=5.0,
        sliding_window=4,
        max_position_embeddings=64,
    )
    model = transformers.Gemma2Model(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    recorder, streamed, _ = record(model, lambda: model(ids))
    with torch.no_grad():
        reference = eager_twin(model)(ids, output_attentions=True).attentions
    assert len(recorder.sites) == 2
    compare("Gemma 2", f"{model.config._attn_implementation} softcap 5", [p for _, p in streamed], reference)


# -- encoder-decoders: BART, T5, Whisper (self, causal self, cross with equal lengths) ------------------------------
def encoder_decoder_case(family: str, model: nn.Module, inputs: dict[str, Tensor], cross_pattern: str) -> None:
    for implementation in ("eager", "sdpa"):
        subject = model if implementation == "sdpa" else eager_twin(model)
        eager = eager_twin(model)
        recorder, streamed, _ = record(subject, lambda s=subject: s(**inputs))
        with torch.no_grad():
            reference = eager(**inputs, output_attentions=True)
        encoder = [p for site, p in streamed if site.startswith("encoder")]
        decoder_self = [p for site, p in streamed if site.startswith("decoder") and cross_pattern not in site]
        compare(family, f"{implementation} encoder self", encoder, reference.encoder_attentions)
        compare(family, f"{implementation} decoder causal self", decoder_self, reference.decoder_attentions)
        compare(
            family,
            f"{implementation} cross (equal lengths)",
            maps_of(streamed, cross_pattern),
            reference.cross_attentions,
        )
        sites = recorder.sites
        cross = [name for name in sites if cross_pattern in name]
        assert cross and all(sites[name].kind == "cross" for name in cross)
        assert all(info.kind == "self" for name, info in sites.items() if name not in cross)


def test_bart_self_causal_and_cross() -> None:
    torch.manual_seed(6)
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
    )
    model = transformers.BartModel(config).eval()
    ids = torch.randint(3, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    encoder_decoder_case(
        "BART",
        model,
        {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, 64, (2, 6))},
        "encoder_attn",
    )


def test_t5_self_causal_and_cross_never_the_position_bias() -> None:
    torch.manual_seed(7)
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    model = transformers.T5Model(config).eval()
    ids = torch.randint(1, 64, (2, 6))
    encoder_decoder_case(
        "T5", model, {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (2, 6))}, "EncDecAttention"
    )


def test_longt5_decoder_read_from_out_bias_weights_and_block_local_encoder_named() -> None:
    torch.manual_seed(18)
    config = transformers.LongT5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        local_radius=2,
    )
    model = transformers.LongT5Model(config).eval()
    inputs = {"input_ids": torch.randint(1, 64, (2, 8)), "decoder_input_ids": torch.randint(1, 64, (2, 5))}
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
        # the encoder's attention is block-local, [batch, blocks, heads, block, 3 block]: not a [queries, keys] map
        with (
            pytest.warns(UserWarning, match=r"LocalSelfAttention \(LongT5LocalAttention\)"),
            AttentionRecorder(model) as recorder,
        ):
            model(**inputs)
    assert reference.encoder_attentions[0].dim() == 5
    assert [(name, info.kind, info.source) for name, info in recorder.sites.items()] == [
        ("decoder.block.0.layer.0.SelfAttention", "self", "weights"),
        ("decoder.block.0.layer.1.EncDecAttention", "cross", "weights"),
    ]
    maps = list(recorder.maps.values())
    compare(
        "LongT5",
        "eager decoder (out, bias, weights)",
        maps,
        [reference.decoder_attentions[0], reference.cross_attentions[0]],
    )


def test_whisper_self_causal_and_cross() -> None:
    torch.manual_seed(8)
    config = transformers.WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        decoder_start_token_id=1,
    )
    model = transformers.WhisperModel(config).eval()
    features = torch.randn(2, 8, 16)
    encoder_decoder_case(
        "Whisper",
        model,
        {"input_features": features, "decoder_input_ids": torch.randint(2, 64, (2, 8))},
        "encoder_attn",
    )


# -- encoders: CLIP text and vision, DistilBERT, ModernBERT, ViT ----------------------------------------------------
def encoder_case(
    family: str, model: nn.Module, inputs: dict[str, Tensor], valid: Tensor | None = None
) -> tuple[Tensor, ...]:
    recorder, streamed, _ = record(model, lambda: model(**inputs))
    with torch.no_grad():
        reference = eager_twin(model)(**inputs, output_attentions=True).attentions
    assert {s.kind for s in recorder.sites.values()} == {"self"}
    compare(family, str(model.config._attn_implementation), [p for _, p in streamed], reference, valid)
    return reference


def test_clip_text_and_vision() -> None:
    torch.manual_seed(9)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
        )
    ).eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    encoder_case("CLIP text", text, {"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": mask}, mask.bool())
    vision = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        )
    ).eval()
    encoder_case("CLIP vision", vision, {"pixel_values": torch.randn(2, 3, 16, 16)})


def test_distilbert_with_padding() -> None:
    torch.manual_seed(10)
    model = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=32
        )
    ).eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    encoder_case("DistilBERT", model, {"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": mask}, mask.bool())


def test_modernbert_local_and_global_layers() -> None:
    torch.manual_seed(11)
    config = transformers.ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        local_attention=4,
        max_position_embeddings=64,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
    )
    model = transformers.ModernBertModel(config).eval()
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    reference = encoder_case(
        "ModernBERT", model, {"input_ids": torch.randint(3, 64, (2, 9)), "attention_mask": mask}, mask.bool()
    )
    assert torch.all(reference[1][0, :, 8, :6] == 0)  # layer 1 is local: the window is shorter than the sequence


def test_vit() -> None:
    torch.manual_seed(12)
    model = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        )
    ).eval()
    encoder_case("ViT", model, {"pixel_values": torch.randn(2, 3, 16, 16)})


# -- nn.MultiheadAttention variants, against a float64 recomputation from the module's weights ----------------------
def reference_mha(mha: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """Per-head probabilities ``[B, H, L, S]`` of ``mha`` for batch-first ``query``/``key``, in float64."""
    e, h = mha.embed_dim, mha.num_heads
    w_q = mha.in_proj_weight[:e] if mha.in_proj_weight is not None else mha.q_proj_weight
    w_k = mha.in_proj_weight[e : 2 * e] if mha.in_proj_weight is not None else mha.k_proj_weight
    bias = mha.in_proj_bias
    q = (query.double() @ w_q.double().T + bias[:e].double()).unflatten(-1, (h, e // h)).transpose(1, 2)
    k = key.double() @ w_k.double().T + bias[e : 2 * e].double()
    if mha.bias_k is not None:  # add_bias_kv: one more key, the learned bias
        k = torch.cat([k, mha.bias_k.double().expand(k.shape[0], 1, e)], dim=1)
    k = k.unflatten(-1, (h, e // h)).transpose(1, 2)
    if mha.add_zero_attn:  # one more key of zeros
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])], dim=2)
    return ((q @ k.transpose(-1, -2)) / (e // h) ** 0.5).softmax(-1)


MHA_VARIANTS = {
    "kdim/vdim (cross)": (dict(kdim=12, vdim=10), dict(need_weights=False)),
    "add_bias_kv": (dict(add_bias_kv=True), dict(need_weights=False)),
    "add_zero_attn": (dict(add_zero_attn=True), dict(need_weights=False)),
    "batch_first False": (dict(batch_first=False), dict(need_weights=False)),
    "average_attn_weights True": (dict(), dict(need_weights=True, average_attn_weights=True)),
}


@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
def test_multihead_attention_variants(variant: str) -> None:
    torch.manual_seed(13)
    module_args, call_args = MHA_VARIANTS[variant]
    mha = nn.MultiheadAttention(16, 4, **{"batch_first": True, **module_args}).train()  # train: the slow path
    x = torch.randn(2, 5, 16)
    memory = (torch.randn(2, 7, 12), torch.randn(2, 7, 10)) if "kdim" in module_args else (x, x)
    q, k, v = (t if mha.batch_first else t.transpose(0, 1) for t in (x, *memory))
    if "kdim" not in module_args:
        k = v = q  # self-attention: the same tensor three times
    recorder, streamed, out = record(mha, lambda: mha(q, k, v, **call_args))
    info = recorder.sites["MultiheadAttention"]
    assert info.kind == ("cross" if "kdim" in module_args else "self")
    if call_args["need_weights"]:
        assert out[1].shape == (2, 5, 5)  # the caller still gets the head average it asked for
    with torch.no_grad():
        expected = reference_mha(mha, x, memory[0])
    compare("nn.MultiheadAttention", variant, [p for _, p in streamed], [expected])


# -- hand-written attention: a softmax over the keys inside a module's forward --------------------------------------
SOFTMAXES: dict[str, Callable[[Tensor], Tensor]] = {
    "Tensor.softmax": lambda s: s.softmax(dim=-1),
    "F.softmax": lambda s: F.softmax(s, dim=-1),
    "torch.softmax": lambda s: torch.softmax(s, -1),
    "nn.Softmax": nn.Softmax(dim=-1),
}


class Mixer(nn.Module):
    """Research-code attention in a module not named like one: ``softmax(q k^T / sqrt(d)) v``, heads or not."""

    def __init__(self, softmax: Callable[[Tensor], Tensor], heads: int = 4, returns_weights: bool = False) -> None:
        super().__init__()
        self.qkv, self.heads, self.returns_weights = nn.Linear(16, 48), heads, returns_weights
        self.softmax = softmax

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.heads > 1:
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        return q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, v

    def forward(self, x: Tensor) -> Any:
        scores, v = self.scores(x)
        weights = self.softmax(scores)
        out = weights @ v
        if self.heads > 1:
            out = out.transpose(1, 2).flatten(-2)
        return (out, weights) if self.returns_weights else out


class WeightsAttention(Mixer):
    """Hugging Face eager style: an attention module that returns ``(output, weights)``."""

    def __init__(self) -> None:
        super().__init__(lambda s: s.softmax(-1), returns_weights=True)


class SingleHeadAttention(Mixer):
    """One head: the softmax is over ``[batch, queries, keys]``."""

    def __init__(self) -> None:
        super().__init__(lambda s: s.softmax(-1), heads=1)


class Classifier(nn.Module):
    """A softmax that is not attention: class probabilities ``[batch, length, classes]`` outside attention modules."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x).softmax(-1)


def first_output(module: nn.Module) -> nn.Module:
    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: Tensor) -> Tensor:
            out = self.inner(x)
            return out[0] if isinstance(out, tuple) else out

    return First()


HAND_WRITTEN = {
    **{name: (lambda f=f: Mixer(f)) for name, f in SOFTMAXES.items()},
    "returns its weights too": WeightsAttention,
    "one head [B, Q, K]": SingleHeadAttention,
}


@pytest.mark.parametrize("case", list(HAND_WRITTEN))
def test_hand_written_attention(case: str) -> None:
    torch.manual_seed(14)
    attention = HAND_WRITTEN[case]()
    model = nn.Sequential(first_output(attention), Classifier())
    x = torch.randn(2, 6, 16)
    recorder, streamed, _ = record(model, lambda: model(x))
    assert list(recorder.sites) == ["0.inner"]  # one capture, and none for the classifier's softmax
    assert recorder.sites["0.inner"].source == ("weights" if attention.returns_weights else "softmax")
    with torch.no_grad():
        scores, _ = attention.scores(x)
        expected = scores.double().softmax(-1)
    compare("hand-written", case, [p for _, p in streamed], [expected if expected.dim() == 4 else expected[:, None]])


# -- torch.compile, autocast ---------------------------------------------------------------------------------------
class SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_torch_compile(fullgraph: bool, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(15)
    torch._dynamo.reset()  # no graph cached by another test: the first call below traces with the recorder active
    model = nn.Sequential(SdpaBlock(), first_output(Mixer(SOFTMAXES["F.softmax"]))).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=fullgraph)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        eager_maps = [p for _, p in record(model, lambda: model(x))[1]]
    compiled_forward = compiled.forward
    with caplog.at_level(logging.INFO, logger="lightning_attn"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `torch.compile")  # torch's note on global hooks
        with torch.no_grad(), AttentionRecorder(compiled) as first:  # the first call traces with the recorder active
            compiled(x)
        recorder, streamed, _ = record(compiled, lambda: compiled(x))
    assert list(first.maps) == list(recorder.sites) == ["0", "1.inner"]
    bypassed = [r for r in caplog.records if "fullgraph" in r.getMessage()]
    assert len(bypassed) == (2 if fullgraph else 0) and all(
        r.levelno == logging.INFO for r in bypassed
    )  # one per recorder
    assert compiled.forward == compiled_forward  # the compiled graph is back
    path = "fullgraph (eager module while recording)" if fullgraph else "default"
    compare("torch.compile", path, list(first.maps.values()), eager_maps, atol=0.0)
    compare("torch.compile", path, [p for _, p in streamed], eager_maps, atol=0.0)


def test_bf16_autocast_gives_float32_maps(llama: nn.Module) -> None:
    torch.manual_seed(16)
    ids = torch.randint(1, 64, (2, 6))
    eager = eager_twin(llama)

    def under_autocast(model: nn.Module, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(ids, **kwargs)

    _, streamed, _ = record(llama, lambda: under_autocast(llama))
    with torch.no_grad():
        reference = under_autocast(eager, output_attentions=True).attentions
    maps = [p for _, p in streamed]
    for probs in maps:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    compare("Llama", "sdpa under bf16 autocast (vs eager in bf16)", maps, reference, atol=1e-2)


# -- what the recorder cannot see, and threads ---------------------------------------------------------------------
class HiddenAttention(SdpaBlock):
    """Attention through a function bound at import time: the recorder cannot see it."""

    num_heads = 4

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(sdpa_bound_at_import(q, k, v).transpose(1, 2).flatten(-2))


def test_warning_names_attention_modules_that_ran_without_a_capture() -> None:
    model = nn.Sequential(SdpaBlock(), HiddenAttention())
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match=r"1 \(HiddenAttention\)") as caught, AttentionRecorder(model) as recorder:
        model(x)
        model(x)
    assert len([w for w in caught if "AttentionRecorder" in str(w.message)]) == 1
    assert list(recorder.maps) == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AttentionRecorder(model, include=["0"]):  # the hidden module is not asked for: nothing to say
            model(x)
    with (
        pytest.warns(UserWarning, match="filtered out every attention site") as caught,
        AttentionRecorder(model, include=["decoder.*"]),
    ):
        model(x)
    assert "custom" not in str(caught[0].message)
    assert_restored(model)


def test_threads_get_their_own_maps_only() -> None:
    torch.manual_seed(17)

    class Yielding(nn.Module):
        """Two attention calls with a thread switch between them."""

        def __init__(self, length: int) -> None:
            super().__init__()
            self.a, self.b, self.length = SdpaBlock(), SdpaBlock(), length

        def forward(self, x: Tensor) -> Tensor:
            x = self.a(x)
            threading.Event().wait(0.001)
            return self.b(x)

    models = [Yielding(4), Yielding(7)]
    inputs = [torch.randn(1, m.length, 16) for m in models]
    expected = []
    for model, x in zip(models, inputs, strict=True):
        with AttentionRecorder(model) as alone:
            model(x)
        expected.append(dict(alone.maps))
    barrier, failures = threading.Barrier(2), []

    def work(index: int) -> None:
        model, x = models[index], inputs[index]
        barrier.wait()
        for _ in range(20):
            with AttentionRecorder(model) as recorder:
                model(x)
            if list(recorder.maps) != ["a", "b"] or any(
                not torch.equal(recorder.maps[s], expected[index][s]) for s in ("a", "b")
            ):
                failures.append((index, {s: tuple(p.shape) for s, p in recorder.maps.items()}))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
