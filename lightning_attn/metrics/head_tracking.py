"""The state of a HeadSpecializationTracker run: the streamed metrics and head-importance sums of each (stage,
dataloader), the batch being recorded, and the history of analysed epochs, driven by the callback's hooks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import torch

from lightning_attn.capture.record import AttentionCapture
from lightning_attn.metrics.batch_context import PADDING_MASK_KEY, TOKEN_IDS_KEY, BatchContext, batch_context
from lightning_attn.metrics.head_labels import FeatureLabel
from lightning_attn.metrics.head_records import HeadHistory, epoch_record, head_scalars
from lightning_attn.metrics.heads import HeadSpecializationMetrics
from lightning_attn.metrics.importance import HeadImportance

__all__ = ["HeadSettings", "HeadTracking", "named_batch_keys"]

#: A batch key, dotted path or callable giving a value of the batch.
Source = str | Callable[[Any], Any]


class HeadSettings(Protocol):
    """What the tracking reads of the tracker's arguments (see :class:`~lightning_attn.HeadSpecializationTracker`)."""

    name: str
    features: dict[str, Source]
    feature_masks: dict[str, Source]
    feature_labels: dict[str, FeatureLabel]
    summary: Literal["auto", "mass", "max_weight", "entropy"]
    chunk_size: int | None
    local_window: int
    confidence_exclude_positions: tuple[int, ...]
    type_score_exclude_bos: bool
    type_score_exclude_current_token: bool
    probe_samples: int
    probe_max_tokens: int
    token_ids_key: str | None
    padding_mask_key: str | None
    confidence_exclude_key: str | None
    hsi_threshold: float
    thresholds: dict[str, float]
    redundancy_threshold: float
    logged_scores: tuple[str, ...]
    log_per_head: bool


def named_batch_keys(settings: HeadSettings) -> tuple[dict[str, str], dict[str, str]]:
    """The batch keys the arguments name, by argument (callables aside), and those of the per-token ``[B, L]``
    tensors. A default key (``input_ids``, ``attention_mask``) is used where the batch has it: it is not among
    them; a key the user named must be in the batch."""
    keys = {f"features[{n!r}]": s for n, s in settings.features.items() if isinstance(s, str)}
    keys.update({f"feature_masks[{n!r}]": s for n, s in settings.feature_masks.items() if isinstance(s, str)})
    token_keys = {
        "token_ids_key": None if settings.token_ids_key == TOKEN_IDS_KEY else settings.token_ids_key,
        "padding_mask_key": None if settings.padding_mask_key == PADDING_MASK_KEY else settings.padding_mask_key,
        "confidence_exclude_key": settings.confidence_exclude_key,
    }
    return keys, {argument: key for argument, key in token_keys.items() if key is not None}


