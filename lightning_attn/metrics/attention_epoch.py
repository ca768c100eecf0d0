"""One (stage, dataloader) pair of the :class:`~lightning_attn.AttentionLogger`: its metric states, fed a capture
at a time, and the :class:`~lightning_attn.metrics.attention.AttentionResults` they compute at the epoch end; plus
the position labels that name the rows and columns of a site (``token_names``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import matches
from lightning_attn.functional.attention import top_positions
from lightning_attn.metrics.attention import (
    STATISTICS_OF_POSITIONS,
    AttentionPositions,
    AttentionResults,
    AttentionStatistics,
    ModalityAgreement,
    PairBuffer,
    ProbeMaps,
    SiteStatistics,
    default_reducers,
)
from lightning_attn.metrics.engine import ENGINE

__all__ = ["AttentionAccumulators", "TokenNames", "label_pattern", "position_labels"]

#: ``token_names`` of the AttentionLogger: one list for every axis of its length, or labels by site glob
#: (``"<glob>"``, ``"<glob>:queries"``, ``"<glob>:keys"``).
TokenNames = Sequence[str] | Mapping[str, Sequence[str]]


def label_pattern(key: str) -> tuple[str, str]:
    """``(site glob, axis)`` of a ``token_names`` key; the axis is ``""`` when the labels are for both axes.

    >>> label_pattern("cross.*:keys"), label_pattern("encoder.*")
    (('cross.*', 'keys'), ('encoder.*', ''))
    """
    if key.endswith((":queries", ":keys")):
        glob, _, axis = key.rpartition(":")
        return glob, axis
    return key, ""


def position_labels(token_names: TokenNames | None, site: str, axis: str, length: int) -> list[str] | None:
    """The labels of the ``axis`` (``"queries"`` or ``"keys"``) of ``site`` when it has ``length`` positions: the
    first ``token_names`` entry of that length whose glob matches the site, else ``None`` (positions by index)."""
    if token_names is None:
        return None
    if isinstance(token_names, Mapping):
        for key, labels in token_names.items():
            glob, which = label_pattern(str(key))
            if which and which != axis:
                continue
            if (glob == site or matches(site, [glob])) and len(labels) == length:
                return [str(label) for label in labels]
        return None
    return [str(label) for label in token_names] if len(token_names) == length else None


@dataclass
class AttentionAccumulators:
    """The metrics of one (stage, dataloader) pair; kept across epochs (reset after each compute)."""

    stats: AttentionStatistics
    positions: AttentionPositions
    agreement: ModalityAgreement
    pairs: PairBuffer | None

    @classmethod
    def create(
        cls,
        sparsity_threshold: float,
        chunk_size: int | None,
        max_positions: int,
        modality_pairs: Mapping[str, tuple[str, str]],
    ) -> AttentionAccumulators:
        """Empty states of the default statistics (:func:`~lightning_attn.metrics.attention.default_reducers`)."""
        return cls(
            stats=AttentionStatistics(default_reducers(sparsity_threshold), chunk_size=chunk_size),
            positions=AttentionPositions(max_positions),
            agreement=ModalityAgreement(),
            pairs=PairBuffer(modality_pairs) if modality_pairs else None,
        )

    def to(self, device: torch.device) -> None:
        for metric in (self.stats, self.positions, self.agreement):
            if metric.device != device:
                metric.to(device)

    def reset(self) -> None:
        for metric in (self.stats, self.positions, self.agreement):
            metric.reset()
        if self.pairs is not None:
            self.pairs.clear()

    def end_batch(self) -> None:
        """Forget the unmatched direction of a modality pair: both directions come from one forward pass."""
        if self.pairs is not None:
            self.pairs.clear()

    def update(self, capture: AttentionCapture, chunk_size: int | None, probe: ProbeMaps | None) -> None:
        """Add one captured call (no host sync): its statistics, positions, modality-pair agreement and, with a
        ``probe``, its probe maps; query chunks of ``chunk_size`` rows at a time."""
        info = capture.info
        site = info.name
        roles = self.pairs.roles(site) if self.pairs is not None else []
        head_mean: Tensor | None = None
        # every statistic of the call, computed once by the engine (shared with other callbacks)
        self.stats.update(site, capture)
        # a decoding step (fewer queries than keys, from a cache) is not a sequence's position profile: its query
        # is the last position, not position 0; it counts in the statistics above, not here
        if info.kind == "cross" or info.num_queries == info.num_keys:
            rows = ENGINE.rows(capture, STATISTICS_OF_POSITIONS, chunk_size)
            self.positions.update(site, rows, 0, info.kind == "self")
        chunks = capture.chunks(chunk_size) if probe is not None or roles else ()
        for offset, chunk in chunks:
            if probe is not None:
                probe.add(site, info.kind, info.num_queries, info.num_keys, chunk, offset)
            if roles:
                if head_mean is None:
                    head_mean = chunk.new_empty(chunk.shape[0], info.num_queries, info.num_keys, dtype=torch.float32)
                head_mean[:, offset : offset + chunk.shape[-2]] = chunk.float().mean(1)
        if probe is not None:
            probe.end_site(site)
        for pair, role in roles:
            assert self.pairs is not None and head_mean is not None  # roles come from declared pairs, after the chunks
            both = self.pairs.add(pair, role, head_mean)
            if both is not None:
                self.agreement.update(pair, *both)

    def compute(
        self, stage: str, epoch: int, global_step: int, top_k: int, labels: Callable[[str, str, int], list[str] | None]
    ) -> AttentionResults:
        """The epoch's results (a collective under DDP: every rank), the top ``top_k`` positions of each site named
        by ``labels(site, axis, length)``."""
        stats = self.stats.compute()
        positions = self.positions.compute()
        agreement = self.agreement.compute_sites()
        sites = list(stats)
        heads = [self.stats.sites[s] for s in sites]
        width = max(heads, default=0)

        def table(pick: Callable[[SiteStatistics], Tensor]) -> Tensor:
            out = torch.full((len(sites), width), math.nan, dtype=torch.float64)
            for index, site in enumerate(sites):
                out[index, : heads[index]] = pick(stats[site]).detach().to("cpu", torch.float64)
            return out

        def statistic(pick: Callable[[SiteStatistics], dict[str, Tensor]], name: str) -> Tensor:
            return table(lambda s: pick(s)[name])

        def top(scores: Tensor, site: str, axis: str) -> list[tuple[str | int, float]]:
            valid = ~torch.isnan(scores)
            if not bool(valid.any()):
                return []
            names = labels(site, axis, scores.numel())
            entries = top_positions(torch.where(valid, scores, -math.inf), min(top_k, int(valid.sum())), names)
            return [(label, float(value)) for label, value in entries]

        top_attended: dict[str, list[tuple[str | int, float]]] = {}
        top_attending: dict[str, list[tuple[str | int, float]]] = {}
        for site in sites:
            if site not in positions:  # decoding steps only: no position profile
                top_attended[site] = top_attending[site] = []
                continue
            received, given = (t.detach().to("cpu", torch.float64) for t in positions[site])
            top_attended[site] = top(received, site, "keys")
            top_attending[site] = top(given, site, "queries")
        names = list(self.stats.names)
        return AttentionResults(
            stage=stage,
            epoch=epoch,
            global_step=global_step,
            sites=sites,
            kinds=[self.positions.kinds.get(s, "self") for s in sites],
            num_heads=heads,
            mean={n: statistic(lambda s: s.mean, n) for n in names},
            std={n: statistic(lambda s: s.std, n) for n in names},
            rows=table(lambda s: s.rows),
            top_attended=top_attended,
            top_attending=top_attending,
            agreement={pair: float(value) for pair, value in agreement.items()},
        )
