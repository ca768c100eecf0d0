"""The recorder on the paths real Hugging Face models take, each against the eager copy of the same weights.

Every case: maps equal to the eager twin's ``output_attentions`` (``copy.deepcopy`` then
``set_attn_implementation("eager")``) to 1e-5 on valid query rows, outputs bitwise those of the unrecorded model,
no recorder warning, nothing left installed. Tiny configs built here, no hub; one Llama shared by its cases (module
scope). Run with ``-s`` to print the table of max |diff| per family and path. PyTorch's own attention, hand-written
attention, compile, warnings and threads: ``test_capture_paths.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from capture_matrix import compare, eager_twin, maps_of, print_table, record
from torch import Tensor, nn

from lightning_attn import AttentionRecorder

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    print_table()


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
