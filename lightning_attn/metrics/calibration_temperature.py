"""Temperature scaling (Guo et al. 2017) of a CalibrationMonitor's evaluation epochs.

During an epoch a uniform sample of the logits is kept per (stage, dataloader) in a :class:`LogitReservoir`; at its
end the ranks' samples are gathered, one scalar ``T`` is fitted on rank zero on the first validation dataloader's
sample (L-BFGS on the NLL of ``softmax(logits / T)``) and broadcast, so that every rank holds the same ``T``; further
dataloaders and the test are scored with it (held out). ``ece_scaled``/``nll_scaled`` are measured on the sample.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_attn.functional.calibration import fit_temperature
from lightning_attn.metrics.calibration import CalibrationMetric
from lightning_attn.metrics.calibration_inputs import Task
from lightning_attn.metrics.reservoir import LogitReservoir

__all__ = ["Collectives", "TemperatureScaling", "temperature_scaling"]


class Collectives(Protocol):
    """What :meth:`TemperatureScaling.finish` needs of a Lightning strategy under DDP."""

    def all_gather(self, tensor: Tensor) -> Tensor: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class TemperatureScaling:
    """The reservoirs of every (stage, dataloader) and the fitted temperature.

    Args:
        reservoir_size: the most samples (logits) a reservoir keeps per epoch.
        max_iter: L-BFGS iterations of the fit.
        n_bins: equal-width bins of the ECE measured before and after scaling.
        fine_bins: resolution of the fine histogram of that measurement.
        seed: seed of the reservoirs' private generators, combined with the rank and the epoch (so that the global
            RNG stream, hence training, is untouched).

    Example:
        >>> import torch
        >>> scaling = TemperatureScaling(reservoir_size=64, max_iter=50, n_bins=5, fine_bins=100)
        >>> metric = CalibrationMetric("multiclass", 3, bootstrap=0)
        >>> logits, target = torch.randn(32, 3) * 4, torch.arange(32) % 3
        >>> metric.update(logits, target)
        >>> scaling.offer("validate", 0, metric, logits, target, epoch=0, rank=0)
        >>> result = scaling.finish("validate", 0, metric, rank=0)
        >>> result["in_sample"], result["sample_size"], scaling.temperature == result["temperature"]
        (True, 32, True)
    """

    def __init__(self, reservoir_size: int, max_iter: int, n_bins: int, fine_bins: int, seed: int = 0) -> None:
        self.reservoir_size = reservoir_size
        self.max_iter = max_iter
        self.n_bins = n_bins
        self.fine_bins = fine_bins
        self.seed = seed
        #: The fitted temperature (``None`` until the first validation epoch).
        self.temperature: float | None = None
        self.reservoirs: dict[tuple[str, int], LogitReservoir] = {}

    def applies(self, stage: str) -> bool:
        """Whether ``stage``'s epochs are sampled: validation always, the test once a temperature is fitted."""
        return stage == "validate" or self.temperature is not None

    def reset(self, stage: str | None = None) -> None:
        """Drop the samples of ``stage``'s epoch (``None``: of every stage)."""
        self.reservoirs = {key: r for key, r in self.reservoirs.items() if stage is not None and key[0] != stage}

    def _reservoir(self, stage: str, dataloader_idx: int, epoch: int, rank: int) -> LogitReservoir:
        """The reservoir of this epoch, created with a seed distinct per rank (independent samples to merge) and per
        epoch."""
        reservoir = self.reservoirs.get((stage, dataloader_idx))
        if reservoir is None:
            seed = (self.seed * 1_000_003 + epoch * 1009 + rank) % (2**62)
            reservoir = self.reservoirs[(stage, dataloader_idx)] = LogitReservoir(self.reservoir_size, seed=seed)
        return reservoir

    def offer(
        self,
        stage: str,
        dataloader_idx: int,
        metric: CalibrationMetric,
        scores: Tensor,
        target: Tensor,
        *,
        epoch: int,
        rank: int,
    ) -> None:
        """Offer a batch, read as ``metric`` reads it, to the sample (no synchronisation)."""
        self._reservoir(stage, dataloader_idx, epoch, rank).update(*metric.reservoir_batch(scores, target))

    def finish(
        self,
        stage: str,
        dataloader_idx: int,
        metric: CalibrationMetric,
        rank: int,
        strategy: Collectives | None = None,
    ) -> dict[str, Any] | None:
        """The epoch's :func:`temperature_scaling` (``None`` for an empty sample), fitted on the first validation
        dataloader; the sample is let go.

        Args:
            stage: ``"validate"`` or ``"test"``.
            dataloader_idx: the dataloader.
            metric: the dataloader's metric (its task and classes).
            rank: the global rank; the fit runs on rank 0.
            strategy: under DDP the Lightning strategy, whose ``all_gather`` and ``broadcast`` make this a collective
                (every rank calls it and gets rank zero's outcome); ``None`` in one process.

        Raises:
            RuntimeError: the fit or measurement failed (on every rank).
        """
        reservoir = self.reservoirs.pop((stage, dataloader_idx), None)
        if reservoir is None:  # a rank that offered nothing still joins the gather, with an empty sample
            reservoir = LogitReservoir(self.reservoir_size)
        shape = (0,) if metric.task == "binary" else (0, metric.num_classes)
        contents: tuple[Tensor, ...] = reservoir.contents(torch.zeros(shape, device=metric.n_samples.device))
        if strategy is not None:
            contents = tuple(strategy.all_gather(part).reshape(-1, *part.shape[1:]) for part in contents)
        fit = stage == "validate" and dataloader_idx == 0
        payload: dict[str, Any] | None = None
        if rank == 0:
            try:
                keys, logits, target = contents
                logits, target = LogitReservoir.merge(keys, logits, target, self.reservoir_size)
                if logits.shape[0] and (fit or self.temperature is not None):
                    options = {"max_iter": self.max_iter, "n_bins": self.n_bins, "fine_bins": self.fine_bins}
                    temperature = None if fit else self.temperature
                    payload = temperature_scaling(
                        logits, target, metric.task, metric.num_classes, temperature, **options
                    )
            except Exception as error:
                payload = {"error": f"{type(error).__name__}: {error}"}
        if strategy is not None:
            payload = strategy.broadcast(payload, src=0)
        if payload is None:
            return None
        if "error" in payload:
            raise RuntimeError(f"CalibrationMonitor temperature scaling failed: {payload['error']}")
        if payload["in_sample"]:
            self.temperature = payload["temperature"]
        return payload