class HeadTracking:
    """The metric states per (stage, dataloader), the recorded batch and the :class:`HeadHistory` of one tracker.

    Args:
        settings: the tracker's arguments.
    """

    def __init__(self, settings: HeadSettings) -> None:
        self.settings = settings
        self.history = HeadHistory()
        #: The probe's redundancy result by stage key, last evaluated epoch (rank zero's probe samples).
        self.last_redundancy: dict[str, dict[str, Any]] = {}
        self._metrics: dict[tuple[str, int], HeadSpecializationMetrics] = {}
        self._importance: dict[tuple[str, int], HeadImportance] = {}
        self._target: HeadSpecializationMetrics | None = None
        self._context: BatchContext | None = None

    # -- states ---------------------------------------------------------------------------------------------
    def metrics_for(self, stage: str, dataloader_idx: int, device: torch.device) -> HeadSpecializationMetrics:
        """The streamed measures of (``stage``, ``dataloader_idx``), created on first use, on ``device``."""
        metrics = self._metrics.get((stage, dataloader_idx))
        if metrics is None:
            s = self.settings
            metrics = self._metrics[(stage, dataloader_idx)] = HeadSpecializationMetrics(
                list(s.features),
                summary=s.summary,
                chunk_size=s.chunk_size,
                local_window=s.local_window,
                confidence_exclude_positions=s.confidence_exclude_positions,
                exclude_bos=s.type_score_exclude_bos,
                exclude_current_token=s.type_score_exclude_current_token,
                probe_samples=s.probe_samples,
                probe_max_tokens=s.probe_max_tokens,
            )
        return metrics.to(device)

    def importance_for(self, stage: str, dataloader_idx: int, device: torch.device) -> HeadImportance:
        """The head-importance sums of (``stage``, ``dataloader_idx``), created on first use, on ``device``."""
        return self._importance.setdefault((stage, dataloader_idx), HeadImportance()).to(device)

    def reset(self, stage: str) -> None:
        """Drop what the states of ``stage`` hold (a new epoch)."""
        states: list[HeadSpecializationMetrics | HeadImportance] = [*self._metrics.values(), *self._importance.values()]
        keys = [*self._metrics, *self._importance]
        for (state_stage, _), state in zip(keys, states, strict=True):
            if state_stage == stage:
                state.reset()

    def used(self, stage: str) -> set[int]:
        """The dataloaders of ``stage`` whose measures got a capture this epoch, on this rank."""
        return {index for (key, index), metrics in self._metrics.items() if key == stage and metrics.updated}

    # -- the recorded batch ---------------------------------------------------------------------------------
    def start_batch(self, stage: str, dataloader_idx: int, batch: Any, device: torch.device, probe: bool) -> None:
        """Send the captures of the coming step to the measures of (``stage``, ``dataloader_idx``)."""
        self._target = self.metrics_for(stage, dataloader_idx, device)
        self._context = self.batch_context(batch, device, probe)

    def batch_context(self, batch: Any, device: torch.device, probe: bool) -> BatchContext:
        """Everything taken from the batch, as tensors on ``device`` (no host synchronization)."""
        s = self.settings
        return batch_context(
            batch,
            device,
            probe=probe,
            token_ids_key=s.token_ids_key,
            padding_mask_key=s.padding_mask_key,
            confidence_exclude_key=s.confidence_exclude_key,
            features=s.features,
            feature_masks=s.feature_masks,
        )

    def on_capture(self, capture: AttentionCapture) -> None:
        """One captured call of the recorded step."""
        if self._target is not None and self._context is not None:
            self._target.update(capture, self._context)

    def end_batch(self) -> None:
        self._target = None
        self._context = None

    # -- epoch end ------------------------------------------------------------------------------------------
    def finish(
        self,
        stage: str,
        dataloader_idx: int,
        device: torch.device,
        *,
        key: str,
        epoch: int,
        global_step: int,
        coverage: Mapping[str, int],
        importance: bool,
    ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, float]]:
        """Compute (collectives: every rank must call it for the same dataloaders), reset, analyse and keep the
        epoch's record of stage key ``key`` in the history; return it, the probe's redundancy result (``None``
        without probe maps) and its logged scalars.

        Args:
            stage: the evaluation loop.
            dataloader_idx: the dataloader.
            device: the model's device.
            key: the stage key (``val``, ``test_dl1`` ...).
            epoch: the epoch evaluated.
            global_step: the optimizer step at the evaluation.
            coverage: the batches recorded and seen.
            importance: whether head importance was scored: computed on every rank, also one that scored no batch
                (the ranks agree on the sites, so none waits for another).
        """
        metrics = self.metrics_for(stage, dataloader_idx, device)
        computed = metrics.compute(self.settings.redundancy_threshold)
        metrics.reset()
        raw = None
        if importance:
            sums = self.importance_for(stage, dataloader_idx, device)
            raw = sums.compute_sites() or None  # no site on any rank: no importance
            sums.reset()
        s = self.settings
        record, redundancy = epoch_record(
            computed,
            stage=key,
            epoch=epoch,
            global_step=global_step,
            coverage=coverage,
            hsi_threshold=s.hsi_threshold,
            thresholds=s.thresholds,
            feature_labels=s.feature_labels,
            importance=raw,
            history=self.history.for_stage(key),
        )
        self.history.add(record)
        if redundancy:
            self.last_redundancy[key] = redundancy
        scalars = head_scalars(
            record,
            s.name,
            s.logged_scores,
            log_per_head=s.log_per_head,
            hsi_threshold=s.hsi_threshold,
            with_features=bool(s.features),
        )
        return record, redundancy, scalars

    def registry(self, stage: str) -> dict[str, Any]:
        """The head-function registry of the latest record of ``stage`` (:meth:`HeadHistory.registry`).

        Raises:
            LookupError: when nothing was recorded for ``stage`` yet.
        """
        s = self.settings
        return self.history.registry(
            stage,
            hsi_threshold=s.hsi_threshold,
            thresholds=s.thresholds,
            feature_labels=s.feature_labels,
            features=list(s.features),
            summary=s.summary,
        )
