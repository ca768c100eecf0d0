"""``AttentionLogger``: streaming per-head attention statistics and figures on validation and test."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from lightning_attn.capture.record import AttentionCapture
from lightning_attn.capture.recorder import AttentionRecorder, matches
from lightning_attn.functional.attention import modality_agreement, top_positions
from lightning_attn.metrics.attention import (
    STATISTICS_OF_POSITIONS,
    AttentionPositions,
    AttentionResults,
    AttentionStatistics,
    ModalityAgreement,
    PairBuffer,
    ProbeMaps,
    default_reducers,
)
from lightning_attn.metrics.engine import ENGINE
from lightning_attn.plots import attention as plots

__all__ = ["AttentionLogger"]

NAMESPACE = "attn"


@dataclass
class _Accumulators:
    """The metrics of one (stage, dataloader) pair; kept across epochs (reset after each compute)."""

    stats: AttentionStatistics
    positions: AttentionPositions
    agreement: ModalityAgreement
    pairs: PairBuffer | None

    def to(self, device: torch.device) -> None:
        for metric in (self.stats, self.positions, self.agreement):
            if metric.device != device:
                metric.to(device)

    def reset(self) -> None:
        for metric in (self.stats, self.positions, self.agreement):
            metric.reset()
        if self.pairs is not None:
            self.pairs.clear()


class AttentionLogger(StreamingCallback):
    """Per-head attention statistics and figures of every attention site, streamed over validation and test.

    Every attention site of the LightningModule (``nn.MultiheadAttention``, ``nn.Transformer*`` layers
    including their fused fast paths, ``scaled_dot_product_attention`` calls such as Hugging Face ``sdpa``,
    eager modules that return their weights) is found at run time by
    :class:`~lightning_attn.AttentionRecorder`; no map is stored. Each captured call is reduced in query
    chunks of ``chunk_size`` rows into fixed-size, sum-reduced torchmetrics states on the module's device
    (:mod:`lightning_attn.metrics.attention`), so memory does not grow with the number of batches and the
    full ``[B, H, L, L]`` map of a long sequence never exists. Batch hooks never synchronize with the host.

    Statistics, per site and head, mean and standard deviation over all (sample, query) rows of the epoch:

    - ``entropy``: normalized row entropy ``H_i / log(n_i)`` in ``[0, 1]`` (Clark et al. 2019); 0 = one key;
    - ``max_weight``: largest weight of the row, the head "confidence" (Voita et al. 2019);
    - ``sparsity``: fraction of valid keys with weight below ``sparsity_threshold``;
    - ``distance``: mean attention distance ``sum_j A_ij |i - j|`` in tokens;
    - ``first_token``: weight on key 0 ([CLS]/BOS attention sink);

    and per site the top attended positions (mean share of a row's attention each key receives) and the top
    attending positions (attention a query gives to other positions; peak weight for cross-attention),
    labelled with ``token_names`` where given; per declared modality pair the mean per-sample agreement (the
    correlation of the head-averaged A->B map with the transposed B->A map, in ``[-1, 1]``).

    Logged keys (through ``pl_module.log`` at epoch end, on every rank: ``ModelCheckpoint`` and
    ``EarlyStopping`` can monitor them; the values are already reduced over ranks):

    - ``attn/<stage>/<site>/<stat>``: mean over heads of the per-head means;
    - ``attn/<stage>/<site>/h<k>/<stat>``: head ``k`` (only with ``log_per_head=True``);
    - ``attn/<stage>/<pair>/agreement``: per declared modality pair;

    with ``<stage>`` ``val`` or ``test``, ``val_dl<k>``/``test_dl<k>`` for the k-th (k >= 1) dataloader, and
    ``<site>`` the module path of the attention (e.g. ``model.encoder.layers.0.self_attn``).

    Published on global rank zero through :mod:`lightning_attn.sinks` to every logger of the Trainer (W&B
    images and a table, TensorBoard images and text; PNG/CSV on disk when no dashboard logger is attached or
    ``save_dir`` is set), under ``attn/<stage>/...``: a site x head heatmap per statistic, layer-evolution
    lines (entropy, sparsity, max weight by depth), head-contribution bars (max weight per head), top
    attended positions; for the probe samples the head-averaged map and the per-head grid of up to
    ``max_figure_sites`` sites (evenly spaced over depth, first and last included), the attention rollout
    (self-attention sites of equal length, in forward order) and, per modality pair, A->B, B->A transposed
    and their difference with the agreement score. A JSON file of the epoch's statistics
    (``<stage>/statistics_epoch<E>_step<S>.json``) is always written to disk. ``callback.results[<stage>]`` holds
    the last epoch's :class:`~lightning_attn.metrics.attention.AttentionResults`.

    Probe samples: the first ``probe_samples`` samples of the first batch of dataloader 0 on global rank zero
    (under DDP, the first samples of rank zero's shard). They are the same samples every epoch as long as
    that dataloader is not shuffled (Lightning's validation and test loaders are not by default); a change
    of probe inputs between epochs, also across a checkpoint resume, raises a warning.

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        max_batches: analyse at most this many batches per dataloader and epoch (``None``: all).
        every_n_batches: analyse only batches whose index is a multiple of this; batches in between run
            with no recording at all, so the cost drops proportionally.
        include: glob patterns of site names to analyse (default: all sites).
        exclude: glob patterns of site names to skip.
        probe_samples: number of fixed samples whose maps are drawn (0: no map figures).
        sparsity_threshold: weight below which a key counts as not attended, for ``sparsity``.
        chunk_size: query rows reduced at a time (``None``: whole maps). Long sequences never materialize
            more than ``batch x heads x chunk_size x keys`` probabilities per site.
        modality_pairs: named pairs of cross-attention sites ``{"eeg<->spec": ("<A->B site>", "<B->A site>")}``;
            site names or glob patterns. The pair name's two sides (split at ``<->``) label the figures.
        token_names: labels of positions for heatmap axes and top-position lists: a list labels every axis
            of the same length; a mapping labels sites by glob pattern, ``"<glob>:queries"`` or
            ``"<glob>:keys"`` for one axis of cross-attention sites (e.g. feature or sensor names).
        log_per_head: also log per-head scalars ``attn/<stage>/<site>/h<k>/<stat>`` (one TensorBoard custom-scalars
            chart per site and statistic); off by default: a 12 x 12-head model would log 144 scalars per statistic.
        log_figures: draw and publish figures (statistics, table and JSON are published regardless).
        max_figure_sites: at most this many sites get per-site map figures and head-contribution bars.
        max_map_tokens: probe maps are block-pooled to at most this many queries and keys for display.
        top_k: number of top attended / attending positions reported per site.
        max_positions: positions tracked for the top-position statistics (fixed state size per site).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn/<name>/<stage>``
            (``<default_root_dir>/lightning_attn_logs/version_<n>/<name>/<stage>`` with no logger).
        name: replaces ``attn`` in the logged keys, published names and the output folder; default ``attn``, or
            ``attn-<include patterns>`` with ``include`` (e.g. ``attn-encoder`` for ``["encoder.*"]``), so that two
            instances on one Trainer keep their outputs, keys and checkpoint states apart (equal names raise at setup).
        overhead_budget: share of the epoch that recording may add: evenly spread batches, the same on every rank
            and for every callback (:mod:`~lightning_attn.callbacks.budget`); ``None``: every batch.
        min_batches: with a budget, never fewer recorded batches per epoch and dataloader (all when fewer).
        exact_outputs: ``False``: SDPA outputs computed from the probabilities recorded (within 1e-5, not bitwise;
            see :class:`~lightning_attn.AttentionRecorder`).
    """

    namespace = NAMESPACE

    def __init__(
        self,
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        every_n_batches: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        probe_samples: int = 2,
        sparsity_threshold: float = 0.01,
        chunk_size: int | None = 256,
        modality_pairs: Mapping[str, tuple[str, str]] | None = None,
        token_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        log_per_head: bool = False,
        log_figures: bool = True,
        max_figure_sites: int = 4,
        max_map_tokens: int = 128,
        top_k: int = 10,
        max_positions: int = 4096,
        save_dir: str | None = None,
        name: str | None = None,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        min_batches: int = DEFAULT_MIN_BATCHES,
        exact_outputs: bool = True,
    ) -> None:
        super().__init__(
            stages, every_n_epochs, max_batches, every_n_batches, max_figure_sites, save_dir, name=name, include=include
        )
        self._set_budget(overhead_budget, min_batches)
        self.exact_outputs = exact_outputs
        check_min(0, probe_samples=probe_samples)
        check_min(1, max_map_tokens=max_map_tokens, top_k=top_k, max_positions=max_positions)
        check_min(1, optional=True, chunk_size=chunk_size)
        if not 0.0 < sparsity_threshold < 1.0:
            raise ValueError(f"sparsity_threshold must be in (0, 1), got {sparsity_threshold}")
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.probe_samples = probe_samples
        self.sparsity_threshold = sparsity_threshold
        self.chunk_size = chunk_size
        for name, sites in (modality_pairs or {}).items():
            if len(sites) != 2:
                raise ValueError(f"modality pair {name!r} needs two sites (A->B, B->A), got {sites!r}")
        self.modality_pairs = {str(k): (str(v[0]), str(v[1])) for k, v in (modality_pairs or {}).items()}
        self.token_names = token_names
        self.log_per_head = log_per_head
        self.log_figures = log_figures
        self.max_map_tokens = max_map_tokens
        self.top_k = top_k
        self.max_positions = max_positions

        self._active: _Accumulators | None = None
        self._recorder: AttentionRecorder | None = None
        self._probe: ProbeMaps | None = None
        self._probe_input: Any = None
        self._probe_fingerprints: dict[str, list[list[float]]] = {}  # stage -> fingerprint of the probe inputs

    # -- identity and checkpoints ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            stages=self.stages, include=self.include, exclude=self.exclude, **self._name_in_state_key()
        )

    def state_dict(self) -> dict[str, Any]:
        """Epoch counters and the probe samples' identity (count, fingerprint of their inputs per stage)."""
        return {
            **super().state_dict(),
            "probe_samples": self.probe_samples,
            "probe_fingerprints": dict(self._probe_fingerprints),
        }

    def forget_model(self) -> None:
        super().forget_model()
        self._probe_fingerprints = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("probe_samples", self.probe_samples)
        if saved != self.probe_samples:
            rank_zero_warn(
                f"AttentionLogger: checkpoint used probe_samples={saved}, now {self.probe_samples}",
                category=UserWarning,
            )
            self._probe_fingerprints = {}
        else:
            self._probe_fingerprints = dict(state_dict.get("probe_fingerprints", {}))

    # -- states ----------------------------------------------------------------------------------------
    def _new_state(self) -> _Accumulators:
        return _Accumulators(
            stats=AttentionStatistics(default_reducers(self.sparsity_threshold), chunk_size=self.chunk_size),
            positions=AttentionPositions(self.max_positions),
            agreement=ModalityAgreement(),
            pairs=PairBuffer(self.modality_pairs) if self.modality_pairs else None,
        )

    @property
    def _accumulators(self) -> dict[tuple[str, int], _Accumulators]:
        """The accumulators of every (stage, dataloader) pair seen."""
        return self._states

    # -- hooks -----------------------------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._used = set()
        self._probe = None
        self._probe_input = None

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
        self._close_recorder()
        self._active = self._state_for(stage, dataloader_idx, pl_module.device)
        if self.probe_samples and probe_batch(trainer, batch_idx, dataloader_idx):
            self._probe = ProbeMaps(self.probe_samples, self.max_map_tokens) if self.log_figures else None
            self._probe_input = _slice_batch(batch, self.probe_samples)
        self._recorder = open_recorder(pl_module, self._on_capture, self.include, self.exclude, self.exact_outputs)

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
        self._close_recorder()

    def eval_abort(self) -> None:
        self._close_recorder()
        self._probe = None
        self._probe_input = None
        self._reset_states()

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        close_recorder(recorder)
        if self._active is not None and self._active.pairs is not None:
            self._active.pairs.clear()
        self._active = None

    def _on_capture(self, capture: AttentionCapture) -> None:
        acc = self._active
        if acc is None:
            return
        info = capture.info
        site = info.name
        roles = acc.pairs.roles(site) if acc.pairs is not None else []
        probe = self._probe
        head_mean: Tensor | None = None
        self_attention = info.kind == "self"
        # every statistic of the call, computed once by the engine (shared with other callbacks)
        acc.stats.update(site, capture)
        acc.positions.update(site, ENGINE.rows(capture, STATISTICS_OF_POSITIONS, self.chunk_size), 0, self_attention)
        chunks = capture.chunks(self.chunk_size) if probe is not None or roles else ()
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
            assert acc.pairs is not None and head_mean is not None  # roles come from declared pairs, after the chunks
            both = acc.pairs.add(pair, role, head_mean)
            if both is not None:
                acc.agreement.update(pair, *both)

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_recorder()
        probe = self._probe.finish() if self._probe is not None else None
        self._check_probe_inputs(stage)
        self._probe = None
        self._finish_epoch(
            trainer,
            pl_module,
            stage,
            compute=lambda acc, key, _: self._compute(acc, key, trainer),
            publish=lambda results, dataloader_idx: self._publish(
                trainer, results, probe if dataloader_idx == 0 else None
            ),
        )

    # -- epoch end -------------------------------------------------------------------------------------
    def _compute(self, acc: _Accumulators, key: str, trainer: pl.Trainer) -> AttentionResults:
        stats = acc.stats.compute()
        positions = acc.positions.compute()
        agreement = acc.agreement.compute_sites()
        sites = list(stats)
        names = list(acc.stats.names)
        heads = [acc.stats.sites[s] for s in sites]
        width = max(heads, default=0)

        def table(pick: Any) -> Tensor:
            out = torch.full((len(sites), width), math.nan, dtype=torch.float64)
            for index, site in enumerate(sites):
                out[index, : heads[index]] = pick(stats[site]).detach().to("cpu", torch.float64)
            return out

        top_attended, top_attending = {}, {}
        for site in sites:
            received, given = (t.detach().to("cpu", torch.float64) for t in positions[site])
            top_attended[site] = self._top(received, site, "keys")
            top_attending[site] = self._top(given, site, "queries")
        return AttentionResults(
            stage=key,
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            sites=sites,
            kinds=[acc.positions.kinds.get(s, "self") for s in sites],
            num_heads=heads,
            mean={n: table(lambda s, n=n: s.mean[n]) for n in names},
            std={n: table(lambda s, n=n: s.std[n]) for n in names},
            rows=table(lambda s: s.rows),
            top_attended=top_attended,
            top_attending=top_attending,
            agreement={pair: float(value) for pair, value in agreement.items()},
        )

    def _top(self, scores: Tensor, site: str, axis: str) -> list[tuple[str | int, float]]:
        valid = ~torch.isnan(scores)
        if not bool(valid.any()):
            return []
        labels = self._labels(site, axis, scores.numel())
        entries = top_positions(torch.where(valid, scores, -math.inf), min(self.top_k, int(valid.sum())), labels)
        return [(label, float(value)) for label, value in entries]

    def _labels(self, site: str, axis: str, length: int) -> list[str] | None:
        names = self.token_names
        if names is None:
            return None
        if isinstance(names, Mapping):
            for pattern, labels in names.items():
                glob, _, which = (
                    str(pattern).rpartition(":")
                    if str(pattern).endswith((":queries", ":keys"))
                    else (str(pattern), "", "")
                )
                if which and which != axis:
                    continue
                if (glob == site or matches(site, [glob])) and len(labels) == length:
                    return [str(label) for label in labels]
            return None
        return [str(label) for label in names] if len(names) == length else None

    def _scalars(self, results: AttentionResults) -> dict[str, float]:
        values: dict[str, float] = {}
        prefix = f"{self.name}/{results.stage}"
        for index, site in enumerate(results.sites):
            for name in results.statistics:
                values[f"{prefix}/{site}/{name}"] = float(results.mean[name][index, : results.num_heads[index]].mean())
            if self.log_per_head:
                for head in range(results.num_heads[index]):
                    for name in results.statistics:
                        values[f"{prefix}/{site}/h{head}/{name}"] = float(results.mean[name][index, head])
        for pair, value in results.agreement.items():
            values[f"{prefix}/{pair}/agreement"] = value
        return values

    def _check_probe_inputs(self, stage: str) -> None:
        if self._probe_input is None:
            return
        fingerprint = _fingerprint(self._probe_input)
        self._probe_input = None
        previous = self._probe_fingerprints.get(stage)
        if previous is not None and fingerprint != previous:
            rank_zero_warn(
                "AttentionLogger: the probe samples (first samples of the first batch of dataloader 0) changed since "
                "the last epoch; is that dataloader shuffled? Figures of different epochs show different samples.",
                category=UserWarning,
            )
        self._probe_fingerprints[stage] = fingerprint

    # -- publishing (rank zero) ------------------------------------------------------------------------
    def _publish(self, trainer: pl.Trainer, results: AttentionResults, probe: dict[str, Any] | None) -> None:
        columns = (
            ["site", "head"] + [f"{n}_mean" for n in results.statistics] + [f"{n}_std" for n in results.statistics]
        )
        rows = [
            [site, head]
            + [float(results.mean[n][i, head]) for n in results.statistics]
            + [float(results.std[n][i, head]) for n in results.statistics]
            for i, site in enumerate(results.sites)
            for head in range(results.num_heads[i])
        ]
        figures = (lambda: self._figures(results, probe)) if self.log_figures and results.sites else None
        self._publish_results(trainer, results, "head_statistics", columns, rows, figures)

    def _figures(self, results: AttentionResults, probe: dict[str, Any] | None) -> dict[str, Figure]:
        key = results.stage
        sites = results.sites
        chosen = self._figure_sites(sites)
        index = {site: i for i, site in enumerate(sites)}
        figures: dict[str, Figure] = {}
        epoch = f"epoch {results.epoch}"
        figures[f"{key}/head_statistics"] = plots.plot_head_statistics(
            results.mean, sites, title=f"Per-head attention statistics ({key}, {epoch})"
        )
        evolution = [n for n in ("entropy", "sparsity", "max_weight") if n in results.mean]
        if evolution:
            figures[f"{key}/layer_evolution"] = plots.plot_layer_evolution(
                sites,
                {n: results.site_mean(n) for n in evolution},
                {n: _nanstd(results.mean[n]) for n in evolution},
                title=f"Layer evolution ({key}, {epoch}; band: std across heads)",
            )
        if "max_weight" in results.mean:
            rows = [index[s] for s in chosen]
            figures[f"{key}/head_contributions"] = plots.plot_head_contributions(
                chosen,
                results.mean["max_weight"][rows],
                results.std["max_weight"][rows],
                statistic="max_weight",
                title=f"Head contributions: mean max weight per head ({key}, {epoch}; error bars: std over rows)",
            )
        attended = {s: results.top_attended[s] for s in chosen if results.top_attended.get(s)}
        if attended:
            figures[f"{key}/top_attended"] = plots.plot_top_positions(
                attended, title=f"Top attended positions ({key}, {epoch})"
            )
        if probe is None:
            return figures
        labels = [f"probe {i}" for i in range(self.probe_samples)]
        for site in chosen:
            if site not in probe["mean"]:
                continue
            (num_queries, num_keys), pooled = (
                probe["shapes"][site],
                probe["mean"][site].shape[1:] != probe["shapes"][site],
            )
            qlab = None if pooled else self._labels(site, "queries", num_queries)
            klab = None if pooled else self._labels(site, "keys", num_keys)
            note = (
                f" (pooled {num_queries}x{num_keys} -> {probe['mean'][site].shape[1]}x{probe['mean'][site].shape[2]})"
                if pooled
                else ""
            )
            figures[f"{key}/maps/{site}"] = plots.plot_attention_maps(
                probe["mean"][site],
                titles=labels,
                query_labels=qlab,
                key_labels=klab,
                title=f"{site}: head mean{note}, {epoch}",
            )
            figures[f"{key}/heads/{site}"] = plots.plot_attention_heads(
                probe["heads"][site],
                query_labels=qlab,
                key_labels=klab,
                title=f"{site}: per head, probe 0{note}, {epoch}",
            )
        if probe["rollout"] is not None:
            length = probe["rollout"].shape[-1]
            first = probe["rollout_sites"][0]
            rollout_labels = self._labels(first, "keys", length)
            figures[f"{key}/rollout"] = plots.plot_rollout(
                probe["rollout"],
                labels=rollout_labels,
                titles=labels,
                title=f"Attention rollout over {len(probe['rollout_sites'])} self-attention sites ({epoch})",
            )
        for pair, (site_a, site_b) in self.modality_pairs.items():
            pairs = self._accumulators[(_stage_of(key), 0)].pairs
            bound = pairs.resolved.get(pair, [None, None]) if pairs is not None else [None, None]
            a, b = bound[0] or site_a, bound[1] or site_b
            if a not in probe["mean"] or b not in probe["mean"]:
                continue
            a_to_b, b_to_a = probe["mean"][a][0], probe["mean"][b][0]
            if a_to_b.shape != b_to_a.T.shape:
                continue
            sides = tuple(part.strip() for part in pair.split("<->")) if "<->" in pair else ("A", "B")
            figures[f"{key}/pairs/{pair}"] = plots.plot_modality_pair(
                a_to_b,
                b_to_a,
                names=(sides[0], sides[1]),
                agreement=results.agreement.get(pair),
                sample_agreement=float(modality_agreement(a_to_b, b_to_a)),
                a_labels=self._labels(a, "queries", a_to_b.shape[0]),
                b_labels=self._labels(a, "keys", a_to_b.shape[1]),
                title=f"{pair}, probe 0, {epoch}",
            )
        return figures


def _stage_of(key: str) -> str:
    return "test" if key.startswith("test") else "validate"


def _nanstd(values: Tensor) -> Tensor:
    """Standard deviation across heads (dim 1), NaN-aware."""
    mean = values.nanmean(dim=1, keepdim=True)
    return ((values - mean) ** 2).nanmean(dim=1).sqrt()


def _slice_batch(batch: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor of a batch (detached clones on the same device: no sync)."""
    if isinstance(batch, Tensor):
        return batch[:count].detach().clone() if batch.dim() else batch.detach().clone()
    if isinstance(batch, Mapping):
        return {k: _slice_batch(v, count) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_slice_batch(v, count) for v in batch]
    return None


def _fingerprint(sliced: Any) -> list[list[float]]:
    """Shape and sums of every tensor of the probe inputs (a host sync: epoch end only)."""
    out: list[list[float]] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            data = value.detach().to("cpu", torch.float64)
            out.append(
                [float(d) for d in value.shape]
                + [
                    float(data.sum()),
                    float(data.abs().sum()),
                    float((data * torch.arange(1, data.numel() + 1, dtype=torch.float64).view_as(data)).sum())
                    if data.numel()
                    else 0.0,
                ]
            )
        elif isinstance(value, Mapping):
            for k in sorted(value, key=str):
                visit(value[k])
        elif isinstance(value, list):
            for v in value:
                visit(v)

    visit(sliced)
    return out