def temperature_scaling(
    logits: Tensor,
    target: Tensor,
    task: Task,
    num_classes: int,
    temperature: float | None,
    *,
    max_iter: int,
    n_bins: int,
    fine_bins: int,
) -> dict[str, Any]:
    """Fit ``T`` on a sample (``temperature=None``) or take the given one, and measure the sample before and after
    scaling its logits by it.

    Args:
        logits: the sample's logits (``[N, K]``, ``[N]`` binary).
        target: its targets.
        task: ``"binary"`` or ``"multiclass"``.
        num_classes: number of classes.
        temperature: the temperature to apply; ``None``: fit one (L-BFGS on the NLL).
        max_iter: L-BFGS iterations of the fit.
        n_bins: equal-width bins of the ECE.
        fine_bins: resolution of the fine histogram.

    Returns:
        ``temperature``, ``ece_scaled``, ``nll_scaled``, ``sample_size``, ``in_sample`` (whether ``T`` was fitted on
        this sample) and the ``before``/``after`` ECE, NLL, Brier score, accuracy and confidence.
    """
    fit = temperature is None
    if temperature is None:
        temperature = fit_temperature(logits, target, task=task, max_iter=max_iter)
    measured = {}
    for name, t in (("before", 1.0), ("after", temperature)):
        probe = CalibrationMetric(
            task, num_classes, score_type="logits", n_bins=n_bins, fine_bins=fine_bins, sync_on_compute=False
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
