"""Shape and dtype checks of a calibration metric's input, before any value is read."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["Task", "check_shapes"]

Task = Literal["binary", "multiclass"]


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
