"""Where outputs go on disk: one run, one folder; one callback, one sub-folder; one stage, one folder below it.

Layout (every callback, every stage)::

    <run folder>/<callback name>/<stage>/<output>_epoch<E>_step<S>.<png|csv|json>

The run folder is ``<log_dir>/lightning_attn`` of the Trainer's first logger (TensorBoard, CSV: their
``version_<n>`` folder; W&B: ``<save_dir>/<project>/<run id>``, the folder Lightning's ``ModelCheckpoint`` uses),
else, with no logger, ``<default_root_dir>/lightning_attn_logs/version_<n>``, a new ``n`` per Trainer. Files carry
the epoch and step they describe, so that no epoch, run or callback instance overwrites another's. An evaluation of
a checkpoint (``trainer.test(ckpt_path=...)``) is named by the checkpoint's own epoch and step, not the Trainer's, and
its ``provenance.json`` names the checkpoint file.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Position", "check_save_dir", "output_dir", "output_path", "position", "run_dir", "write_provenance"]

#: Run folder of each Trainer without a logger, chosen once (a new ``version_<n>`` per Trainer).
_UNLOGGED_RUNS: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
#: ``(path, modification time) -> (epoch, global_step)`` of checkpoints already read.
_CHECKPOINTS: dict[tuple[str, float], tuple[int, int]] = {}


def _next_version(root: Path) -> Path:
    """The first ``version_<n>`` above every one on disk and every one a live Trainer holds (it may not have written
    yet: the folder is made by the first file)."""
    paths = [*root.glob("version_*"), *_UNLOGGED_RUNS.values()]
    taken = [int(m.group(1)) for p in paths if p.parent == root and (m := re.fullmatch(r"version_(\d+)", p.name))]
    return root / f"version_{max(taken, default=-1) + 1}"


def run_dir(trainer: Any) -> Path:
    """The folder of this run's outputs (see the module docstring); a publishing job's view of the Trainer carries
    the folder resolved when the job was submitted (``lightning_attn_run_dir``)."""
    resolved = getattr(trainer, "lightning_attn_run_dir", None)
    if resolved is not None:
        return Path(resolved)
    for logger in list(getattr(trainer, "loggers", None) or []):
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir) / "lightning_attn"
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:  # W&B: no log_dir; the run's own folder, as ModelCheckpoint builds it
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            return Path(save_dir) / str(logger.name) / version / "lightning_attn"
    try:
        return _UNLOGGED_RUNS[trainer]
    except (KeyError, TypeError):
        folder = _next_version(Path(getattr(trainer, "default_root_dir", None) or ".") / "lightning_attn_logs")
        with contextlib.suppress(TypeError):  # a trainer stand-in that cannot be weakly referenced: no cache
            _UNLOGGED_RUNS[trainer] = folder
        return folder


def output_dir(trainer: Any, namespace: str, save_dir: str | Path | None = None) -> Path:
    """``save_dir/<namespace>`` when ``save_dir`` is given, else ``<run folder>/<namespace>``."""
    return (Path(save_dir) if save_dir is not None else run_dir(trainer)) / namespace


@dataclass(frozen=True)
class Position:
    """The training position that outputs describe: the Trainer's, or the evaluated checkpoint's."""

    epoch: int
    step: int
    checkpoint: str | None = None


def position(trainer: Any) -> Position:
    """Epoch and step of the model being evaluated: a checkpoint loaded by ``validate``/``test`` (``ckpt_path``) is
    named by its own ``epoch`` and ``global_step`` (a test after ``fit`` of the best checkpoint must not carry the last
    epoch's number); otherwise the Trainer's current epoch and global step. A publishing job's view of the Trainer
    carries the position of its submit (``lightning_attn_position``)."""
    submitted = getattr(trainer, "lightning_attn_position", None)
    if isinstance(submitted, Position):
        return submitted
    checkpoint = getattr(trainer, "ckpt_path", None)
    state = getattr(trainer, "state", None)
    evaluating = getattr(getattr(state, "fn", None), "value", None) in ("validate", "test")
    if checkpoint and evaluating and Path(checkpoint).is_file():
        path = Path(checkpoint).resolve()
        key = (str(path), path.stat().st_mtime)
        if key not in _CHECKPOINTS:
            # mmap: only the two counters are read, not the weights
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            _CHECKPOINTS[key] = (int(saved.get("epoch", 0)), int(saved.get("global_step", 0)))
        epoch, step = _CHECKPOINTS[key]
        return Position(epoch, step, str(path))
    return Position(int(getattr(trainer, "current_epoch", 0)), int(getattr(trainer, "global_step", 0)))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.<>=-]+", "_", name).strip("_") or "output"


def output_path(
    trainer: Any,
    namespace: str,
    name: str,
    suffix: str,
    save_dir: str | Path | None = None,
    at: Position | None = None,
) -> Path:
    """The file of output ``name`` (``/`` separates folders: ``"val/head_statistics"``) of ``namespace`` (the
    callback's name, optionally with its stage): ``<output_dir>/<folders>/<file>_epoch<E>_step<S><suffix>`` with the
    epoch and step of ``at`` (default :func:`position`), its folder created, with a ``provenance.json`` beside it."""
    parts = [_safe(part) for part in f"{namespace}/{name}".split("/") if part]
    where = at or position(trainer)
    directory = output_dir(trainer, "/".join(parts[:-1]), save_dir)
    directory.mkdir(parents=True, exist_ok=True)
    write_provenance(trainer, directory, where)
    return directory / f"{parts[-1]}_epoch{where.epoch}_step{where.step}{suffix}"


def write_provenance(trainer: Any, directory: Path, where: Position) -> None:
    """``provenance.json`` of the outputs in ``directory``: the run folder, the last epoch, step and checkpoint they
    describe (rewritten when they change)."""
    record = {"run_dir": str(run_dir(trainer)), **asdict(where)}
    path = directory / "provenance.json"
    text = json.dumps(record, indent=2, allow_nan=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def check_save_dir(save_dir: str | Path | None, owner: str) -> None:
    """Raise ``NotADirectoryError`` when ``save_dir`` (``None``: the run folder, nothing to check) or the nearest
    existing folder above it is a file: no output could be written below it, and the publishing thread would only
    fail at the end of the epoch. ``owner`` names the callback in the message."""
    if save_dir is None:
        return
    path = Path(save_dir)
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is below the file {str(existing)!r}"
        raise NotADirectoryError(
            f"{owner}: save_dir {str(path)!r} {where}, not a directory: outputs go to <save_dir>/<name>/<stage>/; "
            "give a directory, or no save_dir for the run folder"
        )
