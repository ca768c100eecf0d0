"""``HeadImportance``: Michel et al.'s ``E_x |dL(x)/d xi_h|`` per head, as sum-reduced states."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_attn.metrics._sites import SiteSums

__all__ = ["HeadImportance"]


class HeadImportance(SiteSums):
    """Per site, the sum over samples of ``|dL(x)/d xi_h|`` for each head ``h`` and the number of samples.

    The gradients come from per-sample gates (:class:`~lightning_attn.capture.gates.HeadGates`); the states are
    sums, so that under DDP the sums over ranks equal one process's over the same samples.

    Example:
        >>> metric = HeadImportance()
        >>> metric.update("layer0", torch.tensor([[0.5, -1.0], [1.5, 0.0]]))
        >>> metric.compute()["layer0"].tolist()
        [1.0, 0.5]
    """

    def update(self, site: str, per_sample: Tensor) -> None:
        """Add ``per_sample`` gradients ``[B, H]`` (``dL(x_b)/d xi_{b,h}``) of ``site``."""
        heads = per_sample.shape[-1]
        state = self._site_state(site, (heads + 1,), per_sample.device, size=heads)
        state[:heads] += per_sample.detach().abs().sum(0).to(state.dtype)
        state[heads] += per_sample.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Site -> ``[H]`` mean over samples of ``|dL(x)/d xi_h|`` (NaN for a site that saw no sample)."""
        out: dict[str, Tensor] = {}
        for site, state in self._site_states():
            samples = state[-1]
            out[site] = state[:-1] / samples if samples > 0 else torch.full_like(state[:-1], float("nan"))
        return out
