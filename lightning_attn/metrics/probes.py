"""Streaming statistics of probed module outputs: activations per position and channel, distributions over
positions as attention sites, and per-head histograms of attention weights.

Like :mod:`lightning_attn.metrics.attention`, every state is a fixed-size, sum-reduced tensor created on first
sight of a site (``dist_reduce_fx="sum"``, float64; float32 on MPS), so that memory does not grow with the
number of batches, ``update`` never synchronizes with the host, and ``compute()`` over ``N`` DDP ranks equals
one process over the same samples. Every rank must see the same sites (the model's forward order) before
``compute()``.

- :class:`ActivationStatistics`: per position (time step) and per channel, the mean, the (population) standard
  deviation and the fraction of saturated values (``<= t`` or ``>= 1 - t``: a gate shut or open), from sums,
  sums of squares and counts.
- Distributions over positions (``"weights"`` probes) are wrapped as ``[B, H, 1, L]`` attention rows and fed
  to the same :class:`~lightning_attn.metrics.attention.AttentionStatistics` and
  :class:`~lightning_attn.metrics.attention.AttentionPositions` as attention maps: entropy, max weight,
  sparsity, mean position, first-position mass and top positions, with no second implementation; their
  ``[B, L, H]`` transpose also goes through :class:`ActivationStatistics` for the mean and spread of each
  position's weight across samples.
- :class:`WeightHistogram`: per site and head, counts of attention weights in fixed equal-width bins on
  ``[0, 1]`` (the "distribution" view of attention: a spike at 0 with a tail near 1 is a focused head, a bump
  around ``1/L`` a uniform one).

:class:`ProbeStatistics` bundles them for one (stage, dataloader) of :class:`~lightning_attn.ModuleProbe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_attn.capture.record import as_bhqk
from lightning_attn.metrics._sites import SiteSums
from lightning_attn.metrics.attention import (
    AttentionPositions,
    AttentionStatistics,
    SiteStatistics,
    default_reducers,
    key_mask_for,
)

__all__ = [
    "ActivationStatistics",
    "ActivationSummary",
    "ProbeResults",
    "ProbeSamples",
    "ProbeStatistics",
    "WeightHistogram",
    "activation_view",
    "top_weight_positions",
    "weights_view",
]


# -- shapes ---------------------------------------------------------------------------------------------


def activation_view(output: Tensor) -> Tensor:
    """An activation as ``[batch, positions, channels]``.

    ``[B, L, C]`` is kept; ``[B, C]`` (no time axis) is one position; ``[B]`` one position and one channel; a
    scalar one sample; ``[B, L, d1, d2, ...]`` keeps dim 1 as the position axis and flattens the rest into
    channels (``d1 * d2 * ...``). Dim 0 is always the batch and dim 1 the position: a module that runs
    sequence-first (``[L, B, C]``) or channels-first (``[B, C, H, W]``) is summarised along those axes as they
    are, so probe its batch-first counterpart or a module that outputs ``[B, L, C]``.
    """
    if output.dim() == 0:
        return output.reshape(1, 1, 1)
    if output.dim() == 1:
        return output[:, None, None]
    if output.dim() == 2:
        return output[:, None, :]
    if output.dim() == 3:
        return output
    return output.flatten(2)


def weights_view(output: Tensor) -> Tensor:
    """A distribution over positions (the last dimension) as attention rows ``[batch, heads, queries, keys]``.

    Trailing singleton dimensions are dropped first (a softmax over dim 1 of ``[B, L, 1]`` scores is
    ``[B, L]``); then ``[L]`` -> ``[1, 1, 1, L]``, ``[B, L]`` -> ``[B, 1, 1, L]`` (one head), ``[B, H, L]`` ->
    ``[B, H, 1, L]``, and ``[B, H, Q, K]`` (a full attention map) is kept; more leading dimensions are folded
    into the batch. Rows are expected to sum to 1 (they are not renormalized: no check costs a host sync).
    """
    while output.dim() > 2 and output.shape[-1] == 1:
        output = output.squeeze(-1)
    if output.dim() == 0:
        raise ValueError("a 'weights' probe needs a distribution over positions, got a scalar output")
    if output.dim() == 1:
        return output[None, None, None]
    if output.dim() == 2:
        return output[:, None, None, :]
    if output.dim() == 3:
        return output[:, :, None, :]
    return as_bhqk(output)


# -- activations ----------------------------------------------------------------------------------------

#: Rows of the per-position and per-channel states.
_SUM, _SUMSQ, _COUNT, _LOW, _HIGH = range(5)


@dataclass
class ActivationSummary:
    """One site's activation statistics (host float64 tensors; position vectors cut after the last position seen).

    Attributes:
        position_mean, position_std: ``[L]`` mean and population std of the values at each position (over
            samples and channels); ``position_count``: values averaged per position.
        position_saturated: ``[L]`` fraction of values ``<= t`` or ``>= 1 - t`` at each position.
        channel_mean, channel_std, channel_count, channel_saturated: the same per channel ``[C]`` (over samples
            and all positions, also those beyond ``max_positions``).
        mean, std: over every value; ``saturation_low``/``saturation_high``: fractions ``<= t`` and ``>= 1 - t``.
        joint_mean, joint_std: ``[L, C]`` per position and channel over samples, for sites updated with
            ``joint=True`` (the per-head weights of a ``[B, H, L]`` distribution); else ``None``.
    """

    position_mean: Tensor
    position_std: Tensor
    position_count: Tensor
    position_saturated: Tensor
    channel_mean: Tensor
    channel_std: Tensor
    channel_count: Tensor
    channel_saturated: Tensor
    mean: float
    std: float
    saturation_low: float
    saturation_high: float
    joint_mean: Tensor | None = None
    joint_std: Tensor | None = None

    @property
    def saturated(self) -> float:
        return self.saturation_low + self.saturation_high

    def to_dict(self) -> dict[str, Any]:
        joint = (
            {}
            if self.joint_mean is None or self.joint_std is None
            else {"position_channel_mean": self.joint_mean.tolist(), "position_channel_std": self.joint_std.tolist()}
        )
        return {
            "mean": self.mean,
            "std": self.std,
            "saturation_low": self.saturation_low,
            "saturation_high": self.saturation_high,
            "saturated": self.saturated,
            "position_mean": self.position_mean.tolist(),
            "position_std": self.position_std.tolist(),
            "position_count": self.position_count.tolist(),
            "position_saturated": self.position_saturated.tolist(),
            "channel_mean": self.channel_mean.tolist(),
            "channel_std": self.channel_std.tolist(),
            "channel_saturated": self.channel_saturated.tolist(),
            **joint,
        }


def _moments(state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    count = state[_COUNT]
    safe = count.clamp_min(1)
    mean = state[_SUM] / safe
    variance = (state[_SUMSQ] / safe - mean * mean).clamp_min(0)
    saturated = (state[_LOW] + state[_HIGH]) / safe
    nan = torch.tensor(math.nan, dtype=state.dtype, device=state.device)
    seen = count > 0
    return (
        torch.where(seen, mean, nan),
        torch.where(seen, variance.sqrt(), nan),
        count,
        torch.where(seen, saturated, nan),
    )


class ActivationStatistics(SiteSums):
    """Per-site mean, standard deviation and saturation of activations per position and per channel, streamed.

    For a site's outputs ``x[b, l, c]`` (:func:`activation_view`) it accumulates the sums of ``x``, ``x^2``, the
    counts and the numbers of values ``<= t`` and ``>= 1 - t`` (``t = saturation_threshold``) per position
    (over samples and channels) in one ``[5, max_positions]`` state and per channel (over samples and positions)
    in one ``[5, C]`` state. Each batch is reduced in float32 and accumulated in float64. The standard deviation is
    the population one, ``sqrt(E[x^2] - E[x]^2)``: accurate to ~1e-6 for bounded activations such as gates; for
    values whose mean dwarfs their spread (``|mean| / std`` beyond ~1e3) it loses digits. Positions at or beyond
    ``max_positions`` enter the per-channel state only.
    A site updated with ``joint=True`` also gets a ``[3, max_positions, C]`` state (sum, sum of squares, count per
    position and channel, over samples): meant for few channels, such as the heads of a pooling distribution.

    Args:
        max_positions: positions tracked per site (fixed state size, the same on every rank).
        saturation_threshold: ``t`` above; a gate value ``<= t`` counts as shut, ``>= 1 - t`` as open.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, max_positions: int = 4096, saturation_threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        if not 0.0 <= saturation_threshold < 0.5:
            raise ValueError(f"saturation_threshold must be in [0, 0.5), got {saturation_threshold}")
        self.max_positions = int(max_positions)
        self.saturation_threshold = float(saturation_threshold)

    def _states(
        self, site: str, channels: int, joint: bool, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        # three states per site: positions, channels, joint (absent unless the first update asked for it)
        layout = {
            "positions": (5, self.max_positions),
            "channels": (5, channels),
            "joint": (3, self.max_positions, channels) if joint else None,
        }
        positions, per_channel, pairs = self._site_tensors(site, layout, device, size=channels, unit="channels")
        assert positions is not None and per_channel is not None
        return positions, per_channel, pairs

    def update(self, site: str, values: Tensor, joint: bool = False, position_mask: Tensor | None = None) -> None:
        """Add one output of ``site`` (any shape, read by :func:`activation_view`); ``joint`` (fixed at the
        site's first update) also tracks every (position, channel) pair. ``position_mask`` (``[batch, positions]``,
        true where valid) leaves padded positions out of every statistic."""
        x = activation_view(values.detach())
        batch, length, channels = x.shape
        positions, per_channel, pairs = self._states(site, channels, joint, x.device)
        # Reductions in float32 (a float64 copy of a large activation would cost 2x its memory), accumulated in
        # the float64 states; saturation counts are exact integers.
        x = x if x.dtype == torch.float32 else x.float()
        low = x <= self.saturation_threshold
        high = x >= 1.0 - self.saturation_threshold
        kept = min(length, self.max_positions)
        dtype = positions.dtype
        if position_mask is None:
            position_count = torch.full((length,), float(batch * channels), dtype=dtype, device=x.device)
            channel_count = torch.full((channels,), float(batch * length), dtype=dtype, device=x.device)
        else:
            if position_mask.shape != (batch, length):
                raise ValueError(
                    f"site {site!r}: position mask of shape {tuple(position_mask.shape)} does not match "
                    f"its output read as [batch, positions, channels] = {tuple(x.shape)}"
                )
            valid = position_mask.to(device=x.device, dtype=torch.bool)[:, :, None]
            x = x * valid
            low &= valid
            high &= valid
            position_count = valid.sum((0, 2), dtype=dtype) * channels
            channel_count = valid.sum(dtype=dtype).expand(channels)
        squares = x * x

        def rows(dims: tuple[int, int], count: Tensor) -> Tensor:
            return torch.stack(
                [
                    x.sum(dims).to(dtype),
                    squares.sum(dims).to(dtype),
                    count,
                    low.sum(dims, dtype=torch.int32).to(dtype),
                    high.sum(dims, dtype=torch.int32).to(dtype),
                ]
            )

        positions[:, :kept] += rows((0, 2), position_count)[:, :kept]
        per_channel += rows((0, 1), channel_count)
        if pairs is not None:
            total = x[:, :kept].sum(0).to(dtype)
            pair_count = (
                torch.full_like(total, batch)
                if position_mask is None
                else valid[:, :kept].sum(0, dtype=dtype).expand_as(total)
            )
            pairs[:, :kept] += torch.stack([total, squares[:, :kept].sum(0).to(dtype), pair_count])

    def compute(self) -> dict[str, ActivationSummary]:
        """``{site: ActivationSummary}`` on the host (a host sync: call at epoch end)."""
        results: dict[str, ActivationSummary] = {}
        for site, (position_name, channel_name, joint_name) in self._state_names.items():
            assert position_name is not None and channel_name is not None  # every site has both
            positions = getattr(self, position_name).detach().to("cpu", torch.float64)
            channels = getattr(self, channel_name).detach().to("cpu", torch.float64)
            seen = torch.nonzero(positions[_COUNT] > 0)
            cut = int(seen.max()) + 1 if seen.numel() else 0
            p_mean, p_std, p_count, p_sat = (t[:cut] for t in _moments(positions))
            c_mean, c_std, c_count, c_sat = _moments(channels)
            total = channels.sum(1)
            count = max(float(total[_COUNT]), 1.0)
            mean = float(total[_SUM]) / count
            variance = max(float(total[_SUMSQ]) / count - mean * mean, 0.0)
            joint_mean = joint_std = None
            if joint_name is not None:
                pairs = getattr(self, joint_name).detach().to("cpu", torch.float64)[:, :cut]
                pair_count = pairs[2].clamp_min(1)
                joint_mean = torch.where(pairs[2] > 0, pairs[0] / pair_count, math.nan)
                joint_std = torch.where(
                    pairs[2] > 0, (pairs[1] / pair_count - joint_mean**2).clamp_min(0).sqrt(), math.nan
                )
            results[site] = ActivationSummary(
                position_mean=p_mean,
                position_std=p_std,
                position_count=p_count,
                position_saturated=p_sat,
                channel_mean=c_mean,
                channel_std=c_std,
                channel_count=c_count,
                channel_saturated=c_sat,
                mean=mean if total[_COUNT] > 0 else math.nan,
                std=math.sqrt(variance) if total[_COUNT] > 0 else math.nan,
                saturation_low=float(total[_LOW]) / count,
                saturation_high=float(total[_HIGH]) / count,
                joint_mean=joint_mean,
                joint_std=joint_std,
            )
        return results


# -- histograms -----------------------------------------------------------------------------------------


class WeightHistogram(SiteSums):
    """Per-site, per-head histogram of attention weights in ``bins`` equal-width bins on ``[0, 1]``, streamed.

    Every weight ``A[b, h, i, j]`` of a valid key adds one to bin ``min(floor(A * bins), bins - 1)`` of head
    ``h``: the last bin is closed (1.0 falls in it, not in a hidden extra bin), and weights above 1 (train-mode
    maps after dropout) are counted there too. One sum-reduced ``[H, bins]`` state per site; masked keys
    (``key_mask`` False) are left out. The counts are integers held in float64 (exact up to 2^53).

    Args:
        bins: number of bins on ``[0, 1]``.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(self, bins: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = int(bins)

    @property
    def edges(self) -> Tensor:
        """``[bins + 1]`` bin edges on ``[0, 1]``."""
        return torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64)

    def _state(self, site: str, heads: int, device: torch.device) -> Tensor:
        return self._site_state(site, (heads, self.bins), device, size=heads)

    def update(self, site: str, probs: Tensor, key_mask: Tensor | bool | None = True) -> None:
        """Add a map or query chunk ``[B, H, q, K]`` (``[..., q, K]`` reshaped). ``key_mask``: ``True`` derives
        valid keys (``probs > 0``), ``None`` counts every key, a bool tensor broadcastable to ``probs`` gives them."""
        probs = as_bhqk(probs.detach())
        heads = probs.shape[1]
        state = self._state(site, heads, probs.device)
        if key_mask is True:
            key_mask = probs > 0
        cells = heads * self.bins
        # int32 bin index per weight (half the memory of int64); masked keys go to a discarded extra cell, so
        # every weight adds one (a stride-0 source: no per-weight buffer of counts)
        index = (probs.float() * self.bins).to(torch.int32).clamp_(0, self.bins - 1)
        index += (torch.arange(heads, device=probs.device, dtype=torch.int32) * self.bins).view(1, heads, 1, 1)
        if isinstance(key_mask, Tensor):
            index = index.masked_fill_(~key_mask.expand(probs.shape), cells)
        counts = state.new_zeros(cells + 1).index_add_(0, index.reshape(-1), state.new_ones(1).expand(index.numel()))
        state += counts[:cells].view(heads, self.bins)

    def compute(self) -> dict[str, Tensor]:
        """``{site: counts [H, bins]}`` on the host (float64)."""
        return {site: state.detach().to("cpu", torch.float64) for site, state in self._site_states()}


# -- probe samples --------------------------------------------------------------------------------------


class ProbeSamples:
    """The outputs of a few fixed samples per site, kept for figures (one batch per epoch, never a state).

    The first call of each site wins (a second forward pass in the same step is ignored). Tensors stay on the
    device until :meth:`finish`.
    """

    def __init__(self, num_samples: int, max_positions: int = 4096) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.max_positions = max_positions
        self.values: dict[str, Tensor] = {}

    def add(self, site: str, values: Tensor, position_dim: int) -> None:
        if site in self.values:
            return
        kept = values[: self.num_samples].detach()
        if kept.dim() > position_dim:
            kept = kept.narrow(position_dim, 0, min(kept.shape[position_dim], self.max_positions))
        self.values[site] = kept.float().clone()

    def finish(self) -> dict[str, Tensor]:
        """Host copies (a host sync: epoch end only)."""
        return {site: value.cpu() for site, value in self.values.items()}


# -- one (stage, dataloader) ----------------------------------------------------------------------------


class ProbeStatistics:
    """All streamed states of one (stage, dataloader) of :class:`~lightning_attn.ModuleProbe`.

    Args:
        saturation_threshold: see :class:`ActivationStatistics`.
        sparsity_threshold: weight below which a position counts as not attended, for weights sites.
        bins: histogram bins on ``[0, 1]``.
        max_positions: positions tracked per site.
        chunk_size: query rows reduced at a time for 4-D weights outputs (``None``: all).
    """

    def __init__(
        self,
        saturation_threshold: float = 0.05,
        sparsity_threshold: float = 0.01,
        bins: int = 20,
        max_positions: int = 4096,
        chunk_size: int | None = 256,
    ) -> None:
        self.activations = ActivationStatistics(max_positions, saturation_threshold)
        self.weights = AttentionStatistics(default_reducers(sparsity_threshold), chunk_size=chunk_size)
        self.positions = AttentionPositions(max_positions)
        self.histograms = WeightHistogram(bins)
        self.chunk_size = chunk_size

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (self.activations, self.weights, self.positions, self.histograms)

    def to(self, device: torch.device) -> ProbeStatistics:
        for metric in self.metrics:
            if metric.device != device:
                metric.to(device)
        return self

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()

    def update_activation(self, site: str, output: Tensor, position_mask: Tensor | None = None) -> None:
        """An ``"activation"`` probe's output (``position_mask``: see :meth:`ActivationStatistics.update`)."""
        self.activations.update(site, output, position_mask=position_mask)

    def update_weights(self, site: str, output: Tensor, histogram: bool = False) -> Tensor:
        """A ``"weights"`` probe's output: the attention measures of its rows, the per-position mean and spread
        across samples (and heads) of ``[B, H, 1, L]`` outputs, and optionally its histogram. Returns the
        ``[B, H, Q, K]`` view."""
        probs = weights_view(output.detach()).float()
        key_mask = key_mask_for(probs, probs)
        assert key_mask is not None  # a plain tensor's mask is always its non-zero entries
        self.weights.update(site, probs, key_mask=key_mask)
        queries, keys = probs.shape[-2:]
        self.positions.update(site, probs, self_attention=queries == keys and queries > 1, row_valid=key_mask.any(-1))
        if queries == 1:
            self.activations.update(site, probs[:, :, 0, :].transpose(1, 2), joint=True)  # [B, L, H]
        if histogram:
            self.histograms.update(site, probs, key_mask)
        return probs

    def update_histogram(self, site: str, probs: Tensor, key_mask: Tensor | bool | None = True) -> None:
        """A map or query chunk of an attention site (``[B, H, q, K]``), histogram only."""
        self.histograms.update(site, probs, key_mask)

    def compute(
        self,
    ) -> tuple[
        dict[str, ActivationSummary], dict[str, SiteStatistics], dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]
    ]:
        """``(activations, weights, positions, histograms)``: a collective under DDP (every rank calls it);
        metrics that no rank fed are skipped."""
        activations = self.activations.compute_sites()
        weights = self.weights.compute_sites()
        positions = self.positions.compute_sites()
        histograms = self.histograms.compute_sites()
        # torchmetrics squeezes one-element tensors of compute() results (one head, one channel): undo it
        activations = {
            site: replace(
                s,
                **{
                    f.name: _vector(getattr(s, f.name))
                    for f in fields(s)
                    if isinstance(getattr(s, f.name), Tensor) and not f.name.startswith("joint")
                },
            )
            for site, s in activations.items()
        }
        weights = {
            site: SiteStatistics(
                mean={n: _vector(v) for n, v in s.mean.items()},
                std={n: _vector(v) for n, v in s.std.items()},
                rows=_vector(s.rows),
            )
            for site, s in weights.items()
        }
        for site, summary in activations.items():
            if summary.joint_mean is not None and summary.joint_std is not None:
                shape = (summary.position_mean.numel(), self.activations.sites[site])
                summary.joint_mean, summary.joint_std = (
                    summary.joint_mean.reshape(shape),
                    summary.joint_std.reshape(shape),
                )
        positions = {site: (_vector(received), _vector(given)) for site, (received, given) in positions.items()}
        histograms = {
            site: counts.reshape(self.histograms.sites[site], self.histograms.bins)
            for site, counts in histograms.items()
        }
        return activations, weights, positions, histograms


