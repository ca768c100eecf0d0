"""What a calibration metric reads and checks: the predictions in a step's outputs (by key), the task they imply,
their shapes and dtypes before any value is read, and the invalid values counted while reading them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

from lightning_attn.capture.site_names import close_names

__all__ = [
    "DEFAULT_TARGET_KEY",
    "PredictionKeyError",
    "Task",
    "check_counts",
    "check_shapes",
    "infer_task",
    "read_predictions",
]

Task = Literal["binary", "multiclass"]

#: The target key looked up by default; only this one falls back to ``batch[1]`` of an ``(x, y)`` batch.
DEFAULT_TARGET_KEY = "target"


class PredictionKeyError(KeyError):
    """A key of the predictions is not where it was looked for (the message names it and the close keys)."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message as written, not KeyError's repr of it


def _missing(argument: str, key: str | None, places: Mapping[str, Any], advice: str) -> PredictionKeyError:
    """The error for ``argument`` (``key``; ``None``: ``'logits'`` or ``'probs'``) found in none of ``places``
    (description -> the mapping looked in), listing their keys and the close ones
    (:func:`~lightning_attn.capture.site_names.close_names`)."""
    keys = sorted({str(k) for place in places.values() for k in place})
    wanted = [key] if key is not None else ["logits", "probs"]
    what = f"{argument}={key!r} is not in" if key is not None else "no 'logits' or 'probs' in"
    where = " nor in ".join(f"{place} (keys: {sorted(map(str, found))})" for place, found in places.items())
    hint = close_names(wanted, keys, "keys")
    return PredictionKeyError(f"CalibrationMonitor: {what} {where}; {hint}. {advice}")


def read_predictions(
    outputs: Any, batch: Any, score_key: str | None, target_key: str = DEFAULT_TARGET_KEY
) -> tuple[Tensor, Tensor, str]:
    """``(scores, target, score key)`` from what ``validation_step``/``test_step`` returned.

    Args:
        outputs: the step's output dict.
        batch: the batch, where the targets are looked for when the outputs lack them.
        score_key: key of the scores; ``None``: ``"logits"``, else ``"probs"`` (the one present).
        target_key: key of the targets in the outputs, else in a dict batch; :data:`DEFAULT_TARGET_KEY` also falls
            back to ``batch[1]`` of an ``(x, y)`` batch (any other key must be found: it is never silently replaced).

    Raises:
        TypeError: the outputs are not a dict.
        PredictionKeyError: a key is missing; the message names it, where it was looked for and the close keys.
    """
    if not isinstance(outputs, Mapping):
        raise TypeError(
            "CalibrationMonitor reads predictions from the dict returned by validation_step/test_step, got "
            f"{type(outputs).__name__}: return {{'logits': ..., 'target': ...}} (or 'probs'), or pass extract=..."
        )
    key = score_key
    if key is None:
        key = "logits" if "logits" in outputs else "probs" if "probs" in outputs else None
    if key is None or key not in outputs:
        advice = "Return it from validation_step/test_step, set score_key=..., or pass extract=..."
        raise _missing("score_key", score_key, {"the step's outputs": outputs}, advice)
    if target_key in outputs:
        return outputs[key], outputs[target_key], key
    if isinstance(batch, Mapping) and target_key in batch:
        return outputs[key], batch[target_key], key
    pair = isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor)
    if pair and target_key == DEFAULT_TARGET_KEY:
        return outputs[key], batch[1], key
    places = {"the step's outputs": outputs, **({"the batch": batch} if isinstance(batch, Mapping) else {})}
    advice = "Return the targets from the step, set target_key=..., or pass extract=..."
    raise _missing("target_key", target_key, places, advice)


def infer_task(scores: Tensor, target: Tensor, task: Task | None, num_classes: int | None) -> tuple[Task, int]:
    """``(task, num_classes)`` of a batch: ``task`` when given, else binary for scores shaped like the target and
    multiclass for one more (class) dimension 1; ``num_classes`` when given, else the scores' dimension 1.

    >>> import torch
    >>> infer_task(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), None, None)
    ('multiclass', 3)

    Raises:
        ValueError: the shapes imply no task.
    """
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
        return task, 2
    if scores.ndim < 2:
        raise ValueError(f"multiclass scores must be [N, num_classes, ...], got {tuple(scores.shape)}")
    return task, num_classes if num_classes is not None else int(scores.shape[1])


def check_counts(
    bad_target: int, bad_prob: int, nan: int, *, task: Task, num_classes: int, ignore_index: int | None
) -> None:
    """Raise ``ValueError`` for counted invalid input (targets outside the classes, probabilities that are not);
    warn for samples skipped because their scores were NaN."""
    if bad_target:
        allowed = f"[0, {num_classes})" if task == "multiclass" else "{0, 1}"
        extra = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{bad_target} target(s) outside {allowed}{extra}: check the labels or num_classes")
    if bad_prob:
        what = "rows not summing to 1 or values outside [0, 1]" if task == "multiclass" else "values outside [0, 1]"
        raise ValueError(
            f"{bad_prob} sample(s) declared as probabilities (score_type='probs') are not probabilities ({what}); "
            "pass score_type='logits' if the model returns logits"
        )
    if nan:
        rank_zero_warn(f"CalibrationMetric: {nan} sample(s) with NaN scores (or +inf logits) were skipped", UserWarning)


def check_shapes(scores: Tensor, target: Tensor, task: Task, num_classes: int | None) -> None:
    """Raise a ``ValueError`` naming the problem when ``scores``/``target`` do not fit ``task``.

    Cheap: shapes and dtypes only, never values (no device synchronisation).

    - multiclass: ``scores [N, K, ...]``, ``target [N, ...]`` (class dimension 1, as ``cross_entropy``);
    - binary: ``scores`` shaped like ``target`` (``[N, ...]``), or ``[N, 1]`` with ``target [N]``.
    """
    if not isinstance(scores, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"scores and target must be tensors, got {type(scores).__name__} and {type(target).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor of logits or probabilities, got dtype {scores.dtype}")
    if target.is_complex() or (target.is_floating_point() and task != "binary"):
        raise ValueError(f"multiclass target must hold integer class indices, got dtype {target.dtype}")
    if task == "multiclass":
        batch_mismatch = scores.shape[0] != target.shape[0] or scores.shape[2:] != target.shape[1:]
        if scores.ndim != target.ndim + 1 or batch_mismatch:
            raise ValueError(
                "multiclass scores must be [N, num_classes, ...] with target [N, ...]; got scores "
                f"{tuple(scores.shape)} and target {tuple(target.shape)}"
            )
        if num_classes is not None and scores.shape[1] != num_classes:
            raise ValueError(f"scores have {scores.shape[1]} classes in dimension 1 but num_classes={num_classes}")
    elif task == "binary":
        one_column = scores.ndim == 2 and scores.shape[1] == 1 and target.shape == scores.shape[:1]
        if scores.shape != target.shape and not one_column:
            raise ValueError(
                "binary scores must have the target's shape (one logit or probability of class 1 per target); got "
                f"scores {tuple(scores.shape)} and target {tuple(target.shape)} "
                "(for [N, 2] scores use task='multiclass')"
            )
    else:
        raise ValueError(f"task must be 'binary' or 'multiclass', got {task!r}")
