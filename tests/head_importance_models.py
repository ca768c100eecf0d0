"""A trained toy classifier whose heads carry graded amounts of the signal (head importance tests and DDP script).

Eight scalar features ``x_0..x_7`` (standard normal) are the tokens of a sequence; the target is
``1[sum_j c_j x_j + noise > 0]`` with ``c = (8, 6, 4, 3, 2, 1, 0.5, 0)``. Two parallel attention layers of four heads
see the tokens: head ``h`` of layer 0 (a module calling ``F.scaled_dot_product_attention``) attends only to token
``h``, head ``h`` of layer 1 (``nn.MultiheadAttention``, weights returned: its own path) only to token ``4 + h``
(planted masks). So, once trained, head ``j`` of the model matters as much as ``c_j``.

Run as a script, it is the DDP job of the importance test: ``--devices 2 --out results.json --root DIR``, with the
trained weights read from ``DIR/../trained.pt`` (:data:`WEIGHTS`), written there by the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers import reproducible, script_main, validate_to_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn import HeadSpecializationTracker

LENGTH, HEADS, DIM = 8, 4, 16
WEIGHTS = "trained.pt"
COEFFICIENTS = (8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0)


def one_key_mask(first: int, batch: int) -> torch.Tensor:
    """``[batch * HEADS, L, L]`` additive mask: head ``h`` may attend to key ``first + h`` only."""
    mask = torch.full((HEADS, LENGTH, LENGTH), float("-inf"))
    for h in range(HEADS):
        mask[h, :, first + h] = 0.0
    return mask.repeat(batch, 1, 1)


class OneKeyAttention(nn.Module):
    """Four heads via ``F.scaled_dot_product_attention``; head ``h`` reads token ``h`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        v = self.value(x).view(batch, LENGTH, HEADS, DIM // HEADS).transpose(1, 2)
        q = torch.zeros_like(v)  # scores are the mask alone
        mask = one_key_mask(0, batch).view(batch, HEADS, LENGTH, LENGTH).to(x.dtype)
        out = F.scaled_dot_product_attention(q, q, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(batch, LENGTH, DIM))


class GradedHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, DIM)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, DIM))
        self.sdpa = OneKeyAttention()
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x[..., None]) + self.position
        mask = one_key_mask(HEADS, x.shape[0]).to(hidden.dtype)
        hidden = self.sdpa(hidden) + self.mha(hidden, hidden, hidden, attn_mask=mask)[0]
        return self.head(hidden.mean(1))

    def out_projections(self) -> list[nn.Linear]:
        """The output projections of the two layers: zeroing the columns of head ``h`` removes its output."""
        return [self.sdpa.out, self.mha.out_proj]


class GradedModule(pl.LightningModule):
    """Returns ``{"logits", "target"}`` from ``validation_step`` (the importance pass then uses the cross-entropy)
    and updates a torchmetrics accuracy there (the pass must not count a batch twice)."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.model = GradedHeads()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=2, average="micro")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        self.accuracy.update(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        return {"logits": logits, "target": y}


def make_data(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, LENGTH, generator=generator)
    score = x @ torch.tensor(COEFFICIENTS) + torch.randn(size, generator=generator)
    return x, (score > 0).long()


def trained_module(steps: int = 100) -> GradedModule:
    """The toy model trained full-batch with Adam (a second or two on one CPU), same weights every call."""
    torch.manual_seed(0)
    module = GradedModule()
    x, y = make_data(256, seed=0)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(module.model(x), y).backward()
        optimizer.step()
    for parameter in module.parameters():
        parameter.grad = None
    return module.eval()


def val_loader(size: int = 256, batch_size: int = 32) -> DataLoader:
    return DataLoader(TensorDataset(*make_data(size, seed=1)), batch_size=batch_size, shuffle=False)


def importance_json(tracker: HeadSpecializationTracker) -> dict[str, Any]:
    record = tracker.history_for("val")[-1]
    return {"importance": record["importance"], "importance_normalized": record["importance_normalized"]}


def run(devices: int, strategy: str, out: str, root: str | None) -> None:
    reproducible()
    assert root is not None, "--root DIR: the trained weights are DIR/../trained.pt"
    module = GradedModule()
    module.load_state_dict(torch.load(Path(root).parent / WEIGHTS))
    tracker = HeadSpecializationTracker(
        head_importance=True, probe_samples=0, log_figures=False, export_registry=False, logged_scores=()
    )
    validate_to_json(module.eval(), tracker, val_loader(), importance_json, devices, strategy, out, root)


if __name__ == "__main__":
    script_main(run)