def _vector(value: Tensor) -> Tensor:
    return value.reshape(-1) if value.dim() == 0 else value


# -- results --------------------------------------------------------------------------------------------


@dataclass
class ProbeResults:
    """One evaluation epoch's probe statistics (host tensors).

    Attributes:
        stage: ``val``/``test`` (``_dl<k>`` for the k-th dataloader, k >= 1); ``epoch``, ``global_step``.
        probes: probe name to ``{"pattern", "kind", "sites"}`` (the matched module names, forward order).
        activations: site to :class:`ActivationSummary`: ``"activation"`` probes per position and channel;
            ``"weights"`` probes with ``[B, L]``/``[B, H, L]`` outputs per position (mean and spread across
            samples and heads) and per head ("channel").
        weights: ``"weights"`` site to per-head :class:`~lightning_attn.metrics.attention.SiteStatistics`
            (entropy, max_weight, sparsity, distance = mean position, first_token = weight on position 0).
        top_positions: ``"weights"`` site to ``[(position name or index, mean weight)]``, highest first.
        histograms: site (``"weights"`` probes and attention sites) to per-head counts ``[H, bins]``;
            ``histogram_edges``: ``[bins + 1]``.
        samples: site to the probe samples' outputs (``[n, L, C]`` activations, ``[n, H, L]`` weights).
    """

    stage: str
    epoch: int
    global_step: int
    probes: dict[str, dict[str, Any]]
    activations: dict[str, ActivationSummary]
    weights: dict[str, SiteStatistics]
    top_positions: dict[str, list[tuple[str | int, float]]]
    histograms: dict[str, Tensor]
    histogram_edges: Tensor
    samples: dict[str, Tensor] = field(default_factory=dict)

    def kind(self, site: str) -> str:
        return "weights" if site in self.weights else "activation" if site in self.activations else "attention"

    def probe_sites(self, probe: str) -> list[str]:
        """The sites of a probe that produced statistics, ``#k`` repeated calls included, in forward order."""
        modules = self.probes[probe]["sites"]
        seen = list(self.weights) if self.probes[probe]["kind"] == "weights" else list(self.activations)
        return [s for s in seen if s.split("#", 1)[0] in modules]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per probe its sites, per site the activation summary and/or the per-head attention
        measures and top positions, and the histograms."""
        sites: dict[str, Any] = {}
        for site in dict.fromkeys([*self.activations, *self.weights]):
            entry: dict[str, Any] = {"kind": self.kind(site)}
            if site in self.activations:
                entry["activation" if entry["kind"] == "activation" else "over_positions"] = self.activations[
                    site
                ].to_dict()
            if site in self.weights:
                stats = self.weights[site]
                entry["num_heads"] = int(stats.rows.numel())
                entry["rows_per_head"] = stats.rows.tolist()
                entry["statistics"] = {
                    name: {
                        "mean": float(stats.mean[name].mean()),
                        "per_head_mean": stats.mean[name].tolist(),
                        "per_head_std": stats.std[name].tolist(),
                    }
                    for name in stats.mean
                }
                entry["top_positions"] = [[label, value] for label, value in self.top_positions.get(site, [])]
            sites[site] = entry
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "probes": {
                name: {"pattern": info["pattern"], "kind": info["kind"], "sites": list(info["sites"])}
                for name, info in self.probes.items()
            },
            "sites": sites,
            "histogram_edges": self.histogram_edges.tolist(),
            "histograms": {
                site: {"kind": self.kind(site), "per_head_counts": counts.tolist()}
                for site, counts in self.histograms.items()
            },
        }


def top_weight_positions(
    received: Tensor, k: int, labels: Sequence[str] | None = None
) -> list[tuple[str | int, float]]:
    """The ``k`` positions with the highest mean weight (``received`` from
    :meth:`~lightning_attn.metrics.attention.AttentionPositions.compute`, NaN where never seen)."""
    valid = ~torch.isnan(received)
    count = int(valid.sum())
    if not count:
        return []
    names = [str(label) for label in labels] if labels is not None and len(labels) == received.numel() else None
    values, index = torch.where(valid, received, -math.inf).topk(min(k, count))
    return [(i if names is None else names[i], float(v)) for i, v in zip(index.tolist(), values.tolist(), strict=False)]
