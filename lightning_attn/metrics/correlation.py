"""Streamed Pearson correlations between per-head summaries and user features (the Head Specialization Index)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_attn.metrics._sites import SiteSums

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
