"""The statistics engine: every per-row attention statistic that any consumer asked for, computed once per
captured call, in one pass over its query chunks.

Consumers (:class:`~lightning_attn.metrics.attention.AttentionStatistics`, the head tracker's metrics) declare
the statistics they need (:meth:`StatisticsEngine.subscribe`, a set of :class:`Stat`) and ask for the rows of a
capture with :meth:`StatisticsEngine.rows`. The first request for a call computes the union of what every live
subscriber declared and keeps the per-row values ``[B, H, Q]`` in the capture's memo, which every capture of the
same call shares (:attr:`~lightning_attn.capture.record.AttentionCapture.memo`): two callbacks recording the same
forward, both asking for entropy, get one computation. Each consumer then reduces the rows with its own row
weights (valid rows, padding, sample masks) into its sums.

How a chunk is computed (:mod:`lightning_attn.functional.fused`):

- captures with queries and keys (SDPA, fused MHA): from the masked scores ``s`` of the chunk: ``p = softmax(s)``;
  entropy ``H = lse - sum_j p_j s_j`` with ``lse = max_j s_j - log max_j p_j`` (no ``log`` over ``L^2``); valid-key
  counts from the call's mask and ``is_causal`` (:func:`~lightning_attn.functional.fused.masked_key_counts`);
  max, first-token mass, distance (one multiply-reduce with ``|i - j|``), diagonal and local masses and the
  below-threshold counts read off the same ``p``. The probabilities of a single-chunk call are handed back to
  the capture (:meth:`~lightning_attn.capture.record.AttentionCapture.adopt_probs`) for consumers that need maps.
- long keys (``key_block`` set and ``K > key_block``): exact online computation over key blocks: a first pass
  for the row max and log-sum-exp, a second for ``p = exp(s - lse)`` and every sum, so the extra memory is
  ``O(B x H x chunk x key_block)`` instead of ``O(B x H x chunk x K)``.
- the documented fallback, captures that come as weights (modules returning them, plain tensors): no scores
  exist, so entropy is ``-sum_j p log p`` over the weights and valid keys are those with ``p > 0``.

Nothing here synchronizes with the host.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_attn.capture.probs import softmax_into
from lightning_attn.capture.record import AttentionCapture, as_bhqk
from lightning_attn.capture.workspace import WORKSPACE, Buffer
from lightning_attn.functional.attention import diagonal_mass, local_window_mass, mean_attention_distance
from lightning_attn.functional.fused import (
    LOWEST,
    entropy_from_scores,
    masked_key_counts,
    normalize_entropy,
    sparsity_from_counts,
)

__all__ = [
    "COLUMN_STATISTICS",
    "DISTANCE",
    "ENGINE",
    "ENTROPY",
    "FIRST_TOKEN",
    "MAX_WEIGHT",
    "RECEIVED",
    "RowValues",
    "Stat",
    "StatisticsEngine",
]

#: Below this window a local mass is the sum of its ``2w + 1`` diagonals (gathers), above it a masked reduce.
_NARROW_WINDOW = 8
_MEMO_KEY = "row_statistics"


class Stat(NamedTuple):
    """One per-row statistic: ``kind`` and its parameter.

    Kinds: ``entropy`` (normalized, ``H_i / log n_i``), ``max_weight`` (``max_j A_ij``), ``sparsity`` (fraction of
    valid keys below ``param``), ``distance`` (``sum_j A_ij |i - j|``), ``first_token`` (``A_i0``), ``diagonal``
    (``A_{i, i + param}``), ``local`` (``sum_{|i - j| <= param} A_ij``); and one column statistic,
    ``received`` (``sum_i A_ij``, the attention key ``j`` receives from the rows).
    """

    kind: str
    param: float = 0.0

    @staticmethod
    def sparsity(threshold: float) -> Stat:
        return Stat("sparsity", float(threshold))

    @staticmethod
    def diagonal(offset: int) -> Stat:
        return Stat("diagonal", int(offset))

    @staticmethod
    def local(window: int) -> Stat:
        return Stat("local", int(window))


ENTROPY = Stat("entropy")
MAX_WEIGHT = Stat("max_weight")
DISTANCE = Stat("distance")
FIRST_TOKEN = Stat("first_token")
RECEIVED = Stat("received")
#: Statistics of the keys (``[B, H, K]``, summed over query rows) rather than of the rows.
COLUMN_STATISTICS = frozenset({RECEIVED})


@dataclass
class RowValues:
    """Per-row values of one captured call: ``values[stat]`` is ``[B, H, Q]`` float32 (``[B, H, K]`` for the
    :data:`COLUMN_STATISTICS`); ``valid`` ``[B, H, Q]`` bool marks the rows with at least one valid key (rows
    without one hold meaningless values)."""

    values: dict[Stat, Tensor]
    valid: Tensor


class StatisticsEngine:
    """Computes the per-row statistics of captured calls once for all their consumers (see the module doc).

    Args:
        key_block: key-block length of the long-context path (``None``: every key of a chunk at once).
        whole_map_bytes: calls whose float32 map ``[B, H, Q, K]`` fits in this many bytes are computed in one chunk
            (keys unblocked), whatever the consumers' ``chunk_size``, and their probabilities are lent to the capture
            until it is released, so that consumers that read maps (probe samples, head types) do not compute them
            again. Query chunks (and key blocks) bound the memory of larger calls.
    """

    def __init__(self, key_block: int | None = 4096, whole_map_bytes: int = 64 * 2**20) -> None:
        self.key_block = key_block
        self.whole_map_bytes = whole_map_bytes
        # by id: metrics' hashes change as they grow states, so a WeakKeyDictionary would lose them
        self._demand: dict[int, tuple[weakref.ref[object], frozenset[Stat]]] = {}

    def subscribe(self, consumer: object, stats: Iterable[Stat]) -> None:
        """Declare what ``consumer`` needs; held while the consumer lives (a weak reference)."""
        self._demand[id(consumer)] = (weakref.ref(consumer), frozenset(stats))

    def demand(self) -> frozenset[Stat]:
        """The union of what every live subscriber needs."""
        for key, (ref, _) in list(self._demand.items()):
            if ref() is None:
                del self._demand[key]
        return frozenset().union(*(stats for _, stats in self._demand.values()))

    def rows(self, attention: AttentionCapture | Tensor, stats: Iterable[Stat], chunk_size: int | None) -> RowValues:
        """The rows of ``stats`` for a capture (memoized on the call, shared by its captures) or a tensor of
        weights ``[..., Q, K]`` (the fallback, not memoized); query chunks of ``chunk_size`` rows."""
        wanted = frozenset(stats)
        if isinstance(attention, Tensor):
            return self._compute(None, as_bhqk(attention), wanted, chunk_size)
        memo: RowValues | None = attention.memo.get(_MEMO_KEY)
        missing = wanted if memo is None else wanted - memo.values.keys()
        if missing:
            weights = None if attention.weights is None else as_bhqk(attention.weights)
            computed = self._compute(
                attention, weights, missing | (self.demand() if memo is None else set()), chunk_size
            )
            if memo is None:
                memo = computed
                attention.memo[_MEMO_KEY] = memo
            else:
                memo.values.update(computed.values)
        assert memo is not None
        return memo

    # -- one call ---------------------------------------------------------------------------------------------

    @torch.no_grad()  # statistics are logged, never differentiated (and ``out=`` buffers refuse autograd)
    def _compute(
        self, capture: AttentionCapture | None, weights: Tensor | None, stats: frozenset[Stat], chunk_size: int | None
    ) -> RowValues:
        if weights is not None:
            batch, heads, num_queries, num_keys = weights.shape
        else:
            assert capture is not None
            info = capture.info
            query = as_bhqk(capture.query) if capture.query is not None else None
            assert query is not None
            batch, heads, num_queries, num_keys = query.shape[0], info.num_heads, info.num_queries, info.num_keys
        # probabilities already at hand (exact_outputs=False, a keeping recorder) are read whole, whatever their size
        lent = capture is not None and weights is None and capture.has_probs
        whole = lent or chunk_size is None or 4 * batch * heads * num_queries * num_keys <= self.whole_map_bytes
        step = num_queries if whole or chunk_size is None else max(chunk_size, 1)
        parts: dict[Stat, list[Tensor]] = {stat: [] for stat in stats}
        valid_parts = []
        for start in range(0, num_queries, step):
            rows = slice(start, min(start + step, num_queries))
            shape = (batch, heads, rows.stop - start)
            if weights is not None:
                values, counts = self._from_weights(weights[..., rows, :], stats, start)
            else:
                assert capture is not None
                counts = torch.broadcast_to(self._key_counts(capture, rows), shape)
                if not whole and self.key_block is not None and num_keys > self.key_block:
                    values = self._blocked(capture, rows, counts, stats)
                else:
                    values = self._from_scores(capture, rows, counts, stats, whole=step >= num_queries)
            for stat in stats:
                if stat in COLUMN_STATISTICS:  # keys: summed over the query chunks
                    parts[stat] = [values[stat] if not parts[stat] else parts[stat][0] + values[stat]]
                else:
                    parts[stat].append(torch.broadcast_to(values[stat], shape))
            valid_parts.append(counts > 0)
        return RowValues(
            values={stat: torch.cat(chunks, -1) for stat, chunks in parts.items()},
            valid=torch.cat(valid_parts, -1),
        )

    @staticmethod
    def _key_counts(capture: AttentionCapture, rows: slice) -> Tensor:
        """``n_i`` of the rows from the call's mask (bool, or additive with ``<= LOWEST / 2`` as masked)."""
        mask, num_queries, num_keys = capture.attn_mask, capture.info.num_queries, capture.info.num_keys
        allowed = None
        if mask is not None:
            if mask.dtype == torch.bool:
                allowed = ~mask if capture.mask_true_means_masked else mask
            else:
                allowed = mask > LOWEST / 2
            if allowed.dim() >= 2 and allowed.shape[-2] == num_queries and num_queries != 1:
                allowed = allowed[..., rows, :]
        device = capture.query.device if capture.query is not None else torch.device("cpu")
        return masked_key_counts(allowed, capture.is_causal, rows.start, rows.stop - rows.start, num_keys, device)

    @staticmethod
    def _masked_scores(
        capture: AttentionCapture, rows: slice | None, cols: slice | None = None, out: Buffer | None = None
    ) -> Tensor:
        scores = capture.scores(rows, cols, masked_score=LOWEST, out=out)  # finite: p * s = 0 on masked keys
        assert scores is not None
        return scores

    def _from_scores(
        self, capture: AttentionCapture, rows: slice, counts: Tensor, stats: frozenset[Stat], whole: bool
    ) -> dict[Stat, Tensor]:
        cached = whole and capture.has_probs  # computed with the outputs (exact_outputs=False), or kept
        scores = capture.take_scores(LOWEST) if cached else None
        if scores is None:
            scores = self._masked_scores(capture, rows, out=WORKSPACE.scores)
        if cached:
            probs = capture.probs_in_call()
        else:
            probs = softmax_into(scores, WORKSPACE.probs)
            if capture.attn_mask is not None:
                probs = probs.mul_((counts > 0)[..., None])  # rows with no key to attend are 0, as attention_probs
            if whole:
                capture.adopt_probs(probs, borrowed=True)  # copied only if a consumer keeps it
        row_max = scores.amax(-1) if ENTROPY in stats else None
        sums = _block_sums(probs, scores, stats, rows.start, 0, scratch=scores)  # the scores are spent on the sums
        peak = sums[MAX_WEIGHT] if MAX_WEIGHT in sums else probs.amax(-1)
        lse = row_max - peak.log() if row_max is not None else None
        return _finish(sums, stats, lse, counts, probs.shape[-1])

    def _blocked(
        self, capture: AttentionCapture, rows: slice, counts: Tensor, stats: frozenset[Stat]
    ) -> dict[Stat, Tensor]:
        assert self.key_block is not None
        num_keys, block = capture.info.num_keys, self.key_block
        row_max: Tensor | None = None
        total: Tensor | None = None
        workspace = WORKSPACE
        for start in range(0, num_keys, block):  # pass 1: online row max and sum of exp
            scores = self._masked_scores(capture, rows, slice(start, start + block), out=workspace.scores)
            block_max = scores.amax(-1)
            new_max = block_max if row_max is None else torch.maximum(row_max, block_max)
            block_total = torch.sub(scores, new_max[..., None], out=workspace.probs(scores.shape, scores.device))
            block_total = block_total.exp_().sum(-1)
            total = block_total if total is None or row_max is None else total * (row_max - new_max).exp() + block_total
            row_max = new_max
        assert row_max is not None and total is not None
        lse = row_max + total.log()
        valid = (counts > 0).to(lse.dtype)
        sums: dict[Stat, Tensor] = {}
        for start in range(0, num_keys, block):  # pass 2: p = exp(s - lse), every sum
            scores = self._masked_scores(capture, rows, slice(start, start + block), out=workspace.scores)
            probs = torch.sub(scores, lse[..., None], out=workspace.probs(scores.shape, scores.device))
            probs = probs.exp_().mul_(valid[..., None])
            partial = _block_sums(probs, scores, stats - {MAX_WEIGHT}, rows.start, start, scratch=scores)
            for stat, value in partial.items():
                if stat not in sums:
                    sums[stat] = value
                elif stat in COLUMN_STATISTICS:  # keys: one block after the other
                    sums[stat] = torch.cat([sums[stat], value], -1)
                else:
                    sums[stat] = sums[stat] + value
        if MAX_WEIGHT in stats:
            sums[MAX_WEIGHT] = (row_max - lse).exp() * valid  # max_j p_j = exp(max_j s_j - lse)
        return _finish(sums, stats, lse, counts, num_keys)

    def _from_weights(
        self, probs: Tensor, stats: frozenset[Stat], query_offset: int
    ) -> tuple[dict[Stat, Tensor], Tensor]:
        """The fallback: no scores, no mask; ``n_i`` counts the keys with ``p > 0``."""
        probs = probs.float()
        scratch = WORKSPACE.scores(probs.shape, probs.device)
        counts = torch.gt(probs, 0, out=scratch).sum(-1)
        sums = _block_sums(probs, None, stats, query_offset, 0, scratch=scratch)
        return _finish(sums, stats, None, counts, probs.shape[-1]), counts


