"""A StockFormer-shaped time-series classifier: gated cross-attention to a market context and attention pooling.

Generated data (no download): each sample is a 32-step window of one stock's returns and of the market's.
The volatility regime decides what predicts the next move:

- calm stocks (low volatility): their own recent momentum (the last 8 steps);
- volatile stocks: the market's drift, visible only in the context sequence.

So a model that learned the task should open its gates to the market context more on volatile samples, and
pool mostly over recent steps. The batch dict carries the sample's realized volatility under ``"volatility"``
(a semantic per-sample feature for the HeadSpecializationTracker's registry) next to ``"x"`` (stock features
``[B, 32, 3]``), ``"context"`` (market features ``[B, 32, 3]``) and ``"target"`` (1 = up).

Module names are stable so probes can find them: ``context_encoder`` (self-attention over the market),
``layers.<i>.self_attn``, ``layers.<i>.cross_attn`` (stock queries over market keys), ``layers.<i>.gate``
(``nn.Sequential(nn.Linear, nn.Sigmoid)``: how much market context enters each step and channel), and
``pool.softmax`` (an ``nn.Softmax`` module: the attention-pooling weights over time).

    python -m lightning_attn.cli fit --config configs/stockformer.yaml
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ClassifierModule, TensorDictDataModule

WINDOW = 32
RECENT = 8


def make_windows(count: int, seed: int) -> dict[str, Tensor]:
    """``count`` samples: ``x``, ``context`` ``[count, WINDOW, 3]``, ``volatility`` and ``target`` ``[count]``."""
    g = torch.Generator().manual_seed(seed)
    vol = torch.exp(torch.empty(count, 1).uniform_(-0.7, 0.9, generator=g))  # regime volatility 0.5 .. 2.5
    weight = torch.sigmoid((vol - 1.2) * 6.0)  # 0: calm (own momentum matters), 1: volatile (market matters)
    market_drift = 0.35 * torch.randn(count, 1, generator=g)
    market = market_drift + torch.randn(count, WINDOW, generator=g)
    momentum = 0.5 * torch.randn(count, 1, generator=g)
    steps = torch.arange(WINDOW)
    recent = (steps >= WINDOW - RECENT).float()  # own momentum shows only in the last steps
    beta = 0.3 + 0.7 * weight
    stock = beta * market + vol * torch.randn(count, WINDOW, generator=g) + momentum * vol * recent
    score = (1 - weight) * momentum + weight * market_drift / 0.35 * 0.5
    target = (score + 0.1 * torch.randn(count, 1, generator=g) > 0).long().squeeze(1)

    def features(series: Tensor) -> Tensor:  # return, its size, cumulative return (scaled)
        return torch.stack([series, series.abs(), series.cumsum(1) / WINDOW**0.5], dim=-1)

    return {
        "x": features(stock),
        "context": features(market),
        "volatility": stock.std(dim=1),
        "target": target,
    }


def forward_logits(pl_module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """How the ExplainabilityReport calls the model (``forward_fn``): the batch also carries ``volatility``
    and ``target``, which are not model inputs."""
    return pl_module(batch["x"], batch["context"])


class MarketDataModule(TensorDictDataModule):
    """Generated stock and market windows; batches ``{"x", "context", "volatility", "target"}``.

    Args:
        num_train: training windows.
        num_val: validation windows.
        num_test: test windows.
        batch_size: samples per batch.
        seed: seed of the generator (train, val and test use seed, seed + 1, seed + 2).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 1000,
        num_test: int = 1000,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_splits(self) -> dict[str, dict[str, Tensor]]:
        return {name: make_windows(count, seed) for name, count, seed in self.seeded_splits()}


class GatedCrossAttentionLayer(nn.Module):
    """Self-attention over the stock, then market cross-attention entering through a sigmoid gate, then a
    feed-forward block (pre-norm residuals): ``x += gate([h, c]) * c`` with ``c = cross_attn(h, context)``."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.gate = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.Sigmoid())
        self.norm3 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim_feedforward, d_model)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x)
        c = self.cross_attn(h, context, context, need_weights=False)[0]
        x = x + self.gate(torch.cat([h, c], dim=-1)) * c
        return x + self.ffn(self.norm3(x))


class AttentionPool(nn.Module):
    """Learned attention pooling over time: ``softmax_t(w . x_t)``-weighted sum of the steps."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.softmax(self.score(x).squeeze(-1))  # [B, T]
        return (weights.unsqueeze(-1) * x).sum(1)


class StockFormer(ClassifierModule):
    """Stock sequence with gated cross-attention to an encoded market sequence, attention pooling, up/down head.

    Args:
        stock_features: features per stock step.
        context_features: features per market step.
        d_model: token width.
        num_heads: heads of every attention layer.
        num_layers: gated cross-attention layers.
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout rate.
        num_classes: output classes (2: down/up).
        lr: peak learning rate of AdamW (one-cycle schedule).
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        stock_features: int = 3,
        context_features: int = 3,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        num_classes: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stock_embed = nn.Linear(stock_features, d_model)
        self.context_embed = nn.Linear(context_features, d_model)
        self.pos = nn.Parameter(torch.randn(1, WINDOW, d_model) * 0.02)
        self.context_encoder = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.ModuleList(
            GatedCrossAttentionLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPool(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """``x [B, T, stock_features]``, ``context [B, T, context_features]`` -> logits ``[B, num_classes]``."""
        ctx = self.context_encoder(self.context_embed(context) + self.pos)
        h = self.stock_embed(x) + self.pos
        for layer in self.layers:
            h = layer(h, ctx)
        return self.head(self.pool(self.norm(h)))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return forward_logits(self, batch)
