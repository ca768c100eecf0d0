"""CalibrationMetric and the functional calibration measures against torchmetrics and NumPy references."""

from __future__ import annotations

import doctest
import importlib
import itertools
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from lightning_attn.functional.calibration import (
    adaptive_calibration_error,
    brier_score,
    calibration_error,
    equal_mass_bins,
    fit_temperature,
    negative_log_likelihood,
    temperature_nll,
)
from lightning_attn.metrics.calibration import CalibrationMetric
from lightning_attn.metrics.reservoir import LogitReservoir

NORMS = {"l1": "ece", "l2": "rmsce", "max": "mce"}


# ---------------------------------------------------------------------------------------------
# NumPy references (written from the formulas, independent of the implementation)
# ---------------------------------------------------------------------------------------------
def np_binned_ece(
    conf: np.ndarray, hit: np.ndarray, n_bins: int, norm: str = "l1", one_in_extra_bin: bool = False
) -> float:
    """Equal-width bins [m/n, (m+1)/n) on float32 edges; 1.0 in the last bin (or an extra one)."""
    edges = np.linspace(0, 1, n_bins + 1, dtype=np.float32)
    idx = np.searchsorted(edges, conf.astype(np.float32), side="right") - 1
    if not one_in_extra_bin:
        idx = np.minimum(idx, n_bins - 1)
    return _ece_from_groups(conf.astype(np.float64), hit.astype(np.float64), idx, norm)


def _ece_from_groups(conf: np.ndarray, hit: np.ndarray, group: np.ndarray, norm: str = "l1") -> float:
    n = len(conf)
    total, worst = 0.0, 0.0
    for g in np.unique(group):
        sel = group == g
        gap = abs(hit[sel].mean() - conf[sel].mean())
        worst = max(worst, gap)
        total += sel.sum() / n * (gap if norm == "l1" else gap**2)
    return {"l1": total, "l2": np.sqrt(total), "max": worst}[norm]


def np_classwise_ece(probs: np.ndarray, target: np.ndarray, n_bins: int) -> float:
    n, k = probs.shape
    total = 0.0
    for c in range(k):
        p = probs[:, c].astype(np.float64)
        idx = np.minimum(np.floor(p * n_bins), n_bins - 1).astype(int)
        hit = (target == c).astype(np.float64)
        for b in np.unique(idx):
            sel = idx == b
            total += sel.sum() / n * abs(hit[sel].mean() - p[sel].mean())
    return total / k


