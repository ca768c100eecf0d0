"""The planted-heads model of the HeadSpecializationTracker tests (imported by the DDP test's subprocess script and
the head-role tests too): two parallel attention layers calling ``F.scaled_dot_product_attention`` with per-head
additive float masks:

- layer 0: h0 previous token, h1 first token (sink), h2 uniform, h3 attention on token 1 growing as the per-sample
  ``ttc`` falls (a "Safety Head"), h4 and h5 random (q k^T from random projections);
- layer 1: h0 previous token (a duplicate of layer 0's h0), h1 induction, h2 duplicate token, h3-h5 random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers import trainer_options
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_attn import HeadSpecializationTracker

LENGTH, HEADS, HEAD_DIM, VOCAB = 16, 6, 8, 5
EMBED = HEADS * HEAD_DIM
LAYER_PLANS = (
    ("previous", "sink", "uniform", "feature", "random", "random"),
    ("previous", "induction", "duplicate", "random", "random", "random"),
)
EXPECTED_LABELS = (
    ["Previous-token head", "Sink head", "Broad head", "Safety Head", "General context", "General context"],
    [
        "Previous-token head",
        "Induction head",
        "Duplicate-token head",
        "General context",
        "General context",
        "General context",
    ],
)
FEATURES = {"ttc": "ttc", "distance": "dist"}


# -- the planted model ---------------------------------------------------------------------------------------


def planted_masks(plan: tuple[str, ...], ids: torch.Tensor, ttc: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, L]`` additive masks that make each planted head's pattern (0 = allowed, -inf = masked)."""
    batch, length = ids.shape
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    neg = float("-inf")
    masks = torch.zeros(batch, len(plan), length, length)
    eye = query == key
    for h, kind in enumerate(plan):
        if kind == "previous":
            allowed = (key == query - 1) | ((query == 0) & (key == 0))
            masks[:, h] = torch.where(allowed, 0.0, neg)
        elif kind == "sink":
            masks[:, h] = torch.where(key == 0, 0.0, neg).expand(length, length)
        elif kind == "feature":  # bias on key 1 from 5 (ttc = 0) down to 1 (ttc = 2): token 1 always the max
            masks[:, h, :, 1] = (5.0 - 2.0 * ttc)[:, None]
        elif kind in ("induction", "duplicate"):
            if kind == "duplicate":
                allowed = (ids[:, :, None] == ids[:, None, :]) & (key < query)
            else:
                shifted = torch.cat([ids[:, :1], ids[:, :-1]], 1)
                allowed = (ids[:, :, None] == shifted[:, None, :]) & (key >= 1) & (key <= query)
            allowed = allowed | (~allowed.any(-1, keepdim=True) & eye)  # rows without a target attend to themselves
            masks[:, h] = torch.where(allowed, 0.0, neg)
    return masks


class PlantedAttention(nn.Module):
    def __init__(self, plan: tuple[str, ...]) -> None:
        super().__init__()
        self.plan = plan
        self.qk = nn.Linear(EMBED, 2 * EMBED, bias=False)
        nn.init.normal_(self.qk.weight, std=0.2)
        self.value = nn.Linear(EMBED, EMBED)
        self.register_buffer("random_heads", torch.tensor([kind == "random" for kind in plan]), persistent=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, ttc: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q, k = self.qk(x).view(batch, LENGTH, 2, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        v = self.value(x).view(batch, LENGTH, HEADS, HEAD_DIM).transpose(1, 2)
        q = q * self.random_heads[None, :, None, None]  # planted heads: scores are their mask alone
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=planted_masks(self.plan, ids, ttc).to(x.dtype))
        return out.transpose(1, 2).reshape(batch, LENGTH, EMBED)


class PlantedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.position = nn.Parameter(torch.randn(LENGTH, EMBED))
        self.layers = nn.ModuleList([PlantedAttention(plan) for plan in LAYER_PLANS])
        self.out = nn.Linear(EMBED, 1)

    def forward(self, ids: torch.Tensor, ttc: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids) + self.position
        hidden = sum(layer(x, ids, ttc) for layer in self.layers)  # parallel: random heads never see ttc
        return self.out(hidden.mean(1)).squeeze(-1)


class PlantedModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = PlantedModel()

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.model(batch["input_ids"], batch["ttc"]), batch["ttc"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class PlantedData(Dataset):
    """Token ids (vocabulary of 5: many duplicates), ``ttc`` in [0, 2], an unrelated ``dist``, and
    ``agent_mask`` marking token 1 (the token the feature head attends to)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
        self.ttc = 2 * torch.rand(size, generator=generator)
        self.dist = 50 * torch.rand(size, generator=generator)
        self.agent_mask = torch.zeros(size, LENGTH, dtype=torch.bool)
        self.agent_mask[:, 1] = True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[index],
            "ttc": self.ttc[index],
            "dist": self.dist[index],
            "agent_mask": self.agent_mask[index],
        }


def make_module(seed: int = 0) -> PlantedModule:
    torch.manual_seed(seed)
    return PlantedModule()


def make_loader(size: int = 256, seed: int = 1, batch_size: int = 32) -> DataLoader:
    return DataLoader(PlantedData(size, seed), batch_size=batch_size, shuffle=False)


def trainer_kwargs(root: Path, **overrides: Any) -> dict[str, Any]:
    return trainer_options(root, **{"num_sanity_val_steps": 0, **overrides})


def summarize(tracker: HeadSpecializationTracker, stage: str = "val") -> dict[str, Any]:
    """The streamed (DDP-global) part of the latest record, for comparisons: no redundancy clusters."""
    record = tracker.history_for(stage)[-1]
    keep = ("sites", "rows", "statistics", "type_scores", "correlations", "hsi", "primary_feature", "labels")
    return json.loads(json.dumps({k: record[k] for k in keep}, default=str).replace("NaN", "null"))
