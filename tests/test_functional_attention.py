"""Functional attention measures against NumPy/SciPy references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from lightning_attn.capture.record import AttentionCapture, SiteInfo
from lightning_attn.functional import (
    attention_rollout,
    diagonal_mass,
    duplicate_token_pattern,
    first_token_mass,
    gradient_weighted_rollout,
    head_js_distance,
    head_type_score,
    induction_pattern,
    js_divergence,
    local_window_mass,
    max_weight,
    mean_attention_distance,
    modality_agreement,
    normalized_entropy,
    previous_token_pattern,
    reduce_in_chunks,
    sparsity,
    top_k_pairs,
    top_positions,
)

FAST = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)
dims = st.integers(1, 9)


def np_softmax(logits: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Row softmax in float64; invalid keys get 0, rows without a valid key are all zero."""
    if valid is not None:
        logits = np.where(valid, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(logits - np.where(np.isfinite(top), top, 0))
    total = exp.sum(-1, keepdims=True)
    return np.divide(exp, total, out=np.zeros_like(exp), where=total > 0)


def random_probs(seed: int, shape: tuple[int, ...], temperature: float = 1.0) -> np.ndarray:
    return np_softmax(np.random.default_rng(seed).normal(size=shape) * temperature)


def t(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float32)


def np_rollout(fused: list[np.ndarray], residual: float = 0.5) -> np.ndarray:
    """Rollout with explicit per-batch, per-row loops in float64."""
    out = None
    for layer in fused:
        step = np.empty_like(layer)
        for b in range(layer.shape[0]):
            a = residual * np.eye(layer.shape[-1]) + (1 - residual) * layer[b]
            for i in range(a.shape[0]):
                step[b, i] = a[i] / a[i].sum()
        out = step if out is None else np.einsum("bij,bjk->bik", step, out)
    return out


# ---- per-row measures ---------------------------------------------------------------------------------------------


@FAST
@given(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 4), q=dims, k=dims, temp=st.sampled_from([0.1, 1.0, 30.0]))
def test_softmax_rows_sum_to_one_and_entropy_in_unit_interval(seed, b, h, q, k, temp):
    probs = random_probs(seed, (b, h, q, k), temp)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
    entropy = normalized_entropy(t(probs))
    assert entropy.shape == (b, h, q)
    assert bool(((entropy >= 0) & (entropy <= 1)).all())
    plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0.0)
    expected = -plogp.sum(-1) / math.log(k) if k > 1 else np.zeros((b, h, q))
    np.testing.assert_allclose(entropy.numpy(), expected, atol=1e-5)


@FAST
@given(seed=seeds, q=dims, k=st.integers(2, 9))
def test_masked_entropy_uses_log_of_valid_key_count(seed, q, k):
    rng = np.random.default_rng(seed)
    valid = rng.random((2, 1, q, k)) < 0.6
    valid[..., 0, :] = False  # one fully masked row
    valid[..., -1, :] = np.arange(k) == 0  # one row with a single valid key
    probs = np_softmax(rng.normal(size=(2, 3, q, k)), valid)
    entropy = normalized_entropy(t(probs), key_mask=torch.tensor(valid)).numpy()
    for index in np.ndindex(*probs.shape[:-1]):
        row, n = probs[index], valid[index[0], 0, index[2]].sum()
        nonzero = row[row > 0]
        expected = -(nonzero * np.log(nonzero)).sum() / math.log(n) if n > 1 else 0.0
        assert entropy[index] == pytest.approx(expected, abs=1e-5)


def test_uniform_over_valid_keys_is_one_and_zero_rows_give_zero():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0, 0.0], [0.0] * 6, [1.0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 2, [False] * 6, [True] * 6])
    entropy = normalized_entropy(probs, key_mask=mask)
    torch.testing.assert_close(entropy, torch.tensor([1.0, 0.0, 0.0]))
    # Without a mask the first row has 6 valid keys: log 4 / log 6.
    assert normalized_entropy(probs)[0].item() == pytest.approx(math.log(4) / math.log(6), abs=1e-6)


