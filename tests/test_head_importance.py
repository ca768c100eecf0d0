"""Head importance (``HeadSpecializationTracker(head_importance=True)``, Michel et al. 2019).

References: the loss increase measured when each head's output is zeroed (weight surgery on the output
projection, not the gates), central finite differences in float64, a per-sample recomputation, the HF bertology
normalization written out by hand, and a 2-rank DDP job.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from head_importance_models import HEADS, WEIGHTS, importance_json, make_data, trained_module, val_loader
from helpers import run_ddp_script, trainer_options
from matplotlib.figure import Figure
from scipy.stats import spearmanr  # type: ignore[import-untyped]

from lightning_attn import HeadSpecializationTracker
from lightning_attn.callbacks.head_importance import step_loss
from lightning_attn.capture.gates import HeadGates
from lightning_attn.functional.importance import normalize_head_importance, pruning_order
from lightning_attn.metrics.heads import registry_schema

SITES = ("model.sdpa", "model.mha")
HEAD_DIM = 16 // HEADS


def tracker(**overrides: Any) -> HeadSpecializationTracker:
    options: dict[str, Any] = dict(
        head_importance=True, probe_samples=0, log_figures=False, export_registry=False, logged_scores=()
    )
    return HeadSpecializationTracker(**{**options, **overrides})


@pytest.fixture(scope="module")
def trained() -> Any:
    return trained_module()


@pytest.fixture(scope="module")
def validated(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    module = copy.deepcopy(trained)
    callback = tracker(log_figures=True, export_registry=True, save_dir=str(tmp_path_factory.mktemp("importance")))
    logged = pl.Trainer(callbacks=[callback], **trainer_options(None)).validate(module, val_loader(), verbose=False)[0]
    return {"tracker": callback, "module": module, "logged": logged}


def ablation_increase(module: Any) -> list[float]:
    """Validation loss increase when each head's output is zeroed (its columns of the output projection)."""
    x, y = make_data(256, seed=1)
    model = copy.deepcopy(module.model)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        increase = []
        for projection in model.out_projections():
            for h in range(HEADS):
                kept = projection.weight.detach().clone()
                projection.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
                increase.append(F.cross_entropy(model(x), y).item() - base)
                projection.weight.copy_(kept)
    return increase


def test_importance_ranks_heads_as_ablation_does(validated: dict[str, Any], trained: Any) -> None:
    record = validated["tracker"].history_for("val")[-1]
    importance = [value for site in SITES for value in record["importance"][site]]
    rho = spearmanr(importance, ablation_increase(trained)).statistic
    assert rho >= 0.8, (importance, rho)
    assert importance[0] == max(importance)  # the head with the largest coefficient


def test_raw_importance_is_the_mean_per_sample_gradient(validated: dict[str, Any], trained: Any) -> None:
    """One sample at a time, ``|dL(x)/d xi_h|`` from ``HeadGates``, averaged: equal to the streamed batched value."""
    module = copy.deepcopy(trained)
    x, y = make_data(256, seed=1)
    total = {site: torch.zeros(HEADS, dtype=torch.float64) for site in SITES}
    for b in range(0, 256, 4):  # every 4th sample keeps it fast: compare on the same subset below
        with torch.enable_grad(), HeadGates(module) as heads:
            loss = F.cross_entropy(module.model(x[b : b + 1]), y[b : b + 1])
        for site, grad in zip(heads.gates, torch.autograd.grad(loss, list(heads.gates.values())), strict=True):
            total[site] += grad[0].abs().double()
    subset = tracker()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[::4], y[::4]), batch_size=16)
    pl.Trainer(callbacks=[subset], **trainer_options(None)).validate(copy.deepcopy(trained), loader, verbose=False)
    streamed = subset.history_for("val")[-1]["importance"]
    for site in SITES:
        assert streamed[site] == pytest.approx((total[site] / 64).tolist(), rel=1e-5)


