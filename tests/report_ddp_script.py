"""The DDP job of ``test_report_ddp.py``: an ExplainabilityReport on ``trainer.test`` of a small classifier.

    python tests/report_ddp_script.py --devices 2 --out results.json --root DIR [--strategy ddp]

The report goes to ``DIR/report``; every rank writes ``<out>.rank<r>`` (what it logged and holds), global rank zero
also ``<out>``. Not collected by pytest (no ``test_`` prefix); the test imports :func:`run` for the one-process
run on the same data. Under DDP the sample rows travel to rank zero in chunks of a few hundred bytes (many
gather rounds), so that the chunked protocol is exercised.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import reproducible, script_main, trainer_options
from report_helpers import DictDataset, TinyClassifier, make_samples
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import ExplainabilityReport  # noqa: E402
from lightning_attn.report import distributed as report_distributed  # noqa: E402

SAMPLES, BATCH, SEED = 16, 4, 7
REPORT_KWARGS: dict[str, Any] = dict(
    modality_pairs={"a<->b": ("cross_ab", "cross_ba")},
    class_names=["low", "mid", "high"],
    pair_sites=["encoder.layers.1.self_attn", "cross_ba"],
    probe_samples=2,
    figures=False,
)


def loader() -> DataLoader:
    """16 samples in batches of 4, unshuffled: under 2-process DDP each rank gets 8 (every other sample)."""
    return DataLoader(DictDataset(make_samples(SAMPLES, SEED)), batch_size=BATCH, shuffle=False)


def run(devices: int, strategy: str = "auto", out: str | None = None, root: str | None = None) -> dict[str, Any]:
    reproducible()
    assert root is not None
    if devices > 1:
        report_distributed.GATHER_CHUNK_BYTES = 500  # many rounds of the chunked row transfer
    model = TinyClassifier()
    report = ExplainabilityReport(report_dir=os.path.join(root, "report"), **REPORT_KWARGS)
    trainer = pl.Trainer(callbacks=[report], **trainer_options(root, devices=devices, strategy=strategy))
    trainer.test(model, loader(), verbose=False)
    data = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "results": sorted(report.results),
        "directory": report.results["test"]["directory"] if "test" in report.results else None,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("report/")},
    }
    if out is not None:
        with open(f"{out}.rank{trainer.global_rank}", "w") as handle:
            json.dump(data, handle)
        if trainer.is_global_zero:
            with open(out, "w") as handle:
                json.dump(data, handle)
    return data


if __name__ == "__main__":
    torch.set_num_threads(1)
    script_main(run)