@FAST
@given(seed=seeds, q=dims, k=dims, threshold=st.sampled_from([0.01, 0.1, 0.3]))
def test_max_first_token_and_sparsity_match_numpy(seed, q, k, threshold):
    rng = np.random.default_rng(seed)
    probs = random_probs(seed, (2, 2, q, k), 3.0).astype(np.float32)  # compare at the precision torch sees
    valid = rng.random((2, 1, 1, k)) < 0.7
    torch.testing.assert_close(max_weight(t(probs)), t(probs.max(-1)))
    torch.testing.assert_close(first_token_mass(t(probs)), t(probs[..., 0]))
    below = (probs < np.float32(threshold)) & valid
    n = np.broadcast_to(valid, probs.shape).sum(-1)
    expected = np.divide(below.sum(-1), n, out=np.zeros(n.shape), where=n > 0)
    got = sparsity(t(probs), threshold, key_mask=torch.tensor(valid))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(
        sparsity(t(probs), threshold).numpy(), (probs < np.float32(threshold)).mean(-1), atol=1e-6
    )


@FAST
@given(seed=seeds, q=dims, k=dims, offset=st.integers(-3, 3), window=st.integers(0, 4), query_offset=st.integers(0, 4))
def test_positional_measures_match_loops(seed, q, k, offset, window, query_offset):
    probs = random_probs(seed, (2, 3, q, k))
    distance = np.zeros(probs.shape[:-1])
    diagonal = np.zeros(probs.shape[:-1])
    local = np.zeros(probs.shape[:-1])
    for r in range(q):
        i = query_offset + r
        for j in range(k):
            distance[..., r] += probs[..., r, j] * abs(i - j)
            local[..., r] += probs[..., r, j] * (abs(i - j) <= window)
        if 0 <= i + offset < k:
            diagonal[..., r] = probs[..., r, i + offset]
    x = t(probs)
    np.testing.assert_allclose(mean_attention_distance(x, query_offset).numpy(), distance, atol=1e-5)
    np.testing.assert_allclose(diagonal_mass(x, offset, query_offset).numpy(), diagonal, atol=1e-7)
    np.testing.assert_allclose(local_window_mass(x, window, query_offset).numpy(), local, atol=1e-6)


def test_diagonal_mass_hand_example():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.1, 0.7, 0.2]])
    torch.testing.assert_close(diagonal_mass(probs, -1), torch.tensor([0.0, 0.6, 0.7]))
    torch.testing.assert_close(diagonal_mass(probs, 0), torch.tensor([1.0, 0.4, 0.2]))
    torch.testing.assert_close(diagonal_mass(probs, 1), torch.tensor([0.0, 0.0, 0.0]))
    # The last two rows as a chunk starting at query 1.
    torch.testing.assert_close(diagonal_mass(probs[1:], -1, query_offset=1), torch.tensor([0.6, 0.7]))


def test_top_k_pairs_and_top_positions_order():
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    assert [(i, j) for i, j, _ in top_k_pairs(probs, 4)] == [(0, 1), (1, 0), (1, 2), (1, 1)]
    assert [w for *_, w in top_k_pairs(probs, 4)] == pytest.approx([0.9, 0.5, 0.3, 0.2])
    assert len(top_k_pairs(probs, 100)) == 6
    with pytest.raises(ValueError, match="single"):
        top_k_pairs(probs[None], 1)
    scores = torch.tensor([0.2, 0.7, 0.1])
    assert top_positions(scores, 2) == [(1, pytest.approx(0.7)), (0, pytest.approx(0.2))]
    assert [name for name, _ in top_positions(scores, 3, ["a", "b", "c"])] == ["b", "a", "c"]


# ---- rollout ------------------------------------------------------------------------------------------------------


@FAST
@given(
    seed=seeds,
    b=st.integers(1, 3),
    layers=st.integers(1, 4),
    length=st.integers(1, 8),
    fusion=st.sampled_from(["mean", "max", "min"]),
    discard=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_rollout_rows_sum_to_one(seed, b, layers, length, fusion, discard):
    maps = [t(random_probs(seed + layer, (b, 3, length, length), 2.0)) for layer in range(layers)]
    out = attention_rollout(maps, head_fusion=fusion, discard_ratio=discard)
    assert out.shape == (b, length, length)
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.ones(b, length))