def np_adaptive_ece_grid(conf: np.ndarray, hit: np.ndarray, n_bins: int, fine_bins: int) -> float:
    """Equal-mass bins whose boundaries are snapped to the fine grid (the documented definition):
    bin m ends at the fine cell of the ceil(m N / n)-th smallest confidence."""
    conf = conf.astype(np.float64)
    n = len(conf)
    cell = np.minimum(np.floor(conf * fine_bins), fine_bins - 1).astype(int)
    sorted_cells = np.sort(cell)
    ranks = [-(-m * n // n_bins) for m in range(1, n_bins + 1)]  # ceil(m n / n_bins), 1-based
    ends = np.unique([sorted_cells[r - 1] for r in ranks])
    group = np.searchsorted(ends, cell, side="left")
    return _ece_from_groups(conf, hit.astype(np.float64), group)


def np_adaptive_ece_exact(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> float:
    """Nixon et al.: sort, split into n_bins chunks of (almost) equal size."""
    order = np.argsort(conf, kind="stable")
    group = np.empty(len(conf), dtype=int)
    for g, chunk in enumerate(np.array_split(order, n_bins)):
        group[chunk] = g
    return _ece_from_groups(conf.astype(np.float64), hit.astype(np.float64), group)


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def random_multiclass(
    n: int = 4000, k: int = 10, seed: int = 0, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * scale
    # labels correlated with the logits, so the model is neither perfect nor useless
    target = torch.where(torch.rand(n, generator=g) < 0.6, logits.argmax(1), torch.randint(0, k, (n,), generator=g))
    return logits, target


def feed(
    metric: CalibrationMetric, scores: torch.Tensor, target: torch.Tensor, batch: int = 700
) -> dict[str, torch.Tensor]:
    for i in range(0, scores.shape[0], batch):
        metric.update(scores[i : i + batch], target[i : i + batch])
    return metric.compute()


def make_metric(*args, sparse: bool = True, **kwargs) -> CalibrationMetric:
    metric = CalibrationMetric(*args, **kwargs)
    metric.sparse_on_cpu = sparse
    return metric


# ---------------------------------------------------------------------------------------------
# torchmetrics equality
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [True, False], ids=["cpu-path", "masked-path"])
@pytest.mark.parametrize("score_type", ["logits", "probs"])
def test_multiclass_ece_norms_equal_torchmetrics(score_type: str, sparse: bool) -> None:
    logits, target = random_multiclass()
    scores = logits if score_type == "logits" else torch.softmax(logits, 1)
    assert scores.max() < 1.0 or score_type == "logits"
    out = feed(make_metric("multiclass", 10, score_type, n_bins=15, sparse=sparse), scores, target)
    for norm, key in NORMS.items():
        reference = MulticlassCalibrationError(num_classes=10, n_bins=15, norm=norm)
        reference.update(scores, target)
        assert float(out[key]) == pytest.approx(float(reference.compute()), abs=1e-6), norm


@pytest.mark.parametrize("score_type", ["logits", "probs"])
def test_binary_ece_norms_equal_torchmetrics(score_type: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5000, generator=g) * 2
    target = (torch.rand(5000, generator=g) < torch.sigmoid(logits * 0.7)).long()
    scores = logits if score_type == "logits" else torch.sigmoid(logits)
    out = feed(make_metric("binary", score_type=score_type, n_bins=10), scores, target)
    for norm, key in NORMS.items():
        reference = BinaryCalibrationError(n_bins=10, norm=norm)
        reference.update(scores, target)
        assert float(out[key]) == pytest.approx(float(reference.compute()), abs=1e-6), norm


def test_confidence_exactly_one_documented_difference() -> None:
    """torchmetrics issue 3510: a confidence of exactly 1.0 lands in a hidden extra bin there; here it
    shares the last bin. Both match their NumPy reference; moving 1.0 just below makes them agree."""
    logits, target = random_multiclass(3000, 5, seed=3)
    probs = torch.softmax(logits, 1)
    probs[:300] = torch.nn.functional.one_hot(logits[:300].argmax(1), 5).float()  # confidence exactly 1.0
    target[:300] = logits[:300].argmax(1)
    target[:150] = (target[:150] + 1) % 5  # half of those wrong: over-confident
    probs[300:1200] = torch.tensor([0.94, 0.015, 0.015, 0.015, 0.015])  # last bin, all correct: under-confident
    target[300:1200] = 0
    conf, pred = probs.max(1)
    hit = (pred == target).numpy()

    ours = feed(make_metric("multiclass", 5, "probs"), probs, target)
    tm = MulticlassCalibrationError(num_classes=5, n_bins=15)
    tm.update(probs, target)
    tm_value = float(tm.compute())
    assert float(ours["n_at_one"]) == 300
    assert float(ours["ece"]) == pytest.approx(np_binned_ece(conf.numpy(), hit, 15), abs=1e-6)
    assert tm_value == pytest.approx(np_binned_ece(conf.numpy(), hit, 15, one_in_extra_bin=True), abs=1e-6)
    assert abs(float(ours["ece"]) - tm_value) > 1e-3

    below = probs.clone()
    below[below == 1.0] = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    tm.reset()
    tm.update(below, target)
    # 1342 samples share the last bin: torchmetrics' float32 scatter_add drifts by 2e-6 there (ours sums in float64)
    assert float(ours["ece"]) == pytest.approx(float(tm.compute()), abs=1e-5)
    assert float(ours["ece"]) == pytest.approx(np_binned_ece(below.max(1).values.numpy(), hit, 15), abs=1e-7)

    # binary: P(y=1) == 1.0 exactly
    p = torch.sigmoid(torch.randn(2000, generator=torch.Generator().manual_seed(4)))
    y = (torch.rand(2000, generator=torch.Generator().manual_seed(5)) < p).long()
    p[:100] = 1.0
    y[:100] = 0
    p[100:200] = 0.95
    y[100:200] = 1
    ours_b = feed(make_metric("binary", score_type="probs"), p, y)
    tm_b = BinaryCalibrationError(n_bins=15)
    tm_b.update(p, y)
    assert float(ours_b["ece"]) == pytest.approx(np_binned_ece(p.numpy(), y.numpy(), 15), abs=1e-6)
    assert float(tm_b.compute()) == pytest.approx(
        np_binned_ece(p.numpy(), y.numpy(), 15, one_in_extra_bin=True), abs=1e-6
    )
    assert abs(float(ours_b["ece"]) - float(tm_b.compute())) > 1e-3


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [True, False], ids=["cpu-path", "masked-path"])
@pytest.mark.parametrize("score_type", ["logits", "probs"])
def test_multiclass_measures_equal_numpy(score_type: str, sparse: bool) -> None:
    logits, target = random_multiclass(5000, 7, seed=7)
    probs = torch.softmax(logits, 1)
    scores = logits if score_type == "logits" else probs
    out = feed(
        make_metric(
            "multiclass", 7, score_type, n_bins=15, adaptive_bins=12, classwise_bins=20, fine_bins=2000, sparse=sparse
        ),
        scores,
        target,
    )
    P, y = probs.numpy(), target.numpy()
    conf = P.max(1)
    hit = (P.argmax(1) == y).astype(np.float64)
    onehot = np.eye(7)[y]
    assert float(out["classwise_ece"]) == pytest.approx(np_classwise_ece(P, y, 20), abs=1e-9)
    assert float(out["adaptive_ece"]) == pytest.approx(np_adaptive_ece_grid(conf, hit, 12, 2000), abs=1e-9)
    assert float(out["adaptive_ece"]) == pytest.approx(np_adaptive_ece_exact(conf, hit, 12), abs=2e-3)
    assert float(out["brier"]) == pytest.approx(((P.astype(np.float64) - onehot) ** 2).sum(1).mean(), abs=1e-6)
    if score_type == "logits":
        nll = -np_log_softmax(logits.numpy())[np.arange(len(y)), y].mean()
    else:
        nll = -np.log(np.maximum(P[np.arange(len(y)), y].astype(np.float64), 1e-12)).mean()
    assert float(out["nll"]) == pytest.approx(nll, rel=1e-6)
    assert float(out["accuracy"]) == pytest.approx(hit.mean(), abs=1e-12)
    assert float(out["confidence"]) == pytest.approx(conf.astype(np.float64).mean(), abs=1e-9)
    assert float(out["overconfidence"]) == pytest.approx(conf.astype(np.float64).mean() - hit.mean(), abs=1e-9)
    right = hit.astype(bool)
    assert float(out["confidence_correct"]) == pytest.approx(conf[right].astype(np.float64).mean(), abs=1e-9)
    assert float(out["confidence_incorrect"]) == pytest.approx(conf[~right].astype(np.float64).mean(), abs=1e-9)
    # per-bin arrays
    assert out["bin_count"].sum() == 5000 and out["adaptive_count"].sum() == 5000
    assert out["class_count"].shape == (7, 20) and torch.all(out["class_count"].sum(1) == 5000)
    assert out["hist_correct"].sum() + out["hist_incorrect"].sum() == 5000
    assert float(out["hist_correct"].sum()) == hit.sum()
    # functional versions agree with the streamed sums
    assert float(brier_score(probs, target)) == pytest.approx(float(out["brier"]), abs=1e-9)
    assert float(negative_log_likelihood(scores, target, score_type=score_type)) == pytest.approx(
        float(out["nll"]), rel=1e-6
    )


@pytest.mark.parametrize("score_type", ["logits", "probs"])
def test_binary_measures_equal_numpy(score_type: str) -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4000, generator=g) * 2
    target = (torch.rand(4000, generator=g) < torch.sigmoid(logits * 0.5)).long()
    p = torch.sigmoid(logits)
    out = feed(
        make_metric("binary", score_type=score_type, n_bins=15, fine_bins=1000),
        logits if score_type == "logits" else p,
        target,
    )
    pn, y = p.numpy().astype(np.float64), target.numpy()
    probs2 = np.stack([1 - pn, pn], 1)
    pred = (pn > 0.5).astype(int)
    conf = np.maximum(pn, 1 - pn)
    assert float(out["classwise_ece"]) == pytest.approx(np_classwise_ece(probs2, y, 15), abs=1e-9)
    assert float(out["adaptive_ece"]) == pytest.approx(np_adaptive_ece_grid(pn, y, 15, 1000), abs=1e-9)
    assert float(out["brier"]) == pytest.approx(((pn - y) ** 2).mean(), abs=1e-7)
    assert float(out["accuracy"]) == pytest.approx((pred == y).mean())
    assert float(out["confidence"]) == pytest.approx(conf.mean(), abs=1e-7)
    if score_type == "logits":
        z = logits.numpy().astype(np.float64)
        nll = np.mean(np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y))
    else:
        nll = -np.mean(y * np.log(np.maximum(pn, 1e-12)) + (1 - y) * np.log(np.maximum(1 - pn, 1e-12)))
    assert float(out["nll"]) == pytest.approx(nll, rel=1e-6)


