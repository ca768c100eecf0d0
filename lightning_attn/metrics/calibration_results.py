"""What a computed calibration epoch becomes: the logged scalars and the plain result record (host arrays, JSON-ready).

Logged keys, ``calibration/<stage>/<name>`` with ``<stage>`` = ``val`` or ``test`` (``val_dl1``, ...
for the k-th extra dataloader):

==========================  ========================================================================
name                        meaning
==========================  ========================================================================
``ece``                     expected calibration error, L1, ``n_bins`` equal-width bins (Guo et al. 2017)
``mce``                     maximum calibration error (max over non-empty bins)
``rmsce``                   root-mean-square calibration error (L2)
``adaptive_ece``            ECE over equal-mass bins (Nixon et al. 2019)
``smece``                   smooth ECE, kernel-smoothed with its own bandwidth (Blasiok & Nakkiran 2023;
                            ``relplot.smECE``), from the fine confidence histogram
``ece_debiased``            debiased L2 calibration error over the ``n_bins`` bins (Kumar et al. 2019)
``classwise_ece``           classwise ECE / static calibration error, SCE (Nixon et al. 2019)
``brier``                   Brier score
``nll``                     negative log-likelihood (cross-entropy)
``accuracy``                top-label accuracy
``confidence``              mean top-label confidence
``overconfidence``          ``confidence - accuracy`` (positive: over-confident)
``confidence_correct``      mean confidence of the correct predictions
``confidence_incorrect``    mean confidence of the wrong predictions
``n_samples``               samples counted (all ranks)
``n_skipped``               samples skipped because their scores were NaN
``ece_ci_low``/``_high``    95% percentile interval of the ECE over ``bootstrap`` Poisson bootstrap
                            replicates (absent with ``bootstrap=0``); likewise ``accuracy_ci_*``, ``brier_ci_*``
``temperature``             fitted temperature (``fit_temperature=True``)
``ece_scaled``              ECE of the reservoir sample after temperature scaling
``nll_scaled``              NLL of the reservoir sample after temperature scaling
==========================  ========================================================================

Binary tasks bin ``P(y = 1)`` against the outcome (the usual binary reliability diagram, as
torchmetrics' ``BinaryCalibrationError``) for ``ece``, ``mce``, ``rmsce`` and ``adaptive_ece``; the
top-label quantities use ``max(p, 1 - p)`` and the prediction ``p > 0.5``.

The bootstrap intervals are percentile intervals of the binned measures: they describe how much
the estimate moves with the sample, around the binned ECE's own upward bias; for a
well-calibrated model (true ECE near 0) the ECE interval lies above the point estimate, and
``ece_debiased`` and ``smece`` are the better guides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["INTERVALS", "SCALARS", "SCALING", "epoch_result"]

#: Scalars logged every evaluation epoch, as ``calibration/<stage>/<name>``.
SCALARS: tuple[str, ...] = (
    "ece",
    "mce",
    "rmsce",
    "adaptive_ece",
    "classwise_ece",
    "brier",
    "nll",
    "accuracy",
    "confidence",
    "overconfidence",
    "confidence_correct",
    "confidence_incorrect",
    "n_samples",
    "n_skipped",
    "smece",
    "ece_debiased",
)

#: Bootstrap interval bounds logged beside their measure when ``bootstrap > 0``.
INTERVALS: tuple[str, ...] = tuple(
    f"{name}_ci_{side}" for name in ("ece", "accuracy", "brier") for side in ("low", "high")
)

#: Temperature-scaling scalars logged with ``fit_temperature``.
SCALING: tuple[str, ...] = ("temperature", "ece_scaled", "nll_scaled")


def epoch_result(
    values: dict[str, Tensor],
    *,
    stage: str,
    task: str,
    num_classes: int,
    evaluation: int,
    epoch: int,
    step: int,
    bootstrap: bool,
    scaling: dict[str, Any] | None,
) -> dict[str, Any]:
    """The record of one computed epoch: its scalars (``metrics``: :data:`SCALARS`, with ``bootstrap`` the
    :data:`INTERVALS`, with ``scaling`` the :data:`SCALING` ones), ``CalibrationMetric.compute()``'s ``values`` as host
    arrays grouped by binning, the temperature ``scaling`` and where it was measured.

    Args:
        values: what ``CalibrationMetric.compute()`` returned.
        stage: ``"validate"`` or ``"test"``.
        task: ``"binary"`` or ``"multiclass"``.
        num_classes: number of classes.
        evaluation: index of this evaluation of the stage key.
        epoch: the trainer's epoch.
        step: the trainer's global step.
        bootstrap: whether ``values`` hold bootstrap intervals.
        scaling: the epoch's temperature scaling (``None``: none).
    """
    scalars = {name: float(values[name]) for name in SCALARS + (INTERVALS if bootstrap else ())}
    if scaling is not None:
        scalars.update({name: scaling[name] for name in SCALING})

    def arr(name: str) -> np.ndarray:
        return values[name].detach().cpu().numpy()

    result: dict[str, Any] = {
        "stage": stage,
        "task": task,
        "num_classes": num_classes,
        "evaluation": evaluation,
        "epoch": epoch,
        "step": step,
        "metrics": scalars,
        "bins": {
            "edges": arr("bin_edges"),
            "count": arr("bin_count"),
            "accuracy": arr("bin_accuracy"),
            "confidence": arr("bin_confidence"),
        },
        "adaptive_bins": {
            "edges": arr("adaptive_edges"),
            "count": arr("adaptive_count"),
            "accuracy": arr("adaptive_accuracy"),
            "confidence": arr("adaptive_confidence"),
        },
        "classwise_bins": {
            "edges": arr("class_edges"),
            "count": arr("class_count"),
            "accuracy": arr("class_accuracy"),
            "confidence": arr("class_confidence"),
        },
        "confidence_histogram": {
            "edges": arr("hist_edges"),
            "correct": arr("hist_correct"),
            "incorrect": arr("hist_incorrect"),
        },
        "n_at_one": float(values["n_at_one"]),
        "n_ignored": float(values["n_ignored"]),
    }
    if bootstrap:
        result["bins"]["accuracy_ci_low"] = arr("bin_accuracy_ci_low")
        result["bins"]["accuracy_ci_high"] = arr("bin_accuracy_ci_high")
    if scaling is not None:
        result["temperature_scaling"] = scaling
    return result
