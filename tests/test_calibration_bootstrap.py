"""Bootstrap intervals, smooth ECE and the debiased L2 error of CalibrationMetric, against independent references.

- smooth ECE: ``relplot.smECE`` (Blasiok & Nakkiran's package) on the same predictions;
- debiased L2: a direct NumPy implementation of Kumar et al. 2019 from the samples;
- bootstrap: the Poisson weights' distribution, replicate sums against a direct weighted ECE, coverage
  of the true ECE of a source with known calibration, and the width's 1/sqrt(n) shrinkage.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import cpu_trainer
from torch.utils.data import DataLoader, TensorDataset

import lightning_attn.functional.bootstrap as bootstrap_module
import lightning_attn.functional.calibration as calibration_module
from lightning_attn import CalibrationMonitor
from lightning_attn.callbacks.calibration import INTERVALS
from lightning_attn.functional.bootstrap import poisson_bootstrap_weights, sample_hash
from lightning_attn.functional.calibration import calibration_error
from lightning_attn.metrics import CalibrationMetric
from lightning_attn.plots.calibration import plot_calibration_trend, plot_reliability_diagram

relplot = pytest.importorskip("relplot")


@pytest.mark.parametrize("module", [bootstrap_module, calibration_module])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.failed == 0 and result.attempted > 0


def logits_source(n: int, k: int, seed: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): calibrated at temperature 1, over-confident above."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * temperature, y


def top_label(z: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence (softmax in the logits' float32, as the metric) and correctness, float64."""
    conf, pred = torch.softmax(z, 1).max(1)
    return conf.double().numpy(), (pred == y).double().numpy()


@pytest.mark.parametrize(("temperature", "n"), [(1.0, 3000), (2.5, 3000), (0.6, 800)])
def test_smece_equals_relplot(temperature: float, n: int) -> None:
    z, y = logits_source(n, 10, seed=1, temperature=temperature)
    metric = CalibrationMetric("multiclass", 10)
    metric.update(z, y)
    ours = float(metric.compute()["smece"])
    reference = relplot.smECE(*top_label(z, y))
    assert abs(ours - reference) < 2e-3, (ours, reference)
    assert abs(ours - reference) < 1e-4  # measured 1e-9 to 2.5e-5: the fine bins (1e-4 wide) are the only approximation


def test_smece_binary_equals_relplot() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2000, generator=g)
    y = (torch.rand(2000, generator=g) < p**1.5).long()  # P(y = 1) over-estimated
    metric = CalibrationMetric("binary", score_type="probs")
    metric.update(p, y)
    reference = relplot.smECE(p.double().numpy(), y.double().numpy())
    assert float(metric.compute()["smece"]) == pytest.approx(reference, abs=1e-4)


