"""CalibrationMonitor: constant-memory calibration metrics, reliability diagrams and temperature scaling.

Thin wiring: predictions read from the step's outputs (checked from the sanity check's first batch on) go to
:class:`~lightning_attn.metrics.calibration_states.CalibrationStates`; each epoch end computes them (a collective),
logs ``calibration/<stage>/<name>`` (names: :mod:`lightning_attn.metrics.calibration_results`) through the module and
publishes on rank zero (:mod:`lightning_attn.callbacks.calibration_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_attn import sinks
from lightning_attn.callbacks.base import EvaluationCallback, Stage, finish_dataloaders, log_scalars, stage_key
from lightning_attn.callbacks.calibration_outputs import publish_calibration
from lightning_attn.functional.calibration import apply_temperature
from lightning_attn.metrics.calibration_inputs import check_shapes, read_predictions
from lightning_attn.metrics.calibration_results import INTERVALS, SCALARS, epoch_result
from lightning_attn.metrics.calibration_states import CalibrationStates
from lightning_attn.metrics.calibration_temperature import TemperatureScaling
from lightning_attn.sinks.layout import check_output_dir

__all__ = ["INTERVALS", "SCALARS", "CalibrationMonitor"]

NAMESPACE = "calibration"


class CalibrationMonitor(EvaluationCallback):
    """Calibration of a classifier, every validation/test epoch, in constant memory.

    The ``LightningModule``'s ``validation_step``/``test_step`` returns, by default, a dict with
    ``"logits"`` (or ``"probs"``) and ``"target"``::

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            return {"logits": logits, "target": y}

    Shapes: multiclass ``[N, K, ...]`` scores (class dimension 1) and ``[N, ...]`` targets; binary scores shaped like
    the targets. Logged as ``calibration/val/ece`` etc., so ``ModelCheckpoint(monitor="calibration/val/ece")`` works;
    ``callback.results[key]`` holds the latest values and per-bin arrays of ``"val"``, ``"test"`` (``"val_dl1"``, ...).
    Figures (``reliability``, ``confidence_histogram``, ``classwise_reliability``, ``trend``) go to W&B and
    TensorBoard, or to PNG files without a dashboard logger or with ``save_dir``.

    Temperature scaling (``fit_temperature=True``): one ``T`` per validation epoch, in ``callback.temperature``
    (:mod:`lightning_attn.metrics.calibration_temperature`). Intervals (``bootstrap=R``): ``ece_ci_low``/``_high``
    etc. from Poisson bootstrap replicates (:class:`~lightning_attn.metrics.CalibrationMetric`).

    Args:
        task: ``"binary"`` or ``"multiclass"``; ``None``: inferred from the first batch (binary: scores shaped like the
            target; multiclass: one more dimension).
        num_classes: number of classes (multiclass); ``None``: the scores' dimension 1.
        n_bins: equal-width bins of the reliability diagram, ECE, MCE and RMSCE.
        score_type: ``"logits"`` or ``"probs"`` (never guessed from the values); ``None``: the name of the key found
            in the outputs; required with ``extract`` or a custom ``score_key``.
        score_key: key of the scores in the step's output dict; default ``"logits"``, else ``"probs"``.
        target_key: key of the targets in the step's outputs, else in a dict batch; the default ``"target"`` also
            falls back to ``batch[1]`` of an ``(x, y)`` batch.
        extract: ``extract(outputs, batch) -> (scores, target)`` instead of the keys.
        ignore_index: target value to leave out (e.g. ``-100`` padding).
        adaptive_bins: equal-mass bins of the adaptive ECE; default ``n_bins``.
        classwise_bins: bins per class for the classwise ECE; default ``n_bins``.
        fine_bins: resolution of the confidence histogram the equal-mass bins are cut from.
        fit_temperature: fit a temperature every validation epoch (and score the test with it).
        reservoir_size: at most this many samples (logits) are kept per epoch for the fit.
        temperature_max_iter: L-BFGS iterations of the fit.
        bootstrap: Poisson bootstrap replicates behind the 95% intervals; 0 turns them off.
        plot: publish the figures.
        plot_classes: classes shown in the classwise reliability grid (the first ones).
        class_names: names of the classes, for the classwise grid.
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this.
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
        seed: seed of the reservoir's private generator (with the rank and epoch; the global RNG is untouched).
        name: replaces ``calibration`` in the logged keys, published names and output folder, so that two monitors
            on one Trainer keep their outputs, keys and checkpoint states apart (equal names raise at setup).

    Raises:
        PredictionKeyError: at the first evaluation batch (the sanity check's when it runs), ``score_key`` or
            ``target_key`` names no key of the step's outputs (or batch); the message lists the close ones.
        NotADirectoryError: at setup, ``save_dir`` (or a folder under it) is a file.
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

        #: The reservoirs of the epoch's logits and the fitted temperature (:attr:`temperature`).
        self.scaling = TemperatureScaling(reservoir_size, temperature_max_iter, n_bins, fine_bins, seed)
        #: Latest results per stage key (``"val"``, ``"test"``, ``"val_dl1"``, ...).
        self.results: dict[str, dict[str, Any]] = {}
        #: One entry per evaluation epoch: stage key, evaluation (0, 1, ... per stage key, also across
        #: repeated ``validate``/``test`` calls), epoch, step and every scalar.
        self.history: list[dict[str, Any]] = []
        #: The metrics of every (stage, dataloader).
        bins = dict(n_bins=n_bins, adaptive_bins=adaptive_bins, classwise_bins=classwise_bins, fine_bins=fine_bins)
        self.states = CalibrationStates(task, num_classes, ignore_index=ignore_index, bootstrap=bootstrap, **bins)
        self._used: set[int] = set()  # dataloaders of this epoch's batches

    @property
    def state_key(self) -> str:
        key = {"task": self.task, "n_bins": self.n_bins, "score_key": self.score_key, "stages": self.stages}
        return self._generate_state_key(**key, **self._name_in_state_key())

    # -- temperature helpers ----------------------------------------------------------------------
    @property
    def temperature(self) -> float | None:
        """The fitted temperature (``None`` until the first validation epoch with ``fit_temperature``)."""
        return self.scaling.temperature

    @temperature.setter
    def temperature(self, value: float | None) -> None:
        self.scaling.temperature = value

    def apply_temperature(self, logits: Tensor) -> Tensor:
        """``logits / T`` with the fitted temperature; softmax (sigmoid) of it is calibrated."""
        if self.temperature is None:
            raise RuntimeError("no temperature fitted yet: set fit_temperature=True and run a validation epoch")
        return apply_temperature(logits, self.temperature)

    def calibrated_probs(self, logits: Tensor) -> Tensor:
        """Temperature-scaled probabilities: ``softmax(logits / T, dim=1)`` (``sigmoid`` for binary)."""
        scaled = self.apply_temperature(logits)
        task = self.states.resolved[0] if self.states.resolved else self.task
        return torch.sigmoid(scaled) if task == "binary" else torch.softmax(scaled, 1)

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new ``fit``/``validate``/``test`` call: fresh metrics (the model may differ); the history
        and the fitted temperature are kept. A ``save_dir`` that cannot hold folders raises here."""
        super().setup(trainer, pl_module, stage)
        if self.save_dir is not None:
            check_output_dir(sinks.output_dir(trainer, self.output_name, self.save_dir), "CalibrationMonitor save_dir")
        self.states.clear()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if trainer.sanity_checking and "validate" in self.stages:  # wrong keys fail here, not after a training epoch
            scores, target, _ = self._read(outputs, batch)
            task, num_classes = self.states.resolve(scores, target)
            check_shapes(scores, target, task, num_classes if task == "multiclass" else None)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args)

    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.states.reset(stage)
        self.scaling.reset(stage)

    def eval_abort(self) -> None:
        self.states.reset()
        self.scaling.reset()
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
        metric = self.states.update(stage, dataloader_idx, scores, target, score_type)  # type: ignore[arg-type]
        self._used.add(dataloader_idx)
        if self.fit_temperature and self.scaling.applies(stage):
            position = {"epoch": trainer.current_epoch, "rank": trainer.global_rank}
            self.scaling.offer(stage, dataloader_idx, metric, scores, target, **position)

    def _read(self, outputs: Any, batch: Any) -> tuple[Tensor, Tensor, str]:
        """``(scores, target, score type)`` of a batch: from ``extract``, else by key."""
        if self.extract is not None:
            scores, target = self.extract(outputs, batch)
            return scores, target, self.score_type  # type: ignore[return-value]
        scores, target, key = read_predictions(outputs, batch, self.score_key, self.target_key)
        return scores, target, self.score_type or key

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        used, self._used = self._used, set()
        finish_dataloaders(used, lambda dataloader_idx: self._finish(trainer, pl_module, stage, dataloader_idx))

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, dataloader_idx: int) -> None:
        """Compute (a collective: every rank), log, record and publish (rank zero, in the :attr:`publisher`) one
        dataloader's epoch."""
        score_type = self.score_type or "logits"
        metric = self.states.epoch_metric(stage, dataloader_idx, pl_module.device, score_type)  # type: ignore[arg-type]
        key = stage_key(stage, dataloader_idx)
        values = metric.compute()  # collective under DDP: every rank
        metric.reset()
        scaling = None
        if self.fit_temperature and self.scaling.applies(stage):  # a collective too: every rank
            strategy = trainer.strategy if trainer.world_size > 1 else None
            scaling = self.scaling.finish(stage, dataloader_idx, metric, trainer.global_rank, strategy)
        position = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        evaluation = sum(h["stage"] == key for h in self.history)
        result = self.results[key] = epoch_result(
            values,
            stage=stage,
            task=metric.task,
            num_classes=metric.num_classes,
            evaluation=evaluation,
            bootstrap=bool(self.bootstrap),
            scaling=scaling,
            **position,
        )
        scalars = result["metrics"]
        as_logged = values["ece"].new_tensor  # float32 on the metric's device
        log_scalars(
            pl_module, {f"{self.name}/{key}/{n}": as_logged(v, dtype=torch.float32) for n, v in scalars.items()}
        )
        self.history.append({"stage": key, "evaluation": evaluation, **position, **scalars})
        if trainer.is_global_zero:
            history = list(self.history)  # as it is now: a later dataloader of this epoch extends it
            self.publisher.submit(trainer, lambda view: publish_calibration(view, self, key, result, history))

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.temperature = state_dict.get("temperature")