@FAST
@given(seed=seeds, layers=st.integers(1, 4), length=st.integers(1, 7), residual=st.sampled_from([0.0, 0.5, 0.9]))
def test_rollout_matches_numpy(seed, layers, length, residual):
    maps = [random_probs(seed + layer, (2, 3, length, length)) for layer in range(layers)]
    expected = np_rollout([m.mean(1) for m in maps], residual)
    got = attention_rollout([t(m) for m in maps], residual_weight=residual)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    got_max = attention_rollout([t(m) for m in maps], head_fusion="max", residual_weight=residual)
    np.testing.assert_allclose(got_max.numpy(), np_rollout([m.max(1) for m in maps], residual), atol=1e-5)


def test_rollout_discard_keeps_diagonal_renormalizes_rows_for_every_batch_element():
    # Batch element 1, fused [[0.9, 0.1], [0.6, 0.4]], discard 0.5 -> the 2 smallest entries are 0.1 and 0.4; the
    # diagonal 0.4 is kept, so only 0.1 goes: 0.5 I + 0.5 F = [[0.95, 0], [0.3, 0.7]] -> rows [[1, 0], [0.3, 0.7]].
    maps = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.9, 0.1], [0.6, 0.4]]]])
    out = attention_rollout([maps], discard_ratio=0.5)
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 0.0], [0.3, 0.7]]))
    # Element 0: all entries tie; two are discarded but never the diagonal, rows still sum to 1.
    torch.testing.assert_close(out[0].sum(-1), torch.ones(2))
    assert bool((out[0].diagonal() >= 0.5).all())


def test_rollout_rejects_bad_maps():
    with pytest.raises(ValueError, match="square"):
        attention_rollout([torch.rand(1, 2, 3, 4)])
    with pytest.raises(ValueError, match="incompatible"):
        attention_rollout([torch.rand(1, 2, 3, 3), torch.rand(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="incompatible"):
        attention_rollout([torch.rand(1, 2, 3, 3), torch.rand(2, 2, 3, 3)])
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([torch.rand(1, 2, 3, 3)], head_fusion="median")


@FAST
@given(seed=seeds, layers=st.integers(1, 3), length=st.integers(1, 6), discard=st.sampled_from([0.0, 0.5]))
def test_gradient_weighted_rollout(seed, layers, length, discard):
    rng = np.random.default_rng(seed)
    maps = [random_probs(seed + layer, (2, 4, length, length)) for layer in range(layers)]
    grads = [rng.normal(size=m.shape) for m in maps]
    got = gradient_weighted_rollout([t(m) for m in maps], [t(g) for g in grads], discard_ratio=discard)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, length))
    if discard == 0.0:
        fused = [np.clip(m * g, 0, None).mean(1) for m, g in zip(maps, grads, strict=False)]  # clamp, then head mean
        np.testing.assert_allclose(got.numpy(), np_rollout(fused), atol=1e-5)


def test_gradient_weighted_rollout_rejects_unpaired():
    with pytest.raises(ValueError, match="pair"):
        gradient_weighted_rollout([torch.rand(1, 2, 3, 3)] * 2, [torch.rand(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="grads"):
        gradient_weighted_rollout([torch.rand(1, 2, 3, 3)], [torch.rand(1, 1, 3, 3)])


# ---- modality agreement, JS ---------------------------------------------------------------------------------------


@FAST
@given(seed=seeds, la=st.integers(1, 6), lb=st.integers(1, 6))
def test_modality_agreement(seed, la, lb):
    a_to_b = random_probs(seed, (2, 3, la, lb))
    b_to_a = random_probs(seed + 1, (2, 3, lb, la))
    got = modality_agreement(t(a_to_b), t(b_to_a))
    assert got.shape == (2, 3)
    for index in np.ndindex(2, 3):
        x, y = a_to_b[index].ravel(), b_to_a[index].T.ravel()
        if np.ptp(x) < 1e-6 or np.ptp(y) < 1e-6:
            continue  # near-constant: float32 may or may not see it as constant
        assert got[index].item() == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-4)
    same = modality_agreement(t(a_to_b), t(a_to_b).transpose(-1, -2))
    negated = modality_agreement(t(a_to_b), 1 - t(a_to_b).transpose(-1, -2))
    varies = np.ptp(a_to_b.reshape(2, 3, -1), axis=-1) > 1e-6
    np.testing.assert_allclose(same.numpy()[varies], 1.0, atol=1e-5)
    np.testing.assert_allclose(negated.numpy()[varies], -1.0, atol=1e-5)


def test_modality_agreement_constant_and_shape_errors():
    constant = torch.full((2, 3), 1 / 3)
    assert modality_agreement(constant, torch.rand(3, 2)).item() == 0.0
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 3\)"):
        modality_agreement(torch.rand(2, 3), torch.rand(2, 3))