def kumar_debiased_l2(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> float:
    """Kumar et al. 2019 (verified_calibration ``unbiased_l2_ce``) over equal-width bins, per sample."""
    index = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = index == b
        size = int(members.sum())
        if size < 2:
            continue
        mean_label, mean_conf = hit[members].mean(), conf[members].mean()
        total += size / len(conf) * ((mean_conf - mean_label) ** 2 - mean_label * (1 - mean_label) / (size - 1))
    return math.sqrt(max(total, 0.0))


@pytest.mark.parametrize(("temperature", "n"), [(2.5, 4000), (1.5, 300), (1.0, 60)])
def test_ece_debiased_equals_kumar(temperature: float, n: int) -> None:
    z, y = logits_source(n, 5, seed=3, temperature=temperature)
    metric = CalibrationMetric("multiclass", 5, n_bins=15)
    metric.update(z, y)
    values = metric.compute()
    reference = kumar_debiased_l2(*top_label(z, y), 15)
    assert float(values["ece_debiased"]) == pytest.approx(reference, abs=1e-12)
    assert float(values["ece_debiased"]) <= float(values["rmsce"])  # the plug-in estimate is biased upwards


def test_poisson_weights_distribution_and_determinism() -> None:
    z, y = logits_source(50_000, 3, seed=4)
    weights = poisson_bootstrap_weights(sample_hash(z, y), 8).double()
    # Poisson(1): mean 1, variance 1, P(0) = e^-1, P(2) = e^-1 / 2; replicates uncorrelated
    assert weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert weights.var().item() == pytest.approx(1.0, abs=0.02)
    assert (weights == 0).double().mean().item() == pytest.approx(math.exp(-1), abs=0.005)
    assert (weights == 2).double().mean().item() == pytest.approx(math.exp(-1) / 2, abs=0.005)
    correlation = torch.corrcoef(weights.T)
    assert (correlation - torch.eye(8)).abs().max() < 0.02
    # a sample's weights depend on the sample alone: the same in any batch, at any position
    subset = torch.tensor([17, 3, 40_001])
    again = poisson_bootstrap_weights(sample_hash(z[subset], y[subset]), 8)
    assert torch.equal(again.double(), weights[subset])
    # and on its label: another target, other weights
    assert not torch.equal(sample_hash(z[:100], (y[:100] + 1) % 3), sample_hash(z[:100], y[:100]))


def test_replicates_equal_a_direct_weighted_ece() -> None:
    """Each replicate's ECE / accuracy / Brier = the weighted measure computed directly in NumPy."""
    z, y = logits_source(3000, 4, seed=5, temperature=2.0)
    metric = CalibrationMetric("multiclass", 4, bootstrap=30)
    for chunk in range(0, 3000, 256):
        metric.update(z[chunk : chunk + 256], y[chunk : chunk + 256])
    weights = poisson_bootstrap_weights(sample_hash(z, y), 30).double().numpy()
    conf, hit = top_label(z, y)
    probs = torch.softmax(z, 1).double().numpy()
    brier = ((probs - np.eye(4)[y.numpy()]) ** 2).sum(1)
    index = np.minimum(np.floor(conf * 15).astype(int), 14)
    ece = calibration_error(metric.boot_count, metric.boot_conf, metric.boot_hits).numpy()
    for r in range(30):
        w = weights[:, r]
        direct = sum(abs((w * (hit - conf))[index == b].sum()) for b in range(15)) / w.sum()
        assert ece[r] == pytest.approx(direct, abs=1e-12)
        assert float(metric.boot_correct[r] / w.sum()) == pytest.approx((w * hit).sum() / w.sum(), abs=1e-12)
        # the CPU path takes each row's sum of squares from float32 probabilities (relative ~1e-8)
        assert float(metric.boot_brier[r] / w.sum()) == pytest.approx((w * brier).sum() / w.sum(), rel=1e-7)
    values = metric.compute()
    low, high = np.quantile(ece, [0.025, 0.975])
    assert float(values["ece_ci_low"]) == pytest.approx(low) and float(values["ece_ci_high"]) == pytest.approx(high)


def test_replicates_do_not_depend_on_batching_order_or_path() -> None:
    """Shuffled, differently batched, on the static-shape (accelerator) path: the same replicate sums."""
    z, y = logits_source(2000, 6, seed=6, temperature=1.7)
    y[::97] = -100  # ignored samples must stay out of every replicate
    states = []
    for batch, sparse, seed in ((128, True, 0), (333, False, 1), (2000, True, 2)):
        metric = CalibrationMetric("multiclass", 6, bootstrap=50, ignore_index=-100)
        metric.sparse_on_cpu = sparse
        order = torch.randperm(2000, generator=torch.Generator().manual_seed(seed))
        for start in range(0, 2000, batch):
            part = order[start : start + batch]
            metric.update(z[part], y[part])
        states.append(metric)
    first = states[0]
    for other in states[1:]:
        assert torch.equal(other.boot_count, first.boot_count) and torch.equal(other.boot_hits, first.boot_hits)
        torch.testing.assert_close(other.boot_conf, first.boot_conf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.boot_correct, first.boot_correct, rtol=0, atol=0)
        # per-sample Brier: from float32 probabilities' norms on the CPU path, float64 on the static one
        torch.testing.assert_close(other.boot_brier, first.boot_brier, rtol=1e-7, atol=0)
    assert float(first.boot_count.sum(1).mean()) == pytest.approx(int(first.n_samples), rel=0.05)


def test_state_size_is_constant_in_the_number_of_samples() -> None:
    metric = CalibrationMetric("multiclass", 5, bootstrap=200)
    z, y = logits_source(8000, 5, seed=7)
    sizes = {}
    for step in range(1000):
        metric.update(z[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8])
        if step + 1 in (10, 1000):
            sizes[step + 1] = metric.state_bytes()
    assert sizes[10] == sizes[1000]
    assert metric.boot_count.shape == (200, 15)


def overconfident_source(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence c ~ U(0.5, 1) of 3 classes, correct with probability c^2: true ECE = E[c - c^2] = 1/6."""
    g = torch.Generator().manual_seed(seed)
    c = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    probs = torch.stack([c, (1 - c) / 2, (1 - c) / 2], 1)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < c**2
    y = torch.where(correct, 0, 1 + torch.randint(0, 2, (n,), generator=g))
    return probs.log().float(), y


TRUE_ECE = 0.75 - 2 * (1 - 0.125) / 3  # E[c] - E[c^2] for c ~ U(0.5, 1); c - c^2 >= 0 so binning loses nothing


@pytest.mark.slow
def test_interval_covers_true_ece_and_shrinks_like_inverse_sqrt_n() -> None:
    def interval(n: int, seed: int) -> tuple[float, float]:
        metric = CalibrationMetric("multiclass", 3, bootstrap=200)
        z, y = overconfident_source(n, seed)
        metric.update(z, y)
        values = metric.compute()
        return float(values["ece_ci_low"]), float(values["ece_ci_high"])

    covered = sum(low <= TRUE_ECE <= high for low, high in (interval(4000, seed) for seed in range(6)))
    assert covered >= 5  # nominal 95%: 6 of 6 expected, 5 tolerated
    widths = {n: np.mean([np.subtract(*interval(n, seed)[::-1]) for seed in range(3)]) for n in (1000, 16000)}
    assert widths[1000] / widths[16000] == pytest.approx(4.0, rel=0.3)  # sqrt(16)


def test_bootstrap_off_and_invalid() -> None:
    z, y = logits_source(100, 3, seed=8)
    metric = CalibrationMetric("multiclass", 3)
    metric.update(z, y)
    values = metric.compute()
    assert "ece_ci_low" not in values and "boot_count" not in metric._defaults
    assert math.isfinite(float(values["smece"])) and math.isfinite(float(values["ece_debiased"]))
    for bad in (-1, 2.5, True, "200"):
        with pytest.raises(ValueError, match="bootstrap must be a number of replicates"):
            CalibrationMetric("multiclass", 3, bootstrap=bad)  # type: ignore[arg-type]


def test_binary_bootstrap_intervals_bracket_the_estimates() -> None:
    g = torch.Generator().manual_seed(9)
    logit = torch.randn(5000, generator=g) * 2
    y = (torch.rand(5000, generator=g) < torch.sigmoid(logit * 0.5)).long()  # over-confident
    metric = CalibrationMetric("binary", bootstrap=200)
    metric.update(logit, y)
    values = metric.compute()
    for name in ("ece", "accuracy", "brier"):
        assert float(values[f"{name}_ci_low"]) < float(values[name]) < float(values[f"{name}_ci_high"]), name
    shown = torch.isfinite(values["bin_accuracy"]) & (values["bin_count"] > 50)
    assert bool((values["bin_accuracy_ci_low"][shown] <= values["bin_accuracy"][shown]).all())
    assert bool((values["bin_accuracy"][shown] <= values["bin_accuracy_ci_high"][shown]).all())


def test_static_shape_path_with_bootstrap_never_syncs_with_the_host() -> None:
    from helpers import NoHostSync

    z, y = logits_source(512, 4, seed=10)
    y[::50] = -100
    metric = CalibrationMetric("multiclass", 4, bootstrap=20, ignore_index=-100)
    metric.sparse_on_cpu = False
    binary = CalibrationMetric("binary", bootstrap=20)
    with NoHostSync():
        metric.update(z, y)
        binary.update(z[:, 0], (y == 0).long())
    assert int(metric.boot_count.sum()) > 0 and int(binary.boot_count.sum()) > 0


# -- in the callback -----------------------------------------------------------------------------------------------
class FixedLogits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"logits": x * self.scale, "target": y}


def test_monitor_logs_intervals_and_keys_repeated_validate_calls_by_evaluation(tmp_path: Path) -> None:
    z, y = logits_source(512, 5, seed=11, temperature=2.0)
    callback = CalibrationMonitor(bootstrap=100, save_dir=str(tmp_path / "out"))
    model, data = FixedLogits(), DataLoader(TensorDataset(z, y), batch_size=64)
    trainer = cpu_trainer(tmp_path, [callback])
    for _ in range(3):
        trainer.validate(model, data, verbose=False)
    assert [(h["evaluation"], h["epoch"]) for h in callback.history] == [(0, 0), (1, 0), (2, 0)]
    assert callback.results["val"]["evaluation"] == 2
    reference = CalibrationMetric("multiclass", 5, bootstrap=100)
    reference.update(z, y)
    expected = reference.compute()
    for name in ("ece", "smece", "ece_debiased", *INTERVALS):
        logged = trainer.callback_metrics[f"calibration/val/{name}"]
        assert float(logged) == pytest.approx(float(expected[name]), rel=1e-6), name
        assert callback.history[-1][name] == pytest.approx(float(expected[name]), rel=1e-12), name
    low, high = callback.results["val"]["bins"]["accuracy_ci_low"], callback.results["val"]["bins"]["accuracy_ci_high"]
    np.testing.assert_allclose(low, expected["bin_accuracy_ci_low"].numpy())
    np.testing.assert_allclose(high, expected["bin_accuracy_ci_high"].numpy())
    # the trend over the repeated evaluations is drawn (one per call from the second on)
    assert len(list((tmp_path / "out" / "calibration" / "val").glob("trend_epoch0_step*.png"))) == 1
    summary = json.loads((tmp_path / "out" / "calibration" / "val" / "summary_epoch0_step0.json").read_text())
    assert [h["evaluation"] for h in summary["history"]] == [0, 1, 2]
    restored = CalibrationMonitor()
    restored.load_state_dict(callback.state_dict())
    assert [h["evaluation"] for h in restored.history] == [0, 1, 2]


def test_monitor_bootstrap_off_and_invalid(tmp_path: Path) -> None:
    for bad in (-5, 1.5, False):
        with pytest.raises(ValueError, match="bootstrap must be a number of replicates"):
            CalibrationMonitor(bootstrap=bad)  # type: ignore[arg-type]
    z, y = logits_source(128, 3, seed=12)
    callback = CalibrationMonitor(bootstrap=0, plot=False, save_dir=str(tmp_path / "out"))
    data = DataLoader(TensorDataset(z, y), batch_size=64)
    cpu_trainer(tmp_path, [callback]).validate(FixedLogits(), data, verbose=False)
    assert "ece_ci_low" not in callback.history[0] and "smece" in callback.history[0]
    assert "accuracy_ci_low" not in callback.results["val"]["bins"]


def test_figures_draw_the_intervals() -> None:
    from matplotlib.collections import PolyCollection
    from matplotlib.container import ErrorbarContainer

    edges = np.linspace(0, 1, 6)
    accuracy = np.array([np.nan, 0.3, 0.5, 0.6, 0.9])
    confidence = np.array([np.nan, 0.35, 0.5, 0.7, 0.95])
    figure = plot_reliability_diagram(
        edges,
        accuracy,
        confidence,
        np.array([0, 10, 20, 30, 40]),
        ece=0.05,
        accuracy_low=accuracy - 0.05,
        accuracy_high=accuracy + 0.04,
        ece_interval=(0.03, 0.08),
    )
    top = figure.axes[0]
    bars = [c for c in top.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 4  # one bar per non-empty bin
    assert "[0.0300, 0.0800]" in top.get_title()
    history = [
        {
            "evaluation": i,
            "ece": 0.1 - 0.01 * i,
            "ece_ci_low": 0.08 - 0.01 * i,
            "ece_ci_high": 0.12 - 0.01 * i,
            "brier": 0.3,
            "brier_ci_low": 0.28,
            "brier_ci_high": 0.33,
        }
        for i in range(3)
    ]
    trend = plot_calibration_trend(history, x="evaluation")
    bands = [c for ax in trend.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # ece (left) and brier (right)
    assert trend.axes[0].get_xlabel() == "evaluation"
