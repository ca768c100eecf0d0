"""Head redundancy: per-head maps of probe samples, their pairwise Jensen-Shannon distances and clusters of
near-duplicate heads (Clark et al. 2019); rank-local, not metric states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
    # the smoothed rows have no zero, so x log x needs no xlogy (three times slower on CPU)
    entropy = -torch.linalg.vecdot(p, p.log())  # [B, N, Q]
    distance = torch.zeros(count, count, dtype=torch.float64)
    for g in range(count - 1):
        mixture = (p[:, g : g + 1] + p[:, g + 1 :]) / 2
        js = -torch.linalg.vecdot(mixture, mixture.log()) - (entropy[:, g : g + 1] + entropy[:, g + 1 :]) / 2
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
