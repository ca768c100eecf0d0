"""Streaming measures of what each attention head does: head-type scores, feature correlations, redundancy.

The per-head row statistics (entropy, confidence, distances, diagonal masses) are not re-implemented here:
they go through :class:`~lightning_attn.metrics.attention.AttentionStatistics` with the reducers of
:func:`head_statistics_reducers`. This module adds what that metric cannot give:

- :class:`HeadTypeScores`: TransformerLens head-detector scores ``sum(A * P) / sum(A)`` for the previous-token,
  duplicate-token and induction patterns, streamed as numerator and denominator sums so that the epoch score
  is the formula over all samples seen (also across DDP ranks);
- :class:`FeatureCorrelation`: the sums behind a Pearson correlation between a per-sample (or per-token) head
  summary and a user feature, for the Head Specialization Index;
- :class:`ProbeHeadMaps`: per-head maps of a few probe samples, for the Jensen-Shannon redundancy matrix of
  Clark et al. 2019 and clusters of near-duplicate heads (rank-local, not a metric state);
- :class:`HeadSpecializationMetrics`: one epoch's worth of all of the above for one dataloader, fed one
  captured attention call at a time, each call reduced in query chunks once for every measure;
- pure functions that turn the computed sums into HSI, labels and the head-function registry
  (:func:`analyze_heads`, :func:`build_registry`).

Every metric state is a fixed-size, sum-reduced float64 tensor (float32 on MPS), created per site on first
sight; no ``update`` synchronizes with the host.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_attn.capture.record import AttentionCapture, SiteInfo, as_bhqk
from lightning_attn.functional.attention import diagonal_mass, local_window_mass
from lightning_attn.metrics._sites import SiteSums
from lightning_attn.metrics.attention import (
    AttentionStatistics,
    DistanceReducer,
    EntropyReducer,
    FirstTokenReducer,
)
from lightning_attn.metrics.engine import ENGINE, MAX_WEIGHT, Stat

__all__ = [
    "DEFAULT_FEATURE_LABELS",
    "GENERAL_LABEL",
    "HEAD_STATISTICS",
    "HEAD_TYPES",
    "REGISTRY_SCHEMA_PATH",
    "STRUCTURAL_LABELS",
    "TYPE_SCORES",
    "BatchContext",
    "ConfidenceReducer",
    "DiagonalReducer",
    "FeatureCorrelation",
    "FeatureLabel",
    "HeadSpecializationMetrics",
    "HeadTypeScores",
    "LocalWindowReducer",
    "ProbeHeadMaps",
    "analyze_heads",
    "as_device_tensor",
    "build_registry",
    "connected_clusters",
    "head_statistics_reducers",
    "lookup",
    "pairwise_js_distance",
    "pearson_from_sums",
    "registry_schema",
    "specialization_level",
    "token_patterns",
]


#: Per-head row statistics, in logging order (see :func:`head_statistics_reducers`).
HEAD_STATISTICS: tuple[str, ...] = (
    "entropy",
    "confidence",
    "distance",
    "first_token",
    "self",
    "previous",
    "next",
    "local",
)

#: Pattern scores streamed by :class:`HeadTypeScores`.
TYPE_SCORES: tuple[str, ...] = ("previous_token", "duplicate_token", "induction")

#: Structural head types, in the priority order used for labels (first match wins).
HEAD_TYPES: tuple[str, ...] = ("induction", "duplicate_token", "previous_token", "sink", "broad")

#: ``type -> (label, description)`` of the structural labels.
STRUCTURAL_LABELS: dict[str, tuple[str, str]] = {
    "induction": (
        "Induction head",
        "Attends to the token right after an earlier occurrence of the current token (A B ... A -> B)",
    ),
    "duplicate_token": ("Duplicate-token head", "Attends to earlier occurrences of the current token"),
    "previous_token": ("Previous-token head", "Attends to the immediately preceding token"),
    "sink": ("Sink head", "Puts most of its attention on the first token (attention sink / [CLS] / BOS)"),
    "broad": ("Broad head", "Spreads its attention almost uniformly over the keys (bag-of-context)"),
}

#: Label of a head with no feature correlation above the HSI threshold and no structural type.
GENERAL_LABEL: tuple[str, str] = ("General context", "Diffuse or mixed attention, no clear specialization")


class FeatureLabel(NamedTuple):
    """What a head that tracks a feature is called: ``label``, ``description`` and the ``expected_sign`` of the
    correlation (``-1``, ``+1``, or ``0`` for either)."""

    label: str
    description: str
    expected_sign: int


#: Default feature labels, those of the Head Specialization Analysis notebook (``FEATURE_TO_LABEL``): feature
#: name (the key of the tracker's ``features`` argument) to ``(label, description, expected sign)``.
DEFAULT_FEATURE_LABELS: dict[str, FeatureLabel] = {
    "ttc": FeatureLabel("Safety Head", "Attends to low-TTC (collision threats)", -1),
    "distance": FeatureLabel("Proximity Head", "Attends to nearby vehicles", -1),
    "closing_speed": FeatureLabel("Threat Assessment", "Attends to approaching vehicles", 1),
    "is_ahead": FeatureLabel("Traffic Flow", "Attends to leading vehicles", 1),
    "is_left": FeatureLabel("Lane Awareness", "Monitors adjacent lanes (left)", 1),
    "is_right": FeatureLabel("Lane Awareness", "Monitors adjacent lanes (right)", 1),
}


# -- row reducers ------------------------------------------------------------------------------------------


class ConfidenceReducer:
    """Head confidence of Voita et al. 2019 per row: ``max_j A_ij`` over the keys not excluded.

    Args:
        exclude_positions: key positions left out of the max (negative: from the end, e.g. ``-1`` for a final
            [SEP]/EOS); positions outside a map are ignored.

    :attr:`batch_exclude` (``[B, K]`` bool, True = excluded, e.g. a special-tokens mask) is set per batch by
    :class:`HeadSpecializationMetrics`; it applies to maps whose batch and key sizes match. Weights are not
    renormalized after the exclusion (as in Voita et al., who drop the EOS weight).
    """

    def __init__(self, exclude_positions: Sequence[int] = ()) -> None:
        self.exclude_positions = tuple(int(p) for p in exclude_positions)
        self.batch_exclude: Tensor | None = None
        self._masks: dict[tuple[int, str], Tensor] = {}

    def _positions(self, num_keys: int, device: torch.device) -> Tensor | None:
        if not self.exclude_positions:
            return None
        cache_key = (num_keys, str(device))
        mask = self._masks.get(cache_key)
        if mask is None:
            mask = torch.zeros(num_keys, dtype=torch.bool)
            for position in self.exclude_positions:
                if -num_keys <= position < num_keys:
                    mask[position] = True
            mask = mask.to(device)
            self._masks[cache_key] = mask
        return mask

    @property
    def statistic(self) -> Stat | None:
        """The engine's ``max_weight`` when no position is excluded (the per-batch exclusion is the caller's)."""
        return None if self.exclude_positions else MAX_WEIGHT

    def excludes(self, batch: int, num_keys: int) -> bool:
        """Whether a map of ``batch`` samples and ``num_keys`` keys has keys left out of the max."""
        exclude = self.batch_exclude
        return bool(self.exclude_positions) or (exclude is not None and tuple(exclude.shape) == (batch, num_keys))

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        excluded = self._positions(probs.shape[-1], probs.device)
        batch = self.batch_exclude
        if batch is not None and probs.dim() == 4 and batch.shape == (probs.shape[0], probs.shape[-1]):
            batch = batch[:, None, None, :]
            excluded = batch if excluded is None else (batch | excluded)
        if excluded is None:
            return probs.amax(-1)
        return probs.masked_fill(excluded, 0).amax(-1)

    def __getstate__(self) -> dict[str, Any]:
        return {"exclude_positions": self.exclude_positions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["exclude_positions"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ConfidenceReducer(exclude_positions={list(self.exclude_positions)})"


class DiagonalReducer:
    """Weight on key ``i + offset`` (:func:`~lightning_attn.functional.diagonal_mass`), query-chunk aware."""

    def __init__(self, offset: int) -> None:
        self.offset = int(offset)
        self.statistic = Stat.diagonal(self.offset)

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        return diagonal_mass(probs, self.offset, query_offset).float()

    def __repr__(self) -> str:
        return f"DiagonalReducer(offset={self.offset})"


class LocalWindowReducer:
    """Weight within ``window`` positions of the query (:func:`~lightning_attn.functional.local_window_mass`)."""

    def __init__(self, window: int) -> None:
        self.window = int(window)
        self.statistic = Stat.local(self.window)

    def __call__(self, probs: Tensor, query_offset: int) -> Tensor:
        if self.window > 8:
            return local_window_mass(probs, self.window, query_offset)
        # a narrow band: the sum of its 2w + 1 diagonals (gathers) instead of a masked copy of the map
        total = diagonal_mass(probs, 0, query_offset).float()
        for offset in range(1, self.window + 1):
            total = total + diagonal_mass(probs, offset, query_offset) + diagonal_mass(probs, -offset, query_offset)
        return total

    def __repr__(self) -> str:
        return f"LocalWindowReducer(window={self.window})"


def head_statistics_reducers(local_window: int = 2, confidence_exclude_positions: Sequence[int] = ()) -> dict[str, Any]:
    """The per-row reducers of :data:`HEAD_STATISTICS`, for :class:`AttentionStatistics`:

    - ``entropy``: ``H_i / log(n_i)`` over the valid keys, in ``[0, 1]`` (Clark et al. 2019);
    - ``confidence``: ``max_j A_ij`` over the keys not excluded (Voita et al. 2019);
    - ``distance``: ``sum_j A_ij |i - j|`` in tokens (mean attention distance);
    - ``first_token``: ``A_i0`` (sink / [CLS] mass);
    - ``self``, ``previous``, ``next``: ``A_{i,i}``, ``A_{i,i-1}``, ``A_{i,i+1}`` (0 where the key does not exist);
    - ``local``: ``sum_{|i-j| <= local_window} A_ij``.

    Per head, the epoch value is the mean over every (sample, query) row seen.
    """
    if local_window < 0:
        raise ValueError(f"local_window must be >= 0, got {local_window}")
    return {
        "entropy": EntropyReducer(),
        "confidence": ConfidenceReducer(confidence_exclude_positions),
        "distance": DistanceReducer(),
        "first_token": FirstTokenReducer(),
        "self": DiagonalReducer(0),
        "previous": DiagonalReducer(-1),
        "next": DiagonalReducer(1),
        "local": LocalWindowReducer(local_window),
    }


# -- head-type scores --------------------------------------------------------------------------------------


def token_patterns(
    tokens: Tensor, query_offset: int = 0, num_rows: int | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rows ``query_offset ... query_offset + num_rows`` of the duplicate-token and induction patterns.

    Exactly TransformerLens ``head_detector``'s patterns (and
    :func:`~lightning_attn.functional.duplicate_token_pattern` / :func:`~lightning_attn.functional.induction_pattern`),
    built per query chunk so that no ``[B, L, L]`` tensor is needed:

    - duplicate: ``P[i, j] = 1`` iff ``tok_i == tok_j`` and ``j < i``;
    - induction: ``P[i, j] = 1`` iff ``tok_i == tok_{j-1}`` and ``1 <= j <= i``.

    Args:
        tokens: ``[B, L]`` token ids.
        valid: optional ``[B, L]`` bool (True = real token): pairs involving a padding position are 0.

    Returns:
        Two ``[B, q, L]`` bool tensors.
    """
    length = tokens.shape[-1]
    num_rows = length - query_offset if num_rows is None else num_rows
    rows = tokens[:, query_offset : query_offset + num_rows]
    query_index = torch.arange(query_offset, query_offset + rows.shape[1], device=tokens.device)[:, None]
    key_index = torch.arange(length, device=tokens.device)[None, :]
    duplicate = (rows[:, :, None] == tokens[:, None, :]) & (key_index < query_index)
    shifted = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)  # shifted[j] = tok_{j-1} (j >= 1)
    induction = (rows[:, :, None] == shifted[:, None, :]) & (key_index >= 1) & (key_index <= query_index)
    if valid is not None:
        valid = valid.to(torch.bool)
        pair = valid[:, query_offset : query_offset + rows.shape[1], None] & valid[:, None, :]
        duplicate = duplicate & pair
        induction = induction & pair
    return duplicate, induction


