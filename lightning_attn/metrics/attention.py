"""Streaming attention statistics as torchmetrics ``Metric`` objects.

Every state here is a fixed-size, sum-reduced tensor (``dist_reduce_fx="sum"``), so that

- memory does not grow with the number of batches: a validation epoch of 10 or 10,000 batches holds the
  same states;
- ``compute()`` is one ``all_gather`` + sum per state under DDP, and the result over ``N`` ranks equals the
  single-process result over the same samples;
- ``update`` never synchronizes with the host (no ``.item()``, no ``.cpu()``, no data-dependent branching):
  it can run in every batch hook on any device.

States are added lazily, one per attention site (or modality pair) on first sight. Ranks need not see the
same sites, nor in the same order: before the reduction they agree on the union of sites by name
(:meth:`~lightning_attn.metrics._sites.SiteSums.agree_on_sites`), a site a rank never saw adding zeros there.

Three metrics:

- :class:`AttentionStatistics`: generic per-head mean and standard deviation of any set of per-row
  reductions (``reducer(probs_chunk, query_offset) -> [B, H, q]``), fed a whole map or query chunks of it.
  :func:`default_reducers` gives the ones of :class:`~lightning_attn.AttentionLogger` (normalized entropy,
  max weight, sparsity, mean attention distance, first-token mass); other callbacks pass their own.
- :class:`AttentionPositions`: per-key received attention and per-query given attention, for the top
  attended and top attending positions of a site.
- :class:`ModalityAgreement`: per-sample agreement of two cross-attention directions (A->B against B->A
  transposed), averaged over samples; :class:`PairBuffer` pairs the two sites within a forward pass.

Plus :class:`ProbeMaps` (the maps of a few fixed samples for figures, one batch per epoch, not a metric)
and :class:`AttentionResults` (one epoch's statistics as host tensors, ``to_dict()`` for JSON). The agreement
classes live in :mod:`lightning_attn.metrics.agreement`, the maps and results in
:mod:`lightning_attn.metrics.attention_results`; both are re-exported here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_attn.capture.record import AttentionCapture, as_bhqk
from lightning_attn.functional.attention import (
    diagonal_mass,
    first_token_mass,
    max_weight,
    mean_attention_distance,
    normalized_entropy,
    sparsity,
)
from lightning_attn.metrics._sites import SiteSums
from lightning_attn.metrics.agreement import ModalityAgreement, PairBuffer
from lightning_attn.metrics.attention_results import AttentionResults, ProbeMaps
from lightning_attn.metrics.engine import DISTANCE, ENGINE, ENTROPY, FIRST_TOKEN, MAX_WEIGHT, RECEIVED, RowValues, Stat

__all__ = [
    "AttentionPositions",
    "AttentionResults",
    "AttentionStatistics",
    "DistanceReducer",
    "EntropyReducer",
    "FirstTokenReducer",
    "MaxWeightReducer",
    "ModalityAgreement",
    "PairBuffer",
    "ProbeMaps",
    "Reducer",
    "SiteStatistics",
    "SparsityReducer",
    "default_reducers",
    "iter_chunks",
    "key_mask_for",
]

#: ``reducer(probs_chunk [B, H, q, K], query_offset) -> [B, H, q]``; may take a ``key_mask`` keyword
#: (bool, True = valid key, broadcastable to the chunk, or ``None`` when every key is valid).
Reducer = Callable[..., Tensor]


def iter_chunks(attention: AttentionCapture | Tensor, chunk_size: int | None) -> Iterator[tuple[int, Tensor]]:
    """``(query_offset, probs_chunk [B, H, q, K])`` over query chunks of a capture or a probability tensor.

    A capture computes each chunk from its queries and keys (``AttentionCapture.chunks``), so the full
    ``[B, H, L, L]`` map never exists; a tensor is sliced.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if isinstance(attention, Tensor):
        probs = as_bhqk(attention)
        step = probs.shape[-2] if chunk_size is None else chunk_size
        for start in range(0, probs.shape[-2], max(step, 1)):
            yield start, probs[..., start : start + step, :]
    else:
        yield from attention.chunks(chunk_size)


