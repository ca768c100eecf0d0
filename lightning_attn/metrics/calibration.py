"""Constant-memory calibration metric: sum-reduced histograms instead of per-sample lists.

:class:`CalibrationMetric` keeps, for the whole epoch, ``O(n_bins x classes + fine_bins)`` numbers
whatever the number of samples (torchmetrics' ``CalibrationError`` keeps one confidence and one
accuracy per sample and gathers them all on sync). Every state is reduced by ``sum`` across
processes, so DDP gives the same result as one process, and the formulas live in
:mod:`lightning_attn.functional.calibration`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_attn.functional.calibration import (
    adaptive_calibration_error,
    bin_statistics,
    bootstrap_intervals,
    calibration_error,
    classwise_calibration_error,
    confidence_histogram,
    debiased_calibration_error,
    equal_mass_bins,
    equal_width_edges,
    fold_last_bin,
)
from lightning_attn.functional.smooth_calibration import smooth_calibration_error
from lightning_attn.metrics.calibration_bootstrap import bootstrap_sums
from lightning_attn.metrics.calibration_inputs import Task, check_counts, check_shapes
from lightning_attn.metrics.calibration_sparse import sparse_multiclass_sums
from lightning_attn.metrics.reservoir import reservoir_input

__all__ = ["CalibrationMetric"]

ScoreType = Literal["logits", "probs"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class CalibrationMetric(Metric):
    r"""Calibration of a classifier over an epoch, from sum-reduced histograms (constant memory).

    Accumulates, with ``B = n_bins``, ``F = fine_bins``, ``K = num_classes``:

    - reliability bins (``B + 1`` entries each: the last holds confidences of exactly 1.0 and is
      merged into bin ``B - 1`` at compute): sample count, confidence sum, hit count. Multiclass:
      top-label (confidence ``max_k p_k``, hit = prediction correct, Guo et al. 2017). Binary:
      ``P(y = 1)`` against the outcome (hit = ``y == 1``), the usual binary reliability diagram and
      what torchmetrics ``BinaryCalibrationError`` measures;
    - a fine histogram of the same quantity (``F + 1`` entries, same three sums) from which the
      equal-mass bins of the adaptive ECE are cut;
    - per-class bins (``K x (B + 1)``) of every class probability for the classwise ECE (SCE);
    - top-label sums: samples, correct, confidence, confidence of the correct ones (binary: top
      label = ``max(p, 1 - p)``, predicted class ``p > 0.5``);
    - Brier and NLL sums; counters of skipped (NaN), ignored and invalid samples;
    - with ``bootstrap = R > 0``: the reliability-bin sums (count, confidence, hits; ``R x B``) and the
      correct and Brier sums (``R``) of ``R`` Poisson bootstrap replicates, each sample weighted in
      replicate ``r`` by a Poisson(1) count drawn from a hash of its scores and target
      (:mod:`lightning_attn.functional.bootstrap`): the weights do not depend on the batch or the
      process, so the replicates reduce by ``sum`` exactly like the other states. Samples with
      bit-identical scores and target share their weights (a model that outputs a constant gives
      a zero-width interval).

    Every state is an ``add_state(..., dist_reduce_fx="sum")`` tensor: counts ``int64``, sums
    ``float64``; their size does not depend on the number of samples.

    Bad input: shapes and dtypes are checked in :meth:`update` (``ValueError`` at once); values are
    checked without synchronising: samples whose scores are NaN (or logits of ``+inf``) are
    skipped and counted, and :meth:`compute` warns; targets outside ``[0, K)`` (other than
    ``ignore_index``) and probabilities outside ``[0, 1]`` or rows not summing to 1 (``score_type="probs"``)
    make :meth:`compute` raise ``ValueError`` naming how many there were.

    Args:
        task: ``"binary"`` (one score per target: logit or probability of class 1) or ``"multiclass"``
            (``[N, K, ...]`` scores, class dimension 1).
        num_classes: number of classes (multiclass; ignored for binary, which has 2).
        score_type: whether the scores are ``"logits"`` (softmax/sigmoid applied here) or ``"probs"``;
            explicit, never guessed from the values.
        n_bins: equal-width bins of the reliability diagram, ECE, MCE and RMSCE (15 as in Guo et al.).
        adaptive_bins: equal-mass bins of the adaptive ECE; default ``n_bins``.
        classwise_bins: bins per class of the classwise ECE; default ``n_bins``.
        fine_bins: resolution of the fine histogram behind the adaptive bins (bins of width ``1/fine_bins``).
        ignore_index: target value to leave out (e.g. padding ``-100``).
        prob_tolerance: how far a probability row sum may be from 1 (``score_type="probs"``,
            multiclass); default ``1e-3``, ``1e-2`` for half-precision scores.
        bootstrap: number of Poisson bootstrap replicates behind the 95% intervals of the ECE,
            accuracy, Brier score and per-bin accuracy; 0 turns them off.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    # the states, declared with add_state in __init__ (the bootstrap ones when bootstrap > 0)
    n_samples: Tensor
    n_correct: Tensor
    n_nan: Tensor
    n_ignored: Tensor
    n_bad_target: Tensor
    n_bad_prob: Tensor
    conf_sum: Tensor
    conf_correct_sum: Tensor
    brier_sum: Tensor
    nll_sum: Tensor
    bin_count: Tensor
    bin_conf: Tensor
    bin_hits: Tensor
    fine_count: Tensor
    fine_conf: Tensor
    fine_hits: Tensor
    class_count: Tensor
    class_conf: Tensor
    class_hits: Tensor
    boot_count: Tensor
    boot_conf: Tensor
    boot_hits: Tensor
    boot_correct: Tensor
    boot_brier: Tensor
    #: Use the CPU fast path (data-dependent shapes) for CPU tensors; the masked path is what runs
    #: on accelerators. Both give the same sums; tests switch this off to exercise the masked path.
    sparse_on_cpu: bool = True

    def __init__(
        self,
        task: Task,
        num_classes: int | None = None,
        score_type: ScoreType = "logits",
        n_bins: int = 15,
        adaptive_bins: int | None = None,
        classwise_bins: int | None = None,
        fine_bins: int = 10_000,
        ignore_index: int | None = None,
        prob_tolerance: float | None = None,
        bootstrap: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("binary", "multiclass"):
            raise ValueError(f"task must be 'binary' or 'multiclass', got {task!r}")
        if task == "multiclass" and (num_classes is None or num_classes < 2):
            raise ValueError(f"multiclass calibration needs num_classes >= 2, got {num_classes}")
        if score_type not in ("logits", "probs"):
            raise ValueError(f"score_type must be 'logits' or 'probs', got {score_type!r}")
        for name, value in (
            ("n_bins", n_bins),
            ("adaptive_bins", adaptive_bins),
            ("classwise_bins", classwise_bins),
            ("fine_bins", fine_bins),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
            raise ValueError(f"bootstrap must be a number of replicates >= 0 (0: off), got {bootstrap!r}")
        self.task: Task = task
        self.num_classes = 2 if task == "binary" else int(num_classes)  # type: ignore[arg-type]
        self.score_type: ScoreType = score_type
        self.n_bins = n_bins
        self.adaptive_bins = adaptive_bins or n_bins
        self.classwise_bins = classwise_bins or n_bins
        self.fine_bins = fine_bins
        self.ignore_index = ignore_index
        self.prob_tolerance = prob_tolerance
        self.bootstrap = bootstrap

        f64, i64 = torch.float64, torch.long
        k, b, bc, fb = self.num_classes, n_bins, self.classwise_bins, fine_bins

        def state(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
            self.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

        for name in ("n_samples", "n_correct", "n_nan", "n_ignored", "n_bad_target", "n_bad_prob"):
            state(name, (), i64)
        for name in ("conf_sum", "conf_correct_sum", "brier_sum", "nll_sum"):
            state(name, (), f64)
        state("bin_count", (b + 1,), i64)
        state("bin_conf", (b + 1,), f64)
        state("bin_hits", (b + 1,), i64)
        state("fine_count", (fb + 1,), i64)
        state("fine_conf", (fb + 1,), f64)
        state("fine_hits", (fb + 1,), i64)
        state("class_count", (k, bc + 1), i64)
        state("class_conf", (k, bc + 1), f64)
        state("class_hits", (k, bc + 1), i64)
        if bootstrap:  # float64: integer-valued weighted counts stay exact below 2^53
            for name in ("boot_count", "boot_conf", "boot_hits"):
                state(name, (bootstrap, b), f64)
            state("boot_correct", (bootstrap,), f64)
            state("boot_brier", (bootstrap,), f64)
        self._edges_cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._padded_edges: dict[torch.dtype, np.ndarray] = {}
        self._eager = False

    # -- update ---------------------------------------------------------------------------------
    def _edges(self, like: Tensor) -> Tensor:
        key = (like.dtype, like.device)
        edges = self._edges_cache.get(key)
        if edges is None:
            with torch.inference_mode(False):
                edges = equal_width_edges(self.n_bins, dtype=like.dtype, device=like.device)
            self._edges_cache[key] = edges
        return edges

    def _padded_edges_for(self, values: Tensor) -> np.ndarray:
        """The reliability edges in ``values``' precision, then ``+inf`` (:func:`equal_width_index`'s input)."""
        padded = self._padded_edges.get(values.dtype)
        if padded is None:
            padded = torch.cat([self._edges(values), values.new_full((1,), float("inf"))]).numpy()
            self._padded_edges[values.dtype] = padded
        return padded

    def flatten(self, scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """A batch as :meth:`update` reads it: shapes checked, scores ``[N, K]`` (``[N]`` binary; class dimension 1
        of ``[N, K, ...]`` moved last), targets ``[N]``, detached, low precision raised to float32."""
        check_shapes(scores, target, self.task, self.num_classes if self.task == "multiclass" else None)
        scores = scores.detach()
        target = target.detach()
        if scores.dtype in _LOW_PRECISION:
            scores = scores.float()
        if self.task == "multiclass":
            if scores.ndim > 2:
                scores = scores.movedim(1, -1).reshape(-1, scores.shape[1])
            return scores, target.reshape(-1)
        return scores.reshape(-1), target.reshape(-1)

    def reservoir_batch(self, scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A batch as a :class:`~lightning_attn.metrics.LogitReservoir` takes it: ``(logits, target, valid)``
        (:func:`~lightning_attn.metrics.reservoir.reservoir_input` of the :meth:`flatten`-ed batch)."""
        x, t = self.flatten(scores, target)
        binary, probs = self.task == "binary", self.score_type == "probs"
        return reservoir_input(
            x, t, binary=binary, num_classes=self.num_classes, probs=probs, ignore_index=self.ignore_index
        )

    def update(self, scores: Tensor, target: Tensor) -> None:
        """Add a batch: ``scores`` (logits or probabilities, as ``score_type`` says) and integer ``target``.

        On accelerators nothing here synchronises with the host: shapes are static, invalid samples
        are routed to a discarded histogram entry and counted, never indexed out. CPU tensors take
        a faster path with data-dependent shapes (invalid rows dropped, only the class probabilities
        of at least ``1/classwise_bins`` binned one by one), which costs nothing there; it gives the
        same sums (``sparse_on_cpu = False`` forces the static path).
        """
        half = scores.dtype in _LOW_PRECISION
        x, t = self.flatten(scores, target)
        # CPU fast path: data-dependent shapes (no device to synchronise with); multiclass only
        self._eager = self.sparse_on_cpu and self.task == "multiclass" and x.device.type == "cpu"
        if x.shape[0] == 0:
            return
        if self.task == "binary":
            self._update_binary(x, t, half)
        else:
            self._update_multiclass(x, t, half)

    def _validity(self, t: Tensor, nan: Tensor, bad_prob: Tensor | None, eager: bool) -> tuple[Tensor, Tensor | None]:
        """``(t_long, valid)``: ``valid`` is ``None`` when every sample is valid (known without a
        synchronisation only on the CPU: ``eager``). Invalid samples are counted in the states."""
        ignored = t == self.ignore_index if self.ignore_index is not None else None
        # binary targets may come as 0./1. floats
        bad_target = (t != 0) & (t != 1) if t.is_floating_point() else (t < 0) | (t >= self.num_classes)
        invalid = bad_target | nan
        if bad_prob is not None:
            invalid |= bad_prob
        if ignored is not None:
            invalid |= ignored
        t = t.long()
        if eager and not bool(invalid.any()):
            return t, None
        if ignored is not None:
            keep = ~ignored
            bad_target &= keep
            nan &= keep
            self.n_ignored = self.n_ignored + ignored.sum()
        nan = nan & ~bad_target
        self.n_bad_target = self.n_bad_target + bad_target.sum()
        self.n_nan = self.n_nan + nan.sum()
        if bad_prob is not None:
            self.n_bad_prob = (
                self.n_bad_prob + (bad_prob & ~bad_target & ~nan & (keep if ignored is not None else True)).sum()
            )
        return t, ~invalid

    def _bincount(self, index: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
        """Histogram of ``index`` (values in ``[0, size)``), ``size`` entries. On the CPU fast path
        ``torch.bincount``; elsewhere a fixed-size ``index_add_``, because CUDA's ``bincount`` reads
        the maximum back to the host to size its output (a synchronisation)."""
        if self._eager:
            return torch.bincount(index, weights=weights, minlength=size)[:size]
        if weights is None:
            return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))
        return torch.zeros(size, dtype=weights.dtype, device=index.device).index_add_(0, index, weights)

    def _tolerance(self, half: bool) -> float:
        if self.prob_tolerance is not None:
            return self.prob_tolerance
        return 1e-2 if half else 1e-3

    def _histogram(
        self, prefix: str, index: Tensor, value64: Tensor, hits: Tensor, valid: Tensor | None, size: int
    ) -> None:
        """Add count / value sum / hit count of samples at ``index`` (``size`` entries). Invalid
        samples (``valid`` False; their ``value64`` must be finite) go to a discarded extra entry.
        Counts and hits come from one ``bincount`` of ``2 * index + hit``."""
        if valid is not None:
            index = torch.where(valid, index, size)
        pairs = self._bincount(index * 2 + hits, 2 * size + 2)[: 2 * size].view(size, 2)
        self._add_histogram(prefix, pairs.sum(1), self._bincount(index, size + 1, value64)[:size], pairs[:, 1])

    def _add_histogram(self, prefix: str, count: Tensor, conf: Tensor, hits: Tensor) -> None:
        """Add a batch's count / value sum / hit count to the ``<prefix>_*`` states (``bin`` or ``fine``)."""
        setattr(self, f"{prefix}_count", getattr(self, f"{prefix}_count") + count)
        setattr(self, f"{prefix}_conf", getattr(self, f"{prefix}_conf") + conf)
        setattr(self, f"{prefix}_hits", getattr(self, f"{prefix}_hits") + hits)

    def _update_reliability(self, value: Tensor, value64: Tensor, hits: Tensor, valid: Tensor | None) -> Tensor:
        """Equal-width and fine histograms of ``value`` (in ``[0, 1]`` where valid, 0 elsewhere);
        returns the equal-width bin index (1.0 -> ``n_bins``)."""
        b, fb = self.n_bins, self.fine_bins
        index = torch.bucketize(value, self._edges(value), right=True) - 1  # torchmetrics' boundaries; 1.0 -> b
        self._histogram("bin", index, value64, hits, valid, b + 1)
        fine = (value64 * fb).long()  # exact floor of a float32 value; 1.0 -> fb
        self._histogram("fine", fine, value64, hits, valid, fb + 1)
        return index

    def _update_bootstrap(self, *samples: Any) -> None:
        """Add the batch to every replicate; ``samples``: the per-sample arguments of :func:`bootstrap_sums`."""
        if not self.bootstrap:
            return
        sums = bootstrap_sums(*samples, n_bins=self.n_bins, replicates=self.bootstrap)
        self.boot_count = self.boot_count + sums.count
        self.boot_hits = self.boot_hits + sums.hits
        self.boot_conf = self.boot_conf + sums.conf
        self.boot_correct = self.boot_correct + sums.correct
        self.boot_brier = self.boot_brier + sums.brier

    def _update_top_label(self, conf64: Tensor, correct: Tensor, n_valid: Tensor | int) -> None:
        """``conf64`` is 0 and ``correct`` False for invalid samples."""
        self.n_samples = self.n_samples + n_valid
        self.n_correct = self.n_correct + correct.sum()
        self.conf_sum = self.conf_sum + conf64.sum()
        self.conf_correct_sum = self.conf_correct_sum + torch.dot(conf64, correct.to(conf64.dtype))

    def _add_classwise(self, count: Tensor, conf: Tensor, t: Tensor, p_y64: Tensor, valid: Tensor | None) -> None:
        k, stride = self.num_classes, self.classwise_bins + 1
        size = k * stride
        hit_index = t * stride + (p_y64 * self.classwise_bins).long()
        if valid is not None:
            hit_index = torch.where(valid, hit_index, size)
        hits = self._bincount(hit_index, size + 1)[:size].view(k, stride)
        self.class_count = self.class_count + count
        self.class_conf = self.class_conf + conf
        self.class_hits = self.class_hits + hits

    def _update_multiclass(self, x: Tensor, t: Tensor, half: bool) -> None:
        eager = self._eager
        probs = torch.softmax(x, 1) if self.score_type == "logits" else x
        conf = probs.amax(1)
        nan = torch.isnan(conf)  # amax propagates NaN: a NaN anywhere in the row (or +inf logits)
        bad_prob = None
        if self.score_type == "probs":
            bad_prob = ((probs.sum(1) - 1).abs() > self._tolerance(half)) | (probs.amin(1) < 0) | (conf > 1)
        t, valid = self._validity(t, nan, bad_prob, eager)
        if eager:
            # On the CPU a data-dependent shape costs no device synchronisation: drop invalid rows
            # (rarely any) and bin only the few class probabilities above 1/classwise_bins.
            if valid is not None:
                keep = valid.nonzero().squeeze(1)
                x, probs, t, conf = x[keep], probs[keep], t[keep], conf[keep]
            if probs.shape[0]:
                self._update_multiclass_sparse(x, probs.contiguous(), t, conf)
        else:
            self._update_multiclass_masked(x, probs, t, valid)

    def _update_multiclass_sparse(self, x: Tensor, probs: Tensor, t: Tensor, conf: Tensor) -> None:
        """All rows valid, CPU tensors: the sums of :func:`sparse_multiclass_sums`."""
        sums = sparse_multiclass_sums(
            x,
            probs,
            t,
            conf,
            padded_edges=self._padded_edges_for(conf),
            n_bins=self.n_bins,
            fine_bins=self.fine_bins,
            classwise_bins=self.classwise_bins,
            logits=self.score_type == "logits",
        )
        self.n_samples = self.n_samples + probs.shape[0]
        self.n_correct = self.n_correct + sums.n_correct
        self.conf_sum = self.conf_sum + sums.conf_sum
        self.conf_correct_sum = self.conf_correct_sum + sums.conf_correct_sum
        self._add_histogram("bin", *sums.bins)
        self._add_histogram("fine", *sums.fine)
        self.class_count = self.class_count + sums.class_count
        self.class_conf = self.class_conf + sums.class_conf
        self.class_hits = self.class_hits + sums.class_hits
        self.brier_sum = self.brier_sum + sums.brier_sum
        self.nll_sum = self.nll_sum + sums.nll_sum
        self._update_bootstrap(x, t, sums.bin_index, None, sums.confidence, sums.correct, sums.correct, sums.brier)

    def _update_multiclass_masked(self, x: Tensor, probs: Tensor, t: Tensor, valid: Tensor | None) -> None:
        """Static shapes, no synchronisation (accelerators): invalid rows are zeroed and sent to a
        discarded histogram entry; every class probability is binned."""
        if valid is None:
            valid = torch.ones_like(t, dtype=torch.bool)
        k, bc = self.num_classes, self.classwise_bins
        stride = bc + 1
        conf, pred = probs.max(1)
        n_valid = valid.sum()
        t = torch.where(valid, t, 0)
        correct = valid & (pred == t)
        probs64 = probs.double().masked_fill_(~valid.unsqueeze(1), 0.0)
        conf = torch.where(valid, conf, 0.0)
        conf64 = conf.double()
        p_y64 = probs64.gather(1, t.unsqueeze(1)).squeeze(1)

        self._update_top_label(conf64, correct, n_valid)
        bin_index = self._update_reliability(conf, conf64, correct, valid)

        index = (probs64 * bc).long()  # invalid rows are zeros: one entry each in bin 0 of every class
        index += torch.arange(0, k * stride, stride, device=index.device)
        size = k * stride
        count = self._bincount(index.view(-1), size).view(k, stride)
        count[:, 0] -= valid.numel() - n_valid
        conf_sum = self._bincount(index.view(-1), size, probs64.view(-1)).view(k, stride)
        self._add_classwise(count, conf_sum, t, p_y64, valid)

        sum_sq = torch.linalg.vector_norm(probs64, dim=1).square()
        self.brier_sum = self.brier_sum + (sum_sq - 2 * p_y64).sum() + n_valid
        brier = torch.where(valid, sum_sq - 2 * p_y64 + 1, 0.0)
        self._update_bootstrap(x, t, bin_index, valid, conf64, correct, correct, brier)
        if self.score_type == "logits":
            z = x.gather(1, torch.stack([t, pred], 1)).double()
            log_p_y = z[:, 0] - z[:, 1] + torch.log(conf64.clamp_min(1e-300))
        else:
            log_p_y = p_y64.clamp_min(1e-12).log()
        self.nll_sum = self.nll_sum - torch.where(valid, log_p_y, 0.0).sum()

    def _update_binary(self, x: Tensor, t: Tensor, half: bool) -> None:
        p = torch.sigmoid(x) if self.score_type == "logits" else x
        nan = torch.isnan(p)
        bad_prob = (p < 0) | (p > 1) if self.score_type == "probs" else None
        t, valid = self._validity(t, nan, bad_prob, eager=False)
        assert valid is not None
        n_valid = valid.sum()
        t = torch.where(valid, t, 0)
        positive = valid & (t == 1)

        p = torch.where(valid, p, 0.0)
        p64 = p.double()
        bin_index = self._update_reliability(p, p64, positive, valid)

        pred = p > 0.5
        conf64 = torch.where(valid, torch.where(pred, p64, 1 - p64), 0.0)
        correct = valid & (pred == positive)
        self._update_top_label(conf64, correct, n_valid)

        bc, stride = self.classwise_bins, self.classwise_bins + 1
        probs64 = torch.stack([1 - p64, p64], 1).masked_fill_(~valid.unsqueeze(1), 0.0)
        index = (probs64 * bc).long()
        index[:, 1] += stride
        count = self._bincount(index.view(-1), 2 * stride).view(2, stride)
        count[:, 0] -= valid.numel() - n_valid
        conf_sum = self._bincount(index.view(-1), 2 * stride, probs64.view(-1)).view(2, stride)
        self._add_classwise(count, conf_sum, t, torch.where(positive, p64, 1 - p64), valid)

        y = t.double()
        brier = torch.where(valid, (p64 - y).square(), 0.0)
        self.brier_sum = self.brier_sum + brier.sum()
        self._update_bootstrap(x, t, bin_index, valid, p64, positive, correct, brier)
        if self.score_type == "logits":
            z = x.double()
            per = torch.nn.functional.softplus(-z) * y + torch.nn.functional.softplus(z) * (1 - y)
        else:
            per = -(y * p64.clamp_min(1e-12).log() + (1 - y) * (1 - p64).clamp_min(1e-12).log())
        self.nll_sum = self.nll_sum + torch.where(valid, per, 0.0).sum()

    # -- compute --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise for invalid input seen since the last reset; warn for skipped NaN samples (:func:`check_counts`)."""
        bad = (int(self.n_bad_target), int(self.n_bad_prob), int(self.n_nan))
        check_counts(*bad, task=self.task, num_classes=self.num_classes, ignore_index=self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        """All measures as a flat dict: 0-d float64 tensors for scalars, 1-d/2-d for per-bin arrays.

        Scalars: ``ece``, ``mce``, ``rmsce``, ``adaptive_ece``, ``classwise_ece``, ``brier``, ``nll``,
        ``accuracy``, ``confidence``, ``overconfidence`` (confidence - accuracy), ``confidence_correct``,
        ``confidence_incorrect``, ``n_samples``, ``n_skipped`` (NaN), ``n_ignored``, ``n_at_one``
        (reliability values of exactly 1.0, merged into the last bin). Arrays: ``bin_*`` (edges,
        count, accuracy, confidence), ``adaptive_*``, ``class_*`` (``[K, classwise_bins]``),
        ``hist_*`` (top-label confidence histogram, correct/incorrect, 50 bins). Also ``smece`` (smooth
        ECE from the fine histogram) and ``ece_debiased`` (Kumar et al.'s debiased L2 error over the
        reliability bins); with ``bootstrap``: ``ece_ci_low``/``_high``, ``accuracy_ci_*``,
        ``brier_ci_*`` (95% percentile intervals) and ``bin_accuracy_ci_*`` (per bin).
        """
        self.check()
        out: dict[str, Tensor] = {}
        n = self.n_samples.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        if int(self.n_samples) == 0:
            rank_zero_warn(
                "CalibrationMetric: no valid samples since the last reset; every measure is NaN", UserWarning
            )

        count, conf, hits = (fold_last_bin(s) for s in (self.bin_count, self.bin_conf, self.bin_hits))
        out["ece"] = calibration_error(count, conf, hits, "l1")
        out["mce"] = calibration_error(count, conf, hits, "max")
        out["rmsce"] = calibration_error(count, conf, hits, "l2")
        fcount, fconf, fhits = (fold_last_bin(s) for s in (self.fine_count, self.fine_conf, self.fine_hits))
        out["adaptive_ece"] = adaptive_calibration_error(fcount, fconf, fhits, self.adaptive_bins)
        out["smece"] = smooth_calibration_error(fcount, fconf, fhits)
        out["ece_debiased"] = debiased_calibration_error(count, conf, hits)
        if self.bootstrap:
            out.update(
                bootstrap_intervals(self.boot_count, self.boot_conf, self.boot_hits, self.boot_correct, self.boot_brier)
            )
        ccount, cconf, chits = (fold_last_bin(s) for s in (self.class_count, self.class_conf, self.class_hits))
        out["classwise_ece"] = classwise_calibration_error(ccount, cconf, chits, self.n_samples)
        out["brier"] = self.brier_sum / n
        out["nll"] = self.nll_sum / n
        accuracy = self.n_correct.double() / n
        confidence = self.conf_sum / n
        out["accuracy"] = accuracy
        out["confidence"] = confidence
        out["overconfidence"] = confidence - accuracy
        n_correct = self.n_correct.double()
        n_wrong = n - n_correct
        out["confidence_correct"] = torch.where(n_correct > 0, self.conf_correct_sum / n_correct.clamp_min(1), nan)
        out["confidence_incorrect"] = torch.where(
            n_wrong > 0, (self.conf_sum - self.conf_correct_sum) / n_wrong.clamp_min(1), nan
        )
        out["n_samples"] = n
        out["n_skipped"] = self.n_nan.double()
        out["n_ignored"] = self.n_ignored.double()
        out["n_at_one"] = self.bin_count[-1].double()

        acc, mean_conf, _ = bin_statistics(count, conf, hits)
        out["bin_edges"] = equal_width_edges(self.n_bins, device=n.device)
        out["bin_count"] = count.double()
        out["bin_accuracy"] = acc
        out["bin_confidence"] = mean_conf
        acount, aconf, ahits, aedges = equal_mass_bins(fcount, fconf, fhits, self.adaptive_bins)
        acc, mean_conf, _ = bin_statistics(acount, aconf, ahits)
        out["adaptive_edges"] = aedges
        out["adaptive_count"] = acount.double()
        out["adaptive_accuracy"] = acc
        out["adaptive_confidence"] = mean_conf
        acc, mean_conf, _ = bin_statistics(ccount, cconf, chits)
        out["class_edges"] = equal_width_edges(self.classwise_bins, device=n.device)
        out["class_count"] = ccount.double()
        out["class_accuracy"] = acc
        out["class_confidence"] = mean_conf
        edges, correct, incorrect = confidence_histogram(fcount, fhits, 50, binary=self.task == "binary")
        out["hist_edges"] = edges
        out["hist_correct"] = correct
        out["hist_incorrect"] = incorrect
        return out

    def state_bytes(self) -> int:
        """Bytes held in metric states (constant in the number of samples)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._defaults)
