"""What the streaming metrics share: sum-reduced states added per site (or pair) on first sight, agreed by name
across DDP ranks before every reduction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SiteSums", "state_dtype"]

#: One state per name of a site: its shape, or ``None`` where the site has no such state.
Layout = dict[str, "tuple[int, ...] | None"]


def state_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the sums: float64, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class SiteSums(Metric):
    """Base of the metrics that keep sum-reduced states per site (or pair), created on the site's first update.

    The sites are not known before the first forward pass, so a state is added there: zeros of the state
    dtype (:func:`state_dtype`) on the device of the data, ``dist_reduce_fx="sum"`` (under DDP, the sums over
    ranks equal one process's sums over the same samples), named in order of first sight (``site_0``, ``site_1``
    ...). Ranks may meet sites in different orders, or not at all (a skipped block, a mixture of experts, an
    early exit), and torchmetrics reduces states one by one in their order of creation; so before every
    reduction (:meth:`sync`, hence every ``compute()`` under DDP) the ranks agree on the union of their sites by
    name (:meth:`agree_on_sites`): a site a rank never saw gets zero states of the shape the others have, and
    every rank reduces the sites in sorted name order.

    Attributes:
        sites: site -> its size (number of heads, or channels), in order of first sight (sites added by the
            agreement last); only for the states created with a ``size``.
        site_info: site -> plain facts about it (e.g. ``{"kind": "self"}``) recorded by a subclass on first sight;
            the agreement gives every rank the lowest rank's facts.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sites: dict[str, int] = {}
        self.site_info: dict[str, dict[str, Any]] = {}
        self._state_names: dict[str, tuple[str | None, ...]] = {}  # site -> the names of its states (None: absent)
        self._layouts: dict[str, Layout] = {}

    def _add_sums(self, name: str, shape: tuple[int, ...], device: torch.device) -> None:
        with torch.inference_mode(False):  # a normal tensor: usable after the evaluation loop too
            self.add_state(name, torch.zeros(shape, dtype=state_dtype(device), device=device), dist_reduce_fx="sum")

    def _add_site(
        self, site: str, layout: Mapping[str, tuple[int, ...] | None], device: torch.device, size: int | None
    ) -> None:
        index = len(self._state_names)
        names = tuple(None if shape is None else f"{prefix}_{index}" for prefix, shape in layout.items())
        for name, shape in zip(names, layout.values(), strict=True):
            if name is not None and shape is not None:
                self._add_sums(name, tuple(shape), device)
        self._state_names[site] = names
        self._layouts[site] = dict(layout)
        if size is not None:
            self.sites[site] = size

    def _site_tensors(
        self,
        site: str,
        layout: Mapping[str, tuple[int, ...] | None],
        device: torch.device,
        size: int | None = None,
        unit: str = "heads",
    ) -> list[Tensor | None]:
        """The states of ``site`` in ``layout`` order (``None`` where the layout has no shape), zeros on first sight.
        A ``size`` (heads, channels) is recorded in :attr:`sites` on first sight and must not change afterwards
        (``ValueError`` naming the ``unit``)."""
        if site not in self._state_names:
            self._add_site(site, layout, device, size)
        elif size is not None and self.sites[site] != size:
            raise ValueError(f"site {site!r} had {self.sites[site]} {unit}, now {size}")
        return [None if name is None else getattr(self, name) for name in self._state_names[site]]

    def _site_state(
        self,
        site: str,
        shape: tuple[int, ...],
        device: torch.device,
        size: int | None = None,
        unit: str = "heads",
        prefix: str = "site",
    ) -> Tensor:
        """The one state of ``site``, zeros of ``shape`` on first sight (see :meth:`_site_tensors`)."""
        state = self._site_tensors(site, {prefix: shape}, device, size, unit)[0]
        assert state is not None
        return state

    def _site_states(self) -> Iterator[tuple[str, Tensor]]:
        """``(site, state)`` of the one-state sites, in order of first sight."""
        for site, names in self._state_names.items():
            assert names[0] is not None
            yield site, getattr(self, names[0])

    # -- distributed -------------------------------------------------------------------------------------------
    def agree_on_sites(self, process_group: Any | None = None) -> None:
        """Make every rank hold the states of every site any rank saw, reduced in one sorted order: a collective
        (an ``all_gather_object`` of the names, shapes, sizes and facts of the sites) that every rank must call;
        nothing without an initialized process group.

        Raises:
            ValueError: when two ranks hold a site with different state shapes or sizes (a site that is not one
                layer on every rank).
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        group = process_group if process_group is not None else self.process_group
        local = {
            site: (self._layouts[site], self.sites.get(site), self.site_info.get(site)) for site in self._state_names
        }
        gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, local, group=group)
        union: dict[str, tuple[int, Any]] = {}
        for rank, sites in enumerate(gathered):
            for site, entry in sites.items():
                first_rank, first = union.setdefault(site, (rank, entry))
                if entry[:2] != first[:2]:
                    raise ValueError(
                        f"{type(self).__name__}: site {site!r} has states {first[0]} (size {first[1]}) on rank "
                        f"{first_rank} but {entry[0]} (size {entry[1]}) on rank {rank}: a site must be the same "
                        "layer on every rank"
                    )
        for site in sorted(union):
            layout, size, info = union[site][1]
            if site not in self._state_names:
                self._add_site(site, layout, self.device, size)
            if info is not None:
                self.site_info[site] = info
        own = {name for names in self._state_names.values() for name in names if name is not None}
        ordered = [name for site in sorted(union) for name in self._state_names[site] if name is not None]
        self._reductions = {
            **{k: v for k, v in self._reductions.items() if k not in own},
            **{k: self._reductions[k] for k in ordered},
        }

    def sync(
        self,
        dist_sync_fn: Callable | None = None,
        process_group: Any | None = None,
        should_sync: bool = True,
        distributed_available: Callable | None = None,
    ) -> None:
        """:meth:`torchmetrics.Metric.sync`, after :meth:`agree_on_sites` whenever it will reduce across ranks."""
        available = distributed_available or self.distributed_available_fn
        if should_sync and not self._is_synced and callable(available) and available():
            self.agree_on_sites(process_group)
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def compute_sites(self) -> Any:
        """``compute()`` when some rank saw a site, else ``{}``: every rank takes the same branch, so a rank that saw
        nothing still joins the reduction (a collective under DDP)."""
        self.agree_on_sites()
        if not self._state_names:
            return {}
        # this rank's share may be the agreement's zeros: that is an update, not compute-before-update
        self._update_count = max(self._update_count, 1)
        return self.compute()
