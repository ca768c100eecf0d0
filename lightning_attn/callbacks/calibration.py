"""CalibrationMonitor: constant-memory calibration metrics, reliability diagrams and temperature scaling.

Thin wiring: predictions are read from what ``validation_step``/``test_step`` return, accumulated by
:class:`lightning_attn.metrics.CalibrationMetric` (sum-reduced histograms), computed at epoch end
(on every rank: it is a collective), logged through the LightningModule so that ``ModelCheckpoint``
and ``EarlyStopping`` can monitor them, and published (rank zero) through :mod:`lightning_attn.sinks`.

Logged keys, ``calibration/<stage>/<name>`` with ``<stage>`` = ``val`` or ``test`` (``val_dl1``, ...
for the k-th extra dataloader):

==========================  ========================================================================
name                        meaning
==========================  ========================================================================
``ece``                     expected calibration error, L1, ``n_bins`` equal-width bins (Guo et al. 2017)
``mce``                     maximum calibration error (max over non-empty bins)
``rmsce``                   root-mean-square calibration error (L2)
``adaptive_ece``            ECE over equal-mass bins (Nixon et al. 2019)
``smece``                   smooth ECE, kernel-smoothed with its own bandwidth (Blasiok & Nakkiran 2023;
                            ``relplot.smECE``), from the fine confidence histogram
``ece_debiased``            debiased L2 calibration error over the ``n_bins`` bins (Kumar et al. 2019)
``classwise_ece``           classwise ECE / static calibration error, SCE (Nixon et al. 2019)
``brier``                   Brier score
``nll``                     negative log-likelihood (cross-entropy)
``accuracy``                top-label accuracy
``confidence``              mean top-label confidence
``overconfidence``          ``confidence - accuracy`` (positive: over-confident)
``confidence_correct``      mean confidence of the correct predictions
``confidence_incorrect``    mean confidence of the wrong predictions
``n_samples``               samples counted (all ranks)
``n_skipped``               samples skipped because their scores were NaN
``ece_ci_low``/``_high``    95% percentile interval of the ECE over ``bootstrap`` Poisson bootstrap
                            replicates (absent with ``bootstrap=0``); likewise ``accuracy_ci_*``, ``brier_ci_*``
``temperature``             fitted temperature (``fit_temperature=True``)
``ece_scaled``              ECE of the reservoir sample after temperature scaling
``nll_scaled``              NLL of the reservoir sample after temperature scaling
==========================  ========================================================================

Binary tasks bin ``P(y = 1)`` against the outcome (the usual binary reliability diagram, as
torchmetrics' ``BinaryCalibrationError``) for ``ece``, ``mce``, ``rmsce`` and ``adaptive_ece``; the
top-label quantities use ``max(p, 1 - p)`` and the prediction ``p > 0.5``.

The bootstrap intervals are percentile intervals of the binned measures: they describe how much
the estimate moves with the sample, around the binned ECE's own upward bias; for a
well-calibrated model (true ECE near 0) the ECE interval lies above the point estimate, and
``ece_debiased`` and ``smece`` are the better guides.

Figures (``calibration/<stage>/<name>`` in W&B and TensorBoard, PNG files when no dashboard logger
is attached or ``save_dir`` is given): ``reliability``, ``confidence_histogram``, ``classwise_reliability``,
``trend``. A JSON summary with the latest values, per-bin arrays and the history is written to
``<run folder>/calibration/<stage>/summary_epoch<E>_step<S>.json``, and the per-bin table to a CSV (and W&B table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_attn.callbacks.base import EvaluationCallback, Stage, finish_dataloaders, log_scalars, stage_key
from lightning_attn.callbacks.calibration_outputs import epoch_result, publish_calibration
from lightning_attn.functional.calibration import apply_temperature, fit_temperature
from lightning_attn.metrics.calibration import CalibrationMetric
from lightning_attn.metrics.reservoir import LogitReservoir

__all__ = ["INTERVALS", "SCALARS", "CalibrationMonitor"]

NAMESPACE = "calibration"

#: Scalars logged every evaluation epoch, as ``calibration/<stage>/<name>``.
SCALARS: tuple[str, ...] = (
    "ece",
    "mce",
    "rmsce",
    "adaptive_ece",
    "classwise_ece",
    "brier",
    "nll",
    "accuracy",
    "confidence",
    "overconfidence",
    "confidence_correct",
    "confidence_incorrect",
    "n_samples",
    "n_skipped",
    "smece",
    "ece_debiased",
)

#: Bootstrap interval bounds logged beside their measure when ``bootstrap > 0``.
INTERVALS: tuple[str, ...] = tuple(
    f"{name}_ci_{side}" for name in ("ece", "accuracy", "brier") for side in ("low", "high")
)


class CalibrationMonitor(EvaluationCallback):
    """Calibration of a classifier, every validation/test epoch, in constant memory.

    The ``LightningModule``'s ``validation_step``/``test_step`` returns, by default, a dict with
    ``"logits"`` (or ``"probs"``) and ``"target"``::

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            return {"logits": logits, "target": y}

    Shapes: multiclass ``[N, K, ...]`` scores (class dimension 1) and ``[N, ...]`` targets; binary
    scores shaped like the targets (one logit or probability of class 1 each). Metrics are logged as
    ``calibration/val/ece`` etc. (see the module docstring for every key), so
    ``ModelCheckpoint(monitor="calibration/val/ece", mode="min")`` works. ``callback.results[key]``
    holds the latest values and per-bin arrays for ``key`` in ``"val"``, ``"test"`` (``"val_dl1"``, ...).

    Temperature scaling (Guo et al. 2017), ``fit_temperature=True``: a uniform random sample of at
    most ``reservoir_size`` validation samples' logits is kept during the epoch (bottom-k reservoir
    sampling: ``reservoir_size x num_classes`` float32 values, 40 MB for 10 000 x 1000 classes); at
    the end of each validation epoch one scalar ``T`` is fitted (on the first validation dataloader;
    further ones are scored with it) by minimizing the NLL of ``softmax(logits / T)`` with L-BFGS. Under DDP the
    ranks' reservoirs are gathered, the fit runs
    on rank zero and ``T`` is broadcast, so every rank holds the same ``T``. ``callback.temperature``
    holds it and :meth:`apply_temperature` applies it. ``ece_scaled``/``nll_scaled`` are measured on
    the sample the fit used (in-sample) at validation and with the validation ``T`` on the test
    sample (held out) at test. With ``score_type="probs"`` the log-probabilities stand in for logits.

    Intervals (``bootstrap=R``, default 200): every sample gets, in each of ``R`` replicates, a
    Poisson(1) weight drawn from a hash of its own scores and target, and each replicate keeps
    its own reliability-bin, accuracy and Brier sums (``R x (3 n_bins + 2)`` float64 numbers, 74 KiB
    for 200 x 15 bins, whatever the number of samples). The 2.5% and 97.5% quantiles over the
    replicates are logged as ``ece_ci_low``/``ece_ci_high`` (and for the accuracy and Brier score)
    and drawn as error bars on the reliability diagram and bands on the trend. As the weights depend
    only on each sample, DDP gives the replicates of one process. Samples with bit-identical
    scores and target share their weights.

    Args:
        task: ``"binary"`` or ``"multiclass"``; inferred from the first batch when ``None`` (scores
            shaped like the target: binary; one more dimension: multiclass).
        num_classes: number of classes (multiclass); inferred from the scores' dimension 1 when ``None``.
        n_bins: equal-width bins of the reliability diagram, ECE, MCE and RMSCE.
        score_type: ``"logits"`` or ``"probs"``: what the scores are (never guessed from their
            values). When ``None`` it is the name of the key found in the outputs (``"logits"`` or
            ``"probs"``); required with ``extract`` or a custom ``score_key``.
        score_key: key of the scores in the step's output dict; default ``"logits"``, else ``"probs"``
            (the one present, ``"logits"`` first).
        target_key: key of the targets in the step's output dict; when missing there, taken from
            the batch (``batch[target_key]`` for a dict batch, ``batch[1]`` for an ``(x, y)`` batch).
        extract: ``extract(outputs, batch) -> (scores, target)`` instead of the keys, e.g.
            ``lambda out, batch: (out["logits"][:, -1], batch["label"])``.
        ignore_index: target value to leave out (e.g. ``-100`` padding).
        adaptive_bins: equal-mass bins of the adaptive ECE; default ``n_bins``.
        classwise_bins: bins per class for the classwise ECE; default ``n_bins``.
        fine_bins: resolution of the confidence histogram the equal-mass bins are cut from.
        fit_temperature: fit a temperature on every validation epoch (and report the test
            calibration after scaling with it).
        reservoir_size: at most this many samples (logits) are kept per epoch for the fit.
        temperature_max_iter: L-BFGS iterations of the fit.
        bootstrap: Poisson bootstrap replicates behind the 95% intervals; 0 turns them off.
        plot: publish the figures (reliability diagram, confidence histogram, classwise grid, trend).
        plot_classes: classes shown in the classwise reliability grid (the first ones).
        class_names: names of the classes, for the classwise grid.
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this.
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
        seed: seed of the reservoir's private random generator (combined with the global rank and
            the epoch), so the global RNG stream, hence training, is untouched.
        name: replaces ``calibration`` in the logged keys, published names and output folder, so that two
            monitors on one Trainer (say one per head of a multi-task model, with ``extract=``) keep their outputs,
            keys and checkpoint states apart (equal names raise at setup).
    """

    namespace = NAMESPACE

    def __init__(
        self,
        task: Literal["binary", "multiclass"] | None = None,
        num_classes: int | None = None,
        n_bins: int = 15,
        score_type: Literal["logits", "probs"] | None = None,
        score_key: str | None = None,
        target_key: str = "target",
        extract: Callable[[Any, Any], tuple[Tensor, Tensor]] | None = None,
        ignore_index: int | None = None,
        adaptive_bins: int | None = None,
        classwise_bins: int | None = None,
        fine_bins: int = 10_000,
        fit_temperature: bool = False,
        reservoir_size: int = 10_000,
        temperature_max_iter: int = 100,
        bootstrap: int = 200,
        plot: bool = True,
        plot_classes: int = 9,
        class_names: list[str] | None = None,
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        save_dir: str | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(stages=stages, every_n_epochs=every_n_epochs, save_dir=save_dir)
        self._set_name(NAMESPACE, name)
        if task not in (None, "binary", "multiclass"):
            raise ValueError(f"task must be 'binary', 'multiclass' or None (inferred), got {task!r}")
        if score_type not in (None, "logits", "probs"):
            raise ValueError(f"score_type must be 'logits', 'probs' or None, got {score_type!r}")
        if score_type is None and (extract is not None or score_key not in (None, "logits", "probs")):
            raise ValueError("score_type='logits' or 'probs' is required with extract= or a custom score_key")
        if n_bins < 1 or reservoir_size < 1 or plot_classes < 1:
            raise ValueError("n_bins, reservoir_size and plot_classes must be positive")
        if task == "multiclass" and num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
            raise ValueError(f"bootstrap must be a number of replicates >= 0 (0: no intervals), got {bootstrap!r}")
        self.task = task
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.score_type = (
            score_type if score_type is not None else (score_key if score_key in ("logits", "probs") else None)
        )
        self.score_key = score_key if score_key is not None else score_type
        self.target_key = target_key
        self.extract = extract
        self.ignore_index = ignore_index
        self.adaptive_bins = adaptive_bins
        self.classwise_bins = classwise_bins
        self.fine_bins = fine_bins
        self.fit_temperature = fit_temperature
        self.reservoir_size = reservoir_size
        self.temperature_max_iter = temperature_max_iter
        self.bootstrap = bootstrap
        self.plot = plot
        self.plot_classes = plot_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.seed = seed

        #: Fitted temperature (``None`` until the first validation epoch with ``fit_temperature``).
        self.temperature: float | None = None
        #: Latest results per stage key (``"val"``, ``"test"``, ``"val_dl1"``, ...).
        self.results: dict[str, dict[str, Any]] = {}
        #: One entry per evaluation epoch: stage key, evaluation (0, 1, ... per stage key, also across
        #: repeated ``validate``/``test`` calls), epoch, step and every scalar.
        self.history: list[dict[str, Any]] = []
        self._metrics: dict[tuple[str, int], CalibrationMetric] = {}
        self._reservoirs: dict[tuple[str, int], LogitReservoir] = {}
        self._resolved: tuple[str, int] | None = None  # (task, num_classes) once known
        self._score_type_seen: str | None = None
        self._used: set[int] = set()  # dataloaders of this epoch's batches

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            task=self.task,
            n_bins=self.n_bins,
            score_key=self.score_key,
            stages=self.stages,
            **self._name_in_state_key(),
        )

    # -- temperature helpers ----------------------------------------------------------------------
    def apply_temperature(self, logits: Tensor) -> Tensor:
        """``logits / T`` with the fitted temperature; softmax (sigmoid) of it is calibrated."""
        if self.temperature is None:
            raise RuntimeError("no temperature fitted yet: set fit_temperature=True and run a validation epoch")
        return apply_temperature(logits, self.temperature)

    def calibrated_probs(self, logits: Tensor) -> Tensor:
        """Temperature-scaled probabilities: ``softmax(logits / T, dim=1)`` (``sigmoid`` for binary)."""
        scaled = self.apply_temperature(logits)
        task = self._resolved[0] if self._resolved else self.task
        return torch.sigmoid(scaled) if task == "binary" else torch.softmax(scaled, 1)

    # -- reading predictions --------------------------------------------------------------------
    def _read(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, str]:
        if self.extract is not None:
            scores, target = self.extract(outputs, batch)
            return scores, target, self.score_type  # type: ignore[return-value]
        if not isinstance(outputs, Mapping):
            raise TypeError(
                "CalibrationMonitor reads predictions from the dict returned by validation_step/test_step, got "
                f"{type(outputs).__name__}: return {{'logits': ..., 'target': ...}} (or 'probs'), or pass extract=..."
            )
        key = self.score_key
        if key is None:
            key = "logits" if "logits" in outputs else "probs" if "probs" in outputs else None
        if key is None or key not in outputs:
            wanted = repr(key) if key is not None else "'logits' or 'probs'"
            raise KeyError(f"CalibrationMonitor: no {wanted} in the step's outputs (keys: {sorted(map(str, outputs))})")
        score_type = self.score_type or key
        if self.target_key in outputs:
            target = outputs[self.target_key]
        elif isinstance(batch, Mapping) and self.target_key in batch:
            target = batch[self.target_key]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
            target = batch[1]
        else:
            raise KeyError(
                f"CalibrationMonitor: no {self.target_key!r} in the step's outputs (keys: {sorted(map(str, outputs))}) "
                "nor in the batch: return it, set target_key=..., or pass extract=..."
            )
        return outputs[key], target, score_type

    def _resolve(self, scores: Tensor, target: Tensor) -> tuple[str, int]:
        if self._resolved is not None:
            return self._resolved
        task = self.task
        if task is None:
            if scores.shape == target.shape or (scores.ndim == 2 and scores.shape[1] == 1 and target.ndim == 1):
                task = "binary"
            elif scores.ndim == target.ndim + 1:
                task = "multiclass"
            else:
                raise ValueError(
                    f"cannot infer the task from scores {tuple(scores.shape)} and target {tuple(target.shape)}: binary "
                    "scores have the target's shape, multiclass ones an extra class dimension 1; set task="
                )
        if task == "binary":
            num_classes = 2
        else:
            if scores.ndim < 2:
                raise ValueError(f"multiclass scores must be [N, num_classes, ...], got {tuple(scores.shape)}")
            num_classes = self.num_classes if self.num_classes is not None else int(scores.shape[1])
        self._resolved = (task, num_classes)
        return self._resolved

    def _metric(
        self, stage: str, dataloader_idx: int, scores: Tensor, target: Tensor, score_type: str
    ) -> CalibrationMetric:
        key = (stage, dataloader_idx)
        metric = self._metrics.get(key)
        if metric is not None and metric.score_type != score_type:
            raise ValueError(
                f"CalibrationMonitor: scores switched from {metric.score_type!r} to {score_type!r} between batches"
            )
        if metric is None:
            if scores.device.type == "mps":
                raise NotImplementedError(
                    "CalibrationMonitor keeps float64 sums, which MPS lacks: move the scores to the CPU in extract= "
                    "(e.g. extract=lambda out, batch: (out['logits'].cpu(), out['target'].cpu()), score_type='logits')"
                )
            metric = self._metrics[key] = self._new_metric(self._resolve(scores, target), score_type, scores.device)
        return metric

    def _new_metric(self, resolved: tuple[str, int], score_type: str, device: torch.device) -> CalibrationMetric:
        task, num_classes = resolved
        return CalibrationMetric(
            task,  # type: ignore[arg-type]
            num_classes,
            score_type=score_type,  # type: ignore[arg-type]
            n_bins=self.n_bins,
            adaptive_bins=self.adaptive_bins,
            classwise_bins=self.classwise_bins,
            fine_bins=self.fine_bins,
            ignore_index=self.ignore_index,
            bootstrap=self.bootstrap,
        ).to(device)

    def _epoch_metric(self, stage: str, dataloader_idx: int, device: torch.device) -> CalibrationMetric:
        """The metric of a dataloader at the epoch end; on a rank that saw none of its batches (DDP) an empty one,
        so that the rank still joins the reduction."""
        metric = self._metrics.get((stage, dataloader_idx))
        if metric is not None:
            return metric
        resolved = self._resolved
        if resolved is None and self.task == "binary":
            resolved = ("binary", 2)
        elif resolved is None and self.task == "multiclass" and self.num_classes is not None:
            resolved = ("multiclass", self.num_classes)
        if resolved is None:
            raise RuntimeError(
                f"CalibrationMonitor: this rank saw no batch of dataloader {dataloader_idx} while another did, and "
                "cannot size its (empty) share of the reduction: pass task= (and num_classes= for multiclass)"
            )
        metric = self._metrics[(stage, dataloader_idx)] = self._new_metric(
            resolved, self.score_type or "logits", device
        )
        return metric

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new ``fit``/``validate``/``test`` call: fresh metrics (the model may differ); the history
        and the fitted temperature are kept."""
        super().setup(trainer, pl_module, stage)
        self._metrics.clear()
        self._reservoirs.clear()
        self._resolved = None

    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for (s, _), metric in self._metrics.items():
            if s == stage:
                metric.reset()
        self._reservoirs = {k: r for k, r in self._reservoirs.items() if k[0] != stage}

    def eval_abort(self) -> None:
        for metric in self._metrics.values():
            metric.reset()
        self._reservoirs.clear()
        self._used = set()

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
        scores, target, score_type = self._read(outputs, batch)
        metric = self._metric(stage, dataloader_idx, scores, target, score_type)
        metric.update(scores, target)
        self._used.add(dataloader_idx)
        if self.fit_temperature and (stage == "validate" or self.temperature is not None):
            self._offer(trainer, stage, dataloader_idx, metric, scores, target, score_type)

    def _offer(
        self,
        trainer: pl.Trainer,
        stage: str,
        dataloader_idx: int,
        metric: CalibrationMetric,
        scores: Tensor,
        target: Tensor,
        score_type: str,
    ) -> None:
        """Offer a batch to the reservoir (no synchronisation)."""
        x, t = metric.flatten(scores, target)
        if score_type == "probs":  # log-probabilities (log-odds for binary) stand in for logits
            x = x.clamp(1e-12, 1.0)
            x = x.log() - torch.log1p(-x.clamp_max(1 - 1e-7)) if metric.task == "binary" else x.log()
        row_max = x if x.ndim == 1 else x.amax(1)
        valid = torch.isfinite(row_max)
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        if t.is_floating_point():
            valid &= (t == 0) | (t == 1)
        else:
            valid &= (t >= 0) & (t < metric.num_classes)
        key = (stage, dataloader_idx)
        reservoir = self._reservoirs.get(key)
        if reservoir is None:
            reservoir = self._reservoirs[key] = LogitReservoir(self.reservoir_size, seed=self._reservoir_seed(trainer))
        reservoir.update(x, torch.where(valid, t.long(), 0), valid)

    def _reservoir_seed(self, trainer: pl.Trainer) -> int:
        """Distinct per rank (independent samples to merge) and per epoch."""
        return (self.seed * 1_000_003 + trainer.current_epoch * 1009 + trainer.global_rank) % (2**62)

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        used, self._used = self._used, set()
        finish_dataloaders(used, lambda dataloader_idx: self._finish(trainer, pl_module, stage, dataloader_idx))

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, dataloader_idx: int) -> None:
        """Compute (a collective: every rank), log, record and publish one dataloader's epoch."""
        metric = self._epoch_metric(stage, dataloader_idx, pl_module.device)
        key = stage_key(stage, dataloader_idx)
        values = metric.compute()  # collective under DDP: every rank
        metric.reset()
        names = SCALARS + (INTERVALS if self.bootstrap else ())
        scalars = {name: float(values[name]) for name in names}
        scaling = None
        if self.fit_temperature and (stage == "validate" or self.temperature is not None):
            scaling = self._temperature_epoch(trainer, stage, dataloader_idx, metric)
        logged = {f"{self.name}/{key}/{name}": values[name].float() for name in names}
        if scaling is not None:
            for name in ("temperature", "ece_scaled", "nll_scaled"):
                logged[f"{self.name}/{key}/{name}"] = torch.tensor(
                    scaling[name], dtype=torch.float32, device=values["ece"].device
                )
            scalars.update({name: scaling[name] for name in ("temperature", "ece_scaled", "nll_scaled")})
        log_scalars(pl_module, logged)
        evaluation = sum(h["stage"] == key for h in self.history)
        self.history.append(
            {
                "stage": key,
                "evaluation": evaluation,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                **scalars,
            }
        )
        self.results[key] = self._result(trainer, stage, metric, values, scalars, scaling)
        if trainer.is_global_zero:
            self._publish(trainer, key, metric)

    # -- temperature ----------------------------------------------------------------------------
    def _temperature_epoch(
        self, trainer: pl.Trainer, stage: str, dataloader_idx: int, metric: CalibrationMetric
    ) -> dict[str, float] | None:
        reservoir = self._reservoirs.pop((stage, dataloader_idx), None)
        if reservoir is None:
            reservoir = LogitReservoir(self.reservoir_size, seed=self._reservoir_seed(trainer))
        shape = (0,) if metric.task == "binary" else (0, metric.num_classes)
        keys, logits, target = reservoir.contents(torch.zeros(shape, device=metric.n_samples.device))
        if trainer.world_size > 1:
            strategy = trainer.strategy
            keys = strategy.all_gather(keys).reshape(-1)
            logits = strategy.all_gather(logits).reshape(-1, *logits.shape[1:])
            target = strategy.all_gather(target).reshape(-1)
        payload: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                sample = LogitReservoir.merge(keys, logits, target, self.reservoir_size)
                payload = self._fit_and_measure(stage == "validate" and dataloader_idx == 0, metric, *sample)
            except Exception as error:
                payload = {"error": f"{type(error).__name__}: {error}"}
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload is None:
            return None
        if "error" in payload:
            raise RuntimeError(f"CalibrationMonitor temperature scaling failed: {payload['error']}")
        if payload["in_sample"]:
            self.temperature = payload["temperature"]
        return payload

    def _fit_and_measure(
        self, fit: bool, metric: CalibrationMetric, logits: Tensor, target: Tensor
    ) -> dict[str, Any] | None:
        """Fit ``T`` on the sample (``fit``) or take the fitted one; measure before and after scaling."""
        if logits.shape[0] == 0 or (not fit and self.temperature is None):
            return None
        task = metric.task
        if fit:
            temperature = fit_temperature(logits, target, task=task, max_iter=self.temperature_max_iter)
        else:
            assert self.temperature is not None
            temperature = self.temperature
        measured = {}
        for name, t in (("before", 1.0), ("after", temperature)):
            probe = CalibrationMetric(
                task,
                metric.num_classes,
                score_type="logits",
                n_bins=self.n_bins,
                fine_bins=self.fine_bins,
                sync_on_compute=False,
            ).to(logits.device)
            probe.update(logits / t, target)
            values = probe.compute()
            measured[name] = {k: float(values[k]) for k in ("ece", "nll", "brier", "accuracy", "confidence")}
        return {
            "temperature": temperature,
            "ece_scaled": measured["after"]["ece"],
            "nll_scaled": measured["after"]["nll"],
            "sample_size": int(logits.shape[0]),
            "in_sample": fit,
            "before": measured["before"],
            "after": measured["after"],
        }

    # -- results and publishing -----------------------------------------------------------------
    def _result(
        self,
        trainer: pl.Trainer,
        stage: str,
        metric: CalibrationMetric,
        values: dict[str, Tensor],
        scalars: dict[str, float],
        scaling: dict[str, Any] | None,
    ) -> dict[str, Any]:
        return epoch_result(
            values,
            scalars,
            stage=stage,
            task=metric.task,
            num_classes=metric.num_classes,
            evaluation=self.history[-1]["evaluation"],
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            bootstrap=bool(self.bootstrap),
            scaling=scaling,
        )

    def _publish(self, trainer: pl.Trainer, key: str, metric: CalibrationMetric) -> None:
        """Figures, the bin table and the JSON summary of ``key``'s epoch, in the :attr:`publisher` (a background
        job, given what it draws now: a later dataloader of this epoch extends the history)."""
        result = self.results[key]
        label = f"{key} epoch {trainer.current_epoch}"
        if any(h["stage"] == key and h["epoch"] == result["epoch"] for h in self.history[:-1]):  # repeated validate
            label += f" (evaluation {result['evaluation']})"
        history = [h for h in self.history if h["stage"] == key]
        binary = metric.task == "binary"
        self.publisher.submit(
            trainer,
            lambda view: publish_calibration(
                view,
                f"{self.name}/{key}",
                result,
                history,
                label=label,
                binary=binary,
                plot=self.plot,
                class_names=self.class_names,
                plot_classes=self.plot_classes,
                save_dir=self.save_dir,
            ),
        )

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.temperature = state_dict.get("temperature")
