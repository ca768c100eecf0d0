"""What the streaming metrics share: sum-reduced states added per site (or pair) on first sight."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SiteSums", "state_dtype"]


def state_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sums: float64, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class SiteSums(Metric):
    """Base of the metrics that keep sum-reduced states per site (or pair), created on the site's first update.

    The sites are not known before the first forward pass, so a state is added there: zeros of the state
    dtype (:func:`state_dtype`) on the device of the data, ``dist_reduce_fx="sum"`` (under DDP, the sums over
    ranks equal one process's sums over the same samples), in order of first sight (``site_0``, ``site_1`` ...).

    Attributes:
        sites: site -> its size (number of heads, or channels), in order of first sight; only for the
            states created with a ``size``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sites: dict[str, int] = {}
        self._state_names: dict[str, Any] = {}  # site -> the name(s) of its state(s)

    def _add_sums(self, name: str, shape: tuple[int, ...], device: torch.device) -> None:
        with torch.inference_mode(False):  # a normal tensor: usable after the evaluation loop too
            self.add_state(name, torch.zeros(shape, dtype=state_dtype(device), device=device), dist_reduce_fx="sum")

    def _site_state(self, site: str, shape: tuple[int, ...], device: torch.device, size: int | None = None,
                    unit: str = "heads", prefix: str = "site") -> Tensor:
        """The state of ``site``, zeros of ``shape`` on first sight. A ``size`` (heads) is recorded in
        :attr:`sites` on first sight and must not change afterwards (``ValueError`` naming the ``unit``)."""
        name = self._state_names.get(site)
        if name is None:
            name = f"{prefix}_{len(self._state_names)}"
            self._add_sums(name, shape, device)
            self._state_names[site] = name
            if size is not None:
                self.sites[site] = size
        elif size is not None and self.sites[site] != size:
            raise ValueError(f"site {site!r} had {self.sites[site]} {unit}, now {size}")
        return getattr(self, name)

    def _site_states(self) -> Iterator[tuple[str, Tensor]]:
        """``(site, state)`` in order of first sight."""
        for site, name in self._state_names.items():
            yield site, getattr(self, name)
