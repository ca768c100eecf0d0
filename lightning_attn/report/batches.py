"""What the ExplainabilityReport does with one evaluated batch: read its logits and targets, add its rows and sums to
the report's run (:mod:`~lightning_attn.report.run`) and, for probe samples, compute their saliency and attributions
(:mod:`~lightning_attn.report.explain`, :mod:`~lightning_attn.report.attribution`); and :class:`ReportModule`, the
LightningModule that wraps a plain model for :func:`~lightning_attn.report.build.build_report`.

**How the model is called.** Logits are taken from what ``test_step``/``validation_step`` returned when it
is a ``[B, C]`` tensor or a mapping with ``logits_key`` (targets from its ``target``/``y``/``labels`` key
if present); else, without a ``forward_fn``, from the output of ``pl_module``'s own forward inside the
step (a forward hook: no extra pass); attention is recorded during the step itself. Otherwise the
callback calls ``forward_fn(pl_module, batch) -> logits`` once more per batch, recorded for the report
only (other callbacks' recorders are suspended during the report's own passes, so their statistics
never see them). The saliency pass always calls ``forward_fn``. The default ``forward_fn`` calls
``pl_module(**inputs)`` for a mapping batch (the batch minus its target key), ``pl_module(*inputs)`` for a
tuple/list batch (``pl_module(x)`` for ``(x, y)``) and ``pl_module(batch)`` for a tensor; its output
may be logits, a mapping with ``"logits"``, an object with ``.logits`` or a tuple starting with them.
Targets: ``target_fn(batch)``, else the batch's ``target_key`` (default: the first of ``target``,
``targets``, ``label``, ``labels``, ``y``), else the last element of a tuple/list batch. A batch without
targets is an error (:class:`~lightning_attn.report.explain.ReportError`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_attn.report.attribution import AttributionSettings, compute_attributions, record_attributions
from lightning_attn.report.explain import (
    TARGET_KEYS,
    BatchAttention,
    ReportError,
    as_logits,
    batch_device,
    class_targets,
    compute_saliency,
    exclusive_recording,
    extract_targets,
    model_inputs,
    probabilities,
    slice_batch,
)
from lightning_attn.report.provenance import sample_hashes
from lightning_attn.report.run import ReportRun, add_batch, keep_finite_rows, record_probes

__all__ = ["BatchProcessing", "ReportModule", "ReportWrapper", "target_module"]


class ReportWrapper(nn.Module):
    """The steps that wrap a plain ``nn.Module`` (or a LightningModule without the needed step) for
    :func:`~lightning_attn.report.build.build_report`; the report explains ``self.model`` (site names and hashes are
    those of the wrapped model). A mixin before the LightningModule of either package: :class:`ReportModule` for
    ``lightning.pytorch``, ``build_report`` makes the ``pytorch_lightning`` one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None


class ReportModule(ReportWrapper, pl.LightningModule):
    """:class:`ReportWrapper` as a ``lightning.pytorch`` LightningModule."""


def target_module(pl_module: nn.Module) -> nn.Module:
    return pl_module.model if isinstance(pl_module, ReportWrapper) else pl_module


