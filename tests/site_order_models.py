"""A model whose attention sites depend on the data, for the DDP site-agreement tests; also their DDP script.

    python tests/site_order_models.py --out results.json

Two blocks, ``first`` and ``second``, each a 2-head self-attention with a gate. A batch goes through ``first``
only when it holds a flagged sample (a block skipped by the data: mixture of experts, modality dropout, early
exit), so the sites a process meets, and their order, depend on which samples it gets. Under 2-rank DDP
(Lightning's unshuffled ``DistributedSampler``: rank ``r`` gets samples ``r, r + 2, ...``):

- ``skip``: samples 0, 2, 4, 6 are not flagged: rank 0's first batch skips ``first``, so rank 0 meets ``second``
  first and rank 1 meets ``first`` first;
- ``one_rank``: only samples 5 and 9 are flagged: rank 1 sees ``first``, rank 0 never does.

Every callback that streams per-site sums runs at once (AttentionLogger, HeadSpecializationTracker, ModuleProbe);
rank zero writes their results keyed by site name. The one process runs the ranks' batches one after the other
(rank 0's, then rank 1's): the same samples in the same batches. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import end_process_group, reproducible, trainer_options
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import AttentionLogger, HeadSpecializationTracker, ModuleProbe  # noqa: E402

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
    return [
        AttentionLogger(chunk_size=2, probe_samples=0, log_figures=False),
        HeadSpecializationTracker(
            features={"feature": "feature"}, probe_samples=0, log_figures=False, export_registry=False
        ),
        ModuleProbe(
            probes={"gate": ("*.gate", "activation")}, histogram_sites=["*"], probe_samples=0, log_figures=False
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


def run(
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


if __name__ == "__main__":  # both scenarios, one process group
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=None)
    arguments = parser.parse_args()
    results = {}
    for scenario in sorted(UNFLAGGED):
        trainer, results[scenario] = run(scenario, devices=2, strategy="ddp", root=arguments.root)
        results[scenario]["world_size"] = trainer.world_size
    if trainer.is_global_zero:
        with open(arguments.out, "w") as handle:
            json.dump(results, handle)
    end_process_group()
