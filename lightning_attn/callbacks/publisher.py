"""Figures off the training thread: epoch-end publishing (drawing, PNG encoding, files) in a background worker.

A callback hands :meth:`Publisher.submit` a job ``job(view)`` that calls :mod:`lightning_attn.sinks` with ``view`` in
place of the Trainer; the job runs in one worker thread per callback, so that the next training step starts while
its figures render. Matplotlib figures are created, drawn and closed inside the job (Agg is safe per figure; a
process-wide lock keeps one job drawing at a time, as some of matplotlib's text caches are shared).

Logger calls do not run in the worker. wandb's ``Run.log`` advances its step counter without a lock
(``wandb/sdk/wandb_run.py``: ``self._local_step += 1`` beside the main thread's own ``log`` calls), so a concurrent
call could share a step with a scalar row; TensorBoard's writer is locked, but Lightning closes it in
``logger.finalize`` right after the callbacks' ``teardown``. So ``view.loggers`` are stand-ins of the real loggers
(subclasses of their classes, so the sinks treat them alike) that record every call; :meth:`Publisher.replay`
makes the recorded calls on the real loggers on the main thread, at the callback's next hook, and
:meth:`Publisher.wait` finishes every job, replays and ends the worker (at ``teardown``, on an exception, and
before the callback's next evaluation epoch, whose states the jobs read).
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning_attn.sinks import layout

__all__ = ["Publisher", "TrainerView"]

#: One job draws at a time in the process: matplotlib keeps its FreeType fonts per thread, but its other text caches
#: (mathtext parsers, layout) are shared by all figures.
_DRAWING = threading.Lock()

_STAND_IN_CLASSES: dict[type, type] = {}

#: A recorded logger call: the real logger, the attribute path from it, the arguments.
Call = tuple[Any, tuple[str, ...], tuple[Any, ...], dict[str, Any]]


class _RecordedCall:
    """An attribute path of a logger (``("experiment", "add_image")``) whose calls are recorded, not made."""

    def __init__(self, calls: list[Call], logger: Any, path: tuple[str, ...]) -> None:
        self._calls = calls
        self._logger = logger
        self._path = path

    def __getattr__(self, name: str) -> _RecordedCall:
        return _RecordedCall(self._calls, self._logger, (*self._path, name))

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._calls.append((self._logger, self._path, args, kwargs))


def _stand_in_getattribute(self: Any, name: str) -> Any:
    real, calls = object.__getattribute__(self, "_lightning_attn_logger")
    if name == "experiment":  # the run/writer object: every use of it is a call to record
        return _RecordedCall(calls, real, ("experiment",))
    value = getattr(real, name)
    return _RecordedCall(calls, real, (name,)) if callable(value) else value


def _stand_in(logger: Any, calls: list[Call]) -> Any:
    """A stand-in of ``logger``: an instance of a subclass of its class (``isinstance`` and class-name checks see the
    real kind) whose methods record their calls in ``calls``; plain attributes (``log_dir``) read through."""
    cls = type(logger)
    stand_in_cls = _STAND_IN_CLASSES.get(cls)
    if stand_in_cls is None:
        stand_in_cls = _STAND_IN_CLASSES[cls] = type(
            cls.__name__, (cls,), {"__getattribute__": _stand_in_getattribute, "__module__": __name__}
        )
    stand_in: Any = object.__new__(stand_in_cls)
    object.__setattr__(stand_in, "_lightning_attn_logger", (logger, calls))
    return stand_in


class TrainerView:
    """What a publishing job sees of the Trainer: the step, epoch, run folder and output position of the submit,
    stand-ins of its loggers, and every other attribute read through (``default_root_dir``, ``is_global_zero``)."""

    def __init__(self, trainer: Any, calls: list[Call]) -> None:
        self._trainer = trainer
        self.global_step = int(trainer.global_step)
        self.current_epoch = int(trainer.current_epoch)
        # resolved now, on the main thread: the job must name its files by the epoch it describes and write them
        # into the Trainer's run folder (a view is another object: it would get a run folder of its own)
        self.lightning_attn_run_dir = layout.run_dir(trainer)
        self.lightning_attn_position = layout.position(trainer)
        self.loggers = [_stand_in(logger, calls) for logger in (getattr(trainer, "loggers", None) or [])]
        self.logger = self.loggers[0] if self.loggers else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class Publisher:
    """Runs a callback's publishing jobs in order, in one background thread (``background=False``: inline, on the
    calling thread, with the real Trainer)."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[tuple[Future[None], list[Call]]] = deque()

    def submit(self, trainer: Any, job: Callable[[Any], None]) -> None:
        """Run ``job(view)`` with a :class:`TrainerView` of ``trainer`` in the worker."""
        if not self.background:
            job(trainer)
            return
        calls: list[Call] = []
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_attn-publisher")
        view = TrainerView(trainer, calls)
        self._jobs.append((self._executor.submit(_drawing, job, view), calls))

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet replayed."""
        return len(self._jobs)

    def replay(self) -> None:
        """Make the logger calls of the finished jobs, in submit order (main thread; no waiting). A job's error is
        raised here, after the calls it made before failing."""
        while self._jobs and self._jobs[0][0].done():
            future, calls = self._jobs.popleft()
            _make_calls(calls)
            future.result()

    def wait(self, raise_errors: bool = True) -> None:
        """Finish every job, replay its logger calls and end the worker thread. With ``raise_errors=False`` (the
        run is already failing) a job's error becomes a warning and the later jobs still publish."""
        try:
            while self._jobs:
                future, calls = self._jobs.popleft()
                error = future.exception()
                _make_calls(calls)
                if error is not None and raise_errors:
                    raise error
                if error is not None:
                    warnings.warn(f"lightning_attn: publishing failed: {error!r}", RuntimeWarning, stacklevel=2)
        finally:
            if self._executor is not None and not self._jobs:
                self._executor.shutdown(wait=True)
                self._executor = None


def _drawing(job: Callable[[Any], None], view: TrainerView) -> None:
    with _DRAWING:
        job(view)


def _make_calls(calls: list[Call]) -> None:
    """Make recorded calls on their real loggers."""
    for logger, path, args, kwargs in calls:
        functools.reduce(getattr, path, logger)(*args, **kwargs)