class BatchProcessing:
    """The per-batch steps of :class:`~lightning_attn.report.callback.ExplainabilityReport` (a mixin: the settings
    below are the report's own, documented there)."""

    target_fn: Callable[[Any], Any] | None
    target_key: str | None
    logits_key: str
    forward_fn: Callable[[Any, Any], Any] | None
    outputs_are_probabilities: bool
    calibration_bins: int
    class_names: list[str] | None
    feature_names: Sequence[str] | Mapping[str, Sequence[str]] | None
    modality_pairs: dict[str, tuple[str, str]]
    probe_samples: int
    probe_indices: list[int] | None
    saliency_target: str
    include: list[str] | None
    exclude: list[str] | None
    max_positions: int
    attribution: AttributionSettings
    _attention: BatchAttention | None
    _recorder: Any
    _record_in_step: bool
    _warned_nonfinite: bool
    _open_recorder: Callable[[nn.Module], None]
    _close_recorder: Callable[[], None]
    _forward: Callable[[], Callable[[Any, Any], Any]]

    def _logits_from_outputs(self, outputs: Any) -> Tensor | None:
        if isinstance(outputs, Mapping):
            return as_logits(outputs, self.logits_key)
        if isinstance(outputs, Tensor) and outputs.dim() == 2:
            return outputs
        return None

    def _targets(self, outputs: Any, batch: Any) -> Any:
        if self.target_fn is not None:
            return self.target_fn(batch)
        if isinstance(outputs, Mapping):
            keys = (self.target_key,) if self.target_key else TARGET_KEYS
            for key in keys:
                if isinstance(outputs.get(key), Tensor):
                    return outputs[key]
        return extract_targets(batch, self.target_key)

    def _process(
        self,
        run: ReportRun,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        attention: BatchAttention | None,
        step_output: Any = None,
    ) -> None:
        module = target_module(pl_module)
        raw_targets = self._targets(outputs, batch)
        if raw_targets is None:
            raise ReportError(
                "the dataloader's batches carry no targets: expected a (inputs, target) tuple, or a mapping with "
                "one of "
                f"the keys {', '.join(TARGET_KEYS)} (or pass target_key= / target_fn=)"
            )
        expected = int(raw_targets.shape[0]) if isinstance(raw_targets, Tensor) and raw_targets.dim() else None
        logits = None
        if attention is not None:
            # logits of the step itself: returned by it, else the output of the module's forward inside it
            hooked = as_logits(step_output, self.logits_key) if self.forward_fn is None else None
            for candidate in (self._logits_from_outputs(outputs), hooked):
                if (
                    candidate is not None
                    and candidate.dim() >= 1
                    and (expected is None or candidate.shape[0] == expected)
                ):
                    logits = candidate
                    break
        if logits is None:
            # One forward pass of our own, recorded for this report only; later batches skip the step recording.
            self._record_in_step = False
            self._open_recorder(pl_module)
            attention = self._attention
            try:
                with exclusive_recording(self._recorder):
                    logits = as_logits(self._forward()(module, batch), self.logits_key)
            finally:
                self._close_recorder()
            if logits is None:
                raise ReportError(
                    "forward_fn returned no logits tensor (a tensor, a mapping with 'logits', .logits or a tuple)"
                )
        probs = probabilities(logits, self.outputs_are_probabilities)
        batch_size, num_classes = probs.shape
        target = class_targets(raw_targets, batch_size, num_classes).to(probs.device)
        kept, probs, target, note = keep_finite_rows(run, batch_idx, probs, target, attention)
        if note is not None and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(f"ExplainabilityReport ({run.key}): {note}", category=UserWarning)
        if not kept:
            run.hasher.update(batch)  # evaluated all the same: part of the inputs hash
            return
        first_index = run.count
        hashes = sample_hashes(model_inputs(batch, self.target_key), batch_size)
        host = add_batch(
            run,
            probs,
            target,
            batch,
            batch_idx,
            attention,
            calibration_bins=self.calibration_bins,
            class_names=self.class_names,
            modality_pairs=self.modality_pairs,
            input_hashes=[hashes[row] for row in kept],
        )

        # probes (rank zero only: the first samples of its shard are the first rows of a distributed report)
        wanted = self._probe_positions(first_index, len(kept)) if not run.shard else []
        if wanted:
            self._saliency(run, module, batch, wanted, first_index, batch_idx, host, [kept[p] for p in wanted])

    def _probe_positions(self, first_index: int, batch_size: int) -> list[int]:
        if self.probe_indices is not None:
            return [i - first_index for i in self.probe_indices if first_index <= i < first_index + batch_size]
        return list(range(0, max(0, min(batch_size, self.probe_samples - first_index))))

    def _saliency(
        self,
        run: ReportRun,
        module: nn.Module,
        batch: Any,
        positions: list[int],
        first_index: int,
        batch_idx: int,
        host: Mapping[str, Tensor],
        batch_rows: list[int],
    ) -> None:
        """Saliency of the kept samples at ``positions`` (of ``host``), rows ``batch_rows`` of ``batch``."""
        index = torch.tensor(positions, dtype=torch.long)
        device = batch_device(batch)
        in_batch = torch.tensor(batch_rows, dtype=torch.long)
        sub = slice_batch(batch, in_batch.to(device) if device is not None else in_batch)
        source = host["predicted"] if self.saliency_target == "predicted" else host["target"]
        explain = source[index]
        try:
            result = compute_saliency(
                module,
                sub,
                self._forward(),
                explain=explain,
                target_key=self.target_key,
                logits_key=self.logits_key,
                include=self.include,
                exclude=self.exclude,
                max_positions=self.max_positions,
            )
            result.update(
                compute_attributions(
                    module,
                    sub,
                    self._forward(),
                    explain=explain,
                    settings=self.attribution,
                    target_key=self.target_key,
                    logits_key=self.logits_key,
                )
            )
        except ReportError:
            raise
        except Exception as error:  # the report stays useful without saliency; the failure is in it
            message = (
                f"saliency failed for samples {[first_index + p for p in positions]}: {type(error).__name__}: {error}"
            )
            run.notes.append(message)
            warnings.warn(f"ExplainabilityReport: {message}", UserWarning, stacklevel=2)
            return
        record_probes(run, result, positions, first_index, batch_idx, host, self.feature_names)
        record_attributions(run, result, positions, self.attribution)
