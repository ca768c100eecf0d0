"""What the lightning_attn callbacks share: stage and epoch gating, hook routing, recording and streaming.

Subclasses of :class:`EvaluationCallback` implement :meth:`~EvaluationCallback.eval_epoch_start`,
:meth:`~EvaluationCallback.eval_batch_start`, :meth:`~EvaluationCallback.eval_batch_end` and
:meth:`~EvaluationCallback.eval_epoch_end` once, for validation and test alike; the base class skips the sanity
check, stages that were not asked for and epochs between ``every_n_epochs``. :class:`StreamingCallback` adds
batch sampling, per-(stage, dataloader) metric states and the epoch-end compute / log / publish sequence.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure

from lightning_attn import sinks
from lightning_attn.callbacks.budget import DEFAULT_MIN_BATCHES, BatchBudget, coverage_scalars
from lightning_attn.callbacks.publisher import Publisher
from lightning_attn.capture.workspace import WORKSPACE
from lightning_attn.metrics.coverage import coverage_caption, coverage_record
from lightning_attn.sinks.dashboards import announce_outputs, per_head_charts, publish_config, publish_scalar_layout

if TYPE_CHECKING:
    from lightning_attn.callbacks.first_batch import FirstBatchCheck

#: torchmetrics' warning when ``compute`` runs on states that saw no ``update``.
_COMPUTE_BEFORE_UPDATE = r"The ``compute`` method of metric \w+ was called before the ``update`` method"

Stage = Literal["validate", "test"]

#: Short stage names used in logged keys: ``<namespace>/<val|test>/...``.
STAGE_KEYS: dict[str, str] = {"validate": "val", "test": "test"}


class EvaluationCallback(Callback):
    """Base of the evaluation-time callbacks.

    Publishing (figures, tables, files) runs in a background :class:`~lightning_attn.callbacks.publisher.Publisher`
    (``background_publishing = False`` on an instance: inline); ``fit``/``validate``/``test`` wait for it at the end.

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn``.
    """

    def __init__(
        self, stages: Sequence[Stage] = ("validate",), every_n_epochs: int = 1, save_dir: str | None = None
    ) -> None:
        super().__init__()
        chosen: tuple[str, ...] = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in chosen if s not in STAGE_KEYS]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: choose from {sorted(STAGE_KEYS)}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.stages = chosen
        self.every_n_epochs = every_n_epochs
        self.save_dir = None if save_dir is None else Path(save_dir)
        self._running: str | None = None
        self._first_batches: set[str] = set()  # the stages whose first batch is still to come in this run
        self._first_batch_open: str | None = None  # the stage whose first batch is running
        self._checks: FirstBatchCheck | None = None  # a subclass's checks of its arguments there
        self._model: weakref.ref[pl.LightningModule] | None = None  # the model of the last setup
        self._budget: BatchBudget | None = None  # the recording budget of the attention-reading callbacks
        self._publisher_of_run: Publisher | None = None

    #: Whether epoch-end publishing runs in a background thread (off the training thread).
    background_publishing: bool = True

    @property
    def publisher(self) -> Publisher:
        """This callback's :class:`~lightning_attn.callbacks.publisher.Publisher`, created on first use."""
        if self._publisher_of_run is None:
            self._publisher_of_run = Publisher(background=self.background_publishing)
        return self._publisher_of_run

    def _finish_publishing(self, raise_errors: bool = True) -> None:
        if self._publisher_of_run is not None:
            self._publisher_of_run.wait(raise_errors=raise_errors)
            self._publisher_of_run = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The end of ``fit``/``validate``/``test`` (before Lightning finalizes the loggers): publish everything."""
        self._finish_publishing()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._publisher_of_run is not None:
            self._publisher_of_run.replay()

    # -- models ---------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A new ``fit``/``validate``/``test``: with another model than the last one (a sweep, a second Trainer),
        :meth:`forget_model` first, so that nothing of that model (its sites, head counts, history) leaks into this
        one. A resumed run continues its history: Lightning restores the callback's state after ``setup``."""
        if self._model is not None and self._model() is not pl_module:
            self.forget_model()
        self._model = weakref.ref(pl_module)
        self._first_batches, self._first_batch_open = set(self.stages), None
        name = getattr(self, "name", None)  # the callbacks whose outputs are named
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        twins = [c for c in callbacks if c is not self and type(c) is type(self) and getattr(c, "name", None) == name]
        if name is not None and twins:
            raise ValueError(
                f"two {type(self).__name__} callbacks are named {name!r} on one Trainer: they would write "
                "the same files and logged keys; give each its own name="
            )
        publish_config(trainer, self.output_name, self)

    @property
    def output_name(self) -> str:
        """The callback's folder under the run folder and its prefix in the run config: :attr:`name` when it has one,
        else its namespace."""
        return str(getattr(self, "name", None) or getattr(self, "namespace", type(self).__name__))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._announce(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._announce(trainer)

    def _announce(self, trainer: pl.Trainer, report: Path | None = None) -> None:
        """One console line: where this callback's outputs went (when it wrote any)."""
        if not trainer.is_global_zero:
            return
        directory = sinks.output_dir(trainer, self.output_name, self.save_dir)
        if directory.is_dir():
            announce_outputs(trainer, self.output_name, directory, report)

    def forget_model(self) -> None:
        """Drop every state that belongs to a model (metric states, results, history); subclasses extend it."""

    # -- names ----------------------------------------------------------------------------------
    def _set_name(self, namespace: str, name: str | None, include: Sequence[str] | None = None) -> None:
        """:attr:`name`: first component of the logged keys, published names and output folder
        (:func:`callback_name`)."""
        self.name = callback_name(namespace, name, include)
        self._named = name is not None

    def _name_in_state_key(self) -> dict[str, str]:
        """``{"name": name}`` for a named instance, else nothing: unnamed instances keep the state keys of earlier
        versions, so that their checkpoints still load."""
        return {"name": self.name} if self._named else {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # a weak reference does not pickle (ddp_spawn pickles the callbacks)
        state["_publisher_of_run"] = None  # nor does a thread
        return state

    # -- gating ---------------------------------------------------------------------------------
    def _should_run(self, trainer: pl.Trainer, stage: str) -> bool:
        if trainer.sanity_checking or stage not in self.stages:
            return False
        return stage == "test" or trainer.current_epoch % self.every_n_epochs == 0

    # -- subclass interface ---------------------------------------------------------------------
    def eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called at the start of an evaluation epoch that runs."""

    def eval_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
        stage: str,
    ) -> None:
        """Called before ``validation_step``/``test_step`` of a batch that runs."""

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
        """Called after the step. No host synchronisation here: it runs for every batch."""

    def eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called at the end of the epoch: compute (a collective: every rank), log, publish (rank zero)."""

    def eval_abort(self) -> None:
        """Called when the loop raised: release whatever the batch hooks hold."""

    def first_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, stage: str) -> None:
        """Called before the step of the first batch of each of :attr:`stages` in a ``fit``/``validate``/``test``,
        whether its epoch runs or not (the sanity check's first batch, when it runs), before :meth:`eval_batch_start`:
        where arguments that name something in the batch or the model are checked (by default the subclass's
        :class:`~lightning_attn.callbacks.first_batch.FirstBatchCheck`, if it set ``_checks``)."""
        if self._checks is not None:
            self._checks.start(pl_module, batch, stage)

    def first_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called after the step of that first batch, before :meth:`eval_batch_end`."""
        if self._checks is not None:
            self._checks.finish(pl_module, stage)

    # -- routing --------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the last epoch's jobs read this callback's states, which this epoch changes: let them finish first
        self._finish_publishing()
        self._running = stage if self._should_run(trainer, stage) else None
        if self._running:
            if self._budget is not None:
                self._budget.start(trainer, stage)
            self.eval_epoch_start(trainer, pl_module, stage)

    def _batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx, stage) -> None:
        if stage in self._first_batches and self._first_batch_open is None:
            self._first_batch_open = stage
            self.first_batch_start(trainer, pl_module, batch, stage)
        if self._running == stage:
            self.eval_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, stage)

    def _batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, stage) -> None:
        if self._first_batch_open == stage:
            self._first_batch_open = None
            self._first_batches.discard(stage)
            self.first_batch_end(trainer, pl_module, stage)
        if self._running == stage:
            self.eval_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, stage)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._running == stage:
            self._running = None
            if self._budget is not None:
                self._budget.end()
            self.eval_epoch_end(trainer, pl_module, stage)
            WORKSPACE.release()  # the map-sized buffers are reused within an epoch, not held between epochs

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx, "test")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "test")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._running = self._first_batch_open = None
        if self._checks is not None:
            self._checks.abort()
        if self._budget is not None:
            self._budget.abort()
        self.eval_abort()
        self._finish_publishing(raise_errors=False)  # what was rendered still reaches the loggers and the disk


def callback_name(namespace: str, name: str | None, include: Sequence[str] | None = None) -> str:
    """The name of a callback instance, first component of its logged keys and output folder: ``name`` when given,
    else ``namespace``, with ``-<patterns>`` when ``include`` patterns narrow it (glob characters dropped), so that
    two instances on different sites differ.

    >>> callback_name("attn", None), callback_name("attn", None, ["encoder.*", "*.cross_attn"])
    ('attn', 'attn-encoder-cross_attn')
    >>> callback_name("attn", "enc")
    'enc'
    """
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        return name
    slugs = [re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"[*?\[\]]", "", p)).strip("._-") for p in include or ()]
    return "-".join([namespace, *(slug for slug in slugs if slug)])


def stage_key(stage: str, dataloader_idx: int = 0) -> str:
    """``val``/``test``, with ``_dl<k>`` for the k-th (k >= 1) dataloader of a multi-loader evaluation."""
    return STAGE_KEYS[stage] + (f"_dl{dataloader_idx}" if dataloader_idx else "")


def used_on_any_rank(used: set[int]) -> list[int]:
    """The dataloaders that some rank used this epoch, sorted: a collective under DDP (an ``all_gather_object``), so
    that every rank computes the same states, and a rank whose shard of a loader was empty still joins its
    reduction (with zeros) instead of leaving the others waiting."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sorted(used)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(used))
    return sorted({index for indices in gathered for index in indices})


def finish_dataloaders(used: set[int], finish: Callable[[int], None]) -> None:
    """The callbacks' epoch-end loop: ``finish(dataloader_idx)`` (compute, a collective: every rank; log; publish)
    for every dataloader that some rank used this epoch (:func:`used_on_any_rank`), in order, with torchmetrics'
    "compute before update" warning silenced: a rank that saw no batch of a loader (no attention in its batches, an
    empty shard) still joins the reduction with its zeros, as expected."""
    for dataloader_idx in used_on_any_rank(used):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_COMPUTE_BEFORE_UPDATE, category=UserWarning)
            finish(dataloader_idx)