def _block_sums(
    probs: Tensor, scores: Tensor | None, stats: Iterable[Stat], query_offset: int, key_offset: int, scratch: Tensor
) -> dict[Stat, Tensor]:
    """The partial row sums of one block of probabilities (keys ``key_offset ...``): per stat ``[B, H, q]``.

    Entropy's partial is ``sum_j p s`` with scores, ``sum_j p log p`` without; sparsity's the count below the
    threshold over all keys of the block; the others their value restricted to the block's keys. ``scratch``
    (float32, ``probs``' shape, possibly ``scores`` itself) receives every elementwise product: entropy is
    taken first, so that the scores may be spent.
    """
    offset = query_offset - key_offset  # row index minus column index, in block coordinates
    sums: dict[Stat, Tensor] = {}
    for stat in sorted(stats, key=lambda stat: stat.kind != "entropy"):
        kind = stat.kind
        if kind == "entropy":
            if scores is not None:
                sums[stat] = torch.mul(probs, scores, out=scratch).sum(-1)
            else:
                sums[stat] = torch.clamp_min(probs, 1e-12, out=scratch).log_().mul_(probs).sum(-1)
        elif kind == "max_weight":
            sums[stat] = probs.amax(-1)
        elif kind == "sparsity":
            sums[stat] = torch.lt(probs, stat.param, out=scratch).sum(-1)
        elif kind == "distance":
            sums[stat] = mean_attention_distance(probs, offset, scratch=scratch)
        elif kind == "received":
            sums[stat] = probs.sum(-2)
        elif kind == "first_token":
            # a copy: ``probs`` may be a reused buffer
            sums[stat] = probs[..., 0].clone() if key_offset == 0 else probs.new_zeros(probs.shape[:-1])
        elif kind == "diagonal":
            sums[stat] = diagonal_mass(probs, int(stat.param), offset)
        elif kind == "local":
            window = int(stat.param)
            if window > _NARROW_WINDOW:
                sums[stat] = local_window_mass(probs, window, offset, scratch=scratch)
            else:
                diagonals = [diagonal_mass(probs, d, offset) for d in range(-window, window + 1)]
                sums[stat] = torch.stack(diagonals).sum(0)
        else:
            raise ValueError(f"unknown statistic {stat!r}")
    return sums


def _finish(
    sums: dict[Stat, Tensor], stats: Iterable[Stat], lse: Tensor | None, counts: Tensor, num_keys: int
) -> dict[Stat, Tensor]:
    """Row values from the row sums: entropy normalized by ``log n_i``, sparsity over the valid keys."""
    values = {}
    for stat in stats:
        total = sums[stat]
        if stat.kind == "entropy":
            entropy = -total if lse is None else entropy_from_scores(lse, total)
            values[stat] = normalize_entropy(entropy, counts)
        elif stat.kind == "sparsity":
            values[stat] = sparsity_from_counts(total, num_keys, counts)
        else:
            values[stat] = total
    return values


#: The engine every callback shares (one memo per call, one union of demands).
ENGINE = StatisticsEngine()