@FAST
@given(seed=seeds, k=st.integers(1, 10), smoothing=st.sampled_from([0.0, 0.001, 0.1]))
def test_js_divergence_matches_scipy_and_is_symmetric(seed, k, smoothing):
    p, q = random_probs(seed, (4, k), 3.0), random_probs(seed + 1, (4, k), 3.0)
    got = js_divergence(t(p), t(q), smoothing)
    ps, qs = smoothing / k + (1 - smoothing) * p, smoothing / k + (1 - smoothing) * q
    expected = np.array([jensenshannon(a, b) ** 2 for a, b in zip(ps, qs, strict=False)])  # SciPy gives the distance
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    torch.testing.assert_close(got, js_divergence(t(q), t(p), smoothing))
    assert bool((js_divergence(t(p), t(p), smoothing) == 0).all())
    # Reducing along dim 0 equals reducing the transpose along the last dim.
    torch.testing.assert_close(js_divergence(t(p.T), t(q.T), smoothing, dim=0), got)


def test_js_divergence_disjoint_is_log_two():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert js_divergence(p, q, smoothing=0.0).item() == pytest.approx(math.log(2), abs=1e-6)


@FAST
@given(seed=seeds, b=st.integers(1, 3), q=dims, k=dims)
def test_head_js_distance(seed, b, q, k):
    maps = random_probs(seed, (b, 4, q, k), 2.0)
    maps[:, 3] = maps[:, 1]  # two equal heads
    got = head_js_distance(t(maps))
    assert got.shape == (4, 4)
    torch.testing.assert_close(got, got.T, rtol=0, atol=0)
    assert bool((got.diagonal() == 0).all()) and got[1, 3].item() == 0.0
    smooth = 0.001 / k + 0.999 * maps
    expected = np.zeros((4, 4))
    for g in range(4):
        for h in range(4):
            rows = [
                jensenshannon(x, y) ** 2
                for x, y in zip(smooth[:, g].reshape(-1, k), smooth[:, h].reshape(-1, k), strict=False)
            ]
            expected[g, h] = np.mean(rows)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    torch.testing.assert_close(head_js_distance(t(maps[0])), head_js_distance(t(maps[:1])))


# ---- head-type patterns and scores --------------------------------------------------------------------------------

A4 = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0],
        [0.1, 0.6, 0.2, 0.1],
    ]
)


def test_patterns_by_hand():
    torch.testing.assert_close(previous_token_pattern(3), torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]))
    tokens = torch.tensor([[5, 7, 5, 7], [1, 1, 2, 1]])
    dup = duplicate_token_pattern(tokens)
    torch.testing.assert_close(dup[0], torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]))
    torch.testing.assert_close(dup[1], torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]))
    ind = induction_pattern(tokens)
    # P[i, j] = 1 iff tok_i == tok_{j-1}, 1 <= j <= i (TransformerLens keeps j = i after its tril).
    torch.testing.assert_close(ind[0], torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    torch.testing.assert_close(ind[1], torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]))


