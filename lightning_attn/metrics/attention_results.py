"""What the AttentionLogger keeps besides sums: :class:`ProbeMaps` (the maps of a few fixed samples, for figures)
and :class:`AttentionResults` (one epoch's statistics as host tensors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class ProbeMaps:
    """Attention maps of a few fixed samples, kept for figures (one batch per epoch, never a state).

    Per site: the head-averaged map of every probe sample ``[n, Q', K']`` and the per-head maps of the first
    ``[H, Q', K']``, block-pooled to at most ``max_tokens`` queries and keys: query blocks are averaged and
    key blocks summed, so pooled rows still sum to 1. Also the attention rollout (Abnar & Zuidema 2020,
    :func:`~lightning_attn.functional.attention_rollout`, head mean, residual 0.5) of the self-attention sites
    whose length equals the first one's, folded layer by layer in forward order (``R_l @ ... @ R_1``), for
    sequences of at most ``rollout_max_tokens``. Everything stays on the device until :meth:`finish`.

    Feed it query chunks with :meth:`add` and call :meth:`end_site` after the last chunk of each capture;
    a site seen again (a second forward pass in the same step) is ignored.
    """

    def __init__(self, num_samples: int, max_tokens: int = 128, rollout_max_tokens: int = 1024) -> None:
        if num_samples < 1 or max_tokens < 1:
            raise ValueError("num_samples and max_tokens must be >= 1")
        self.num_samples = num_samples
        self.max_tokens = max_tokens
        self.rollout_max_tokens = rollout_max_tokens
        self.mean: dict[str, Tensor] = {}
        self.heads: dict[str, Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.kinds: dict[str, str] = {}
        self.rollout: Tensor | None = None
        self.rollout_sites: list[str] = []
        self._rollout_length: int | None = None
        self._full: Tensor | None = None
        self._done: set[str] = set()

    def _bins(self, length: int, device: torch.device) -> tuple[int, Tensor | None]:
        if length <= self.max_tokens:
            return length, None
        return self.max_tokens, torch.arange(length, device=device) * self.max_tokens // length

    def add(self, site: str, kind: str, num_queries: int, num_keys: int, chunk: Tensor, query_offset: int) -> None:
        if site in self._done:  # a second forward pass in the same step: keep the first one's maps
            return
        x = chunk[: self.num_samples].float()  # [n, H, q, K]
        n, heads, q, _ = x.shape
        device = x.device
        query_bins, query_index = self._bins(num_queries, device)
        key_bins, key_index = self._bins(num_keys, device)
        if site not in self.mean:
            self.mean[site] = x.new_zeros(n, query_bins, key_bins)
            self.heads[site] = x.new_zeros(heads, query_bins, key_bins)
            self.shapes[site] = (num_queries, num_keys)
            self.kinds[site] = kind
            if kind == "self" and num_queries == num_keys and num_queries <= self.rollout_max_tokens:
                if self._rollout_length is None:
                    self._rollout_length = num_queries
                if num_queries == self._rollout_length:
                    self._full = x.new_zeros(n, num_queries, num_keys)
        head_mean = x.mean(1)
        if self._full is not None:
            self._full[:, query_offset : query_offset + q] = head_mean
        first = x[0]
        if key_index is not None:
            head_mean = head_mean.new_zeros(n, q, key_bins).index_add_(-1, key_index, head_mean)
            first = first.new_zeros(heads, q, key_bins).index_add_(-1, key_index, first)
        if query_index is None:
            self.mean[site][:, query_offset : query_offset + q] = head_mean
            self.heads[site][:, query_offset : query_offset + q] = first
        else:
            rows = query_index[query_offset : query_offset + q]
            self.mean[site].index_add_(1, rows, head_mean)
            self.heads[site].index_add_(1, rows, first)

    def end_site(self, site: str) -> None:
        """Close a capture: fold it into the rollout if it takes part."""
        self._done.add(site)
        if self._full is None:
            return
        from lightning_attn.functional.attention import attention_rollout, rollout_product

        step = attention_rollout([self._full[:, None]], "mean", 0.0, 0.5)  # one layer: 0.5 I + 0.5 A, renormalized
        self.rollout = rollout_product(step, self.rollout)
        self.rollout_sites.append(site)
        self._full = None

    def finish(self) -> dict[str, Any]:
        """Host copies: ``{"mean", "heads", "shapes", "kinds", "rollout", "rollout_sites"}`` (a host sync)."""
        mean, heads = {}, {}
        for site, (num_queries, _) in self.shapes.items():
            scale: Tensor | float = 1.0
            if num_queries > self.max_tokens:
                index = torch.arange(num_queries) * self.max_tokens // num_queries
                scale = 1.0 / torch.bincount(index, minlength=self.max_tokens).to(torch.float32)[:, None]
            mean[site] = self.mean[site].cpu() * scale
            heads[site] = self.heads[site].cpu() * scale
        rollout = None
        if self.rollout is not None:
            rollout = self.rollout.cpu()
            length = rollout.shape[-1]
            if length > self.max_tokens:  # display only: pooled like the maps
                index = torch.arange(length) * self.max_tokens // length
                counts = torch.bincount(index, minlength=self.max_tokens).to(torch.float32)
                pooled = rollout.new_zeros(rollout.shape[0], length, self.max_tokens).index_add_(-1, index, rollout)
                rollout = (
                    pooled.new_zeros(rollout.shape[0], self.max_tokens, self.max_tokens).index_add_(1, index, pooled)
                    / counts[:, None]
                )
        return {
            "mean": mean,
            "heads": heads,
            "shapes": dict(self.shapes),
            "kinds": dict(self.kinds),
            "rollout": rollout,
            "rollout_sites": list(self.rollout_sites),
        }


# -- results --------------------------------------------------------------------------------------------


@dataclass
class AttentionResults:
    """One evaluation epoch's attention statistics (host tensors).

    Attributes:
        stage: ``val``/``test`` (``_dl<k>`` for the k-th dataloader, k >= 1).
        epoch: ``trainer.current_epoch``; ``global_step``: ``trainer.global_step``.
        sites: site names in forward order; ``kinds``: ``"self"``/``"cross"``; ``num_heads``: heads per site.
        mean: statistic name to ``[sites, max_heads]`` per-head means (NaN beyond a site's heads).
        std: the same for the per-head standard deviation over (sample, query) rows.
        rows: ``[sites, max_heads]`` number of rows averaged.
        top_attended: site to ``[(position name or index, mean share of a row's attention received)]``.
        top_attending: site to ``[(position, attention given to other positions (self-attention) or peak
            weight (cross-attention))]``.
        agreement: modality pair name to mean per-sample agreement in ``[-1, 1]``.
    """

    stage: str
    epoch: int
    global_step: int
    sites: list[str]
    kinds: list[str]
    num_heads: list[int]
    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    rows: Tensor
    top_attended: dict[str, list[tuple[str | int, float]]]
    top_attending: dict[str, list[tuple[str | int, float]]]
    agreement: dict[str, float]

    @property
    def statistics(self) -> list[str]:
        return list(self.mean)

    def site_mean(self, statistic: str) -> Tensor:
        """``[sites]``: the mean over heads of the per-head means (each head weighs the same)."""
        return self.mean[statistic].nanmean(dim=1)

    def head_spread(self, statistic: str) -> Tensor:
        """``[sites]``: the standard deviation across heads of the per-head means (NaN heads left out)."""
        values = self.mean[statistic]
        return ((values - values.nanmean(dim=1, keepdim=True)) ** 2).nanmean(dim=1).sqrt()

    def scalars(self, prefix: str, per_head: bool = False) -> dict[str, float]:
        """The logged scalars ``<prefix>/<site>/<statistic>`` (mean over heads), with ``per_head`` also
        ``<prefix>/<site>/h<k>/<statistic>``, and ``<prefix>/<pair>/agreement``."""
        values: dict[str, float] = {}
        for index, site in enumerate(self.sites):
            for name in self.statistics:
                values[f"{prefix}/{site}/{name}"] = float(self.mean[name][index, : self.num_heads[index]].mean())
            if per_head:
                for head in range(self.num_heads[index]):
                    for name in self.statistics:
                        values[f"{prefix}/{site}/h{head}/{name}"] = float(self.mean[name][index, head])
        for pair, value in self.agreement.items():
            values[f"{prefix}/{pair}/agreement"] = value
        return values

    def rows_by_site(self) -> dict[str, Tensor]:
        """Site -> ``[H]`` rows each head counted (for :func:`~lightning_attn.metrics.coverage.coverage_record`)."""
        return {site: self.rows[index, : self.num_heads[index]] for index, site in enumerate(self.sites)}

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)``: a row per site and head, the mean and standard deviation of every statistic."""
        columns = ["site", "head"] + [f"{n}_mean" for n in self.statistics] + [f"{n}_std" for n in self.statistics]
        rows = [
            [site, head]
            + [float(self.mean[n][i, head]) for n in self.statistics]
            + [float(self.std[n][i, head]) for n in self.statistics]
            for i, site in enumerate(self.sites)
            for head in range(self.num_heads[i])
        ]
        return columns, rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per site, per statistic the site mean, per-head means and standard deviations."""
        sites = {}
        for index, site in enumerate(self.sites):
            heads = self.num_heads[index]
            sites[site] = {
                "kind": self.kinds[index],
                "num_heads": heads,
                "rows_per_head": self.rows[index, :heads].tolist(),
                "statistics": {
                    name: {
                        "mean": float(self.mean[name][index, :heads].mean()),
                        "per_head_mean": self.mean[name][index, :heads].tolist(),
                        "per_head_std": self.std[name][index, :heads].tolist(),
                    }
                    for name in self.mean
                },
                "top_attended": [[label, value] for label, value in self.top_attended.get(site, [])],
                "top_attending": [[label, value] for label, value in self.top_attending.get(site, [])],
            }
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "statistics": self.statistics,
            "sites": sites,
            "agreement": dict(self.agreement),
        }
