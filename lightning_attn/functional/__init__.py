"""Functional attention measures: pure tensor functions, no Lightning."""

from lightning_attn.functional import attention
from lightning_attn.functional.attention import *  # noqa: F403  (every measure in attention.__all__)
from lightning_attn.functional.calibration import (
    adaptive_calibration_error,
    apply_temperature,
    brier_score,
    calibration_error,
    classwise_calibration_error,
    equal_mass_bins,
    fit_temperature,
    negative_log_likelihood,
)
from lightning_attn.functional.smooth_calibration import smooth_calibration_error

__all__ = []
__all__ += attention.__all__
__all__ += [
    "adaptive_calibration_error",
    "apply_temperature",
    "brier_score",
    "calibration_error",
    "classwise_calibration_error",
    "equal_mass_bins",
    "fit_temperature",
    "negative_log_likelihood",
    "smooth_calibration_error",
]