def test_head_type_score_by_hand():
    # Sum of A4 is 4. Previous token: 0.5 + 0.3 + 0.2 = 1.0 -> 0.25.
    assert head_type_score(A4, previous_token_pattern(4)).item() == pytest.approx(0.25)
    tokens = torch.tensor([[5, 7, 5, 7]])
    # Duplicate (2,0) + (3,1): 0.2 + 0.6 = 0.8 -> 0.2. Induction (2,1) + (3,2): 0.3 + 0.2 = 0.5 -> 0.125.
    assert head_type_score(A4, duplicate_token_pattern(tokens)[0]).item() == pytest.approx(0.2)
    assert head_type_score(A4, induction_pattern(tokens)[0]).item() == pytest.approx(0.125)
    # [B=2, H=2] maps, a [B, L, L] pattern broadcast over heads; an all-zero map scores 0.
    probs = torch.stack([torch.stack([A4, torch.eye(4)]), torch.stack([A4, torch.zeros(4, 4)])])
    pattern = torch.stack([previous_token_pattern(4), torch.eye(4)])
    scores = head_type_score(probs, pattern[:, None])
    # Element 1 head 0 against the identity: 1 + 0.5 + 0.5 + 0.1 = 2.1 -> 0.525.
    torch.testing.assert_close(scores, torch.tensor([[0.25, 0.0], [0.525, 0.0]]))


# ---- chunked reductions -------------------------------------------------------------------------------------------

REDUCERS = {
    "entropy": lambda p, start: normalized_entropy(p),
    "max": lambda p, start: max_weight(p),
    "distance": lambda p, start: mean_attention_distance(p, start),
    "previous": lambda p, start: diagonal_mass(p, -1, start),
    "local": lambda p, start: local_window_mass(p, 2, start),
}


def assert_reductions_agree(got, reference, rows):
    assert got["_rows"] == rows
    for name in REDUCERS:
        for part in range(2):
            np.testing.assert_allclose(got[name][part].numpy(), reference[name][part], rtol=1e-6, atol=1e-6)


@FAST
@given(
    seed=seeds,
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    q=st.integers(1, 20),
    k=st.integers(1, 12),
    chunk=st.integers(1, 25),
)
def test_chunked_reduction_matches_unchunked(seed, b, h, q, k, chunk):
    probs = t(random_probs(seed, (b, h, q, k)))
    per_row = {name: fn(probs, 0).double().numpy() for name, fn in REDUCERS.items()}
    reference = {name: (v.sum(-1), (v * v).sum(-1)) for name, v in per_row.items()}
    assert_reductions_agree(reduce_in_chunks(probs, REDUCERS, chunk), reference, q)
    assert_reductions_agree(reduce_in_chunks(probs, REDUCERS, None), reference, q)


@FAST
@given(seed=seeds, q=st.integers(1, 16), k=st.integers(1, 16), chunk=st.integers(1, 20), causal=st.booleans())
def test_chunked_reduction_from_capture_queries_and_keys(seed, q, k, chunk, causal):
    rng = np.random.default_rng(seed)
    query, key = rng.normal(size=(2, 3, q, 8)), rng.normal(size=(2, 3, k, 8))
    info = SiteInfo("layer", "self" if q == k else "cross", 3, q, k, "Module", "sdpa")
    capture = AttentionCapture(info, query=t(query), key=t(key), is_causal=causal)
    allowed = np.tril(np.ones((q, k), dtype=bool)) if causal else None
    probs = t(np_softmax(query @ key.swapaxes(-1, -2) / math.sqrt(8), allowed))
    per_row = {name: fn(probs, 0).double().numpy() for name, fn in REDUCERS.items()}
    reference = {name: (v.sum(-1), (v * v).sum(-1)) for name, v in per_row.items()}
    got = reduce_in_chunks(capture, REDUCERS, chunk)
    assert got["_rows"] == q
    for name in REDUCERS:
        np.testing.assert_allclose(got[name][0].numpy(), reference[name][0], rtol=1e-5, atol=1e-5)


def test_reduce_in_chunks_shapes_and_validation():
    probs = torch.softmax(torch.randn(3, 10, 10), -1)  # [H, Q, K] gets batch 1
    out = reduce_in_chunks(probs, {"max": lambda p, s: max_weight(p)}, 4)
    assert out["max"][0].shape == (1, 3) and out["_rows"] == 10
    with pytest.raises(ValueError, match="chunk_size"):
        reduce_in_chunks(probs, {}, 0)
    with pytest.raises(ValueError, match="_"):
        reduce_in_chunks(probs, {"_rows": lambda p, s: max_weight(p)}, 4)