def log_scalars(pl_module: pl.LightningModule, values: dict[str, Any]) -> None:
    """Log already-reduced scalars (``Metric.compute`` synced them) through the module, so that
    ModelCheckpoint and EarlyStopping can monitor them; no dataloader suffix.

    The values are equal on every rank; ``sync_dist`` with a ``max`` reduction keeps them exactly so
    (a mean could round) while telling Lightning they are global, which silences its per-key
    "use sync_dist=True" warning under DDP at the cost of one scalar all-reduce per key and epoch."""
    for key, value in values.items():
        pl_module.log(
            key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", add_dataloader_idx=False
        )


def probe_batch(trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether this batch holds the probe samples: the first batch of dataloader 0 on global rank zero (under DDP,
    the first samples of rank zero's shard), the same samples for every callback and, unshuffled, every epoch."""
    return dataloader_idx == 0 and batch_idx == 0 and trainer.is_global_zero


def check_min(low: int, optional: bool = False, **values: int | None) -> None:
    """Raise ``ValueError`` for the first argument below ``low`` (``None`` allowed where ``optional``)."""
    for name, value in values.items():
        if optional and value is None:
            continue
        if value < low:  # type: ignore[operator]
            raise ValueError(f"{name} must be >= {low}{' or None' if optional else ''}, got {value}")


def evenly_spaced(items: Sequence[str], count: int) -> list[str]:
    """At most ``count`` of ``items``, evenly spaced with the first and last kept (only the last for one)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    picks = {round(i * (len(items) - 1) / (count - 1)) for i in range(count)}
    return [items[i] for i in sorted(picks)]


class StageResults(dict):
    """Results by stage key: ``results["val"]``; ``results["validate"]`` works too."""

    def __missing__(self, key: str) -> Any:
        alias = {"validate": "val", "validation": "val"}.get(key)
        if alias is not None and alias in self:
            return self[alias]
        raise KeyError(key)


class StreamingCallback(EvaluationCallback):
    """Base of the callbacks that stream metric states over sampled evaluation batches and, at each epoch end,
    compute them (a collective: every rank), log their scalars and publish a table, a JSON file and figures
    (global rank zero) under :attr:`name` (by default the class's :attr:`namespace`, see :func:`callback_name`).

    States are kept per (stage, dataloader) across epochs (reset after each compute): a subclass creates one in
    :meth:`_new_state` (it has ``to(device)`` and ``reset()``), gets the batch's with :meth:`_state_for`, and turns
    a computed epoch into logged scalars in :meth:`_scalars`. ``results[<stage key>]`` holds the last epoch's results
    (with ``stage``, ``epoch`` and ``to_dict()``).

    Args:
        stages: evaluation loops to run in: ``"validate"`` and/or ``"test"``.
        every_n_epochs: run on validation epochs whose index is a multiple of this (test always runs).
        max_batches: analyse at most this many batches per dataloader and epoch (``None``: all).
        every_n_batches: analyse only batches whose index is a multiple of this.
        max_figure_sites: at most this many sites per figure (evenly spaced over depth, first and last kept).
        save_dir: directory for PNG/JSON/CSV outputs; default ``<log_dir>/lightning_attn/<name>/<stage>``
            (``<default_root_dir>/lightning_attn_logs/version_<n>/<name>/<stage>`` with no logger).
        name: first component of every logged key and published name, and the output folder (:func:`callback_name`).
        include: the subclass's site patterns, which the default name mentions.
    """

    #: The default :attr:`name`.
    namespace: str = ""

    def __init__(
        self,
        stages: Sequence[Stage],
        every_n_epochs: int,
        max_batches: int | None,
        every_n_batches: int,
        max_figure_sites: int,
        save_dir: str | None,
        name: str | None = None,
        include: Sequence[str] | None = None,
    ) -> None:
        super().__init__(stages=stages, every_n_epochs=every_n_epochs, save_dir=save_dir)
        self._set_name(self.namespace, name, include)
        check_min(1, every_n_batches=every_n_batches, max_figure_sites=max_figure_sites)
        check_min(1, optional=True, max_batches=max_batches)
        self.max_batches = max_batches
        self.every_n_batches = every_n_batches
        self._set_budget(None, DEFAULT_MIN_BATCHES)
        #: Batches recorded and seen (over ranks) by stage key, last evaluated epoch.
        self.coverage: dict[str, dict[str, int]] = {}
        self.max_figure_sites = max_figure_sites
        self.results: dict[str, Any] = StageResults()
        self._states: dict[tuple[str, int], Any] = {}
        self._used: set[int] = set()  # dataloaders whose states were updated this epoch
        self._epochs_run: dict[str, int] = {}

    # -- checkpoints ------------------------------------------------------------------------------
    def forget_model(self) -> None:
        super().forget_model()
        self.results = StageResults()
        self._states = {}
        self._used = set()
        self._epochs_run = {}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_run": dict(self._epochs_run)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epochs_run = dict(state_dict.get("epochs_run", {}))

    # -- batches and states -----------------------------------------------------------------------
    def _sampled(self, batch_idx: int) -> bool:
        if batch_idx % self.every_n_batches:
            return False
        return self.max_batches is None or batch_idx // self.every_n_batches < self.max_batches

    def _set_budget(self, overhead_budget: float | None, min_batches: int) -> None:
        """Record within ``overhead_budget`` (:mod:`lightning_attn.callbacks.budget`; ``None``: every batch). An
        explicit ``max_batches`` or ``every_n_batches`` is a sampling of its own: the budget then does not apply."""
        self.overhead_budget = overhead_budget
        self.min_batches = min_batches
        own_sampling = self.max_batches is not None or self.every_n_batches != 1
        self._budget = BatchBudget(None if own_sampling else overhead_budget, min_batches)

    def _records(self, stage: str, dataloader_idx: int, batch_idx: int) -> bool:
        """Whether this batch is recorded: the callback's own sampling and the shared budget's decision."""
        assert self._budget is not None
        return self._budget.records(stage, dataloader_idx, batch_idx, sampled=self._sampled(batch_idx))

    def _new_state(self) -> Any:
        """The metric states of one (stage, dataloader) pair."""
        raise NotImplementedError

    def _state_for(self, stage: str, dataloader_idx: int, device: torch.device) -> Any:
        """The states of (``stage``, ``dataloader_idx``), created on first use, on ``device`` once per epoch."""
        key = (stage, dataloader_idx)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = self._new_state()
        if dataloader_idx not in self._used:
            state.to(device)
            self._used.add(dataloader_idx)
        return state

    def _reset_states(self) -> None:
        """Drop what this epoch added (a partial epoch must not leak into the next one)."""
        for state in self._states.values():
            state.reset()
        self._used = set()

    # -- epoch end --------------------------------------------------------------------------------
    def _finish_epoch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        compute: Callable[[Any, str, int], Any],
        publish: Callable[[Any, int], None],
    ) -> None:
        """For every dataloader used this epoch: ``compute(state, stage_key, dataloader_idx)`` (a collective: every
        rank), reset, keep in :attr:`results`, log :meth:`_scalars` and, on global rank zero,
        ``publish(results, dataloader_idx)``."""
        self._epochs_run[stage] = self._epochs_run.get(stage, 0) + 1
        used, self._used = used_on_any_rank(self._used), set()
        assert self._budget is not None
        coverage = self._budget.coverage(trainer, stage, used)  # a collective: every rank

        def finish(dataloader_idx: int) -> None:
            state = self._state_for(stage, dataloader_idx, pl_module.device)
            key = stage_key(stage, dataloader_idx)
            results = compute(state, key, dataloader_idx)
            state.reset()
            self.results[key] = results
            self.coverage[key] = coverage[dataloader_idx]
            scalars = self._scalars(results)
            log_scalars(pl_module, {**scalars, **coverage_scalars(self.name, key, coverage[dataloader_idx])})
            if trainer.is_global_zero:
                publish_scalar_layout(trainer, self.name, per_head_charts(list(scalars)))
                publish(results, dataloader_idx)

        finish_dataloaders(set(used), finish)

    def _scalars(self, results: Any) -> dict[str, float]:
        """The scalars to log for one computed epoch: ``<name>/<stage key>/...``."""
        raise NotImplementedError

    # -- publishing (rank zero) -------------------------------------------------------------------
    def _figure_sites(self, sites: Sequence[str]) -> list[str]:
        return evenly_spaced(sites, self.max_figure_sites)

    def _publish_results(
        self,
        trainer: pl.Trainer,
        results: Any,
        table: str,
        columns: list[str],
        rows: list[list[Any]],
        figures: Callable[[], dict[str, Figure]] | None,
    ) -> None:
        """The table ``<stage key>/<table>`` (captioned with its coverage), the JSON file ``<stage key>/statistics`` of
        ``results.to_dict()`` with its ``coverage`` (:func:`~lightning_attn.metrics.coverage.coverage_record`) and the
        figures drawn by ``figures`` (``None``: none), then the figures are let go; all in the :attr:`publisher`."""
        step = int(trainer.global_step)
        namespace = self.name
        coverage = coverage_record(self.coverage[results.stage], results.rows_by_site())
        assert self._budget is not None
        caption = coverage_caption(coverage, self._budget.overhead_budget)

        def publish(view: Any) -> None:
            sinks.publish_table(
                view,
                f"{results.stage}/{table}",
                columns,
                rows,
                namespace=namespace,
                step=step,
                save_dir=self.save_dir,
                caption=caption,
            )
            data = {**results.to_dict(), "coverage": coverage}
            sinks.publish_json(view, f"{results.stage}/statistics", data, namespace=namespace, save_dir=self.save_dir)
            if figures is None:
                return
            drawn = figures()
            sinks.publish_figures(view, drawn, namespace=namespace, step=step, save_dir=self.save_dir)
            drawn.clear()

        self.publisher.submit(trainer, publish)
