"""Every precision Lightning offers runs with every callback, and gives the float32 run's numbers.

One fit of one epoch with validation (sanity check included) of a tiny two-layer classifier, with the
AttentionLogger, CalibrationMonitor, HeadSpecializationTracker, ModuleProbe and ExplainabilityReport at their
defaults, under each precision; every scalar the callbacks log must be finite and within 1e-2 of the float32 run,
and every figure must be written. Under ``bf16-mixed``/``16-mixed`` the rollout was once left in bfloat16 by
autocast and crashed the figures (issue 13).

The model trains with SGD at a tiny learning rate so that the weights of every run stay (almost) those of the
float32 run: the differences measured are those of the precision, not of a different training trajectory (Adam's
``eps=1e-8`` underflows to 0 in ``16-true`` and would make the weights NaN: a property of the optimizer, not of
the callbacks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import AttentionLogger, CalibrationMonitor, HeadSpecializationTracker, ModuleProbe
from lightning_attn.functional import attention_rollout
from lightning_attn.metrics.attention import ProbeMaps
from lightning_attn.plots import plot_rollout
from lightning_attn.report import ExplainabilityReport

pytestmark = pytest.mark.usefixtures("one_thread")

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]

#: Largest difference allowed between a logged scalar and the float32 run's (issue 13).
TOLERANCE = 1e-2


class PrecisionClassifier(pl.LightningModule):
    """Two self-attention layers (the rollout multiplies their maps) over ``[B, 6, 5]`` inputs, three classes;
    evaluation steps return logits and targets (the CalibrationMonitor's defaults); inputs follow the weights' dtype
    (for ``model.double()``); SGD at a tiny learning rate."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x.to(self.embed.weight.dtype))).mean(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        return {"logits": self(x), "target": y}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, 5, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (16,), generator=generator)), batch_size=8)


def fp16_runs_on_cpu() -> bool:
    """Whether this CPU build runs the model's float16 kernels (layer norm, matmul, softmax)."""
    try:
        x = torch.randn(2, 4, dtype=torch.float16)
        torch.nn.functional.layer_norm(x @ x.T, (2,)).softmax(-1)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def fit(root: Path, precision: Precision, double: bool = False) -> tuple[dict[str, float], AttentionLogger]:
    """One epoch of fit with every callback at its defaults; the scalars the callbacks logged."""
    pl.seed_everything(0, verbose=False)
    model = PrecisionClassifier()
    if double:
        model = model.double()
    logger = AttentionLogger()
    callbacks: list[pl.Callback] = [
        logger,
        CalibrationMonitor(),
        HeadSpecializationTracker(),
        ModuleProbe(probes={"ff": ("encoder.layers.*.linear1", "activation")}),
        ExplainabilityReport(stages=("validate",)),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    trainer.fit(model, loader(0), loader(1))
    logged = {key: float(value) for key, value in trainer.callback_metrics.items() if key != "train_loss"}
    return logged, logger


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    torch.set_num_threads(1)
    logged, _ = fit(tmp_path_factory.mktemp("float32"), "32-true")
    return logged


def test_rollout_under_autocast_stays_float32_and_draws() -> None:
    """The probe samples' rollout folded under bf16 autocast (as in a ``bf16-mixed`` validation step) equals the
    float64 rollout of the same maps, in float32, and its figure draws (a bfloat16 one once crashed numpy)."""
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 6, 6, generator=generator).softmax(-1) for _ in range(3)]
    probe = ProbeMaps(num_samples=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for layer, attention in enumerate(maps):
            probe.add(f"layer{layer}", "self", 6, 6, attention, 0)
            probe.end_site(f"layer{layer}")
    rollout = probe.finish()["rollout"]
    assert rollout.dtype == torch.float32
    reference = attention_rollout([m.double() for m in maps])
    torch.testing.assert_close(rollout.double(), reference, atol=1e-6, rtol=0)
    plot_rollout(rollout.bfloat16()).clear()  # figures take any dtype


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "double"),
    [
        ("bf16-mixed", False),
        ("16-mixed", False),
        ("bf16-true", False),
        ("16-true", False),
        ("64-true", False),
        ("32-true", True),
    ],
    ids=["bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "model.double"],
)
def test_every_precision_gives_the_float32_numbers(
    tmp_path: Path, float32_run: dict[str, float], precision: Precision, double: bool
) -> None:
    if precision == "16-true" and not fp16_runs_on_cpu():
        pytest.skip("this CPU build of torch has no float16 kernels for the model (layer norm / matmul)")
    logged, logger = fit(tmp_path, precision, double)

    # every callback logged the float32 run's keys, finite and close
    for prefix in ("attn/val/", "calibration/val/", "heads/val/", "probe/val/", "report/val/"):
        assert any(key.startswith(prefix) for key in float32_run), prefix
    assert set(logged) == set(float32_run)
    for key, want in float32_run.items():
        got = logged[key]
        assert math.isfinite(got) == math.isfinite(want), key
        if "_ci_" in key:
            # a bootstrap bound is a percentile over replicates whose weights hash each sample's logit bits: another
            # precision draws other replicates (the bound moves by its Monte Carlo error on this small set, not by
            # rounding), so only its order is checked here; test_calibration_bootstrap.py checks the intervals
            low, high = logged[key.replace("_ci_high", "_ci_low")], logged[key.replace("_ci_low", "_ci_high")]
            assert low <= high, key
        elif math.isfinite(want):
            assert abs(got - want) <= TOLERANCE, f"{precision}: {key} = {got}, float32 run {want}"

    # every figure was drawn (the rollout crashed the figures under autocast), from float32/float64 data
    logs = tmp_path / "lightning_attn_logs" / "version_0"
    assert list((logs / "attn" / "val").glob("rollout_epoch0_step*.png"))
    report_dir = logs / "report" / "val_epoch0"
    assert (report_dir / "figures" / "rollout.png").is_file() and (report_dir / "report.html").is_file()
    for values in (*logger.results["val"].mean.values(), *logger.results["val"].std.values()):
        assert values.dtype in (torch.float32, torch.float64)