def test_equal_mass_bins_functional() -> None:
    # 10 samples in distinct cells -> 5 bins of 2
    count = torch.zeros(100, dtype=torch.long)
    count[torch.arange(0, 100, 10)] = 1
    conf = count.double() * torch.arange(100) / 100
    hits = count.clone()
    c, _s, _h, edges = equal_mass_bins(count, conf, hits, 5)
    assert c.tolist() == [2, 2, 2, 2, 2] and edges[0] == 0 and edges[-1] == 1
    # all mass in one cell: one bin
    count = torch.zeros(100, dtype=torch.long)
    count[42] = 50
    c, _, _, _ = equal_mass_bins(count, count.double() * 0.425, count // 2, 10)
    assert c.tolist() == [50]
    empty = torch.zeros(100, dtype=torch.long)
    assert torch.isnan(adaptive_calibration_error(empty, empty.double(), empty, 10))
    assert torch.isnan(calibration_error(torch.zeros(5), torch.zeros(5), torch.zeros(5)))


# ---------------------------------------------------------------------------------------------
# constant memory
# ---------------------------------------------------------------------------------------------
def test_state_size_identical_after_1e3_and_1e6_samples() -> None:
    def sizes(metric: CalibrationMetric) -> dict[str, tuple[tuple[int, ...], int]]:
        return {
            name: (tuple(getattr(metric, name).shape), getattr(metric, name).element_size())
            for name in metric._defaults
        }

    small = CalibrationMetric("multiclass", 4, "logits")
    logits, target = random_multiclass(1000, 4)
    small.update(logits, target)
    big = CalibrationMetric("multiclass", 4, "logits")
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        big.update(torch.randn(250_000, 4, generator=g), torch.randint(0, 4, (250_000,), generator=g))
    assert int(big.n_samples) == 1_000_000 and int(small.n_samples) == 1000
    assert sizes(small) == sizes(big)
    assert small.state_bytes() == big.state_bytes()
    assert all(not isinstance(getattr(big, name), list) for name in big._defaults)
    assert set(big._reductions.values()) == {big._reductions["n_samples"]}  # every state sum-reduced
    assert big._reductions["n_samples"].__name__ in ("dim_zero_sum", "sum")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_wrong_shapes_and_dtypes_raise_at_update() -> None:
    metric = CalibrationMetric("multiclass", 5, "logits")
    with pytest.raises(ValueError, match=r"scores must be \[N, num_classes"):
        metric.update(torch.randn(8, 5), torch.randint(0, 5, (8, 2)))
    with pytest.raises(ValueError, match="num_classes=5"):
        metric.update(torch.randn(8, 4), torch.randint(0, 4, (8,)))
    with pytest.raises(ValueError, match="floating-point"):
        metric.update(torch.randint(0, 3, (8, 5)), torch.randint(0, 5, (8,)))
    with pytest.raises(ValueError, match="integer class indices"):
        metric.update(torch.randn(8, 5), torch.rand(8))
    binary = CalibrationMetric("binary", score_type="logits")
    with pytest.raises(ValueError, match="binary scores must have the target's shape"):
        binary.update(torch.randn(8, 2), torch.randint(0, 2, (8,)))


@pytest.mark.parametrize("sparse", [True, False], ids=["cpu-path", "masked-path"])
def test_targets_out_of_range_raise_at_compute(sparse: bool) -> None:
    metric = make_metric("multiclass", 5, "logits", sparse=sparse)
    target = torch.randint(0, 5, (16,))
    target[3] = 5
    target[4] = -1
    metric.update(torch.randn(16, 5), target)  # no sync, no error yet
    with pytest.raises(ValueError, match=r"2 target\(s\) outside \[0, 5\)"):
        metric.compute()
    binary = CalibrationMetric("binary", score_type="probs")
    binary.update(torch.rand(4), torch.tensor([0.0, 1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match=r"2 target\(s\) outside \{0, 1\}"):
        binary.compute()


def test_probabilities_that_are_not_raise() -> None:
    metric = CalibrationMetric("multiclass", 4, "probs")
    metric.update(torch.randn(10, 4) * 3, torch.randint(0, 4, (10,)))  # logits passed as probs
    with pytest.raises(ValueError, match="score_type='logits'"):
        metric.compute()


@pytest.mark.parametrize("sparse", [True, False], ids=["cpu-path", "masked-path"])
@pytest.mark.parametrize("score_type", ["logits", "probs"])
def test_nan_scores_warn_and_are_skipped(score_type: str, sparse: bool) -> None:
    logits, target = random_multiclass(600, 6, seed=5)
    scores = logits if score_type == "logits" else torch.softmax(logits, 1)
    bad = scores.clone()
    bad[[3, 100, 599]] = float("nan")
    bad[200, 2] = float("nan")  # one NaN in a row is enough
    keep = torch.ones(600, dtype=torch.bool)
    keep[[3, 100, 599, 200]] = False
    metric = make_metric("multiclass", 6, score_type, sparse=sparse)
    metric.update(bad, target)
    with pytest.warns(UserWarning, match="4 sample"):
        out = metric.compute()
    clean = make_metric("multiclass", 6, score_type, sparse=sparse)
    clean.update(scores[keep], target[keep])
    expected = clean.compute()
    assert float(out["n_skipped"]) == 4 and float(out["n_samples"]) == 596
    for key in ("ece", "adaptive_ece", "classwise_ece", "brier", "nll", "accuracy"):
        assert float(out[key]) == pytest.approx(float(expected[key]), abs=1e-12), key


@pytest.mark.parametrize("sparse", [True, False], ids=["cpu-path", "masked-path"])
def test_ignore_index_and_extra_dims(sparse: bool) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, 6, 7, generator=g)  # [N, C, H, W] segmentation-style
    target = torch.randint(0, 5, (4, 6, 7), generator=g)
    target[0, :2] = -100
    metric = make_metric("multiclass", 5, "logits", ignore_index=-100, sparse=sparse)
    metric.update(logits, target)
    out = metric.compute()
    flat_logits = logits.movedim(1, -1).reshape(-1, 5)
    flat_target = target.reshape(-1)
    keep = flat_target != -100
    reference = MulticlassCalibrationError(num_classes=5, n_bins=15)
    reference.update(flat_logits[keep], flat_target[keep])
    assert float(out["n_ignored"]) == 14 and float(out["n_samples"]) == keep.sum()
    assert float(out["ece"]) == pytest.approx(float(reference.compute()), abs=1e-6)


def test_cpu_and_masked_paths_agree_on_every_state() -> None:
    logits, target = random_multiclass(3000, 20, seed=9)
    logits[17] = float("nan")
    target[40:60] = -1
    a = make_metric("multiclass", 20, "logits", ignore_index=-1, sparse=True)
    b = make_metric("multiclass", 20, "logits", ignore_index=-1, sparse=False)
    for m in (a, b):
        m.update(logits[:1000], target[:1000])
        m.update(logits[1000:], target[1000:])
    for name in a._defaults:
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype == torch.long:
            assert torch.equal(x, y), name  # counts: exact
        else:  # sums: bin 0 of the CPU path is a float32 column sum minus the rest
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-9), name


def test_cpu_path_bins_confidences_on_and_beside_edges_like_bucketize() -> None:
    # maxima exactly on torchmetrics' float32 edges (linspace(0, 1, 16)) and one ulp either side
    edges = torch.linspace(0, 1, 16)[8:]
    top = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, torch.ones(()))]).clamp(
        0.5, 1.0
    )
    probs = torch.stack([top, 1 - top], 1)
    target = torch.arange(top.shape[0]) % 2
    states = []
    for sparse in (True, False):
        metric = make_metric("multiclass", 2, "probs", sparse=sparse)
        metric.update(probs, target)
        states.append((metric.bin_count.clone(), metric.bin_hits.clone()))
    expected = torch.bincount(torch.bucketize(top, torch.linspace(0, 1, 16), right=True) - 1, minlength=16)
    assert torch.equal(states[0][0], expected) and torch.equal(states[1][0], expected)
    assert torch.equal(states[0][1], states[1][1])