class HeadTypeScores(SiteSums):
    """Per-site, per-head TransformerLens head-detector scores, streamed over an epoch.

    For each pattern ``P`` of :data:`TYPE_SCORES` the score of a head is (TransformerLens
    ``transformer_lens/head_detector.py``, ``error_measure="mul"``)::

        score = sum_{b, i, j} A[b, h, i, j] P[b, i, j] / sum_{b, i, j} A[b, h, i, j]

    summed over every sample ``b`` of the epoch (TransformerLens averages per-sequence scores instead; the
    ratio of sums is what sum-reduced states can give exactly under DDP and gives long sequences their
    weight). Patterns: previous token ``P[i, i-1] = 1``; duplicate token and induction from token ids
    (:func:`token_patterns`), only for batches that carry them. Scores are defined for self-attention maps
    (``Q == K``); other sites keep NaN.

    State: one sum-reduced ``[2, 3, H]`` tensor per site, numerators then denominators.

    Args:
        exclude_bos: zero key 0 of ``A`` before both sums (TransformerLens ``exclude_bos``).
        exclude_current_token: zero the diagonal of ``A`` before both sums (``exclude_current_token``).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, exclude_bos: bool = False, exclude_current_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exclude_bos = bool(exclude_bos)
        self.exclude_current_token = bool(exclude_current_token)

    @property
    def excludes(self) -> bool:
        """Whether keys are zeroed before the sums (then scores are read off the maps, not the engine's rows)."""
        return self.exclude_bos or self.exclude_current_token

    def register(self, site: str, num_heads: int, device: torch.device) -> Tensor:
        """The state of ``site`` (created on first sight)."""
        return self._site_state(site, (2, len(TYPE_SCORES), num_heads), device, size=num_heads)

    def update(
        self,
        site: str,
        probs: Tensor,
        query_offset: int = 0,
        tokens: Tensor | None = None,
        row_weight: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add one square map or query chunk ``[B, H, q, L]`` (rows ``query_offset ...``).

        Args:
            tokens: ``[B, L]`` token ids for the duplicate and induction patterns (``None``: those are skipped).
            row_weight: ``[B, q]`` weights of the query rows of the chunk (0 leaves a padding row out).
            valid: ``[B, L]`` bool, True = real token: padding positions never match a token pattern.
        """
        probs = as_bhqk(probs)
        rows, keys = probs.shape[-2:]
        attn = probs.float()
        if self.exclude_bos or self.exclude_current_token:
            drop = torch.zeros(rows, keys, dtype=torch.bool, device=probs.device)
            if self.exclude_bos:
                drop[:, 0] = True
            if self.exclude_current_token:
                drop |= (torch.arange(rows, device=probs.device)[:, None] + query_offset) == torch.arange(
                    keys, device=probs.device
                )
            attn = attn.masked_fill(drop, 0)
        weight = None if row_weight is None else row_weight.to(attn.dtype)[:, None, :]  # [B, 1, q]
        total = attn.sum(-1)  # [B, H, q]
        previous = diagonal_mass(attn, -1, query_offset)
        if weight is not None:
            total, previous = total * weight, previous * weight
        self.add_sums(
            site, previous.sum(-1), total.sum(-1), self.pattern_sums(attn, query_offset, tokens, row_weight, valid)
        )

    @staticmethod
    def pattern_sums(
        probs: Tensor,
        query_offset: int,
        tokens: Tensor | None,
        row_weight: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | None:
        """``sum_{i, j} A_ij P_ij`` per sample and head (``[B, H]`` each) of a chunk ``[B, H, q, L]`` for the
        duplicate-token and induction patterns (:func:`token_patterns`); ``None`` without ``tokens``."""
        if tokens is None:
            return None
        attn = probs.float()
        duplicate, induction = token_patterns(tokens, query_offset, attn.shape[-2], valid)
        on_pattern = []
        for pattern in (duplicate, induction):
            pattern = pattern.to(attn.dtype)
            if row_weight is not None:
                pattern = pattern * row_weight.to(attn.dtype)[:, :, None]
            # an elementwise product and a sum: faster than einsum's batched matrix-vector product on CPU
            on_pattern.append((attn * pattern[:, None]).sum((2, 3)))
        return on_pattern[0], on_pattern[1]

    def add_sums(self, site: str, previous: Tensor, total: Tensor, patterns: tuple[Tensor, Tensor] | None) -> None:
        """Add per-sample sums ``[B, H]``: the previous-token mass, the total mass (``sum A``) and
        :meth:`pattern_sums` (``None``: no token ids, the token patterns are skipped)."""
        state = self.register(site, total.shape[1], total.device)
        zeros = torch.zeros_like(total)
        if patterns is not None:
            numerators, denominators = [previous, *patterns], [total, total, total]
        else:
            numerators, denominators = [previous, zeros, zeros], [total, zeros, zeros]
        # per-sample float32 values, summed over samples in the state's float64
        state += torch.stack([torch.stack(numerators), torch.stack(denominators)]).to(state.dtype).sum(2)

    def compute(self) -> dict[str, Tensor]:
        """``{site: [3, H]}`` scores in :data:`TYPE_SCORES` order; NaN where nothing was added."""
        results = {}
        for site, state in self._site_states():
            results[site] = torch.where(
                state[1] > 0, state[0] / state[1].clamp_min(torch.finfo(state.dtype).tiny), torch.nan
            )
        return results


# -- feature correlation -----------------------------------------------------------------------------------

#: Rows of a :class:`FeatureCorrelation` site state.
_SUMS = ("x", "y", "xx", "yy", "xy", "n")


def pearson_from_sums(sums: Tensor, rtol: float = 1e-9) -> Tensor:
    """Pearson correlation from streamed sums ``[..., 6, H]`` (``sum x, sum y, sum x^2, sum y^2, sum xy, n``).

    ``r = (n Sxy - Sx Sy) / sqrt((n Sxx - Sx^2)(n Syy - Sy^2))``, clamped to ``[-1, 1]``. NaN where ``n < 2`` or
    where either variable is constant: its centred second moment ``Sxx - Sx^2 / n`` is at most ``rtol`` times
    ``Sxx`` (float rounding of a constant), where the correlation is undefined.
    """
    sx, sy, sxx, syy, sxy, n = sums.unbind(-2)
    safe_n = n.clamp_min(1)
    vx = sxx - sx * sx / safe_n
    vy = syy - sy * sy / safe_n
    cov = sxy - sx * sy / safe_n
    defined = (n >= 2) & (vx > rtol * sxx.abs()) & (vy > rtol * syy.abs()) & (vx > 0) & (vy > 0)
    r = cov / (vx.clamp_min(0) * vy.clamp_min(0)).sqrt().clamp_min(torch.finfo(sums.dtype).tiny)
    return torch.where(defined, r.clamp(-1, 1), torch.nan)


class FeatureCorrelation(SiteSums):
    """Streamed Pearson correlation between per-head summaries and user features, per site.

    For every site, feature ``f`` and head ``h`` it sums, over the (weighted) pairs ``(x, y)`` seen, ``x``, ``y``,
    ``x^2``, ``y^2``, ``x y`` and the count ``n`` (weights are 0/1), in one sum-reduced ``[F, 6, H]`` state per site,
    so that the correlation over all samples is exact under DDP (:func:`pearson_from_sums`).

    Args:
        features: feature names, in state order.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, features: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = list(features)
        if not self.features:
            raise ValueError("FeatureCorrelation needs at least one feature")
        self._index = {name: i for i, name in enumerate(self.features)}

    def register(self, site: str, num_heads: int, device: torch.device) -> Tensor:
        """The state of ``site`` (created on first sight)."""
        return self._site_state(site, (len(self.features), len(_SUMS), num_heads), device, size=num_heads)

    def update(self, site: str, feature: str, x: Tensor, y: Tensor, weight: Tensor | None = None) -> None:
        """Add pairs of one batch.

        Args:
            feature: feature name.
            x: head summaries, ``[B, H]`` (per sample) or ``[B, H, K]`` (per key token).
            y: feature values, ``[B]`` or ``[B, K]`` like ``x`` without the head dim. Non-finite values are skipped.
            weight: optional bool/0-1 ``[B]`` or ``[B, K]``: which pairs count.
        """
        state = self.register(site, x.shape[1], x.device)
        dtype = state.dtype
        y = y.to(device=x.device, dtype=dtype)
        keep = torch.isfinite(y)
        if weight is not None:
            keep = keep & weight.to(device=x.device).to(torch.bool)
        x = x.to(dtype)
        pair = keep[:, None] & torch.isfinite(x)  # [B, H] or [B, H, K]
        x = torch.where(pair, x, 0)
        w = pair.to(dtype)
        y = torch.where(keep, y, 0)[:, None].expand_as(x)
        dims = (0,) if x.dim() == 2 else (0, 2)
        sums = torch.stack([x, y * w, x * x, y * y * w, x * y, w]).sum(tuple(d + 1 for d in dims))  # [6, H]
        state[self._index[feature]] += sums

    def compute(self) -> dict[str, Tensor]:
        """``{site: [F, H]}`` correlations (NaN where undefined)."""
        return {site: pearson_from_sums(state) for site, state in self._site_states()}

    def sums(self) -> dict[str, Tensor]:
        """``{site: [F, 6, H]}`` the raw (local, unsynced) sums."""
        return dict(self._site_states())


# -- probe maps and redundancy -----------------------------------------------------------------------------


class ProbeHeadMaps:
    """Per-head maps of the probe samples, for head redundancy (rank-local, one batch per epoch).

    Per site ``[n, H, Q', K']``: maps longer than ``max_tokens`` are block-pooled (query blocks averaged, key
    blocks summed, so rows stay distributions), as :class:`~lightning_attn.metrics.attention.ProbeMaps` does.
    """

    def __init__(self, num_samples: int, max_tokens: int = 128) -> None:
        if num_samples < 1 or max_tokens < 1:
            raise ValueError("num_samples and max_tokens must be >= 1")
        self.num_samples = num_samples
        self.max_tokens = max_tokens
        self.maps: dict[str, Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def _bins(self, length: int, device: torch.device) -> tuple[int, Tensor | None]:
        if length <= self.max_tokens:
            return length, None
        return self.max_tokens, torch.arange(length, device=device) * self.max_tokens // length

    def add(self, site: str, chunk: Tensor, query_offset: int, num_queries: int, num_keys: int) -> None:
        x = chunk[: self.num_samples].float()
        n, heads, q, _ = x.shape
        query_bins, query_index = self._bins(num_queries, x.device)
        key_bins, key_index = self._bins(num_keys, x.device)
        if site not in self.maps:
            self.maps[site] = x.new_zeros(n, heads, query_bins, key_bins)
            self.shapes[site] = (num_queries, num_keys)
        if key_index is not None:
            x = x.new_zeros(n, heads, q, key_bins).index_add_(-1, key_index, x)
        if query_index is None:
            self.maps[site][:, :, query_offset : query_offset + q] = x
        else:
            self.maps[site].index_add_(2, query_index[query_offset : query_offset + q], x)

    def finish(self) -> dict[str, Tensor]:
        """Per-site ``[n, H, Q', K']`` host maps (query blocks averaged): a host sync."""
        out = {}
        for site, (num_queries, _) in self.shapes.items():
            maps = self.maps[site].cpu()
            if num_queries > self.max_tokens:
                index = torch.arange(num_queries) * self.max_tokens // num_queries
                maps = maps / torch.bincount(index, minlength=self.max_tokens).to(maps.dtype)[:, None]
            out[site] = maps
        return out

    def redundancy(self, threshold: float) -> dict[str, Any]:
        """Pairwise Jensen-Shannon distance between all probed heads, and clusters of near-duplicates.

        ``D[g, h] = mean_{b, i} JS(A_g[b, i, :], A_h[b, i, :])`` in nats with Clark et al.'s smoothing
        ``0.001 / n + 0.999 A`` (:func:`~lightning_attn.functional.head_js_distance`, computed by
        :func:`pairwise_js_distance`), over the probe samples
        and query rows, between heads of sites with the same ``[Q, K]`` shape (NaN across shapes). Clusters:
        connected components (single linkage) of the graph with an edge where ``D <= threshold``, size >= 2.

        Returns:
            ``{"heads": [(site, head)], "distance": [N, N] tensor, "clusters": [[head index]]}``.
        """
        maps = self.finish()
        heads = [(site, h) for site, m in maps.items() for h in range(m.shape[1])]
        distance = torch.full((len(heads), len(heads)), torch.nan, dtype=torch.float64)
        groups: dict[tuple[int, ...], list[str]] = {}
        for site, m in maps.items():
            groups.setdefault((*self.shapes[site], m.shape[0]), []).append(site)
        starts, start = {}, 0
        for site, m in maps.items():
            starts[site] = start
            start += m.shape[1]
        for sites in groups.values():
            stacked = torch.cat([maps[s] for s in sites], dim=1)  # [n, N_g, Q', K']
            index = torch.cat([torch.arange(starts[s], starts[s] + maps[s].shape[1]) for s in sites])
            block = pairwise_js_distance(stacked)
            distance[index[:, None], index[None, :]] = block
        return {"heads": heads, "distance": distance, "clusters": connected_clusters(distance, threshold)}


def pairwise_js_distance(maps: Tensor, smoothing: float = 0.001) -> Tensor:
    """:func:`~lightning_attn.functional.head_js_distance` (same definition, same smoothing), computed as
    ``JS(P, Q) = H(M) - (H(P) + H(Q)) / 2`` with the smoothed rows' entropies ``H`` computed once per head: one
    ``x log x`` pass per pair instead of four, and each unordered pair once.

    Args:
        maps: ``[B, N, Q, K]`` (``N`` heads).

    Returns:
        ``[N, N]`` float64, symmetric, zero diagonal: ``mean_{b, i} JS(A_g[b, i], A_h[b, i])`` in nats.
    """
    if maps.dim() != 4:
        raise ValueError(f"pairwise_js_distance expects [B, N, Q, K], got shape {tuple(maps.shape)}")
    count, keys = maps.shape[1], maps.shape[-1]
    p = smoothing / keys + (1 - smoothing) * maps.float()
    entropy = -torch.xlogy(p, p).sum(-1)  # [B, N, Q]
    distance = torch.zeros(count, count, dtype=torch.float64)
    for g in range(count - 1):
        mixture = (p[:, g : g + 1] + p[:, g + 1 :]) / 2
        js = -torch.xlogy(mixture, mixture).sum(-1) - (entropy[:, g : g + 1] + entropy[:, g + 1 :]) / 2
        distance[g, g + 1 :] = js.clamp_min(0).mean((0, 2)).double().cpu()
    return distance + distance.T


def connected_clusters(distance: Tensor, threshold: float) -> list[list[int]]:
    """Connected components (single-linkage clusters) of ``distance <= threshold`` with at least two members,
    each sorted, ordered by first member. NaN distances are no edge."""
    count = distance.shape[0]
    parent = list(range(count))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    close = (distance <= threshold).tolist()
    for g in range(count):
        for h in range(g + 1, count):
            if close[g][h]:
                parent[find(h)] = find(g)
    members: dict[int, list[int]] = {}
    for g in range(count):
        members.setdefault(find(g), []).append(g)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: m[0])


# -- one epoch, one dataloader -----------------------------------------------------------------------------


@dataclass
class BatchContext:
    """What :class:`HeadSpecializationMetrics` takes from one batch (tensors already on the model's device).

    Attributes:
        tokens: ``[B, L]`` token ids, or ``None``.
        valid: ``[B, L]`` bool, True = real (non-padding) token, or ``None`` (every position is real).
        features: feature name to values ``[B]`` (per sample) or ``[B, K]`` (per key token).
        masks: feature name to a ``[B, K]`` bool key-token mask (the tokens whose attention mass summarizes a
            head for that feature).
        confidence_exclude: ``[B, K]`` bool keys left out of the confidence max, or ``None``.
        probe: whether this batch feeds the probe maps.
    """

    tokens: Tensor | None = None
    valid: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    confidence_exclude: Tensor | None = None
    probe: bool = False


@dataclass(frozen=True)
class _MapReads:
    """Which measures of a call need its maps (query chunks) rather than the engine's rows."""

    confidence: bool
    types: bool
    summaries: bool
    probe: bool

    @property
    def any(self) -> bool:
        return self.confidence or self.types or self.summaries or self.probe


def _fits(tensor: Tensor | None, *shape: int) -> bool:
    return tensor is not None and tuple(tensor.shape) == shape


class HeadSpecializationMetrics:
    """All the streamed measures of :class:`~lightning_attn.HeadSpecializationTracker` for one stage and
    dataloader: row statistics (:class:`AttentionStatistics` with :func:`head_statistics_reducers`), type scores,
    feature correlations and (optionally) probe maps.

    :meth:`update` reads one captured call in query chunks of ``chunk_size``, each chunk computed once and
    handed to every measure. Per-sample head summaries for the feature correlations (all summaries average
    over the valid query rows ``i`` of the sample, ``1/|V| sum_{i in V}``):

    - ``mass``: attention on the feature's masked key tokens ``M``, ``sum_{j in M} A_ij`` (needs a mask);
    - ``max_weight``: the confidence ``max_j A_ij`` (:class:`ConfidenceReducer`, exclusions applied);
    - ``entropy``: the normalized entropy;
    - ``auto``: ``mass`` where the feature has a mask of the site's key length, else ``max_weight``;
    - per-token features (``[B, K]``) always use the attention received by each key token, ``A_ij`` averaged
      over the rows, paired with the token's value (pairs limited to the mask when there is one).

    A site whose batch size or key length does not match a feature (or mask) adds nothing for that feature.
    """

    def __init__(
        self,
        features: Sequence[str] = (),
        *,
        summary: str = "auto",
        chunk_size: int | None = 256,
        local_window: int = 2,
        confidence_exclude_positions: Sequence[int] = (),
        exclude_bos: bool = False,
        exclude_current_token: bool = False,
        probe_samples: int = 0,
        probe_max_tokens: int = 128,
    ) -> None:
        if summary not in ("auto", "mass", "max_weight", "entropy"):
            raise ValueError(f"summary must be 'auto', 'mass', 'max_weight' or 'entropy', got {summary!r}")
        self.features = list(features)
        self.summary = summary
        self.chunk_size = chunk_size
        self.reducers = head_statistics_reducers(local_window, confidence_exclude_positions)
        self.statistics = AttentionStatistics(self.reducers, chunk_size=None)
        # the engine's statistics of the reducers; confidence read off the maps where keys are excluded
        self._row_statistics = {
            name: MAX_WEIGHT if name == "confidence" else reducer.statistic for name, reducer in self.reducers.items()
        }
        ENGINE.subscribe(self, self._row_statistics.values())
        self.types = HeadTypeScores(exclude_bos, exclude_current_token)
        self.correlation = FeatureCorrelation(self.features) if self.features else None
        self.probe_samples = probe_samples
        self.probe_max_tokens = probe_max_tokens
        self.probe: ProbeHeadMaps | None = None
        # kept by the statistics metric, so that ranks agree on it with the sites
        self.site_info: dict[str, dict[str, Any]] = self.statistics.site_info

    def metrics(self) -> list[Metric]:
        return [m for m in (self.statistics, self.types, self.correlation) if m is not None]

    def to(self, device: torch.device | str) -> HeadSpecializationMetrics:
        for metric in self.metrics():
            metric.to(device)
        return self

    def reset(self) -> None:
        for metric in self.metrics():
            metric.reset()
        self.probe = None

    @property
    def updated(self) -> bool:
        """Whether a capture was added since the last reset."""
        return self.statistics.update_called

    def update(self, capture: AttentionCapture | Tensor, context: BatchContext, site: str | None = None) -> None:
        """Add one captured call (or a probability tensor ``[B, H, Q, K]`` named ``site``, read as captured weights).

        The row statistics come from the statistics engine (:mod:`lightning_attn.metrics.engine`, computed once per
        call for every consumer); the call's maps are read in query chunks only for what needs them: token
        patterns, excluded confidence keys, mass and per-token summaries, probe maps.
        """
        if isinstance(capture, Tensor):
            if site is None:
                raise ValueError("site is required with a tensor")
            probs = as_bhqk(capture)
            kind = "self" if probs.shape[-1] == probs.shape[-2] else "cross"
            heads, queries, keys = probs.shape[1:]
            info = SiteInfo(site, "self" if kind == "self" else "cross", heads, queries, keys, "Tensor", "weights")
            capture = AttentionCapture(info, weights=probs)
        info = capture.info
        site, num_queries, num_keys = info.name, info.num_queries, info.num_keys
        if site not in self.site_info:
            self.site_info[site] = {
                "kind": info.kind,
                "num_heads": info.num_heads,
                "num_queries": num_queries,
                "num_keys": num_keys,
            }
        rows = ENGINE.rows(capture, self._row_statistics.values(), self.chunk_size)
        values = {name: rows.values[stat] for name, stat in self._row_statistics.items()}
        values["_valid"] = rows.valid
        batch, num_heads = rows.valid.shape[:2]
        device = rows.valid.device
        square = info.kind == "self" and num_queries == num_keys
        row_valid = context.valid if _fits(context.valid, batch, num_queries) else None
        row_weight = None if row_valid is None else row_valid.to(torch.float32)  # [B, Q]
        confidence: ConfidenceReducer = self.reducers["confidence"]
        confidence.batch_exclude = context.confidence_exclude
        plan = self._plan(context, batch, num_keys)
        self.types.register(site, num_heads, device)
        if self.correlation is not None:
            self.correlation.register(site, num_heads, device)
        if context.probe and self.probe_samples and self.probe is None:
            self.probe = ProbeHeadMaps(self.probe_samples, self.probe_max_tokens)
        maps = _MapReads(
            confidence=confidence.excludes(batch, num_keys),
            types=square and (self.types.excludes or _fits(context.tokens, batch, num_keys)),
            summaries=any(kind in ("mass", "received") for _, kind, _ in plan),
            probe=self.probe is not None and context.probe,
        )
        summaries: dict[Any, Any] = {}
        if maps.any:
            self._read_maps(capture, context, maps, plan, row_weight, summaries, values)
        confidence.batch_exclude = None
        self.statistics.update(site, values, row_weight=row_weight)
        if square and not self.types.excludes:
            weight = rows.valid if row_valid is None else rows.valid & row_valid[:, None, :]
            weight = weight.to(torch.float32)
            previous = (torch.where(rows.valid, values["previous"], 0) * weight).sum(-1)
            self.types.add_sums(site, previous, weight.sum(-1), summaries.pop("patterns", None))
        if not plan or self.correlation is None:
            return
        weight = torch.ones(batch, num_queries, device=device) if row_weight is None else row_weight
        for kind in ("max_weight", "entropy"):
            name = "confidence" if kind == "max_weight" else kind
            summaries[kind] = (torch.where(values["_valid"], values[name], 0) * weight[:, None, :]).sum(-1)
        row_count = weight.sum(-1)
        has_rows = row_count > 0
        denominator = row_count.clamp_min(1)
        for feature, kind_, mask in plan:
            y = context.features[feature]
            if kind_ == "received":
                x = summaries["received"] / denominator[:, None, None]
                feature_weight = has_rows[:, None] if mask is None else (has_rows[:, None] & mask)
            else:
                x = summaries[(kind_, feature) if kind_ == "mass" else kind_] / denominator[:, None]
                feature_weight = has_rows
            self.correlation.update(site, feature, x, y, feature_weight)

    def _read_maps(
        self,
        capture: AttentionCapture,
        context: BatchContext,
        maps: _MapReads,
        plan: list[tuple[str, str, Tensor | None]],
        row_weight: Tensor | None,
        summaries: dict[Any, Any],
        values: dict[str, Tensor],
    ) -> None:
        """One pass over the call's query chunks for what the engine's rows cannot give."""
        info = capture.info
        site = info.name
        confidence_rows = []
        tokens = valid = None
        if maps.types:
            tokens = context.tokens if _fits(context.tokens, values["_valid"].shape[0], info.num_keys) else None
            valid = context.valid if _fits(context.valid, values["_valid"].shape[0], info.num_keys) else None

        def add(key: Any, value: Tensor) -> None:
            summaries[key] = value if key not in summaries else summaries[key] + value

        for offset, chunk in capture.chunks(self.chunk_size):
            rows = chunk.shape[-2]
            weight = None if row_weight is None else row_weight[:, offset : offset + rows]
            if maps.confidence:
                confidence_rows.append(self.reducers["confidence"](chunk, offset))
            if maps.types and self.types.excludes:
                self.types.update(site, chunk, offset, tokens, weight, valid)
            elif maps.types:
                patterns = self.types.pattern_sums(chunk, offset, tokens, weight, valid)
                if patterns is not None:
                    add("patterns", torch.stack(patterns))
            if maps.summaries:
                probs = chunk.float()
                weight = torch.ones(chunk.shape[0], rows, device=chunk.device) if weight is None else weight
                for feature, kind, mask in plan:
                    if kind == "mass":
                        assert mask is not None
                        per_row = (probs * mask.to(probs.dtype)[:, None, None, :]).sum(-1)
                        add((kind, feature), (per_row * weight[:, None]).sum(-1))
                if any(kind == "received" for _, kind, _ in plan):
                    add("received", (probs * weight[:, None, :, None]).sum(2))
            if maps.probe and self.probe is not None:
                self.probe.add(site, chunk, offset, info.num_queries, info.num_keys)
        if confidence_rows:
            values["confidence"] = torch.cat(confidence_rows, -1)
        if "patterns" in summaries:
            summaries["patterns"] = tuple(summaries["patterns"].unbind(0))

    def _plan(self, context: BatchContext, batch: int, num_keys: int) -> list[tuple[str, str, Tensor | None]]:
        plan = []
        for feature in self.features:
            y = context.features.get(feature)
            if y is None or y.shape[0] != batch:
                continue
            mask = context.masks.get(feature)
            mask = mask if _fits(mask, batch, num_keys) else None
            if y.dim() == 2:
                if y.shape[1] == num_keys:
                    plan.append((feature, "received", mask))
                continue
            kind = self.summary
            if kind == "auto":
                kind = "mass" if mask is not None else "max_weight"
            if kind == "mass" and mask is None:
                continue
            plan.append((feature, kind, mask))
        return plan

    def compute(self, threshold: float = 0.05) -> dict[str, Any]:
        """Sync and reduce (a collective: every rank), then host values.

        Returns:
            ``{"sites": [{name, kind, num_heads, num_queries, num_keys}], "rows": {site: [H]} (the number of
            (sample, query) rows averaged), "statistics": {site: {stat: [H]}},
            "type_scores": {site: {type: [H]}}, "correlations": {site: {feature: [H]}}}`` with floats (NaN
            where undefined), plus ``"redundancy"`` when probe maps were collected: ``{"heads": [id],
            "distance": [N, N] tensor, "clusters": [[id]]}`` with ids ``<site>/h<k>`` (``threshold`` for the
            clusters).
        """
        statistics = self.statistics.compute()
        types = self.types.compute_sites()
        correlations = self.correlation.compute_sites() if self.correlation is not None else {}
        entry: dict[str, Any] = {"sites": [], "rows": {}, "statistics": {}, "type_scores": {}, "correlations": {}}
        for site, stats in statistics.items():
            info = self.site_info.get(
                site, {"kind": "self", "num_heads": self.statistics.sites[site], "num_queries": None, "num_keys": None}
            )
            entry["sites"].append({"name": site, **info})
            entry["rows"][site] = _floats(stats.rows)
            entry["statistics"][site] = {name: _floats(stats.mean[name]) for name in HEAD_STATISTICS}
            heads = self.statistics.sites[site]
            scores = types.get(site)
            entry["type_scores"][site] = {
                name: _floats(scores[i]) if scores is not None else [math.nan] * heads
                for i, name in enumerate(TYPE_SCORES)
            }
            corr = correlations.get(site)
            if corr is not None:  # torchmetrics squeezes a one-element result (one feature, one head) to 0-d
                corr = corr.reshape(len(self.features), heads)
            entry["correlations"][site] = {
                f: _floats(corr[i]) if corr is not None else [math.nan] * heads for i, f in enumerate(self.features)
            }
        if self.probe is not None:
            redundancy = self.probe.redundancy(threshold)
            ids = [f"{site}/h{h}" for site, h in redundancy["heads"]]
            entry["redundancy"] = {
                "heads": ids,
                "distance": redundancy["distance"],
                "clusters": [[ids[i] for i in cluster] for cluster in redundancy["clusters"]],
            }
        return entry


def _floats(values: Tensor) -> list[float]:
    # reshape: a single-head site's values may arrive as a 0-d tensor, whose tolist() is a bare float
    return [float(v) for v in values.detach().double().cpu().reshape(-1).tolist()]


# -- analysis: HSI, labels, registry -----------------------------------------------------------------------


def specialization_level(hsi: float | None) -> str:
    """The notebook's reading of an HSI: ``strong`` (> 0.7), ``moderate`` (0.5-0.7), ``weak`` (0.3-0.5),
    ``none`` (< 0.3 or undefined)."""
    if hsi is None or not math.isfinite(hsi) or hsi < 0.3:
        return "none"
    return "strong" if hsi > 0.7 else "moderate" if hsi >= 0.5 else "weak"


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, float) and math.isfinite(value)


def analyze_heads(
    entry: dict[str, Any],
    *,
    hsi_threshold: float = 0.3,
    thresholds: Mapping[str, float] | None = None,
    feature_labels: Mapping[str, FeatureLabel | Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Add HSI, primary feature, structural types and labels to an epoch ``entry`` (in place; returned).

    Definitions, per head:

    - ``corr_f``: Pearson correlation over the epoch's samples between the head's summary and feature ``f``
      (NaN where undefined: fewer than 2 samples, or a constant summary or feature);
    - ``HSI = max_f |corr_f|`` over the features with a defined correlation (``None`` if there is none);
      ``primary_feature = argmax_f |corr_f|``, ``correlation = corr_primary`` (signed);
    - type scores: ``previous_token``, ``duplicate_token``, ``induction`` (TransformerLens ``mul`` scores),
      ``sink`` = mean first-token mass, ``broad`` = mean normalized entropy; a head *is* of a type when its
      score is at least ``thresholds[type]``;
    - label: if ``HSI >= hsi_threshold``, the feature label of ``feature_labels[primary]`` (with
      ``" (inverted)"`` appended when the correlation's sign contradicts a non-zero expected sign; a feature
      without an entry gets ``"<Feature> Head"``); else the first structural type in :data:`HEAD_TYPES` order;
      else ``"General context"``.
    """
    thresholds = dict(thresholds or {})
    labels_by_feature = {name: FeatureLabel(*value) for name, value in (feature_labels or {}).items()}
    entry["hsi"], entry["primary_feature"], entry["correlation"] = {}, {}, {}
    entry["types"], entry["labels"], entry["descriptions"] = {}, {}, {}
    for site_info in entry["sites"]:
        site = site_info["name"]
        heads = site_info["num_heads"]
        stats = entry["statistics"][site]
        scores = entry["type_scores"][site]
        scores["sink"] = list(stats["first_token"])
        scores["broad"] = list(stats["entropy"])
        correlations = entry["correlations"].get(site, {})
        hsi_row, primary_row, corr_row, types_row, label_row, description_row = [], [], [], [], [], []
        for h in range(heads):
            defined = {f: values[h] for f, values in correlations.items() if _finite(values[h])}
            if defined:
                primary = max(defined, key=lambda f: abs(defined[f]))
                hsi, corr = abs(defined[primary]), defined[primary]
            else:
                primary, hsi, corr = None, None, None
            types = [
                t for t in HEAD_TYPES if t in thresholds and _finite(scores[t][h]) and scores[t][h] >= thresholds[t]
            ]
            if hsi is not None and primary is not None and hsi >= hsi_threshold:
                label, description = _feature_label(primary, corr, labels_by_feature.get(primary))
            elif types:
                label, description = STRUCTURAL_LABELS[types[0]]
            else:
                label, description = GENERAL_LABEL
            hsi_row.append(hsi)
            primary_row.append(primary)
            corr_row.append(corr)
            types_row.append(types)
            label_row.append(label)
            description_row.append(description)
        entry["hsi"][site], entry["primary_feature"][site], entry["correlation"][site] = hsi_row, primary_row, corr_row
        entry["types"][site], entry["labels"][site], entry["descriptions"][site] = types_row, label_row, description_row
    return entry


def _feature_label(feature: str, correlation: float, known: FeatureLabel | None) -> tuple[str, str]:
    sign = "+" if correlation >= 0 else "-"
    if known is None:
        title = feature.replace("_", " ").strip().title() or feature
        return f"{title} Head", f"Attention tracks {feature} (r {sign})"
    if known.expected_sign and (correlation >= 0) != (known.expected_sign > 0):
        return (
            f"{known.label} (inverted)",
            f"{known.description}; here inverted: correlation with {feature} is {sign}, "
            f"expected {'+' if known.expected_sign > 0 else '-'}",
        )
    return known.label, known.description


#: Version of the registry layout (``lightning_attn/report/head_functions.schema.json``).
REGISTRY_SCHEMA_VERSION = 1

#: The registry's JSON schema (draft 2020-12), shipped with the package.
REGISTRY_SCHEMA_PATH = Path(__file__).resolve().parent.parent / "report" / "head_functions.schema.json"


def registry_schema() -> dict[str, Any]:
    """The head-function registry's JSON schema, for ``jsonschema.validate(registry, registry_schema())``."""
    return json.loads(REGISTRY_SCHEMA_PATH.read_text())


def build_registry(
    entry: Mapping[str, Any],
    *,
    hsi_threshold: float,
    thresholds: Mapping[str, float],
    feature_labels: Mapping[str, FeatureLabel | Sequence[Any]],
    features: Sequence[str],
    summary: str,
) -> dict[str, Any]:
    """The head-function registry of an analyzed epoch ``entry`` (see :func:`analyze_heads`), JSON-ready.

    Layout (``lightning_attn/report/head_functions.schema.json``)::

        {"schema_version": 1, "generator": "lightning_attn.HeadSpecializationTracker",
         "stage": "val", "epoch": 3, "global_step": 120, "summary": "auto",
         "hsi_threshold": 0.3, "thresholds": {type: threshold},
         "features": {name: {"label", "description", "expected_sign"}},
         "layers": [{"layer": 0, "site": "...", "kind": "self", "num_heads": H, "heads": [
             {"id": "<site>/h<k>", "head": k, "label", "description", "hsi", "specialization",
              "primary_feature", "correlation", "correlations": {feature: r},
              "type_scores": {type: score}, "types": [type], "statistics": {stat: value},
              "redundant_with": [id]}]}],
         "clusters": [[id]]}

    Undefined numbers (NaN) are ``null``.
    """
    from lightning_attn.sinks import to_jsonable

    labels_by_feature = {name: FeatureLabel(*value) for name, value in feature_labels.items()}
    clusters = [list(c) for c in entry.get("clusters") or []]
    partners: dict[str, list[str]] = {}
    for cluster in clusters:
        for member in cluster:
            partners[member] = [m for m in cluster if m != member]
    layers = []
    for index, site_info in enumerate(entry["sites"]):
        site = site_info["name"]
        heads = []
        for h in range(site_info["num_heads"]):
            head_id = f"{site}/h{h}"
            hsi = entry["hsi"][site][h]
            heads.append(
                {
                    "id": head_id,
                    "head": h,
                    "label": entry["labels"][site][h],
                    "description": entry["descriptions"][site][h],
                    "hsi": hsi,
                    "specialization": specialization_level(hsi),
                    "primary_feature": entry["primary_feature"][site][h],
                    "correlation": entry["correlation"][site][h],
                    "correlations": {f: values[h] for f, values in entry["correlations"].get(site, {}).items()},
                    "type_scores": {t: entry["type_scores"][site][t][h] for t in (*TYPE_SCORES, "sink", "broad")},
                    "types": list(entry["types"][site][h]),
                    "statistics": {s: values[h] for s, values in entry["statistics"][site].items()},
                    "redundant_with": partners.get(head_id, []),
                }
            )
        layers.append(
            {
                "layer": index,
                "site": site,
                "kind": site_info["kind"],
                "num_heads": site_info["num_heads"],
                "heads": heads,
            }
        )
    registry = {
        "schema_version": REGISTRY_SCHEMA_VERSION,
        "generator": "lightning_attn.HeadSpecializationTracker",
        "stage": entry.get("stage"),
        "epoch": entry.get("epoch"),
        "global_step": entry.get("global_step"),
        "summary": summary,
        "hsi_threshold": hsi_threshold,
        "thresholds": dict(thresholds),
        "features": {
            f: (
                {
                    "label": labels_by_feature[f].label,
                    "description": labels_by_feature[f].description,
                    "expected_sign": labels_by_feature[f].expected_sign,
                }
                if f in labels_by_feature
                else {"label": None, "description": None, "expected_sign": 0}
            )
            for f in features
        },
        "layers": layers,
        "clusters": clusters,
    }
    return to_jsonable(registry)


def lookup(batch: Any, source: str | Callable[[Any], Any]) -> Any:
    """``source(batch)`` for a callable; else ``batch[source]``, then the dotted path ``a.b.0`` through
    mappings, sequences (integer parts) and attributes. Raises ``KeyError`` when absent."""
    if callable(source):
        return source(batch)
    if isinstance(batch, Mapping) and source in batch:
        return batch[source]
    obj = batch
    for part in source.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        elif not isinstance(obj, (Mapping, list, tuple, Tensor)) and hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            available = sorted(map(str, batch.keys())) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"{source!r} not found in the batch (available: {available})")
    return obj


def as_device_tensor(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor on ``device`` (non-blocking copy for host tensors); lists and arrays are converted."""
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.device != device:
        value = value.to(device, non_blocking=True)
    return value if dtype is None else value.to(dtype)