@pytest.mark.parametrize("site,head", [("model.sdpa", 1), ("model.mha", 0)])
def test_gate_gradient_equals_finite_difference(trained: Any, site: str, head: int) -> None:
    module = copy.deepcopy(trained).double()
    model = module.model
    x, y = make_data(3, seed=2)
    x = x.double()
    with torch.enable_grad(), HeadGates(module) as heads:
        loss = F.cross_entropy(model(x), y)
    gates = heads.gates
    grad = torch.autograd.grad(loss, [gates[site]])[0]
    assert set(gates) == set(SITES) and gates[site].shape == (3, HEADS)
    projection = dict(zip(SITES, model.out_projections(), strict=True))[site]
    eps = 1e-6

    def loss_at(scale: float) -> float:  # one sample's gate = scaling that head's columns of the output projection
        scaled = copy.deepcopy(model)
        weight = dict(zip(SITES, scaled.out_projections(), strict=True))[site].weight
        with torch.no_grad():
            weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] *= scale
            return F.cross_entropy(scaled(x[:1]), y[:1]).item()

    difference = (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
    # the batch loss is a mean over 3 samples: sample 0's gate gets a third of its own loss's derivative
    assert 3 * grad[0, head].item() == pytest.approx(difference, rel=1e-6, abs=1e-9)
    assert projection.weight.grad is None


def test_gates_leave_the_forward_value_and_parameters_alone(trained: Any, validated: dict[str, Any]) -> None:
    model = copy.deepcopy(trained.model)
    x, _ = make_data(8, seed=3)
    with torch.no_grad():
        plain = model(x)
    with torch.enable_grad(), HeadGates(model):
        gated = model(x)
    assert (gated - plain).abs().max().item() < 1e-5
    module = validated["module"]
    assert all(p.grad is None for p in module.parameters())
    # the step ran twice per batch, but its accuracy saw every batch once and the logged loss is the plain one
    assert int(module.accuracy._update_count) == 8
    x, y = make_data(256, seed=1)
    with torch.no_grad():
        assert validated["logged"]["val_loss"] == pytest.approx(F.cross_entropy(module.model(x), y).item(), rel=1e-5)


def test_normalization_registry_table_and_figure(validated: dict[str, Any]) -> None:
    callback: HeadSpecializationTracker = validated["tracker"]
    record = callback.history_for("val")[-1]
    # Michel et al. / HF bertology, by hand: per layer by the L2 norm, then global min-max
    per_layer = [
        [v / math.sqrt(sum(w * w for w in record["importance"][s])) for v in record["importance"][s]] for s in SITES
    ]
    low, high = min(min(r) for r in per_layer), max(max(r) for r in per_layer)
    for site, row in zip(SITES, per_layer, strict=True):
        assert record["importance_normalized"][site] == pytest.approx([(v - low) / (high - low) for v in row])
    registry = callback.registry("val")
    jsonschema.validate(registry, registry_schema())
    heads = {h["id"]: h for layer in registry["layers"] for h in layer["heads"]}
    assert heads["model.sdpa/h0"]["importance"]["raw"] == pytest.approx(record["importance"]["model.sdpa"][0])
    out = callback.save_dir / "heads" / "val"  # type: ignore[operator]
    rows = (out / "prunable_heads_epoch0_step0.csv").read_text().splitlines()
    assert rows[0] == "rank,head,label,importance,normalized,cumulative_share"
    assert rows[1].split(",")[1] == min(heads, key=lambda h: heads[h]["importance"]["normalized"])
    assert float(rows[-1].split(",")[-1]) == pytest.approx(1.0)
    assert (out / "importance_epoch0_step0.png").exists()
    figure = callback.figures("val")["importance"]
    assert isinstance(figure, Figure)
    shown = figure.axes[0].images[0].get_array()
    assert shown is not None
    assert shown.shape == (2, HEADS) and float(shown[0, 0]) == pytest.approx(
        record["importance_normalized"]["model.sdpa"][0]
    )


def test_functional_helpers_on_hand_values() -> None:
    got = normalize_head_importance([torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])])
    assert torch.cat(got).tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 1.0, 0.0])
    order, share = pruning_order(torch.tensor([0.2, 0.0, 0.8]))
    assert order.tolist() == [1, 0, 2] and share.tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_a_step_without_loss_fails_at_the_first_batch(trained: Any) -> None:
    with pytest.raises(ValueError, match="needs the evaluation step to return its loss"):
        step_loss({"predictions": torch.zeros(2)})
    module = copy.deepcopy(trained)
    module.validation_step = lambda batch, batch_idx: None  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="returned NoneType"):
        pl.Trainer(callbacks=[tracker()], **trainer_options(None)).validate(module, val_loader(64), verbose=False)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_equals_one_process(tmp_path: Path, validated: dict[str, Any], trained: Any) -> None:
    torch.save(trained.state_dict(), tmp_path / WEIGHTS)
    ddp = run_ddp_script(Path(__file__).with_name("head_importance_models.py"), tmp_path)
    assert ddp["world_size"] == 2
    single = importance_json(validated["tracker"])
    for key in ("importance", "importance_normalized"):
        for site in SITES:  # float32 gradients of other batch compositions: equal up to their rounding
            assert ddp[key][site] == pytest.approx(single[key][site], rel=1e-6, abs=1e-9), (key, site)


def test_encoder_layers_are_gated_off_their_fast_path_with_the_same_output() -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)  # grad-free parameters: the fused fast path would run without the gates
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        plain = encoder(x)
    with torch.enable_grad(), HeadGates(encoder) as heads:
        gated = encoder(x)
    assert list(heads.gates) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert (gated - plain).abs().max().item() < 1e-5
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    grads = torch.autograd.grad(gated.square().sum(), list(heads.gates.values()))
    assert all(g.shape == (3, 2) and g.abs().sum() > 0 for g in grads)


class EagerAttention(torch.nn.Module):
    """Returns ``(output, weights)`` and merges its heads itself: captured, but not gateable."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = x @ x.transpose(-1, -2)
        weights = torch.stack([scores.softmax(-1), (-scores).softmax(-1)], 1)  # two heads
        return weights.mean(1) @ x, weights


class EagerModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.attention = EagerAttention()
        self.head = torch.nn.Linear(4, 2)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.attention(x)[0].mean(1)), y)


def test_attention_that_merges_its_own_heads_gets_a_clear_warning() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 4), torch.randint(0, 2, (8,)))
    callback = tracker()
    with pytest.warns(UserWarning, match="found no head to gate"):
        pl.Trainer(callbacks=[callback], **trainer_options(None)).validate(
            EagerModule(), torch.utils.data.DataLoader(data, batch_size=4), verbose=False
        )
    assert "importance" not in callback.history_for("val")[-1]
