"""A small vision transformer on scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download).

Each image is cut into 2x2-pixel patches (a 4x4 grid of 16 patch tokens) and a [CLS] token is prepended;
three pre-norm ``nn.TransformerEncoder`` layers with 4 heads classify from the [CLS] output. The attention
sites are ``encoder.layers.<i>.self_attn`` (17 x 17 maps: [CLS] then patches ``r<row>c<col>``).

    python -m lightning_attn.cli fit --config configs/digits_vit.yaml
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ClassifierModule, TensorDictDataModule

#: Axis labels of the 17 tokens: [CLS] and the 4x4 grid of 2x2 patches (``token_names`` of the AttentionLogger).
TOKEN_NAMES = ["CLS"] + [f"r{r}c{c}" for r in range(4) for c in range(4)]


class DigitsDataModule(TensorDictDataModule):
    """scikit-learn's digits, split once with a fixed seed into stratified train/val/test sets.

    Batches are dicts ``{"x": [B, 1, 8, 8] float in [0, 1], "target": [B] long}``.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the 1797 images held out for validation.
        test_fraction: share held out for test.
        seed: seed of the split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_splits(self) -> dict[str, dict[str, Tensor]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        index = torch.arange(len(y)).numpy()
        hp = self.hparams
        rest, test = train_test_split(index, test_size=hp.test_fraction, stratify=y, random_state=hp.seed)
        train, val = train_test_split(
            rest, test_size=hp.val_fraction / (1 - hp.test_fraction), stratify=y[rest], random_state=hp.seed
        )
        splits = {"train": torch.as_tensor(train), "val": torch.as_tensor(val), "test": torch.as_tensor(test)}
        return {name: {"x": x[idx], "target": y[idx]} for name, idx in splits.items()}


class DigitsViT(ClassifierModule):
    """ViT classifier: patch embedding, [CLS] token, learned positions, ``nn.TransformerEncoder``.

    Args:
        patch_size: side of the square patches (8 must be divisible by it).
        d_model: token width.
        num_heads: attention heads per layer.
        num_layers: encoder layers.
        dim_feedforward: hidden width of the feed-forward blocks.
        dropout: dropout in the encoder layers.
        num_classes: output classes.
        lr: peak learning rate of AdamW (one-cycle schedule).
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        patch_size: int = 2,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 3,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if 8 % patch_size:
            raise ValueError(f"patch_size must divide 8, got {patch_size}")
        num_patches = (8 // patch_size) ** 2
        self.patch_embed = nn.Conv2d(1, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 1, 8, 8]`` -> logits ``[B, num_classes]``."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, d_model], row-major grid
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.encoder(tokens)[:, 0])

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch["x"])
