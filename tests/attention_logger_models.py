"""Small models and data for the AttentionLogger tests; also the DDP script they run as a subprocess.

    python tests/attention_logger_models.py --devices 2 --out results.json [--strategy ddp]

Not collected by pytest (no ``test_`` prefix); the tests import it (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import reproducible, script_main, validate_to_json
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
    reproducible()
    module = CrossModalModule()
    callback = AttentionLogger(chunk_size=4, modality_pairs=PAIRS, probe_samples=1, max_figure_sites=2)
    return validate_to_json(module, callback, loader(16, 4), results_json, devices, strategy, out, root)


if __name__ == "__main__":
    script_main(run)
