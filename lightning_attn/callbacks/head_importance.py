"""The head-importance pass of :class:`~lightning_attn.HeadSpecializationTracker` (``head_importance=True``).

Lightning evaluates under ``torch.inference_mode``: the step's outputs cannot be differentiated. So, after the
step, the batch is evaluated once more, by the module's own ``validation_step`` / ``test_step``, with grad
enabled and a gate of ones on every head (:class:`~lightning_attn.capture.gates.HeadGates`), and the step's loss
is differentiated with respect to the gates only (``torch.autograd.grad``: no parameter's ``.grad`` is touched).
Cost: one more forward and one backward per evaluated batch, about 3x a plain evaluation step. During that
step ``self.log`` does nothing and the states of the module's torchmetrics are restored afterwards, so nothing
the step logs or accumulates sees the batch twice (other side effects of the step do).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

from lightning_attn.capture.backends import INTERCEPTOR
from lightning_attn.capture.gates import HeadGates

__all__ = ["head_gradients", "step_loss"]


def step_loss(output: Any) -> Tensor:
    """The loss of a step's output: a scalar tensor, ``output["loss"]``, else the cross-entropy of
    ``output["logits"]`` against ``output["target"]``.

    Raises:
        ValueError: when the output holds none of these.
    """
    if isinstance(output, Tensor) and output.numel() == 1:
        return output.reshape(())
    if isinstance(output, Mapping):
        if isinstance(output.get("loss"), Tensor):
            return output["loss"]
        if isinstance(output.get("logits"), Tensor) and isinstance(output.get("target"), Tensor):
            return F.cross_entropy(output["logits"].float(), output["target"])
    found = sorted(output) if isinstance(output, Mapping) else type(output).__name__
    raise ValueError(
        "HeadSpecializationTracker(head_importance=True) needs the evaluation step to return its loss (a scalar "
        f"tensor or {{'loss': ...}}) or {{'logits': ..., 'target': ...}}; it returned {found}"
    )


@contextlib.contextmanager
def _logging_off(pl_module: pl.LightningModule) -> Iterator[None]:
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


@contextlib.contextmanager
def _metric_states_kept(pl_module: pl.LightningModule) -> Iterator[None]:
    """Restore every torchmetrics state of the module (a step that updates its accuracy) on exit."""
    saved = []
    for metric in pl_module.modules():
        if isinstance(metric, Metric):
            states = {
                name: value.clone() if isinstance(value, Tensor) else list(value)
                for name, value in metric.metric_state.items()
            }
            saved.append((metric, states, metric._update_count, metric._computed))
    try:
        yield
    finally:
        for metric, states, count, computed in saved:
            for name, value in states.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


def head_gradients(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batch: Any,
    batch_idx: int,
    dataloader_idx: int,
    stage: str,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Site -> ``[B, H]`` per-sample ``dL(x_b)/d xi_{b,h}`` of the batch, by re-running the module's evaluation step
    with gated heads (see the module docstring).

    The step's loss is taken to be a mean over the ``B`` samples (Lightning's convention): the gradient of sample
    ``b``'s own loss is then ``B`` times the gradient of the batch loss with respect to its gate.
    """
    step = pl_module.validation_step if stage == "validate" else pl_module.test_step
    loaders = trainer.num_val_batches if stage == "validate" else trainer.num_test_batches
    kwargs = {"dataloader_idx": dataloader_idx} if len(loaders) > 1 else {}
    with torch.inference_mode(False), torch.enable_grad():
        batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())  # normal tensors, not inference ones
        with (
            _logging_off(pl_module),
            _metric_states_kept(pl_module),
            HeadGates(pl_module, include, exclude) as heads,
            INTERCEPTOR.exclusive(heads),
        ):
            loss = step_loss(step(batch, batch_idx, **kwargs))
        if not heads.gates:
            rank_zero_warn(
                "HeadSpecializationTracker(head_importance=True) found no head to gate: only attention computed by "
                "scaled_dot_product_attention or nn.MultiheadAttention can be gated (Hugging Face models: use the "
                "default attn_implementation='sdpa', not 'eager')"
            )
            return {}
        grads = torch.autograd.grad(loss, list(heads.gates.values()), allow_unused=True)
    return {
        site: (torch.zeros_like(gate) if grad is None else grad * gate.shape[0]).detach()
        for (site, gate), grad in zip(heads.gates.items(), grads, strict=True)
    }
