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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_attn.capture.record import AttentionCapture, SiteInfo, as_bhqk
from lightning_attn.functional.attention import diagonal_mass, local_window_mass
from lightning_attn.metrics.attention import (
    AttentionStatistics,
    DistanceReducer,
    EntropyReducer,
    FirstTokenReducer,
)
from lightning_attn.metrics.batch_context import BatchContext, as_device_tensor, lookup
from lightning_attn.metrics.correlation import FeatureCorrelation, pearson_from_sums
from lightning_attn.metrics.driving import DEFAULT_FEATURE_LABELS
from lightning_attn.metrics.engine import ENGINE, MAX_WEIGHT, Stat
from lightning_attn.metrics.head_labels import (
    GENERAL_LABEL,
    HEAD_TYPES,
    STRUCTURAL_LABELS,
    FeatureLabel,
    analyze_heads,
    specialization_level,
)
from lightning_attn.metrics.head_types import TYPE_SCORES, HeadTypeScores, token_patterns
from lightning_attn.metrics.redundancy import ProbeHeadMaps, connected_clusters, pairwise_js_distance
from lightning_attn.metrics.registry import REGISTRY_SCHEMA_PATH, build_registry, registry_schema

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


# -- one epoch, one dataloader -----------------------------------------------------------------------------


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
        probe_max_tokens: int = 64,
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
