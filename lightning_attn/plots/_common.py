"""What the figure modules share: host arrays from tensors, arrays and sequences."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAX_LINES", "as_array", "distinct_colours", "say_no_data"]


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


#: Most lines one axes holds before a figure switches to small multiples or a labelled heatmap: beyond it the
#: qualitative palettes repeat or their shades become indistinguishable.
MAX_LINES = 10


def distinct_colours(count: int) -> list[tuple[float, float, float, float]]:
    """``count`` colours, none repeated: tab10 up to 10, tab20 up to 20, then evenly spaced samples of turbo."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](k) for k in range(count)]
    if count <= 20:
        return [colormaps["tab20"](k) for k in range(count)]
    return [colormaps["turbo"](k / (count - 1)) for k in range(count)]


def say_no_data(ax: Any, reason: str) -> None:
    """Write why a panel is empty in its middle (a blank panel otherwise reads as "all zero" or a bug)."""
    ax.text(
        0.5,
        0.5,
        reason,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=8,
        color="dimgray",
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "lightgray"},
        gid="no-data",
    )
