"""The scaffold the examples share: a classification LightningModule base and a DataModule base for splits
held as dicts of tensors. Each example file keeps its model, its data and whatever is specific to it.

- :class:`ClassifierModule`: cross-entropy training, ``val``/``test`` steps that log ``<stage>/loss`` and
  ``<stage>/acc`` (``sync_dist=True``, so every rank names the same best checkpoint) and return
  ``{"loss", "logits", "target"}`` for the callbacks, and AdamW with a one-cycle schedule. A subclass writes
  its ``__init__`` and ``forward`` and says how a batch reaches the model in :meth:`~ClassifierModule.logits`.
- :class:`TensorDictDataModule`: ``train``/``val``/``test`` splits built once in ``setup`` from dicts of
  equal-length tensors (batches are dicts with a ``"target"`` key), and their DataLoaders. A subclass
  implements :meth:`~TensorDictDataModule.build_splits`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, StackDataset

SPLITS = ("train", "val", "test")


class ClassifierModule(pl.LightningModule):
    """Base of the example classifiers: the Lightning steps, the logged metrics and the optimizer.

    A subclass defines:

    - ``__init__``: its type-hinted, documented arguments (LightningCLI reads them); it calls
      ``super().__init__()`` and then ``self.save_hyperparameters()``. The default
      :meth:`configure_optimizers` reads the hyperparameters ``lr`` and ``weight_decay``;
    - ``forward``: the model inputs -> logits ``[B, num_classes]``;
    - :meth:`logits`: how a batch dict calls ``forward``.

    Batches are dicts with the class indices under ``"target"``.
    """

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``[B, num_classes]`` of a batch dict (call ``self(...)`` with its model inputs)."""
        raise NotImplementedError(f"{type(self).__name__} must implement logits(batch)")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """Loss and accuracy of a ``val``/``test`` batch, logged as ``<stage>/loss`` and ``<stage>/acc``;
        returns ``{"loss", "logits", "target"}`` (the CalibrationMonitor and the report read the last two)."""
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["target"])
        acc = (logits.argmax(-1) == batch["target"]).float().mean()
        metrics = {f"{stage}/loss": loss, f"{stage}/acc": acc}
        self.log_dict(metrics, prog_bar=True, batch_size=len(logits), sync_dist=True)
        return {"loss": loss, "logits": logits, "target": batch["target"]}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict:
        """AdamW (``hparams.lr``, ``hparams.weight_decay``) with a one-cycle schedule peaking at ``lr``, stepped
        per batch over the whole fit."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TensorDictDataModule(pl.LightningDataModule):
    """Base of the example datamodules: ``train``/``val``/``test`` splits of tensor dicts, built once.

    A subclass calls ``super().__init__()`` and then ``self.save_hyperparameters()`` in its ``__init__``
    (the hyperparameters must include ``batch_size``; ``num_workers`` is optional, default 0) and implements
    :meth:`build_splits`. Batches are dicts of the split's keys (the training set is shuffled).
    """

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, StackDataset] = {}

    def build_splits(self) -> dict[str, dict[str, Tensor]]:
        """``{"train": {...}, "val": {...}, "test": {...}}``: per split, equal-length tensors by batch key
        (one of them ``"target"``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_splits()")

    def seeded_splits(self) -> list[tuple[str, int, int]]:
        """``(split, size, seed)`` for generated data: ``num_train``, ``num_val`` and ``num_test`` samples
        drawn with the seeds ``seed``, ``seed + 1`` and ``seed + 2`` (hyperparameters of the subclass)."""
        hp = self.hparams
        sizes = (hp.num_train, hp.num_val, hp.num_test)
        return [
            (name, count, hp.seed + offset) for offset, (name, count) in enumerate(zip(SPLITS, sizes, strict=False))
        ]

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {name: StackDataset(**tensors) for name, tensors in self.build_splits().items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.get("num_workers", 0)
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
