"""Small models and data for the report tests (importable by the report command through class paths
``report_helpers.TinyClassifier`` / ``report_helpers.TinyData`` with ``tests/`` on ``sys.path``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

A_LEN, B_LEN, A_FEATURES, B_FEATURES, NUM_CLASSES = 6, 4, 5, 3, 3


def make_samples(count: int, seed: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(count, A_LEN, A_FEATURES, generator=generator)
    b = torch.randn(count, B_LEN, B_FEATURES, generator=generator)
    label = (a[..., 0].mean(1) > 0).long() + (b[..., 1].mean(1) > 0).long()
    return [{"a": a[i], "b": b[i], "label": label[i]} for i in range(count)]


class DictDataset(Dataset):
    def __init__(self, samples: list[dict[str, Tensor]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.samples[index]


class TinyData(pl.LightningDataModule):
    """Two modalities ``a`` [A_LEN, A_FEATURES] and ``b`` [B_LEN, B_FEATURES]; three classes.

    Args:
        num_train: training samples.
        num_test: test (and validation) samples.
        batch_size: batch size.
        seed: data seed.
        with_targets: batches carry ``label`` (False: inputs only, for the no-target error).
    """

    def __init__(
        self, num_train: int = 64, num_test: int = 40, batch_size: int = 16, seed: int = 0, with_targets: bool = True
    ) -> None:
        super().__init__()
        self.num_train = num_train
        self.num_test = num_test
        self.batch_size = batch_size
        self.seed = seed
        self.with_targets = with_targets

    def _loader(self, count: int, seed: int) -> DataLoader:
        samples = make_samples(count, seed)
        if not self.with_targets:
            samples = [{"a": s["a"], "b": s["b"]} for s in samples]
        return DataLoader(DictDataset(samples), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.num_train, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.num_test, self.seed + 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.num_test, self.seed + 2)


class TinyClassifier(pl.LightningModule):
    """Self-attention over ``a`` (2 encoder layers), cross-attention a->b and b->a, mean pooling, linear head.

    Args:
        d_model: width.
        num_heads: heads per attention.
        num_classes: classes.
        step_returns_logits: ``test_step`` returns ``{"logits", "loss"}`` (else only the loss tensor).
        lr: learning rate.
    """

    def __init__(
        self,
        d_model: int = 16,
        num_heads: int = 2,
        num_classes: int = NUM_CLASSES,
        step_returns_logits: bool = True,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed_a = nn.Linear(A_FEATURES, d_model)
        self.embed_b = nn.Linear(B_FEATURES, d_model)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross_ab = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.cross_ba = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.head = nn.Linear(2 * d_model, num_classes)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha = self.encoder(self.embed_a(a))
        hb = self.embed_b(b)
        a2, _ = self.cross_ab(ha, hb, hb)
        b2, _ = self.cross_ba(hb, ha, ha)
        return self.head(torch.cat([a2.mean(1), b2.mean(1)], dim=-1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self(batch["a"], batch["b"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def _eval(self, batch: dict[str, Tensor]) -> Any:
        logits = self(batch["a"], batch["b"])
        if "label" not in batch:
            return {"logits": logits} if self.hparams.step_returns_logits else None
        loss = nn.functional.cross_entropy(logits, batch["label"])
        return {"logits": logits, "loss": loss} if self.hparams.step_returns_logits else loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        return self._eval(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        return self._eval(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class OneFeatureModel(nn.Module):
    """Classifier whose output depends on input feature ``feature`` only (every other feature is multiplied
    by an exact zero before anything else), with self-attention in between."""

    def __init__(self, num_features: int = 5, feature: int = 2, d_model: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        mask = torch.zeros(num_features)
        mask[feature] = 1.0
        self.register_buffer("mask", mask)
        self.embed = nn.Linear(num_features, d_model)
        self.attn = nn.MultiheadAttention(d_model, 2, batch_first=True)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x * self.mask)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out.mean(1))


def entry(checkpoint: str | None = None) -> tuple[nn.Module, DataLoader]:
    """Entry point for ``lightning-attn report --entry report_helpers:entry``: the model (weights from
    ``checkpoint``) and the test dataloader."""
    if checkpoint is None:
        model = TinyClassifier()
    else:
        model = TinyClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    return model, TinyData().test_dataloader()


def fit_checkpoint(directory: str, epochs: int = 1) -> str:
    """Fit ``TinyClassifier`` on ``TinyData`` for ``epochs`` and return the checkpoint path."""
    pl.seed_everything(0, workers=True)
    model = TinyClassifier()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=TinyData())
    path = f"{directory}/tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


# -- fakes of the calibration and head-specialization callbacks (duck-typed: .results / registry()) ---------------
class FakeCalibrationMonitor(pl.Callback):
    """Stands for a calibration callback: ``results`` keyed by stage key."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results["test"] = {
            "metrics": {"ece": 0.125, "brier": 0.5},
            "bins": {"count": torch.tensor([1.0, 2.0, float("nan")])},
        }


class FakeHeadSpecializationTracker(pl.Callback):
    """Stands for a head-specialization callback: ``registry(stage)``."""

    def registry(self, stage: str = "val") -> dict[str, Any]:
        return {
            "stage": stage,
            "layers": [
                {
                    "site": "encoder.layers.0.self_attn",
                    "heads": [{"head": 0, "label": "previous-token", "types": ["previous_token"], "hsi": 0.5}],
                }
            ],
        }


_SHARED: dict[str, Any] = {}


def shared_report(directory: str) -> dict[str, Any]:
    """One full report (figures included) of an untrained TinyClassifier on TinyData's test set, built once per
    session and shared by the report tests: ``{"dir": Path, "num_samples": int, "model": TinyClassifier}``."""
    if "dir" not in _SHARED:
        from pathlib import Path

        from lightning_attn import build_report

        torch.manual_seed(0)
        model = TinyClassifier()
        data = TinyData(num_test=40, batch_size=16)
        out = build_report(
            model,
            data.test_dataloader(),
            Path(directory) / "shared",
            accelerator="cpu",
            progress=False,
            callbacks=[FakeCalibrationMonitor(), FakeHeadSpecializationTracker()],
            modality_pairs={"a<->b": ("cross_ab", "cross_ba")},
            feature_names={"a": [f"a{i}" for i in range(A_FEATURES)], "b": ["b0", "b1", "b2"]},
            class_names=["low", "mid", "high"],
            pair_sites=["encoder.layers.1.self_attn", "cross_ba"],
            probe_samples=3,
        )
        _SHARED.update(dir=out, num_samples=40, model=model)
    return _SHARED
