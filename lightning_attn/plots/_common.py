"""What the figure modules share: host arrays from tensors, arrays and sequences."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "MAX_LINES",
    "as_array",
    "distinct_colours",
    "fixed_layout",
    "say_no_data",
    "side_colorbar",
    "text_inches",
]


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


def text_inches(texts: Any, fontsize: float) -> float:
    """Width in inches of the longest of ``texts`` at ``fontsize`` points (DejaVu Sans averages about 0.62 em per
    character): what a fixed margin must hold for tick labels, in place of measuring them at draw time."""
    return max((len(str(text)) for text in texts), default=0) * 0.62 * fontsize / 72


def fixed_layout(
    fig: Any,
    *,
    left: float,
    right: float,
    top: float,
    bottom: float,
    rows: int = 1,
    columns: int = 1,
    wgap: float = 0.0,
    hgap: float = 0.0,
) -> None:
    """Lay out the figure's ``rows x columns`` subplot grid with margins and gaps in inches (text keeps its size
    whatever the figure's). A layout fixed up front costs nothing at draw time, where ``layout="constrained"``
    measures every tick label of every axes twice more (about half of a small figure's rendering time). ``top``
    must hold the suptitle and the first row's titles, ``hgap`` a row's x tick labels and the next row's titles."""
    width, height = fig.get_size_inches()
    panel_width = max((width - left - right - (columns - 1) * wgap) / columns, 0.3)
    panel_height = max((height - top - bottom - (rows - 1) * hgap) / rows, 0.3)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=wgap / panel_width,
        hspace=hgap / panel_height,
    )


def side_colorbar(fig: Any, mappable: Any, axes: Any, label: str | None = None) -> Any:
    """A colour bar 0.15 inch wide, 0.12 inch right of ``axes`` (one or several, placed by :func:`fixed_layout`) and
    as tall as they are: the right margin must hold its tick labels (about 0.45 inch) and ``label``."""
    boxes = [ax.get_position() for ax in np.atleast_1d(axes).ravel() if ax.get_visible()]
    width = fig.get_size_inches()[0]
    low, high = min(box.y0 for box in boxes), max(box.y1 for box in boxes)
    cax = fig.add_axes((max(box.x1 for box in boxes) + 0.12 / width, low, 0.15 / width, high - low), label="<colorbar>")
    return fig.colorbar(mappable, cax=cax, label=label)
