"""DDP scenarios that must equal one process, for every callback that streams per-site sums (AttentionLogger,
HeadSpecializationTracker, ModuleProbe, all at once); also their DDP script, which runs them all in one process
group and writes rank zero's results (keyed by site name) to a JSON file::

    python tests/ddp_scenarios.py --out results.json

Sites that depend on the data (:func:`run_sites`): two blocks, ``first`` and ``second``, each a 2-head
self-attention with a gate. A batch goes through ``first`` only when it holds a flagged sample (a block skipped by
the data: mixture of experts, modality dropout, early exit), so the sites a process meets, and their order, depend
on which samples it gets. Under 2-rank DDP (Lightning's unshuffled ``DistributedSampler``: rank ``r`` gets samples
``r, r + 2, ...``):

- ``skip``: samples 0, 2, 4, 6 are not flagged: rank 0's first batch skips ``first``, so rank 0 meets ``second``
  first and rank 1 meets ``first`` first;
- ``one_rank``: only samples 5 and 9 are flagged: rank 1 sees ``first``, rank 0 never does.

The one process runs the ranks' batches one after the other (rank 0's, then rank 1's): the same samples in the
same batches.

Uneven shards (:func:`run_uneven`): three validation loaders split without repeating a sample, 37 samples in
batches of 2 and 11 in batches of 3 (rank 0 gets 19 and 6 samples, rank 1 18 and 5: different numbers of batches)
and 1 sample (rank 1 gets no batch of that loader), against one process over the same loaders; with a
CalibrationMonitor too (rank 1 joins the one-sample loader's reduction with an empty metric).

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import attention_logger_models as models
import lightning.pytorch as pl
import torch
from helpers import end_process_group, reproducible, trainer_options
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import AttentionLogger, CalibrationMonitor, HeadSpecializationTracker, ModuleProbe  # noqa: E402

SAMPLES, BATCH, LENGTH, DIM = 16, 4, 5, 8
UNFLAGGED = {"skip": {0, 2, 4, 6}, "one_rank": set(range(SAMPLES)) - {5, 9}}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return x + self.gate(out) * out


class SkippingModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.first = Block()
        self.second = Block()

    def forward(self, x: Tensor, flag: Tensor) -> Tensor:
        if bool(flag.any()):
            x = self.first(x)
        return self.second(x)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self(batch["x"], batch["flag"])


class FlaggedData(torch.utils.data.Dataset):
    def __init__(self, scenario: str) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, LENGTH, DIM, generator=generator)
        self.feature = torch.randn(SAMPLES, generator=generator)
        self.flag = torch.tensor([i not in UNFLAGGED[scenario] for i in range(SAMPLES)])

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x[index], "flag": self.flag[index], "feature": self.feature[index]}


def callbacks() -> list[Any]:
    # overhead_budget=None: the one process runs both ranks' batches, compared over all of them
    return [
        AttentionLogger(chunk_size=2, probe_samples=0, log_figures=False, overhead_budget=None),
        HeadSpecializationTracker(
            features={"feature": "feature"},
            probe_samples=0,
            log_figures=False,
            export_registry=False,
            overhead_budget=None,
        ),
        ModuleProbe(
            probes={"gate": ("*.gate", "activation")},
            histogram_sites=["*"],
            probe_samples=0,
            log_figures=False,
            overhead_budget=None,
        ),
    ]


def results_json(attention: AttentionLogger, heads: HeadSpecializationTracker, probe: ModuleProbe) -> dict[str, Any]:
    """Every streamed result, keyed by site name (the order of sites is a rank's order of first sight)."""
    attn = attention.results["val"]
    record = heads.history_for("val")[-1]
    probes = probe.results["val"]
    return {
        "attn": {
            site: {
                "rows": attn.rows[i].tolist(),
                **{name: attn.mean[name][i].tolist() for name in attn.statistics},
                **{f"{name}_std": attn.std[name][i].tolist() for name in attn.statistics},
            }
            for i, site in enumerate(attn.sites)
        },
        "heads": {
            site: {
                "rows": record["rows"][site],
                **record["statistics"][site],
                **record["type_scores"][site],
                **record["correlations"][site],
            }
            for site in record["rows"]
        },
        "probe": {
            site: {"mean": s.mean, "std": s.std, "channel_mean": s.channel_mean.tolist()}
            for site, s in probes.activations.items()
        },
        "histograms": {site: counts.tolist() for site, counts in probes.histograms.items()},
    }


def run_sites(
    scenario: str, devices: int, strategy: str = "auto", root: str | None = None
) -> tuple[pl.Trainer, dict[str, Any]]:
    reproducible()
    module = SkippingModule()
    attention, heads, probe = callbacks()
    trainer = pl.Trainer(
        callbacks=[attention, heads, probe], **trainer_options(root, devices=devices, strategy=strategy)
    )
    data: torch.utils.data.Dataset = FlaggedData(scenario)
    if devices == 1:  # the ranks' shards in turn
        data = torch.utils.data.Subset(data, [*range(0, SAMPLES, 2), *range(1, SAMPLES, 2)])
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    trainer.validate(module, loader, verbose=False)
    return trainer, results_json(attention, heads, probe)


class Shard(torch.utils.data.IterableDataset):
    """The samples ``r, r + 2, ...`` of a dataset on rank ``r`` (all of them in one process), streamed: no repeats (with
    which Lightning's sampler pads a shorter shard, samples one process would not see), and possibly none (Lightning
    refuses a sized loader without batches, not a stream)."""

    def __init__(self, data: torch.utils.data.Dataset, samples: int) -> None:
        self.data, self.samples = data, samples

    def __iter__(self) -> Iterator[Any]:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        return (self.data[index] for index in range(rank, self.samples, world))


class ThreeLoaderModule(models.CrossModalModule):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        eeg, spec, y = batch
        return {"logits": self(eeg, spec), "target": y}  # for the CalibrationMonitor

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [
            torch.utils.data.DataLoader(Shard(models.dataset(samples, seed), samples), batch_size=batch_size)
            for samples, batch_size, seed in ((37, 2, 0), (11, 3, 1), (1, 1, 2))
        ]


def run_uneven(devices: int, strategy: str = "auto", root: str | None = None) -> tuple[pl.Trainer, dict[str, Any]]:
    reproducible()
    module = ThreeLoaderModule()
    # overhead_budget=None: uneven shards, the one process has other batch counts than the ranks
    callbacks: list[Any] = [
        AttentionLogger(chunk_size=2, probe_samples=0, log_figures=False, overhead_budget=None),
        HeadSpecializationTracker(probe_samples=0, log_figures=False, export_registry=False, overhead_budget=None),
        ModuleProbe(
            probes={"ff": ("encoder.layers.*.linear1", "activation")},
            probe_samples=0,
            log_figures=False,
            overhead_budget=None,
        ),
        CalibrationMonitor(task="multiclass", num_classes=3, n_bins=5, bootstrap=0, plot=False),
    ]
    options = trainer_options(root, devices=devices, strategy=strategy, use_distributed_sampler=False)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.validate(module, verbose=False)
    attention, heads, probe, calibration = callbacks
    stages = ("val", "val_dl1", "val_dl2")
    return trainer, {
        "attn": {key: attention.results[key].to_dict() for key in stages},
        "heads": {key: heads.history_for(key)[-1] for key in stages},
        "probe": {key: probe.results[key].to_dict() for key in stages},
        "calibration": {key: calibration.results[key]["metrics"] for key in stages},
    }


if __name__ == "__main__":  # every scenario, one process group
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=None)
    arguments = parser.parse_args()
    results = {}
    for scenario in sorted(UNFLAGGED):
        trainer, results[scenario] = run_sites(scenario, devices=2, strategy="ddp", root=arguments.root)
        results[scenario]["world_size"] = trainer.world_size
    trainer, results["uneven"] = run_uneven(devices=2, strategy="ddp", root=arguments.root)
    results["uneven"]["world_size"] = trainer.world_size
    if trainer.is_global_zero:
        with open(arguments.out, "w") as handle:
            json.dump(results, handle)
    end_process_group()