def test_half_precision_scores() -> None:
    logits, target = random_multiclass(2000, 10, seed=12)
    metric = CalibrationMetric("multiclass", 10, "probs")
    metric.update(torch.softmax(logits, 1).half(), target)
    out = metric.compute()  # rows of fp16 probabilities sum to 1 within the fp16 tolerance
    reference = feed(CalibrationMetric("multiclass", 10, "logits"), logits, target)
    assert float(out["ece"]) == pytest.approx(float(reference["ece"]), abs=2e-3)


# ---------------------------------------------------------------------------------------------
# temperature scaling and the reservoir
# ---------------------------------------------------------------------------------------------
def overconfident(
    n: int = 20_000, k: int = 10, temperature: float = 2.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the model reports temperature * z: calibrated after dividing by T."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 1.5
    target = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * temperature, target


def test_temperature_scaling_recovers_true_temperature() -> None:
    logits, target = overconfident()
    with torch.inference_mode():  # as in Lightning's evaluation loop
        logits_inf, target_inf = logits.clone(), target.clone()
        t = fit_temperature(logits_inf, target_inf)
    assert t == pytest.approx(2.5, abs=0.1)
    before = feed(CalibrationMetric("multiclass", 10, "logits"), logits, target)
    after = feed(CalibrationMetric("multiclass", 10, "logits"), logits / t, target)
    assert float(after["ece"]) < 0.5 * float(before["ece"])
    assert float(after["nll"]) < float(before["nll"])
    assert float(after["accuracy"]) == float(before["accuracy"])
    assert float(temperature_nll(logits, target, t)) == pytest.approx(float(after["nll"]), rel=1e-6)
    # binary: one logit
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20_000, generator=g) * 2
    y = (torch.rand(20_000, generator=g) < torch.sigmoid(z)).long()
    assert fit_temperature(z * 2.5, y, task="binary") == pytest.approx(2.5, abs=0.1)


