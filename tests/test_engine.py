"""The statistics engine: fused row statistics against float64 references on the probabilities, the key-blocked
long-context path against the unblocked one, and one computation per call shared by every consumer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attention_logger_models as models
import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

import lightning_attn.capture.record as record_module
from lightning_attn import AttentionLogger, AttentionRecorder
from lightning_attn.capture.record import AttentionCapture, SiteInfo
from lightning_attn.capture.workspace import WORKSPACE
from lightning_attn.functional.attention import (
    diagonal_mass,
    local_window_mass,
    mean_attention_distance,
    normalized_entropy,
    sparsity,
)
from lightning_attn.metrics.attention import AttentionStatistics, default_reducers
from lightning_attn.metrics.engine import (
    DISTANCE,
    ENGINE,
    ENTROPY,
    FIRST_TOKEN,
    MAX_WEIGHT,
    RECEIVED,
    Stat,
    StatisticsEngine,
)
from lightning_attn.metrics.heads import BatchContext, HeadSpecializationMetrics

STATS = (
    ENTROPY,
    MAX_WEIGHT,
    DISTANCE,
    FIRST_TOKEN,
    RECEIVED,
    Stat.sparsity(0.01),
    Stat.diagonal(-1),
    Stat.diagonal(0),
    Stat.diagonal(1),
    Stat.local(2),
    Stat.local(9),
)


def reference(probs: Tensor) -> dict[Stat, Tensor]:
    """Every statistic in float64 from the probabilities with the functional module (valid keys: ``p > 0``)."""
    p = probs.double()
    valid = p > 0
    return {
        ENTROPY: normalized_entropy(p, valid),
        MAX_WEIGHT: p.amax(-1),
        DISTANCE: mean_attention_distance(p),
        FIRST_TOKEN: p[..., 0],
        RECEIVED: p.sum(-2),
        Stat.sparsity(0.01): sparsity(p, 0.01, valid),
        Stat.diagonal(-1): diagonal_mass(p, -1),
        Stat.diagonal(0): diagonal_mass(p, 0),
        Stat.diagonal(1): diagonal_mass(p, 1),
        Stat.local(2): local_window_mass(p, 2),
        Stat.local(9): local_window_mass(p, 9),
    }


def sdpa_capture(length: int, mask: str, heads: int = 3, batch: int = 2, seed: int = 0) -> AttentionCapture:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, 16, generator=generator) * 1.5
    key = torch.randn(batch, heads, length, 16, generator=generator) * 1.5
    lengths = torch.tensor([length, length * 2 // 3])[:batch]
    keep = torch.arange(length)[None, :] < lengths[:, None]  # [B, L] key padding
    attn_mask: Tensor | None = None
    causal = mask.startswith("causal")
    if mask.endswith("padding"):
        attn_mask = keep[:, None, None, :]
    elif mask == "additive":
        attn_mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    elif mask == "window":  # a [B, 1, Q, K] sliding-window mask on top of the padding
        rows = torch.arange(length)[:, None]
        attn_mask = (keep[:, None, :] & ((rows - torch.arange(length)).abs() <= 5))[:, None]
    info = SiteInfo("layer", "self", heads, length, length, "Attention", "sdpa")
    return AttentionCapture(info, query=query, key=key, attn_mask=attn_mask, is_causal=causal)


@pytest.mark.parametrize("mask", ["none", "padding", "causal", "causal_padding", "additive", "window"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_fused_statistics_equal_float64_reference(mask: str, chunk_size: int | None) -> None:
    capture = sdpa_capture(23, mask)
    expected = reference(capture.probs())
    capture._cache = None  # the engine computes from the scores, not from cached probabilities
    rows = StatisticsEngine(key_block=None, whole_map_bytes=0).rows(capture, STATS, chunk_size)
    valid = expected[MAX_WEIGHT] > 0
    assert torch.equal(rows.valid, valid)
    for stat in STATS:
        got = rows.values[stat].double()
        want = expected[stat]
        if stat != RECEIVED:
            got, want = got[valid], want[valid]
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (stat, (got - want).abs().max())


def test_weights_fallback_equals_reference() -> None:
    probs = sdpa_capture(19, "causal_padding").probs()
    rows = StatisticsEngine(whole_map_bytes=0).rows(probs, STATS, 5)
    expected = reference(probs)
    valid = expected[MAX_WEIGHT] > 0
    for stat in STATS:
        got, want = rows.values[stat].double(), expected[stat]
        if stat != RECEIVED:
            got, want = got[valid], want[valid]
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), stat


@pytest.mark.parametrize("mask", ["causal_padding", "none"])
def test_key_blocked_equals_unblocked_at_2048_tokens(mask: str) -> None:
    """The long-context path (two passes over key blocks, online log-sum-exp) against whole rows."""
    capture = sdpa_capture(2048, mask, heads=2, batch=2, seed=1)
    whole = StatisticsEngine(key_block=None).rows(capture, STATS, 256)
    capture.memo = {}
    capture._cache = None
    blocked = StatisticsEngine(key_block=300, whole_map_bytes=0).rows(capture, STATS, 256)
    assert torch.equal(whole.valid, blocked.valid)
    for stat in STATS:
        got, want = blocked.values[stat], whole.values[stat]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (stat, (got - want).abs().max())


def test_engine_statistics_feed_attention_statistics_like_the_reducers() -> None:
    """AttentionStatistics on a capture (engine) and on its float64 probabilities (functional reducers)."""
    capture = sdpa_capture(31, "padding")
    by_engine = AttentionStatistics(default_reducers(), chunk_size=8)
    by_engine.update("layer", capture)
    by_reducers = AttentionStatistics(default_reducers(), chunk_size=8)
    by_reducers.update("layer", capture.probs().double())
    engine, reducers = by_engine.compute()["layer"], by_reducers.compute()["layer"]
    assert torch.equal(engine.rows, reducers.rows)
    for name in engine.mean:
        assert torch.allclose(engine.mean[name], reducers.mean[name], atol=1e-6), name
        assert torch.allclose(engine.std[name], reducers.std[name], atol=1e-5), name


class TwoLayerSdpa(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(8, 32)

    def forward(self, x: Tensor) -> Tensor:
        q, k = self.qk(x).view(x.shape[0], x.shape[1], 2, 2, 8).unbind(2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, k, is_causal=True)


@pytest.mark.parametrize(("whole_map_bytes", "passes"), [(0, 3), (ENGINE.whole_map_bytes, 1)])
def test_two_consumers_of_one_call_compute_it_once(
    monkeypatch: pytest.MonkeyPatch, whole_map_bytes: int, passes: int
) -> None:
    """Query chunks of 4 rows (3 for 10 queries) when the map is over ``whole_map_bytes``, one chunk when it fits;
    either way the two consumers share the computation."""
    monkeypatch.setattr(ENGINE, "whole_map_bytes", whole_map_bytes)
    calls: list[Any] = []
    original = record_module.attention_scores

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(kwargs.get("query_slice"))
        return original(*args, **kwargs)

    monkeypatch.setattr(record_module, "attention_scores", spy)
    model = TwoLayerSdpa()
    first = AttentionStatistics(default_reducers(), chunk_size=4)
    second = HeadSpecializationMetrics(chunk_size=4)
    x = torch.randn(2, 10, 8)
    with (
        AttentionRecorder(model, keep=False, on_capture=lambda c: first.update(c.site, c)),
        AttentionRecorder(model, keep=False, on_capture=lambda c: second.update(c, BatchContext())),
    ):
        model(x)
    assert len(calls) == passes  # one pass over the call, shared by both consumers
    shared = first.compute()["TwoLayerSdpa"].mean["entropy"]
    assert torch.equal(shared, second.statistics.compute()["TwoLayerSdpa"].mean["entropy"])


def test_single_head_site_computes() -> None:
    """A single-head site (one value per statistic) gives one-element lists, not a crash."""
    probs = torch.softmax(torch.randn(3, 1, 6, 6), -1)
    metrics = HeadSpecializationMetrics(features=["y"], chunk_size=None)
    metrics.update(probs, BatchContext(features={"y": torch.tensor([0.0, 1.0, 2.0])}), site="single")
    entry = metrics.compute()
    assert entry["sites"][0]["num_heads"] == 1
    assert len(entry["statistics"]["single"]["entropy"]) == 1
    expected = normalized_entropy(probs.double()).mean()
    assert entry["statistics"]["single"]["entropy"][0] == pytest.approx(float(expected), abs=1e-6)


def test_maps_kept_by_a_recorder_are_not_the_engines_reused_buffers() -> None:
    """The engine computes whole maps into buffers it reuses at the next call and lends them to the capture; a
    recorder that keeps maps must get copies: each kept map equals its own call's eager probabilities."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)

    class TwoCalls(nn.Module):
        def forward(self) -> Tensor:
            return F.scaled_dot_product_attention(q, k, k, is_causal=True) + F.scaled_dot_product_attention(k, q, q)

    model, metric = TwoCalls(), AttentionStatistics(default_reducers(), chunk_size=4)
    with AttentionRecorder(model, keep=True, on_capture=lambda c: metric.update(c.site, c)) as recorder:
        model()
        kept = dict(recorder.maps)
    expected = [torch.softmax((q @ k.transpose(-1, -2)) / 8**0.5 + torch.triu(torch.full((9, 9), -torch.inf), 1), -1)]
    expected.append(torch.softmax((k @ q.transpose(-1, -2)) / 8**0.5, -1))
    assert list(kept) == ["TwoCalls", "TwoCalls#1"]
    for got, want in zip(kept.values(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_reused_buffers_are_released_at_epoch_end(tmp_path: Path) -> None:
    """The map-sized buffers serve the calls of an epoch; none is held once the evaluation epoch has ended."""
    held: list[int] = []

    class HeldBytes(Callback):
        def on_validation_batch_end(self, *args: Any) -> None:
            held.append(WORKSPACE.held_bytes())

    logger = AttentionLogger(log_figures=False, overhead_budget=None)
    cpu_trainer(tmp_path, [logger, HeldBytes()]).validate(models.CrossModalModule(), models.loader(8, 4), verbose=False)
    assert held and max(held) > 0  # used during the epoch
    assert WORKSPACE.held_bytes() == 0
