"""Small models and data for the AttentionLogger tests; also the DDP script they run as a subprocess.

    python tests/attention_logger_models.py --devices 2 --out results.json [--strategy ddp]

Not collected by pytest (no ``test_`` prefix); the tests import it by path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import AttentionLogger  # noqa: E402

EEG_LEN, SPEC_LEN, FEATURES, DIM = 6, 5, 4, 16
PAIRS = {"eeg<->spec": ("eeg_to_spec", "spec_to_eeg")}


class CrossModalModule(pl.LightningModule):
    """An encoder over one modality (nn.TransformerEncoder, fused fast path in eval) and two cross-attentions:
    ``eeg_to_spec`` through SDPA (need_weights=False), ``spec_to_eeg`` returning its weights."""

    def __init__(self, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.eeg_in = nn.Linear(FEATURES, DIM)
        self.spec_in = nn.Linear(FEATURES, DIM)
        layer = nn.TransformerEncoderLayer(DIM, heads, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.eeg_to_spec = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.spec_to_eeg = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = nn.Linear(DIM, 3)

    def forward(self, eeg: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        e = self.encoder(self.eeg_in(eeg))
        s = self.spec_in(spec)
        a, _ = self.eeg_to_spec(e, s, s, need_weights=False)
        b, _ = self.spec_to_eeg(s, e, e)
        return self.head(a.mean(1) + b.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        eeg, spec, y = batch
        loss = nn.functional.cross_entropy(self(eeg, spec), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        eeg, spec, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(eeg, spec), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        eeg, spec, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(eeg, spec), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def dataset(samples: int = 16, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(samples, EEG_LEN, FEATURES, generator=generator),
        torch.randn(samples, SPEC_LEN, FEATURES, generator=generator),
        torch.randint(0, 3, (samples,), generator=generator),
    )


def loader(samples: int = 16, batch_size: int = 4, seed: int = 0, shuffle: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(samples, seed), batch_size=batch_size, shuffle=shuffle)


def results_json(callback: AttentionLogger, key: str = "val") -> dict[str, Any]:
    results = callback.results[key]
    return {
        "sites": results.sites,
        "mean": {k: v.tolist() for k, v in results.mean.items()},
        "std": {k: v.tolist() for k, v in results.std.items()},
        "rows": results.rows.tolist(),
        "top_attended": results.top_attended,
        "top_attending": results.top_attending,
        "agreement": results.agreement,
    }


def run(devices: int, strategy: str = "auto", out: str | None = None, root: str | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny model: parallel regions only add waiting, and ranks share the cores
    pl.seed_everything(0, workers=True, verbose=False)
    module = CrossModalModule()
    callback = AttentionLogger(chunk_size=4, modality_pairs=PAIRS, probe_samples=1, max_figure_sites=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback], default_root_dir=root,
    )
    trainer.validate(module, loader(16, 4))
    data = results_json(callback)
    data["world_size"] = trainer.world_size
    if out is not None and trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump(data, handle)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", default=None)
    arguments = parser.parse_args()
    run(arguments.devices, arguments.strategy, arguments.out, arguments.root)
