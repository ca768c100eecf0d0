"""Worker of ``test_calibration_ddp.py``: ``python calibration_ddp_worker.py OUT_DIR [DEVICES]``.

Runs ``trainer.validate`` with a CalibrationMonitor (temperature scaling and the default 200
bootstrap replicates on) under ``strategy="ddp"`` on CPU (gloo), then a bare CalibrationMetric over
this rank's shard synchronised by hand (to read the reduced bootstrap states), and writes
``OUT_DIR/rank<r>.json`` per rank. Run as a script,
not under pytest: Lightning's DDP launcher re-executes ``sys.argv`` for the other ranks.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import end_process_group
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import CalibrationMonitor
from lightning_attn.metrics import CalibrationMetric

warnings.filterwarnings("ignore")

N, K, BATCH = 2048, 10, 128


class FixedLogits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return {"logits": x * self.scale, "target": y}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, K, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z * 2.5, y


def run(out: Path, devices: int) -> dict:
    """Validate on ``devices`` CPU processes; returns (and writes) this rank's results."""
    x, y = dataset()
    callback = CalibrationMonitor(fit_temperature=True, reservoir_size=N, save_dir=str(out / "outputs"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.validate(FixedLogits(), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    result = callback.results["val"]
    metric = next(iter(callback.states.metrics.values()))
    # the shard DistributedSampler gives this rank (N splits evenly: no padding), in batches
    bare = CalibrationMetric("multiclass", K, bootstrap=200)
    shard = slice(trainer.global_rank, None, trainer.world_size)
    for start in range(0, N // trainer.world_size, BATCH):
        bare.update(x[shard][start : start + BATCH], y[shard][start : start + BATCH])
    bare.sync()
    boot = {
        name: getattr(bare, name).tolist()
        for name in ("boot_count", "boot_hits", "boot_conf", "boot_correct", "boot_brier")
    }
    payload = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "metrics": result["metrics"],
        "temperature": callback.temperature,
        "sample_size": result["temperature_scaling"]["sample_size"],
        "bin_count": result["bins"]["count"].tolist(),
        "class_count": result["classwise_bins"]["count"].tolist(),
        "state_bytes": metric.state_bytes(),
        "logged_ece": float(trainer.callback_metrics["calibration/val/ece"]),
        "logged_ece_ci_high": float(trainer.callback_metrics["calibration/val/ece_ci_high"]),
        "bin_accuracy_ci_low": result["bins"]["accuracy_ci_low"].tolist(),
        "boot": boot,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))
    return payload


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    end_process_group()