def test_reservoir_is_exact_bottom_k_and_uniform() -> None:
    size, n = 500, 5000
    values = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    target = torch.arange(n)
    batches = [0, 7, 300, 1000, 1500, 2400, 3999, 4000, n]  # includes batches larger than the reservoir
    reservoir = LogitReservoir(size, seed=123)
    for lo, hi in itertools.pairwise(batches):
        reservoir.update(values[lo:hi], target[lo:hi])
    _, kept, _ = reservoir.sample()
    # the same keys, drawn in the same order: the reservoir holds exactly the size smallest
    g = torch.Generator().manual_seed(123)
    keys = torch.cat([torch.rand(hi - lo, generator=g) for lo, hi in itertools.pairwise(batches) if hi > lo])
    expected = torch.topk(keys, size, largest=False).indices
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    # uniform: inclusion frequency does not depend on the position in the epoch
    counts = torch.zeros(n)
    for seed in range(200):
        r = LogitReservoir(size, seed=seed)
        for lo, hi in itertools.pairwise(batches):
            r.update(values[lo:hi], target[lo:hi])
        counts[r.sample()[1]] += 1
    per_tenth = counts.view(10, -1).sum(1) / (200 * size)
    assert torch.all((per_tenth - 0.1).abs() < 0.01), per_tenth
    # invalid samples never enter
    r = LogitReservoir(10, seed=0)
    r.update(values[:20], target[:20], valid=torch.arange(20) % 2 == 0)
    assert torch.all(r.sample()[1] % 2 == 0) and r.sample()[1].numel() == 10


