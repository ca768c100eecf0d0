"""What the figure modules share: host arrays from tensors, arrays and sequences."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_array"]


def as_array(values: Any, none_as_nan: bool = False) -> np.ndarray:
    """``values`` (a tensor on any device, an array or a nested sequence) as a float64 host array; with
    ``none_as_nan`` ``None`` entries (undefined values of a JSON-ready record) become NaN."""
    if hasattr(values, "detach"):
        # through float64 first: numpy has no bfloat16 (a map captured under autocast may arrive in it)
        values = values.detach().cpu().double().numpy()
    if none_as_nan:
        array = np.asarray(values, dtype=object)
        # numpy's stubs reject a None operand; on an object array it compares elementwise (== None)
        values = np.where(np.equal(array, None), np.nan, array)  # type: ignore[call-overload]
    return np.asarray(values, dtype=np.float64)
