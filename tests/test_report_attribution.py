"""Token saliency and Grad-CAM of the report's probes against independent references: Captum's layer methods on
the same embedding layer (float64), and a direct Grad-CAM computation from hooked activations."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from report_helpers import DictDataset
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.functional.attribution import gradcam_map, patch_grid
from lightning_attn.report import build_report, load_schema
from lightning_attn.report.attribution import (
    AttributionSettings,
    compute_attributions,
    find_embedding,
    gradcam,
    token_saliency,
)
from lightning_attn.report.explain import ReportError, default_forward

captum_attr = pytest.importorskip("captum.attr")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, LENGTH, CLASSES = 20, 7, 3


class TinyText(nn.Module):
    """Token ids -> embedding (padding id 0) -> one encoder layer -> masked mean -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


class TinyViT(nn.Module):
    """8x8 images -> 2x2 patches (a 4x4 grid) + [CLS] -> two pre-norm encoder layers -> [CLS] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))[:, 0])


def _text_batch() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0  # trailing padding
    return {"input_ids": ids, "attention_mask": mask, "label": torch.tensor([0, 1, 2])}


@pytest.fixture
def text_model() -> TinyText:
    torch.manual_seed(0)
    return TinyText().double().eval()


def test_find_embedding(text_model: TinyText) -> None:
    assert find_embedding(text_model) == ("embed", text_model.embed)
    assert find_embedding(text_model, "encoder.linear1") == ("encoder.linear1", text_model.encoder.linear1)
    with pytest.raises(ReportError, match="embedding='nope' names no submodule"):
        find_embedding(text_model, "nope")


def test_gradient_x_input_equals_captum(text_model: TinyText) -> None:
    batch = _text_batch()
    explain = torch.tensor([2, 0, 1])
    ours = token_saliency(
        text_model, batch, default_forward, explain=explain, layer=text_model.embed, settings=AttributionSettings()
    )
    reference = (
        captum_attr.LayerGradientXActivation(text_model, text_model.embed)
        .attribute(batch["input_ids"], target=explain, additional_forward_args=(batch["attention_mask"],))
        .sum(-1)
    )
    assert torch.equal(ours["ids"], batch["input_ids"])
    assert (ours["attribution"] - reference).abs().max() < 1e-5
    assert reference.abs().max() > 1e-3  # a real signal, not two zeros


@pytest.mark.parametrize("n_steps", [8, 25])
def test_integrated_gradients_equal_captum(text_model: TinyText, n_steps: int) -> None:
    batch = _text_batch()
    explain = torch.tensor([1, 1, 0])
    ours = token_saliency(
        text_model,
        batch,
        default_forward,
        explain=explain,
        layer=text_model.embed,
        settings=AttributionSettings(saliency="integrated_gradients", n_steps=n_steps),
    )
    reference = (
        captum_attr.LayerIntegratedGradients(text_model, text_model.embed)
        .attribute(
            batch["input_ids"],
            baselines=torch.zeros_like(batch["input_ids"]),
            target=explain,
            additional_forward_args=(batch["attention_mask"],),
            n_steps=n_steps,
        )
        .sum(-1)
    )
    assert (ours["attribution"] - reference).abs().max() < 1e-5


def test_integrated_gradients_completeness(text_model: TinyText) -> None:
    """Sundararajan et al.: the attributions add up to S(x) - S(baseline) as the path sum converges (the encoder's
    LayerNorm makes the integrand steep near the zero embedding, so this needs many points)."""
    batch = _text_batch()
    explain = torch.tensor([1, 1, 0])
    ours = token_saliency(
        text_model,
        batch,
        default_forward,
        explain=explain,
        layer=text_model.embed,
        settings=AttributionSettings(saliency="integrated_gradients", n_steps=200),
    )
    with torch.no_grad():
        full = text_model(batch["input_ids"], batch["attention_mask"]).gather(1, explain[:, None])[:, 0]
        base = text_model(torch.zeros_like(batch["input_ids"]), batch["attention_mask"]).gather(1, explain[:, None])[
            :, 0
        ]
    assert (ours["attribution"].sum(1) - (full - base)).abs().max() < 0.05 * float((full - base).abs().max())


def test_gradcam_equals_direct_computation() -> None:
    torch.manual_seed(1)
    model = TinyViT().double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    explain = torch.tensor([1, 2])
    result = gradcam(
        model,
        (x, torch.zeros(2, dtype=torch.long)),
        default_forward,
        explain=explain,
        layer_glob="encoder.layers.*.norm1",
    )
    assert result["layer"] == "encoder.layers.1.norm1" and result["grid"] == (4, 4) and result["dropped_cls"]

    # direct: hook the same layer's output, differentiate the explained logits, weights = token-mean gradient
    stored: dict[str, Tensor] = {}
    handle = model.encoder.layers[1].norm1.register_forward_hook(lambda m, a, out: stored.setdefault("a", out))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, explain[:, None]).sum(), stored["a"])
    weights = grad[:, 1:].mean(1, keepdim=True)  # [CLS] left out first, as pytorch-grad-cam's reshape_transform does
    direct = torch.relu((weights * stored["a"][:, 1:]).sum(-1)).reshape(2, 4, 4)
    assert (result["map"] - direct.detach()).abs().max() < 1e-10
    assert direct.max() > 0
    # the trap (pytorch-grad-cam): the head reads [CLS] only, so the last block's own output gives its patch tokens
    # no gradient, which is why the layer to name is that block's first norm
    handle = model.encoder.layers[1].register_forward_hook(lambda m, a, out: stored.__setitem__("block", out))
    logits = model(x)
    handle.remove()
    (block_grad,) = torch.autograd.grad(logits.gather(1, explain[:, None]).sum(), stored["block"])
    assert float(block_grad[:, 1:].abs().max()) == 0.0 and float(block_grad[:, 0].abs().max()) > 0


def test_gradcam_errors() -> None:
    model = TinyViT().eval()
    batch = (torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ReportError, match="matches no submodule"):
        gradcam(model, batch, default_forward, explain=torch.tensor([0, 0]), layer_glob="decoder.*")
    with pytest.raises(ReportError, match=r"not \[batch=2, tokens, channels\]"):
        gradcam(model, batch, default_forward, explain=torch.tensor([0, 0]), layer_glob="patch")
    with pytest.raises(ReportError, match="grid 3x3 does not fit 17 tokens"):
        gradcam(
            model,
            batch,
            default_forward,
            explain=torch.tensor([0, 0]),
            layer_glob="encoder.layers.0.norm1",
            grid=(3, 3),
        )


def test_gradcam_map_and_grid_match_formula() -> None:
    a, g = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    expected = torch.stack(
        [torch.stack([g[b, :, c].mean() * a[b, :, c] for c in range(3)]).sum(0).relu() for b in range(2)]
    )
    assert torch.allclose(gradcam_map(a, g), expected.double(), atol=1e-12)
    assert patch_grid(197) == (1, (14, 14)) and patch_grid(196) == (0, (14, 14))


class OneHotText(nn.Module):
    """Token ids read through one_hot: its nn.Embedding (kept for another use) never sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(VOCAB, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(nn.functional.one_hot(input_ids, VOCAB).float().mean(1))


def test_an_embedding_the_forward_never_calls() -> None:
    """Found automatically: a note and no token saliency; named by the user: one clear error."""
    batch, explain = _text_batch(), torch.tensor([0, 1, 2])
    result = compute_attributions(OneHotText(), batch, default_forward, explain=explain, settings=AttributionSettings())
    assert result["tokens"] is None and "no token saliency on the layer found, unused" in result["attribution_notes"][0]
    with pytest.raises(ReportError, match="was not called by the model's forward"):
        compute_attributions(
            OneHotText(), batch, default_forward, explain=explain, settings=AttributionSettings(embedding="unused")
        )


def test_a_failing_id_to_token_is_one_clear_error() -> None:
    settings = AttributionSettings(id_to_token=lambda i: ["a", "b"][i])
    assert settings.token_strings([0, 1]) == ["a", "b"]
    with pytest.raises(ReportError, match=r"id_to_token failed on the token ids \[0, 5\]"):
        settings.token_strings([0, 5])


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="saliency must be one of"):
        AttributionSettings(saliency="lime")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        AttributionSettings(n_steps=0)
    with pytest.raises(ValueError, match="grid must be"):
        AttributionSettings(grid=(4, 0))