def key_mask_for(attention: AttentionCapture | Tensor, probs_chunk: Tensor) -> Tensor | None:
    """Valid keys of a chunk: ``None`` (all valid) when the capture is known to be unmasked, else ``probs > 0``.

    A capture recomputed from queries and keys without ``attn_mask`` and without ``is_causal`` has no masked
    key. Captured weights (and plain tensors) may have been masked; there a key with exactly zero
    probability counts as masked. (A key whose probability underflowed to 0 in float32, a logit gap above
    ~100, is then treated as masked too: it changes entropy normalization and sparsity of such rows only.)
    """
    if (
        isinstance(attention, AttentionCapture)
        and attention.weights is None
        and attention.attn_mask is None
        and not attention.is_causal
    ):
        return None
    return probs_chunk > 0


# -- reducers -------------------------------------------------------------------------------------------
# Module-level classes rather than lambdas: picklable (checkpoints, ddp_spawn), with readable reprs.
# Each is the function of lightning_attn.functional of the same name, applied to probability tensors; its
# ``statistic`` names the same measure in the statistics engine, which computes it for whole captures (once per
# call for every consumer, from the scores). Entropy and sparsity take a cheaper route with the same result when
# every key is valid (no mask expansion), tested against it.


class EntropyReducer:
    """Normalized row entropy ``H_i / log(n_i)`` (:func:`~lightning_attn.functional.normalized_entropy`)."""

    statistic = ENTROPY

    def __call__(self, probs: Tensor, query_offset: int, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is not None or probs.shape[-1] < 2:
            return normalized_entropy(probs, key_mask)
        probs = probs.float()
        # sum_j A_ij log A_ij as one fused multiply-reduce over the logs (cheaper than special.entr)
        plogp = torch.linalg.vecdot(probs, probs.clamp_min(1e-12).log_())
        return plogp.div_(-math.log(probs.shape[-1])).clamp_(0, 1)

    def __repr__(self) -> str:
        return "EntropyReducer()"


class MaxWeightReducer:
    """Largest weight of each row (:func:`~lightning_attn.functional.max_weight`): head confidence."""

    statistic = MAX_WEIGHT

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        return max_weight(probs)

    def __repr__(self) -> str:
        return "MaxWeightReducer()"


class SparsityReducer:
    """Fraction of valid keys below ``threshold`` (:func:`~lightning_attn.functional.sparsity`)."""

    def __init__(self, threshold: float = 0.01) -> None:
        self.threshold = float(threshold)
        self.statistic = Stat.sparsity(self.threshold)

    def __call__(self, probs: Tensor, query_offset: int, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is not None:
            return sparsity(probs, self.threshold, key_mask)
        # counting through uint8 is several times faster than summing bools
        below = (probs < self.threshold).view(torch.uint8).sum(-1, dtype=torch.int32)
        return below.to(torch.float32).div_(probs.shape[-1])

    def __repr__(self) -> str:
        return f"SparsityReducer(threshold={self.threshold})"


class DistanceReducer:
    """Mean attention distance ``sum_j A_ij |i - j|`` in tokens
    (:func:`~lightning_attn.functional.mean_attention_distance`), query chunks offset-aware."""

    statistic = DISTANCE

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        return mean_attention_distance(probs, query_offset)

    def __repr__(self) -> str:
        return "DistanceReducer()"


class FirstTokenReducer:
    """Weight on key 0 (:func:`~lightning_attn.functional.first_token_mass`): [CLS]/BOS sink mass."""

    statistic = FIRST_TOKEN

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        return first_token_mass(probs).float()

    def __repr__(self) -> str:
        return "FirstTokenReducer()"


def default_reducers(sparsity_threshold: float = 0.01) -> dict[str, Reducer]:
    """The statistics of :class:`~lightning_attn.AttentionLogger`, in logging order.

    - ``entropy``: normalized entropy ``H_i / log(n_i)`` in ``[0, 1]`` (Clark et al. 2019);
    - ``max_weight``: largest weight of the row, the head "confidence" of Voita et al. 2019;
    - ``sparsity``: fraction of valid keys with weight below ``sparsity_threshold``;
    - ``distance``: mean attention distance in tokens (Dosovitskiy et al. 2021);
    - ``first_token``: weight on key 0 (attention-sink / [CLS] mass, Xiao et al. 2023).
    """
    return {
        "entropy": EntropyReducer(),
        "max_weight": MaxWeightReducer(),
        "sparsity": SparsityReducer(sparsity_threshold),
        "distance": DistanceReducer(),
        "first_token": FirstTokenReducer(),
    }


def _takes_key_mask(reducer: Reducer) -> bool:
    try:
        return "key_mask" in inspect.signature(reducer).parameters
    except (TypeError, ValueError):
        return False


# -- per-head statistics --------------------------------------------------------------------------------


@dataclass
class SiteStatistics:
    """Per-head results of one site: ``mean[name]`` and ``std[name]`` are ``[H]``; ``rows`` is ``[H]``, the
    number of (sample, query) rows that entered each head's statistics."""

    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    rows: Tensor


class AttentionStatistics(SiteSums):
    """Per-site, per-head mean and standard deviation of per-row attention reductions, streamed.

    For every site and head ``h`` and every reducer ``f`` it accumulates, over all samples ``b`` and query rows
    ``i`` seen, ``sum f(A)[b, h, i]``, ``sum f(A)[b, h, i]^2`` and the number of rows, in one sum-reduced
    ``[2R + 1, H]`` float64 state per site (float32 on MPS). ``compute()`` returns the mean and the population
    standard deviation ``sqrt(E[f^2] - E[f]^2)`` of each head. Rows with no valid key (all-zero rows of
    fully masked queries, padded rows of nested fast-path maps) are left out when a ``key_mask`` is given.

    A capture (not a tensor) goes through the statistics engine (:mod:`lightning_attn.metrics.engine`) when every
    reducer names an engine ``statistic`` (the reducers here do): its rows are computed once per call from the
    scores, for every consumer of the call, and this metric sums them. Other reducers read query chunks of the map.

    Reusable with any reducers, e.g. head-type scores::

        stats = AttentionStatistics({"prev": lambda p, off: diagonal_mass(p, -1, off)}, chunk_size=256)
        with AttentionRecorder(model, keep=False, on_capture=lambda c: stats.update(c.site, c)):
            model(x)
        stats.compute()["layers.0.self_attn"].mean["prev"]  # [H]

    Args:
        reducers: name to ``reducer(probs_chunk [B, H, q, K], query_offset) -> [B, H, q]``. A reducer with
            a ``key_mask`` parameter also receives the chunk's valid keys (``None`` when all are valid).
        chunk_size: query rows per chunk when :meth:`update` is given a whole capture or map; ``None`` for
            all rows at once.
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).
    """

    def __init__(self, reducers: Mapping[str, Reducer], chunk_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not reducers:
            raise ValueError("reducers is empty: give at least one name -> reducer(probs_chunk, query_offset)")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        self.reducers = dict(reducers)
        self.names = list(self.reducers)
        self.chunk_size = chunk_size
        self._masked = {name: _takes_key_mask(fn) for name, fn in self.reducers.items()}
        #: name -> engine statistic, when every reducer has one (then captures go through the engine)
        self.statistics: dict[str, Stat] | None = None
        statistics = {name: getattr(fn, "statistic", None) for name, fn in self.reducers.items()}
        if all(isinstance(stat, Stat) for stat in statistics.values()):
            self.statistics = {name: stat for name, stat in statistics.items() if isinstance(stat, Stat)}
            ENGINE.subscribe(self, self.statistics.values())

    def _state(self, site: str, num_heads: int, device: torch.device) -> Tensor:
        return self._site_state(site, (2 * len(self.names) + 1, num_heads), device, size=num_heads)

    def update(
        self,
        site: str,
        attention: AttentionCapture | Tensor | Mapping[str, Tensor],
        query_offset: int = 0,
        key_mask: Tensor | bool | None = True,
        row_weight: Tensor | None = None,
    ) -> None:
        """Add the rows of one map, one capture, one query chunk of a map, or whole per-row values.

        Args:
            site: site name (a state is created on first sight).
            attention: an :class:`~lightning_attn.capture.record.AttentionCapture` (reduced in
                ``chunk_size`` query chunks) or probabilities ``[B, H, q, K]`` (``[..., q, K]`` is reshaped).
            query_offset: index of the first query row of a chunk ``attention`` (tensors only).
            key_mask: ``True`` (default) derives the valid keys with :func:`key_mask_for`; ``None`` says every
                key is valid; a bool tensor broadcastable to the chunk gives them.
            row_weight: with per-row values only (see :meth:`_add_rows`).
        """
        if isinstance(attention, Mapping):
            self._add_rows(site, attention, row_weight)
        elif isinstance(attention, AttentionCapture) and key_mask is True and self.statistics is not None:
            self._add_rows(site, self.rows_of(ENGINE.rows(attention, self.statistics.values(), self.chunk_size)))
        elif isinstance(attention, AttentionCapture):
            for offset, chunk in attention.chunks(self.chunk_size):
                mask = key_mask_for(attention, chunk) if key_mask is True else key_mask
                self._update_chunk(site, chunk, offset, mask)
        elif self.chunk_size is not None and query_offset == 0 and attention.shape[-2] > self.chunk_size:
            rows = attention.shape[-2]
            for offset, chunk in iter_chunks(attention, self.chunk_size):
                mask = key_mask_for(chunk, chunk) if key_mask is True else key_mask
                if isinstance(mask, Tensor) and mask.dim() >= 2 and mask.shape[-2] == rows:
                    mask = mask[..., offset : offset + chunk.shape[-2], :]
                self._update_chunk(site, chunk, offset, mask)
        else:
            probs = as_bhqk(attention)
            mask = key_mask_for(probs, probs) if key_mask is True else key_mask
            self._update_chunk(site, probs, query_offset, mask)

    def rows_of(self, rows: RowValues) -> dict[str, Tensor]:
        """This metric's statistics, by name, out of the engine's rows of a call (``[B, H, Q]`` each), plus
        ``"_valid"``: the rows with a valid key."""
        assert self.statistics is not None
        return {**{name: rows.values[stat] for name, stat in self.statistics.items()}, "_valid": rows.valid}

    def _add_rows(self, site: str, values: Mapping[str, Tensor], row_weight: Tensor | None = None) -> None:
        """Add whole per-row values: ``values[name]`` ``[B, H, Q]`` for every name and ``values["_valid"]``
        (``[B, H, Q]`` bool, the rows that count); ``row_weight`` (``[B, Q]``, 0/1) leaves more rows out.
        Called by :meth:`update` (given a mapping), which marks the metric updated."""
        valid = values["_valid"]
        state = self._state(site, valid.shape[1], valid.device)
        weight = valid.to(state.dtype)
        if row_weight is not None:
            weight = weight * row_weight.to(state.dtype)[:, None, :]
        stacked = torch.stack([torch.where(valid, values[name], 0) for name in self.names]).to(state.dtype) * weight
        rows = weight.sum((0, 2))[None]
        state += torch.cat([stacked.sum((1, 3)), stacked.square().sum((1, 3)), rows])

    def _update_chunk(self, site: str, probs: Tensor, query_offset: int, key_mask: Tensor | bool | None) -> None:
        state = self._state(site, probs.shape[1], probs.device)
        values = []
        for name in self.names:
            reducer = self.reducers[name]
            value = (
                reducer(probs, query_offset, key_mask=key_mask) if self._masked[name] else reducer(probs, query_offset)
            )
            values.append(value)
        stacked = torch.stack(values).to(state.dtype)  # [R, B, H, q]
        if isinstance(key_mask, Tensor):
            valid = key_mask.expand(probs.shape).any(-1).to(state.dtype)  # [B, H, q]
            stacked = stacked * valid
            rows = valid.sum((0, 2))[None]
        else:
            rows = torch.full(
                (1, probs.shape[1]), probs.shape[0] * probs.shape[2], dtype=state.dtype, device=state.device
            )
        sums = stacked.sum((1, 3))
        squares = stacked.square().sum((1, 3))
        state += torch.cat([sums, squares, rows])

    def compute(self) -> dict[str, SiteStatistics]:
        """``{site: SiteStatistics}`` in order of first sight; heads with no row give NaN."""
        results: dict[str, SiteStatistics] = {}
        count = len(self.names)
        for site, state in self._site_states():
            rows = state[2 * count]
            mean = state[:count] / rows
            variance = (state[count : 2 * count] / rows - mean.square()).clamp_min(0)
            std = variance.sqrt()
            results[site] = SiteStatistics(
                mean={n: mean[i] for i, n in enumerate(self.names)},
                std={n: std[i] for i, n in enumerate(self.names)},
                rows=rows,
            )
        return results


# -- positions ------------------------------------------------------------------------------------------


#: What :class:`AttentionPositions` reads from the statistics engine.
STATISTICS_OF_POSITIONS = (RECEIVED, Stat.diagonal(0), MAX_WEIGHT)


class AttentionPositions(SiteSums):
    """Which positions receive attention and which give it, per site, streamed.

    One sum-reduced ``[4, max_positions]`` state per site, summed over samples, heads and rows:

    - ``received[j] = sum A[b, h, i, j]`` and the number of rows in which key ``j`` existed: their ratio is the
      share of a row's attention that key ``j`` receives on average (the shares of a sequence sum to 1);
    - ``given[i]``: for self-attention sites the attention query ``i`` gives to *other* positions,
      ``1 - A[b, h, i, i]`` (every row gives 1 in total, so the share not kept for itself is what ranks
      queries); for cross-attention sites, whose keys are another sequence, the peak weight ``max_j A_ij``
      (how sharply the query attends); with the number of (sample, head) pairs in which query ``i`` existed.

    Positions at or beyond ``max_positions`` are not tracked (fixed state size, the same on every rank
    whatever the sequence lengths). Variable-length batches are fine: each position is averaged over the
    rows where it existed.
    """

    def __init__(self, max_positions: int = 4096, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.max_positions = int(max_positions)
        ENGINE.subscribe(self, STATISTICS_OF_POSITIONS)

    @property
    def kinds(self) -> dict[str, str]:
        """Site -> ``"self"`` or ``"cross"``, as first seen (agreed across ranks with the states)."""
        return {site: info["kind"] for site, info in self.site_info.items()}

    def _state(self, site: str, kind: str, device: torch.device) -> Tensor:
        self.site_info.setdefault(site, {"kind": kind})
        return self._site_state(site, (4, self.max_positions), device)

    def update(
        self,
        site: str,
        probs: Tensor | RowValues,
        query_offset: int = 0,
        self_attention: bool = True,
        row_valid: Tensor | None = None,
    ) -> None:
        """Add one map or query chunk ``[B, H, q, K]`` (rows ``query_offset ...``) of ``site``, or a whole call
        from the statistics engine's rows (:data:`STATISTICS`).

        ``row_valid`` (``[B, H, q]`` bool) leaves rows without a valid key out; ``None`` counts every row.
        """
        if isinstance(probs, RowValues):
            received = probs.values[RECEIVED].sum((0, 1))
            given = 1 - probs.values[Stat.diagonal(0)] if self_attention else probs.values[MAX_WEIGHT]
            self._add(site, self_attention, received, given, 0, probs.valid)
            return
        probs = as_bhqk(probs)
        given = diagonal_mass(probs, 0, query_offset).neg_().add_(1) if self_attention else max_weight(probs)
        self._add(site, self_attention, probs.sum((0, 1, 2)), given, query_offset, row_valid)

    def _add(
        self,
        site: str,
        self_attention: bool,
        received: Tensor,
        given: Tensor,
        query_offset: int,
        row_valid: Tensor | None,
    ) -> None:
        """``received`` ``[K]`` (summed over samples, heads and rows), ``given`` ``[B, H, q]``."""
        state = self._state(site, "self" if self_attention else "cross", given.device)
        batch, heads, num_queries = given.shape
        keys = min(received.shape[-1], self.max_positions)
        first, last = min(query_offset, self.max_positions), min(query_offset + num_queries, self.max_positions)
        queries = last - first
        received = received.to(state.dtype)
        given = given.to(state.dtype)
        if row_valid is None:
            rows = torch.full((), batch * heads * num_queries, dtype=state.dtype, device=state.device)
            pairs = torch.full((queries,), batch * heads, dtype=state.dtype, device=state.device)
        else:
            valid = row_valid.to(state.dtype)
            given = given * valid
            rows = valid.sum()
            pairs = valid.sum((0, 1))[:queries]
        state[0, :keys] += received[:keys]
        state[1, :keys] += rows
        state[2, first:last] += given.sum((0, 1))[:queries]
        state[3, first:last] += pairs

    def compute(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{site: (received_share [K'], given [Q'])}``, NaN where a position never occurred; trailing
        never-seen positions are cut (a host sync: call at epoch end)."""
        results: dict[str, tuple[Tensor, Tensor]] = {}
        for site, state in self._site_states():
            received = torch.where(state[1] > 0, state[0] / state[1], torch.nan)
            given = torch.where(state[3] > 0, state[2] / state[3], torch.nan)
            results[site] = (_trim(received, state[1]), _trim(given, state[3]))
        return results


def _trim(values: Tensor, counts: Tensor) -> Tensor:
    seen = torch.nonzero(counts > 0)
    return values[: int(seen.max()) + 1] if seen.numel() else values[:0]
