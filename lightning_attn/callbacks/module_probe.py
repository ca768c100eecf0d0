"""``ModuleProbe``: gates, attention pooling and any named activation, streamed and drawn like attention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor

from lightning_attn.callbacks.base import (
    Stage,
    StreamingCallback,
    check_min,
    close_recorder,
    open_recorder,
    probe_batch,
)
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, DEFAULT_OVERHEAD_BUDGET
from lightning_attn.capture.probes import ModuleHooks, ProbeSpec, parse_probes, resolve_probes
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder
from lightning_attn.metrics.attention import key_mask_for
from lightning_attn.metrics.probes import (
    ProbeResults,
    ProbeSamples,
    ProbeStatistics,
    activation_view,
    top_weight_positions,
)
from lightning_attn.plots import attention as attention_plots
from lightning_attn.plots import probes as plots

__all__ = ["ModuleProbe"]

NAMESPACE = "probe"


class ModuleProbe(StreamingCallback):
    """Streamed statistics and figures of named module outputs: gates, attention pooling, any activation.

    Probes are declared by glob over qualified module names with a kind::

        ModuleProbe(probes={"gate": ("layers.*.gate", "activation"), "pool": ("pool.softmax", "weights")})

    Design: a small callback that shares the :class:`~lightning_attn.AttentionLogger`'s machinery rather than an
    option of it. It uses the same evaluation gating (:class:`~lightning_attn.callbacks.EvaluationCallback`:
    stages, ``every_n_epochs``, sanity check skipped), the same sampled batches (``max_batches``,
    ``every_n_batches``) and probe samples, the same sum-reduced torchmetrics states (a ``"weights"`` output is
    fed to the logger's :class:`~lightning_attn.metrics.attention.AttentionStatistics` and
    :class:`~lightning_attn.metrics.attention.AttentionPositions` as ``[B, H, 1, L]`` attention rows, so it gets
    exactly the attention measures, with no second implementation), the same figure helpers and the same sinks.
    Probing is a different capture (per-module forward hooks on chosen modules, not attention interception), so
    it stays a separate callback: probes can be added or dropped without touching attention logging, and
    either runs without the other.

    Module matching: ``pattern`` is an ``fnmatch`` glob (``*`` crosses dots) over the full qualified names of
    ``pl_module.named_modules()`` with DDP/FSDP/``torch.compile`` wrapper components stripped; a pattern that
    matches nothing raises one ``ValueError`` at setup naming every such pattern with the closest module names.
    Each matched module is a site named by its module path (``layers.0.gate``); the k-th repeated call of a
    module within one batch is ``<name>#k``. Forward hooks are registered on the matched modules at the start of
    each evaluation epoch that runs and removed at its end (and when the loop raises); they detach the output
    and never change it. A per-module hook on a submodule of an ``nn.TransformerEncoderLayer`` moves that layer
    off its fused eval fast path (outputs equal up to rounding); gates and pooling heads are not such modules.

    Kinds:

    - ``"activation"``: the output (the first tensor of a tuple) is read as ``[batch, positions, channels]``:
      ``[B, L, C]`` as is, ``[B, C]`` as one position, ``[B]`` as one position and one channel, and
      ``[B, L, d1, d2, ...]`` with the trailing dimensions flattened into channels (dim 1 is always the position:
      probe batch-first modules). Statistics: per position (time step) and per channel the mean, the population
      standard deviation and the fraction of saturated values (``<= saturation_threshold`` or
      ``>= 1 - saturation_threshold``: a gate shut or fully open), overall mean, std and saturation.
    - ``"weights"``: a distribution over positions along the last dimension (e.g. a pooling softmax ``[B, L]``
      or ``[B, H, L]``; trailing singleton dimensions dropped; ``[B, H, Q, K]`` maps accepted) becomes an
      attention site of its own: per head the mean and std over samples of ``entropy`` (normalized),
      ``max_weight``, ``sparsity``, ``distance`` (for one-row outputs: the mean position ``sum_j w_j j``) and
      ``first_token`` (weight on position 0), the top positions by mean weight, the mean and std of each
      position's weight across samples (and heads), and a per-head histogram. No rollout (a pooling
      distribution is not a layer-to-layer map).

    Histograms: per-head histograms of weights in ``histogram_bins`` fixed bins on ``[0, 1]`` (streamed counts,
    the distribution view of attention) for every ``"weights"`` site and for the attention sites matched by
    ``histogram_sites`` (captured by an :class:`~lightning_attn.AttentionRecorder`, as the AttentionLogger does).

    Everything is streamed into fixed-size, sum-reduced states on the module's device
    (:mod:`lightning_attn.metrics.probes`): memory does not grow with the number of batches, batch hooks never
    synchronize with the host, and under DDP the statistics over ``N`` ranks equal one process over the same
    samples (``compute()`` runs on every rank; figures and files on global rank zero).

    Logged (``pl_module.log`` at epoch end, already reduced over ranks, so ``ModelCheckpoint`` and
    ``EarlyStopping`` can monitor them): ``probe/<stage>/<site>/{mean,std,saturation_low,saturation_high}`` for
    activation sites and ``probe/<stage>/<site>/<statistic>`` (mean over heads) for weights sites.

    Published on global rank zero through :mod:`lightning_attn.sinks` under ``probe/<stage>/...``: per activation
    probe, the mean over time of every site overlaid (``<probe>/over_time``, band: std) and a heatmap over time of
    the ``max_channels`` channels with the largest std for each probe sample (``<probe>/heatmap``); per weights
    probe, the weights over time (``<probe>/over_time``: mean and std across samples per head, the probe samples'
    own lines), the attention measures (``<probe>/statistics``: bars per site and head, error bars std over
    samples) and the top positions (``<probe>/top_positions``); the per-head histograms (``histograms``); a
    summary table; and always the JSON file ``<stage>/statistics_epoch<E>_step<S>.json``.
    ``callback.results[<stage>]`` holds the last epoch's
    :class:`~lightning_attn.metrics.probes.ProbeResults` (probe samples' outputs under ``samples``).

    Probe samples are the AttentionLogger's: the first ``probe_samples`` samples of the first batch of
    dataloader 0 on global rank zero, so gates, pooling and attention figures show the same samples.

    Args:
        probes: probe name to ``(module glob, kind)``, kind ``"activation"`` or ``"weights"``; in YAML
            ``{gate: [layers.*.gate, activation], pool: [pool.softmax, weights]}``.
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        max_batches: analyse at most this many batches per dataloader and epoch (``None``: all).
        every_n_batches: analyse only batches whose index is a multiple of this.
        probe_samples: samples whose outputs are drawn (0: none); ``None`` takes the ``probe_samples`` of an
            AttentionLogger among the Trainer's callbacks, else 2.
        saturation_threshold: a value ``<= t`` counts as saturated low, ``>= 1 - t`` as saturated high.
        sparsity_threshold: weight below which a position counts as not attended (weights sites).
        histogram_sites: glob patterns of attention sites (as the AttentionLogger names them, e.g.
            ``layers.*.cross_attn``) whose per-head weight histograms are streamed; weights probes always are.
        histogram_bins: equal-width bins on ``[0, 1]`` of the histograms.
        chunk_size: query rows of an attention map reduced at a time for histograms (``None``: whole maps).
        position_names: labels of the positions (time steps) for axes and top positions, used where the length
            matches (e.g. ``[t-31, ..., t0]``).
        max_channels: channels shown in the activation heatmaps (those with the largest std over the epoch).
        max_figure_sites: at most this many sites per figure (evenly spaced over depth, first and last kept).
        top_k: number of top positions reported per weights site.
        max_positions: positions tracked per site (fixed state size).
        mask_key: where each batch holds a ``[batch, positions]`` mask of valid positions (true or 1 where valid,
            e.g. ``"attention_mask"``): a key of a mapping batch or the index of an element of a tuple batch.
            Activation outputs with that many positions then leave padded positions out of every statistic;
            outputs without a position axis are unaffected, other lengths raise an error. (``"weights"`` outputs
            need no mask: a masked softmax gives padded positions weight 0, and zero weights are left out.)
        log_figures: draw and publish figures (statistics, table and JSON are published regardless).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn/<name>/<stage>``
            (``<default_root_dir>/lightning_attn_logs/version_<n>/<name>/<stage>`` with no logger).
        name: replaces ``probe`` in the logged keys, published names and the output folder (default ``probe``): give
            two instances on one Trainer different names (equal names raise at setup).
        overhead_budget: share of the epoch that recording may add: evenly spread batches, the same on every rank
            and for every callback (:mod:`~lightning_attn.callbacks.budget`); ``None``: every batch.
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader (all when fewer).
        exact_outputs: ``False``: SDPA outputs computed from the probabilities recorded (within 1e-5, not bitwise;
            see :class:`~lightning_attn.AttentionRecorder`).
    """

    namespace = NAMESPACE

    def __init__(
        self,
        probes: dict[str, tuple[str, str]],
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        every_n_batches: int = 1,
        probe_samples: int | None = None,
        saturation_threshold: float = 0.05,
        sparsity_threshold: float = 0.01,
        histogram_sites: Sequence[str] | None = None,
        histogram_bins: int = 20,
        chunk_size: int | None = 256,
        position_names: Sequence[str] | None = None,
        max_channels: int = 16,
        max_figure_sites: int = 6,
        top_k: int = 10,
        max_positions: int = 4096,
        mask_key: str | int | None = None,
        log_figures: bool = True,
        save_dir: str | None = None,
        name: str | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        min_batches: int = DEFAULT_MIN_BATCHES,
        exact_outputs: bool = True,
    ) -> None:
        super().__init__(stages, every_n_epochs, max_batches, every_n_batches, max_figure_sites, save_dir, name=name)
        self._set_budget(overhead_budget, min_batches)
        self.exact_outputs = exact_outputs
        self.specs: list[ProbeSpec] = parse_probes(probes)
        self.probes = {spec.name: (spec.pattern, spec.kind) for spec in self.specs}
        check_min(1, histogram_bins=histogram_bins, max_channels=max_channels, top_k=top_k, max_positions=max_positions)
        check_min(0, optional=True, probe_samples=probe_samples)
        check_min(1, optional=True, chunk_size=chunk_size)
        if not 0.0 <= saturation_threshold < 0.5:
            raise ValueError(f"saturation_threshold must be in [0, 0.5), got {saturation_threshold}")
        if not 0.0 < sparsity_threshold < 1.0:
            raise ValueError(f"sparsity_threshold must be in (0, 1), got {sparsity_threshold}")
        self.probe_samples = probe_samples
        self.saturation_threshold = saturation_threshold
        self.sparsity_threshold = sparsity_threshold
        self.histogram_sites = list(histogram_sites) if histogram_sites else None
        self.histogram_bins = histogram_bins
        self.chunk_size = chunk_size
        self.position_names = None if position_names is None else [str(n) for n in position_names]
        self.max_channels = max_channels
        self.top_k = top_k
        self.max_positions = max_positions
        self.mask_key = mask_key
        self.log_figures = log_figures

        self._active: ProbeStatistics | None = None
        self._hooks: ModuleHooks | None = None
        self._recorder: AttentionRecorder | None = None
        self._samples: ProbeSamples | None = None
        self._taking_samples = False
        self._position_mask: Tensor | None = None
        self._site_probe: dict[str, str] = {}
        self._attention_sites: set[str] = set()
        self._probe_sites: dict[str, list[str]] = {}
        self._warned_histograms = False

    # -- identity and checkpoints ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            stages=self.stages, probes=sorted(self.probes.items()), **self._name_in_state_key()
        )

    # -- set-up ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail early: every probe pattern must match a module (the error lists close module names)."""
        super().setup(trainer, pl_module, stage)
        resolve_probes(pl_module, self.specs)

    def forget_model(self) -> None:
        super().forget_model()
        self._site_probe = {}
        self._attention_sites = set()
        self._probe_sites = {}
        self._warned_histograms = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()

    def _num_samples(self, trainer: pl.Trainer) -> int:
        if self.probe_samples is not None:
            return self.probe_samples
        from lightning_attn.callbacks.attention_logger import AttentionLogger

        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Trainer.callbacks is a property of the mixin
            if isinstance(callback, AttentionLogger):
                return int(callback.probe_samples)
        return 2

    def _new_state(self) -> ProbeStatistics:
        return ProbeStatistics(
            self.saturation_threshold, self.sparsity_threshold, self.histogram_bins, self.max_positions, self.chunk_size
        )

    # -- hooks -----------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._used = set()
        self._samples = None
        self._hooks = ModuleHooks(pl_module, self.specs, self._on_output).attach()
        self._probe_sites = {name: list(sites) for name, sites in self._hooks.sites.items()}

    def eval_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        if not self._records(stage, dataloader_idx, batch_idx):
            return
        self._close_batch()
        self._active = self._state_for(stage, dataloader_idx, pl_module.device)
        if self.mask_key is not None:
            self._position_mask = batch_mask(batch, self.mask_key)
        if self._hooks is not None:
            self._hooks.new_step()
        if probe_batch(trainer, batch_idx, dataloader_idx) and self._samples is None:
            count = self._num_samples(trainer)
            if count:
                self._samples = ProbeSamples(count, self.max_positions)
                self._taking_samples = True
        if self.histogram_sites:
            self._recorder = open_recorder(
                pl_module, self._on_capture, self.histogram_sites, exact_outputs=self.exact_outputs
            )

    def eval_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        self._close_batch()

    def eval_abort(self) -> None:
        self._release()
        self._samples = None
        self._reset_states()

    def _close_batch(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder, quiet=True)  # "no attention found": reported once per epoch instead
        self._active = None
        self._taking_samples = False
        self._position_mask = None

    def _release(self) -> None:
        self._close_batch()
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()

    def _on_output(self, spec: ProbeSpec, site: str, output: Tensor) -> None:
        statistics = self._active
        if statistics is None:
            return
        self._site_probe.setdefault(site, spec.name)
        samples = self._samples if self._taking_samples else None
        if spec.kind == "activation":
            view = activation_view(output)
            mask = self._position_mask if self._position_mask is not None and view.shape[1] > 1 else None
            statistics.update_activation(site, view, position_mask=mask)
            if samples is not None:
                samples.add(site, view, position_dim=1)
        else:
            probs = statistics.update_weights(site, output, histogram=True)
            if samples is not None and probs.shape[-2] == 1:
                samples.add(site, probs[:, :, 0, :], position_dim=2)

    def _on_capture(self, capture: AttentionCapture) -> None:
        statistics = self._active
        if statistics is None:
            return
        site = capture.info.name
        self._attention_sites.add(site)
        for _, chunk in capture.chunks(self.chunk_size):
            statistics.update_histogram(site, chunk, key_mask_for(capture, chunk))

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        samples = self._samples.finish() if self._samples is not None else {}
        self._samples = None
        analysed = bool(self._used)
        self._finish_epoch(
            trainer,
            pl_module,
            stage,
            compute=lambda statistics, key, dataloader_idx: self._compute(
                statistics, key, trainer, samples if dataloader_idx == 0 else {}
            ),
            publish=lambda results, _: self._publish(trainer, results),
        )
        if self.histogram_sites and analysed and not self._attention_sites and not self._warned_histograms:
            self._warned_histograms = True
            rank_zero_warn(
                f"ModuleProbe: histogram_sites {self.histogram_sites} matched no attention site of "
                f"{type(pl_module).__name__}",
                category=UserWarning,
            )

    # -- epoch end -------------------------------------------------------------------------------------
    def _compute(
        self, statistics: ProbeStatistics, key: str, trainer: pl.Trainer, samples: dict[str, Tensor]
    ) -> ProbeResults:
        activations, weights, positions, histograms = statistics.compute()
        weights = {
            site: type(s)(
                mean={n: v.detach().to("cpu", torch.float64) for n, v in s.mean.items()},
                std={n: v.detach().to("cpu", torch.float64) for n, v in s.std.items()},
                rows=s.rows.detach().to("cpu", torch.float64),
            )
            for site, s in weights.items()
        }
        top = {}
        for site in weights:
            received = positions[site][0].detach().to("cpu", torch.float64)
            top[site] = top_weight_positions(received, self.top_k, self._labels(received.numel()))
        return ProbeResults(
            stage=key,
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            probes={
                name: {"pattern": pattern, "kind": kind, "sites": list(self._probe_sites.get(name, []))}
                for name, (pattern, kind) in self.probes.items()
            },
            activations=activations,
            weights=weights,
            top_positions=top,
            histograms=histograms,
            histogram_edges=statistics.histograms.edges,
            samples=samples,
        )

    def _labels(self, length: int) -> list[str] | None:
        names = self.position_names
        return names if names is not None and len(names) == length else None

    def _scalars(self, results: ProbeResults) -> dict[str, float]:
        prefix = f"{self.name}/{results.stage}"
        values: dict[str, float] = {}
        for site, summary in results.activations.items():
            if site in results.weights:
                continue
            values.update(
                {
                    f"{prefix}/{site}/mean": summary.mean,
                    f"{prefix}/{site}/std": summary.std,
                    f"{prefix}/{site}/saturation_low": summary.saturation_low,
                    f"{prefix}/{site}/saturation_high": summary.saturation_high,
                }
            )
        for site, stats in results.weights.items():
            for name, per_head in stats.mean.items():
                values[f"{prefix}/{site}/{name}"] = float(per_head.mean())
        return values

    # -- publishing (rank zero) ------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, results: ProbeResults) -> None:
        statistic_names = list(next(iter(results.weights.values())).mean) if results.weights else []
        columns = ["probe", "site", "kind", "mean", "std", "saturation_low", "saturation_high", *statistic_names]
        rows = []
        for site in dict.fromkeys([*results.activations, *results.weights]):
            kind = results.kind(site)
            summary = results.activations.get(site)
            row: list[Any] = [self._site_probe.get(site, ""), site, kind]
            row += (
                [summary.mean, summary.std, summary.saturation_low, summary.saturation_high]
                if summary is not None and kind == "activation"
                else [None] * 4
            )
            stats = results.weights.get(site)
            row += [float(stats.mean[n].mean()) if stats is not None else None for n in statistic_names]
            rows.append(row)
        figures = (lambda: self._figures(results)) if self.log_figures else None
        self._publish_results(trainer, results, "summary", columns, rows, figures)

    def _figures(self, results: ProbeResults) -> dict[str, Figure]:
        key, epoch = results.stage, f"epoch {results.epoch}"
        figures: dict[str, Figure] = {}
        sample_titles = [f"probe {i}" for i in range(max((v.shape[0] for v in results.samples.values()), default=0))]
        for probe, (_, kind) in self.probes.items():
            sites = self._figure_sites(results.probe_sites(probe))
            if not sites:
                continue
            if kind == "activation":
                self._activation_figures(figures, results, probe, sites, sample_titles, f"{key}, {epoch}")
            else:
                self._weights_figures(figures, results, probe, sites, sample_titles, f"{key}, {epoch}")
        histogram_sites = self._figure_sites(list(results.histograms))
        if histogram_sites:
            figures[f"{key}/histograms"] = plots.plot_weight_histograms(
                {s: results.histograms[s] for s in histogram_sites},
                results.histogram_edges,
                title=f"Per-head histograms of attention weights ({key}, {epoch})",
            )
        return figures

    def _activation_figures(
        self,
        figures: dict[str, Figure],
        results: ProbeResults,
        probe: str,
        sites: list[str],
        sample_titles: list[str],
        when: str,
    ) -> None:
        summaries = {s: results.activations[s] for s in sites}
        length = max(int(s.position_mean.numel()) for s in summaries.values())
        unit = all(_within_unit(s.position_mean) for s in summaries.values()) and all(
            _within_unit(results.samples[s]) for s in sites if s in results.samples
        )
        figures[f"{results.stage}/{probe}/over_time"] = plots.plot_over_time(
            {s: v.position_mean for s, v in summaries.items()},
            {s: v.position_std for s, v in summaries.items()},
            position_labels=self._labels(length),
            ylabel=f"{probe}: mean over samples and channels",
            ylim=(0.0, 1.0) if unit else None,
            title=f"{probe}: mean over time per site ({when}; band: std)",
        )
        maps, labels = {}, {}
        for site in sites:
            values = results.samples.get(site)
            if values is None:
                continue
            channel_std = torch.nan_to_num(summaries[site].channel_std, nan=-1.0)
            chosen = channel_std.topk(min(self.max_channels, channel_std.numel())).indices
            maps[site] = values[:, :, chosen].transpose(1, 2)  # [n, C', L]
            labels[site] = [f"ch {int(c)}" for c in chosen]
        if maps:
            length = max(int(m.shape[-1]) for m in maps.values())
            figures[f"{results.stage}/{probe}/heatmap"] = plots.plot_channel_heatmaps(
                maps,
                channel_labels=labels,
                position_labels=self._labels(length),
                sample_titles=sample_titles,
                vmin=0.0 if unit else None,
                vmax=1.0 if unit else None,
                title=f"{probe} over time, the {max(len(v) for v in labels.values())} channels of largest std ({when})",
            )

    def _weights_figures(
        self,
        figures: dict[str, Figure],
        results: ProbeResults,
        probe: str,
        sites: list[str],
        sample_titles: list[str],
        when: str,
    ) -> None:
        means, stds, samples = {}, {}, {}
        for site in sites:
            summary = results.activations.get(site)
            if summary is None:  # a [B, H, Q, K] map: no position view
                continue
            values = results.samples.get(site)  # [n, H, L]
            joint_mean, joint_std = summary.joint_mean, summary.joint_std
            if joint_mean is None or joint_std is None:
                means[site], stds[site] = summary.position_mean, summary.position_std
                if values is not None:
                    samples[site] = values[:, 0]
                continue
            heads = joint_mean.shape[1]
            for head in range(heads):
                panel = site if heads == 1 else f"{site} h{head}"
                means[panel] = summary.position_mean if heads == 1 else joint_mean[:, head]
                stds[panel] = summary.position_std if heads == 1 else joint_std[:, head]
                if values is not None:
                    samples[panel] = values[:, head]
        if means:
            length = max(int(m.numel()) for m in means.values())
            figures[f"{results.stage}/{probe}/over_time"] = plots.plot_weights_over_time(
                means,
                stds,
                samples,
                position_labels=self._labels(length),
                sample_titles=sample_titles,
                title=f"{probe}: weights over positions ({when}; band: std across samples)",
            )
        stats = {s: results.weights[s] for s in sites}
        figures[f"{results.stage}/{probe}/statistics"] = plots.plot_weight_statistics(
            {s: v.mean for s, v in stats.items()},
            {s: v.std for s, v in stats.items()},
            labels={"distance": "distance (mean position)", "first_token": "first_token (weight on pos. 0)"},
            title=f"{probe}: attention measures of the weights ({when}; error bars: std over samples)",
        )
        top = {s: results.top_positions[s] for s in sites if results.top_positions.get(s)}
        if top:
            figures[f"{results.stage}/{probe}/top_positions"] = attention_plots.plot_top_positions(
                top, title=f"{probe}: top positions ({when})", xlabel="mean weight"
            )


def batch_mask(batch: Any, key: str | int) -> Tensor:
    """The ``[batch, positions]`` mask at ``key`` of a mapping batch, or at index ``key`` of a tuple/list batch."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"ModuleProbe: mask_key {key!r} is not in the batch (keys: {sorted(map(str, batch))})")
        mask = batch[key]
    elif isinstance(batch, (tuple, list)) and isinstance(key, int) and -len(batch) <= key < len(batch):
        mask = batch[key]
    else:
        raise KeyError(f"ModuleProbe: mask_key {key!r} does not select an element of a {type(batch).__name__} batch")
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(
            f"ModuleProbe: mask_key {key!r} must select a [batch, positions] tensor, got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
        )
    return mask.bool()


def _within_unit(values: Tensor) -> bool:
    finite = values[torch.isfinite(values)]
    return bool(finite.numel() == 0 or (finite.min() >= 0 and finite.max() <= 1))
