"""A small model with known gates and known pooling distributions for the ModuleProbe tests; also the DDP script.

    python tests/module_probe_models.py --devices 2 --out results.json [--strategy ddp]

The batch carries the gate logits ``g [B, L, C]`` and the pooling logits ``p [B, L]``, so the probed outputs are
known without running the model: ``layers.<i>.gate`` outputs ``sigmoid((i + 1) * g)``, ``pool.softmax`` outputs
``softmax(p)`` and ``heads_pool.softmax`` outputs ``softmax([p, -p] / t)`` over positions (two "heads").

Not collected by pytest (no ``test_`` prefix); the tests import it (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import reproducible, script_main, validate_to_json
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lightning_attn import ModuleProbe  # noqa: E402

LENGTH, CHANNELS, FEATURES, LAYERS = 6, 4, 3, 2
PROBES = {
    "gate": ("layers.*.gate", "activation"),
    "pool": ("pool.softmax", "weights"),
    "heads": ("heads_pool.softmax", "weights"),
}
TEMPERATURES = (1.0, 0.5)


class GateLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(CHANNELS, CHANNELS)
        self.gate = nn.Sigmoid()


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)


class GatedPoolModule(pl.LightningModule):
    """Embedding, gated residual layers whose gates are ``sigmoid((i + 1) * g)``, one self-attention
    (``attn``, 2 heads), attention pooling with known weights, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, CHANNELS)
        self.layers = nn.ModuleList(GateLayer() for _ in range(LAYERS))
        self.attn = nn.MultiheadAttention(CHANNELS, 2, batch_first=True)
        self.pool = Pool()
        self.heads_pool = Pool()
        self.head = nn.Linear(CHANNELS, 3)

    def forward(self, x: Tensor, gate_logits: Tensor, pool_logits: Tensor) -> Tensor:
        h = self.embed(x)
        for index, layer in enumerate(self.layers):
            h = h + layer.gate(gate_logits * (index + 1)) * layer.proj(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        w = self.pool.softmax(pool_logits)  # [B, L]
        w2 = self.heads_pool.softmax(known_head_logits(pool_logits))  # [B, 2, L]
        pooled = (w[..., None] * h).sum(1) + (w2.mean(1)[..., None] * h).sum(1)
        return self.head(pooled)

    def _loss(self, batch: Any) -> Tensor:
        x, g, p, y = batch
        return nn.functional.cross_entropy(self(x, g, p), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def known_head_logits(pool_logits: Tensor) -> Tensor:
    return torch.stack([pool_logits / TEMPERATURES[0], -pool_logits / TEMPERATURES[1]], dim=1)


def dataset(samples: int = 16, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(samples, LENGTH, FEATURES, generator=generator),
        3.0 * torch.randn(samples, LENGTH, CHANNELS, generator=generator) + torch.linspace(-2, 2, LENGTH)[:, None],
        2.0 * torch.randn(samples, LENGTH, generator=generator),
        torch.randint(0, 3, (samples,), generator=generator),
    )


def loader(samples: int = 16, batch_size: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(samples, seed), batch_size=batch_size)


def results_json(callback: ModuleProbe, key: str = "val") -> dict[str, Any]:
    """The statistics of a run (no probe samples: under DDP they are rank zero's shard)."""
    data = callback.results[key].to_dict()
    return {"sites": data["sites"], "histograms": data["histograms"], "probes": data["probes"]}


def run(devices: int, strategy: str = "auto", out: str | None = None, root: str | None = None) -> dict[str, Any]:
    reproducible()
    module = GatedPoolModule()
    callback = ModuleProbe(PROBES, histogram_sites=["attn"], histogram_bins=10, probe_samples=1, max_figure_sites=2)
    return validate_to_json(module, callback, loader(16, 4), results_json, devices, strategy, out, root)


if __name__ == "__main__":
    script_main(run)
