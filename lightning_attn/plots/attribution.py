"""Figures of layer attributions: Grad-CAM maps beside their input images (arrays in, ``Figure`` out, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_gradcam_overlay", "upsample_nearest"]


def upsample_nearest(grid_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``[rows, cols]`` map stretched to ``[height, width]`` pixels, each cell covering its block of the image
    (nearest neighbour: a patch's value stays on its own pixels).

    Example:
        >>> upsample_nearest(np.array([[1.0, 2.0]]), 2, 4).tolist()
        [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    """
    rows, cols = grid_map.shape
    row_index = np.minimum((np.arange(height) * rows) // height, rows - 1)
    col_index = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return grid_map[np.ix_(row_index, col_index)]


def plot_gradcam_overlay(
    images: Sequence[np.ndarray], maps: Sequence[np.ndarray], *, labels: Sequence[str], title: str = "Grad-CAM"
) -> Figure:
    """Per probe, one column: the input image (``[H, W]`` grey or ``[H, W, 3]`` in [0, 1]) on top and, below it,
    its Grad-CAM map on the patch grid over a faded copy of the input (scaled to the probe's maximum; transparent
    where it is 0), so that the input is seen unobstructed beside its saliency; one colour bar for the maps."""
    count = len(images)
    fig = Figure(figsize=(2.3 * count + 0.8, 5.0), layout="constrained")
    axes = fig.subplots(2, count, squeeze=False)
    shown = None
    for column, (image, grid_map, label) in enumerate(zip(images, maps, labels, strict=True)):
        height, width = image.shape[:2]
        grey = "gray" if image.ndim == 2 else None
        # gid "input": a picture of the sample, not a value map, so it takes no colour bar
        axes[0, column].imshow(image, cmap=grey, vmin=0, vmax=1, interpolation="nearest", gid="input")
        axes[0, column].set_title(f"{label}\ninput", fontsize=8)
        ax = axes[1, column]
        ax.imshow(image, cmap=grey, vmin=0, vmax=1, interpolation="nearest", alpha=0.35, gid="input")
        peak = float(np.max(grid_map)) if np.size(grid_map) else 0.0
        scaled = upsample_nearest(
            np.asarray(grid_map, dtype=float) / peak if peak > 0 else np.zeros_like(grid_map, dtype=float),
            height,
            width,
        )
        shown = ax.imshow(
            np.ma.masked_where(scaled <= 0, scaled),
            cmap="jet",
            alpha=0.7,
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
        )
        ax.set_title("Grad-CAM", fontsize=8)
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[1]), shrink=0.8, label="Grad-CAM / max")
    fig.suptitle(title, fontsize=10)
    return fig