# -- in the report --------------------------------------------------------------------------------------------
def _text_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (8, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    ids[::2, 5:], mask[::2, 5:] = 0, 0
    samples = [{"input_ids": ids[i], "attention_mask": mask[i], "label": torch.tensor(i % CLASSES)} for i in range(8)]
    return DataLoader(DictDataset(samples), batch_size=4)


@pytest.mark.slow
def test_report_of_a_text_model_has_token_saliency_equal_to_captum(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyText().eval()
    out = build_report(
        model,
        _text_loader(),
        tmp_path / "text",
        probe_samples=2,
        figures=False,
        progress=False,
        accelerator="cpu",
        id_to_token=lambda i: f"w{i}",
    )
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["saliency"] == "gradient_x_input"
    jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    batch = next(iter(_text_loader()))
    for probe in report["saliency"]["probes"]:
        row = probe["sample"]
        entry = probe["tokens"]
        ids = batch["input_ids"][row]
        keep = int(batch["attention_mask"][row].sum())  # trailing padding (id 0 = padding_idx) is left out
        assert entry["layer"] == "embed" and entry["ids"] == ids[:keep].tolist()
        assert entry["tokens"] == [f"w{i}" for i in ids[:keep].tolist()]
        reference = (
            captum_attr.LayerGradientXActivation(model, model.embed)
            .attribute(
                ids[None],
                target=probe["explained_class"],
                additional_forward_args=(batch["attention_mask"][row][None],),
            )
            .sum(-1)[0]
        )
        assert (
            max(abs(a - float(r)) for a, r in zip(entry["attribution"], reference.detach()[:keep], strict=True)) < 1e-5
        )
        assert sum(entry["share"]) == pytest.approx(1.0)
    page = (out / "report.html").read_text()
    assert page.count('class="tok"') == sum(len(p["tokens"]["ids"]) for p in report["saliency"]["probes"])


@pytest.mark.slow
def test_report_of_an_image_model_draws_gradcam(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyViT().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, torch.arange(6) % CLASSES), batch_size=3)
    out = build_report(
        model,
        loader,
        tmp_path / "image",
        probe_samples=2,
        progress=False,
        accelerator="cpu",
        gradcam_layer="encoder.layers.1.norm1",
    )
    report = json.loads((out / "report.json").read_text())
    assert (out / "figures" / "gradcam.png").is_file()
    jsonschema.validate(report, load_schema(), cls=jsonschema.Draft202012Validator)
    for probe in report["saliency"]["probes"]:
        cam = probe["gradcam"]
        assert cam["grid"] == [4, 4] and cam["dropped_cls"]
        direct = gradcam(
            model,
            (x[probe["sample"]][None], torch.zeros(1, dtype=torch.long)),
            default_forward,
            explain=torch.tensor([probe["explained_class"]]),
            layer_glob="encoder.layers.1.norm1",
        )
        assert (torch.tensor(cam["map"]) - direct["map"][0]).abs().max() < 1e-6


@pytest.mark.slow
def test_token_saliency_on_real_minilm_equals_captum() -> None:
    """The real all-MiniLM-L6-v2 (Hugging Face BertModel, SDPA attention): the embedding layer is found through
    get_input_embeddings(), and both methods equal Captum's on it."""
    minilm = pytest.importorskip("examples.minilm_text")
    torch.manual_seed(0)
    model = minilm.MiniLMClassifier().eval()
    tokenizer = minilm._tokenizer()
    encoded = tokenizer(
        ["the striker scored twice", "a storm will bring rain to the coast"], padding=True, return_tensors="pt"
    )
    batch = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "target": torch.tensor([0, 1]),
    }
    layer = model.bert.embeddings.word_embeddings
    assert find_embedding(model) == ("bert.embeddings.word_embeddings", layer)  # through get_input_embeddings()
    explain = torch.tensor([0, 1])
    mask = (batch["attention_mask"],)
    ours = token_saliency(model, batch, default_forward, explain=explain, layer=layer, settings=AttributionSettings())
    reference = (
        captum_attr.LayerGradientXActivation(model, layer)
        .attribute(batch["input_ids"], target=explain, additional_forward_args=mask)
        .sum(-1)
    )
    assert (ours["attribution"] - reference.detach()).abs().max() < 1e-5
    settings = AttributionSettings(saliency="integrated_gradients", n_steps=8, tokenizer=tokenizer)
    ours = token_saliency(model, batch, default_forward, explain=explain, layer=layer, settings=settings)
    reference = (
        captum_attr.LayerIntegratedGradients(model, layer)
        .attribute(
            batch["input_ids"],
            baselines=torch.full_like(batch["input_ids"], tokenizer.pad_token_id),
            target=explain,
            additional_forward_args=mask,
            n_steps=8,
        )
        .sum(-1)
    )
    assert (ours["attribution"] - reference.detach()).abs().max() < 1e-5
    assert settings.token_strings(batch["input_ids"][0, :3].tolist())[0] == "[CLS]"
