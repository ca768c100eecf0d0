"""Figures that survive a second look: the gallery draws every plot function, and each figure's artists say that
titles do not collide, heatmaps carry a colour bar, compared bars share their axis, empty panels say why and no
two lines of one axes share a colour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from lightning_attn import plots
from lightning_attn.gallery import GalleryEntry, build_gallery
from lightning_attn.plots.attribution import plot_gradcam_overlay

SITES = [f"encoder.layers.{i}.self_attn" for i in range(3)]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[GalleryEntry, Figure]]]:
    out = tmp_path_factory.mktemp("gallery")
    return out, build_gallery(out, heads=3, layers=2)


@pytest.fixture(scope="module")
def gallery(drawn: tuple[Path, list[tuple[GalleryEntry, Figure]]]) -> dict[str, Figure]:
    return {entry.name: figure for entry, figure in drawn[1]}


def _maps(figure: Figure) -> list[AxesImage | QuadMesh]:
    """The value maps of a figure: images and meshes of its plotting axes (not colour bars, not raw inputs)."""
    found: list[AxesImage | QuadMesh] = []
    for ax in figure.axes:
        found += [image for image in ax.images if image.get_gid() not in ("input", "categorical")]
        found += [mesh for mesh in ax.collections if isinstance(mesh, QuadMesh)]
    return [m for m in found if getattr(m.axes, "_colorbar", None) is None and m.axes.get_label() != "<colorbar>"]


def _has_colour_bar(figure: Figure, mappable: AxesImage | QuadMesh) -> bool:
    """A colour bar for this map, or for a map of the figure on the same colour scale (a shared bar)."""
    if mappable.colorbar is not None:
        return True
    scale = (mappable.get_cmap().name, mappable.norm.vmin, mappable.norm.vmax)
    return any(
        other.colorbar is not None and (other.get_cmap().name, other.norm.vmin, other.norm.vmax) == scale
        for other in _maps(figure)
    )


def test_gallery_draws_every_plot_function(drawn: tuple[Path, list[tuple[GalleryEntry, Figure]]]) -> None:
    out, entries = drawn[0], [entry for entry, _ in drawn[1]]
    functions = {entry.function for entry in entries}
    assert set(plots.__all__) <= functions, set(plots.__all__) - functions
    assert {"plot_gradcam_overlay", "plot_head_importance", "plot_head_timeline"} <= functions
    page = (out / "index.html").read_text()
    for entry in entries:
        assert (out / f"{entry.name}.png").stat().st_size > 1000
        assert f'src="{entry.name}.png"' in page and entry.function in page


def test_suptitle_clears_every_subplot_title(gallery: dict[str, Figure]) -> None:
    for name, figure in gallery.items():
        if figure._suptitle is None or not figure._suptitle.get_text():
            continue
        renderer = figure.canvas.get_renderer()
        top = figure._suptitle.get_window_extent(renderer)
        for ax in figure.axes:
            for title in (ax.title, ax._left_title, ax._right_title):
                if title.get_text() and ax.get_visible():
                    assert not top.overlaps(title.get_window_extent(renderer)), (name, title.get_text())


def test_every_heatmap_has_a_colour_bar(gallery: dict[str, Figure]) -> None:
    checked = 0
    for name, figure in gallery.items():
        for mappable in _maps(figure):
            assert _has_colour_bar(figure, mappable), name
            checked += 1
    assert checked > 20


def _visible(figure: Figure) -> list[Axes]:
    return [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


@pytest.mark.parametrize(
    ("name", "axis"),
    [("head_contributions", "y"), ("weight_histograms", "y"), ("weights_over_time", "y"), ("top_positions", "x")],
)
def test_layer_panels_compared_by_height_share_their_axis(gallery: dict[str, Figure], name: str, axis: str) -> None:
    panels = _visible(gallery[name])
    assert len(panels) >= 2
    limits = {ax.get_ylim() if axis == "y" else ax.get_xlim() for ax in panels}
    assert len(limits) == 1, limits
    ((low, high),) = limits
    for ax in panels:  # the shared scale holds every panel's data (none clipped by the first panel's limits)
        data = ax.dataLim.intervaly if axis == "y" else ax.dataLim.intervalx
        assert data[1] <= high * (1 + 1e-9), (ax.get_title(), data, (low, high))
        assert low <= data[0] or ax.get_yscale() == "log", "a log axis leaves out the stairs' 0 baseline"


def test_empty_head_type_panels_say_they_need_token_ids(gallery: dict[str, Figure]) -> None:
    by_title = {ax.get_title(): ax for ax in gallery["head_type_scores"].axes}
    for name in ("duplicate_token", "induction"):
        assert [t.get_text() for t in by_title[name].texts] == ["needs token ids"]
    assert not by_title["previous_token"].texts


def test_an_empty_panel_takes_a_given_reason() -> None:
    scores = {"previous_token": [[math.nan, math.nan]], "sink": [[0.2, 0.4]]}
    figure = plots.plot_head_type_scores(scores, SITES[:1], reasons={"previous_token": "cross-attention site"})
    assert [t.get_text() for t in figure.axes[0].texts] == ["cross-attention site"]


def test_one_epoch_is_no_evolution() -> None:
    heads = [f"{site}/h{h}" for site in SITES for h in range(2)]
    figure = plots.plot_head_evolution([7], {"entropy": np.full((1, 6), 0.5)}, heads, title="evolution (test)")
    assert "epoch 7 only" in figure._suptitle.get_text()
    assert not any(ax.images or ax.lines for ax in figure.axes), "no one-column heatmap, no one-point lines"
    assert len(figure.axes[0].patches) == 6


def test_classwise_grid_counts_the_classes_it_leaves_out() -> None:
    rng = np.random.default_rng(0)
    edges, per_class = np.linspace(0, 1, 6), (12, 5)
    values = [rng.uniform(0, 1, per_class), rng.uniform(0, 1, per_class), rng.integers(1, 9, per_class)]
    grid = plots.plot_classwise_reliability(edges, *values, max_classes=9, title="test")
    assert "+3 more" in grid._suptitle.get_text() and "first 9 of 12" in grid._suptitle.get_text()
    assert sum(ax.axison for ax in grid.axes) == 9
    every_class = plots.plot_classwise_reliability(edges, *values, max_classes=12)
    assert "more" not in every_class._suptitle.get_text()


def _line_colours(figure: Figure) -> list[list[tuple[float, ...]]]:
    return [[to_rgba(line.get_color()) for line in ax.lines if line.get_label()[0] != "_"] for ax in figure.axes]


def test_more_than_ten_series_never_share_a_colour() -> None:
    rng = np.random.default_rng(0)
    many = {f"layers.{i}.gate": rng.uniform(0, 1, 9) for i in range(12)}
    figure = plots.plot_over_time(many)
    assert not any(ax.lines for ax in figure.axes), "12 sites: a heatmap, not 12 lines"
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [f"{i}.gate" for i in range(12)]
    heads = [f"{site}/h{h}" for site in SITES for h in range(4)]
    evolution = plots.plot_head_evolution([0, 1, 2], {"entropy": rng.uniform(0, 1, (3, 12))}, heads)
    assert not any(ax.lines for ax in evolution.axes)
    samples = {"pool": rng.uniform(0, 1, (12, 9))}
    weights = plots.plot_weights_over_time({"pool": rng.uniform(0, 1, 9)}, samples=samples)
    histograms = plots.plot_weight_histograms({"a": rng.integers(1, 9, (12, 5))}, np.linspace(0, 1, 6))
    statistics = plots.plot_weight_statistics({"a": {"entropy": rng.uniform(0, 1, 14)}})
    for figure in (weights, histograms):
        for colours in _line_colours(figure):
            assert len(colours) == len(set(colours))
    bar_colours = [tuple(patch.get_facecolor()) for patch in statistics.axes[0].patches]
    assert len(bar_colours) == 14 == len(set(bar_colours))


def test_inputs_are_drawn_beside_their_grad_cam() -> None:
    images = [np.full((8, 8), 0.5), np.eye(8)]
    figure = plot_gradcam_overlay(images, [np.ones((4, 4)), np.eye(4)], labels=["a", "b"])
    inputs = [ax for ax in figure.axes if ax.images and all(i.get_gid() == "input" for i in ax.images)]
    assert len(inputs) == 2, "each input on its own panel, unobstructed"
    cams = [ax for ax in figure.axes if any(i.get_gid() != "input" for i in ax.images)]
    assert len(cams) == 2 and all(_has_colour_bar(figure, ax.images[-1]) for ax in cams)