def test_reservoir_merge_of_gathered_reservoirs_is_bottom_k_of_union() -> None:
    a, b = LogitReservoir(50, seed=0), LogitReservoir(50, seed=1)
    x = torch.randn(400, 4)
    t = torch.arange(400)
    a.update(x[:200], t[:200])
    b.update(x[200:], t[200:])
    keys = torch.cat([a.keys, b.keys])
    logits, target = LogitReservoir.merge(keys, torch.cat([a.logits, b.logits]), torch.cat([a.target, b.target]), 50)
    assert target.numel() == 50
    assert torch.equal(logits, x[target])
    assert set(target.tolist()) == set(
        torch.cat([a.target, b.target])[torch.topk(keys, 50, largest=False).indices].tolist()
    )


def test_no_warning_on_clean_data() -> None:
    logits, target = random_multiclass(500, 4)
    metric = CalibrationMetric("multiclass", 4, "logits")
    metric.update(logits, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()


@pytest.mark.parametrize(
    "name",
    [
        "lightning_attn.metrics.calibration_inputs",
        "lightning_attn.metrics.calibration_sparse",
        "lightning_attn.metrics.calibration_states",
        "lightning_attn.metrics.calibration_temperature",
        "lightning_attn.metrics.reservoir",
        "lightning_attn.sinks.layout",
    ],
)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
