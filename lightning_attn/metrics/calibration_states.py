"""The streaming states of a CalibrationMonitor: one :class:`CalibrationMetric` per (stage, dataloader), created at
its first batch with the task that the first batch implies."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_attn.metrics.calibration import CalibrationMetric, ScoreType
from lightning_attn.metrics.calibration_inputs import Task, infer_task

__all__ = ["CalibrationStates"]

StateKey = tuple[str, int]


class CalibrationStates:
    """The metrics of every (stage, dataloader) pair, with the task they share.

    Args:
        task: ``"binary"`` or ``"multiclass"``; ``None``: inferred from the first batch (:func:`infer_task`).
        num_classes: number of classes; ``None``: the first batch's scores' dimension 1.
        metric_options: the :class:`CalibrationMetric` arguments (``n_bins``, ``bootstrap``, ...).

    Example:
        >>> states = CalibrationStates("multiclass", None, n_bins=10, bootstrap=0)
        >>> metric = states.update("validate", 0, torch.randn(8, 3), torch.arange(8) % 3, "logits")
        >>> states.resolved, int(metric.n_samples)
        (('multiclass', 3), 8)
    """

    def __init__(self, task: Task | None, num_classes: int | None, **metric_options: Any) -> None:
        self.task = task
        self.num_classes = num_classes
        self.metric_options = metric_options
        self.metrics: dict[StateKey, CalibrationMetric] = {}
        #: ``(task, num_classes)`` once known.
        self.resolved: tuple[Task, int] | None = None

    def clear(self) -> None:
        """Forget every state and the resolved task (a new run, whose model may differ)."""
        self.metrics.clear()
        self.resolved = None

    def reset(self, stage: str | None = None) -> None:
        """Drop what the current epoch of ``stage`` (``None``: of every stage) added."""
        for (metric_stage, _), metric in self.metrics.items():
            if stage is None or metric_stage == stage:
                metric.reset()

    def resolve(self, scores: Tensor, target: Tensor) -> tuple[Task, int]:
        """``(task, num_classes)``: inferred from the first batch seen, then kept."""
        if self.resolved is None:
            self.resolved = infer_task(scores, target, self.task, self.num_classes)
        return self.resolved

    def update(
        self, stage: str, dataloader_idx: int, scores: Tensor, target: Tensor, score_type: ScoreType
    ) -> CalibrationMetric:
        """Add a batch to the metric of (``stage``, ``dataloader_idx``), created at its first batch; returns it.

        Raises:
            ValueError: the score type changed between batches.
            NotImplementedError: the scores are on MPS, which lacks the float64 sums.
        """
        key = (stage, dataloader_idx)
        metric = self.metrics.get(key)
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
            metric = self.metrics[key] = self._new_metric(self.resolve(scores, target), score_type, scores.device)
        metric.update(scores, target)
        return metric

    def epoch_metric(
        self, stage: str, dataloader_idx: int, device: torch.device, score_type: ScoreType
    ) -> CalibrationMetric:
        """The metric of a dataloader at the epoch end; on a rank that saw none of its batches (DDP) an empty one
        of ``score_type``, so that the rank still joins the reduction.

        Raises:
            RuntimeError: no batch told this rank the task, nor did the arguments.
        """
        metric = self.metrics.get((stage, dataloader_idx))
        if metric is not None:
            return metric
        resolved = self.resolved
        if resolved is None and self.task == "binary":
            resolved = ("binary", 2)
        elif resolved is None and self.task == "multiclass" and self.num_classes is not None:
            resolved = ("multiclass", self.num_classes)
        if resolved is None:
            raise RuntimeError(
                f"CalibrationMonitor: this rank saw no batch of dataloader {dataloader_idx} while another did, and "
                "cannot size its (empty) share of the reduction: pass task= (and num_classes= for multiclass)"
            )
        metric = self.metrics[(stage, dataloader_idx)] = self._new_metric(resolved, score_type, device)
        return metric

    def _new_metric(self, resolved: tuple[Task, int], score_type: ScoreType, device: torch.device) -> CalibrationMetric:
        task, num_classes = resolved
        return CalibrationMetric(task, num_classes, score_type=score_type, **self.metric_options).to(device)
