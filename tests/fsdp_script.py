"""The FSDP job of ``test_fsdp.py``: validate a tiny classifier with the AttentionLogger, CalibrationMonitor and
HeadSpecializationTracker; global rank zero writes every scalar they logged and their per-site results to JSON.

    python tests/fsdp_script.py --devices 2 --strategy fsdp --accelerator gpu --out results.json

Not collected by pytest (no ``test_`` prefix). Also runs with ``--strategy ddp --accelerator cpu`` (the same
comparison under gloo), which is how its logic is checked on a machine without GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from helpers import end_process_group, reproducible, trainer_options
from report_helpers import TinyClassifier, TinyData
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import AttentionLogger, CalibrationMonitor, HeadSpecializationTracker  # noqa: E402

#: 32 samples in batches of 4: 4 batches per rank on 2 ranks, no DistributedSampler padding.
SAMPLES, BATCH = 32, 4


class TargetClassifier(TinyClassifier):
    """TinyClassifier whose evaluation steps also return the targets (the CalibrationMonitor's defaults)."""

    def _eval(self, batch: dict[str, Tensor]) -> Any:
        return {**super()._eval(batch), "target": batch["label"]}


def run(devices: int, strategy: str, accelerator: str, out: str, root: str) -> None:
    reproducible()
    logger, calibration = AttentionLogger(log_figures=False), CalibrationMonitor(plot=False)
    callbacks: list[pl.Callback] = [logger, calibration, HeadSpecializationTracker(log_figures=False)]
    options = trainer_options(root, accelerator=accelerator, devices=devices, strategy=strategy)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    data = TinyData(num_test=SAMPLES, batch_size=BATCH)
    trainer.validate(TargetClassifier(), data.val_dataloader(), verbose=False)
    if trainer.is_global_zero:
        attention = logger.results["val"]
        result = {
            "world_size": trainer.world_size,
            "logged": {key: float(value) for key, value in trainer.callback_metrics.items()},
            "sites": attention.sites,
            "rows": attention.rows.tolist(),
            "calibration_count": calibration.results["val"]["bins"]["count"].tolist(),
        }
        Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    arguments = parser.parse_args()
    run(arguments.devices, arguments.strategy, arguments.accelerator, arguments.out, arguments.root)
    end_process_group()


if __name__ == "__main__":
    main()
