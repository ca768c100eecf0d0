"""Sinks: the one place that knows W&B, TensorBoard and the disk.

Callbacks hand over matplotlib Figures, tables and JSON-able dicts; this module renders each figure
once to PNG and sends it to every logger of the Trainer through the logger's own API:

- ``WandbLogger``: ``log_image`` (with a caption) for figures, ``log_table`` (a ``wandb.Table``, sortable in the
  workspace) for tables, under distinct keys (``<key>`` for a figure, ``<key>_table`` for a table) so that every
  key has one type;
- ``TensorBoardLogger``: ``add_image`` of the rendered PNG (the same pixels W&B and the disk get,
  rendered once rather than once per sink as ``add_figure`` would) and ``add_text`` (Markdown, ``n/a`` for a
  missing value) for tables, under ``<key>_table`` too;
- any run (CSV logger, no logger, or an explicit ``save_dir``): PNG, CSV and JSON files on disk, laid out by
  :mod:`lightning_attn.sinks.layout` (``<run folder>/<callback>/<stage>/<name>_epoch<E>_step<S>.<ext>``).

:mod:`lightning_attn.sinks.dashboards` adds what is logged once per run: the callbacks' arguments in the W&B run
config, the report as ``wandb.Html`` and an artifact, TensorBoard's custom-scalars layout.

Everything here runs on global rank zero only; callers still compute metrics on every rank.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image  # a matplotlib dependency

from lightning_attn.sinks.layout import Position, output_dir, output_path, position, run_dir

__all__ = [
    "Position",
    "output_dir",
    "output_path",
    "position",
    "publish_figures",
    "publish_json",
    "publish_table",
    "render_png",
    "run_dir",
    "to_jsonable",
]

#: Suffix of a table's key: a figure and a table of one name never share a key (W&B keeps one type per key).
TABLE_SUFFIX = "_table"


def _loggers(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "loggers", None) or [])


def _is_a(logger: Any, name: str) -> bool:
    # by class name, through the MRO, so that subclasses (a project's own WandbLogger) count too
    return any(cls.__name__ == name for cls in type(logger).__mro__)


def _is_wandb(logger: Any) -> bool:
    return _is_a(logger, "WandbLogger")


def _is_tensorboard(logger: Any) -> bool:
    return _is_a(logger, "TensorBoardLogger")


def has_dashboard(trainer: Any) -> bool:
    """Whether some logger of ``trainer`` displays images (W&B or TensorBoard)."""
    return any(_is_wandb(lg) or _is_tensorboard(lg) for lg in _loggers(trainer))


def render_png(figure: Figure, dpi: int = 100) -> tuple[bytes, np.ndarray]:
    """Render a Figure once: PNG bytes and the RGB array ``[H, W, 3]`` uint8."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    buffer = io.BytesIO()
    # Encode the pixels just drawn: a second draw through savefig (layout, text) costs as much again.
    Image.fromarray(rgb).save(buffer, format="png", compress_level=3)
    return buffer.getvalue(), rgb


def publish_figures(
    trainer: Any,
    figures: Mapping[str, Figure],
    *,
    namespace: str,
    step: int,
    save_dir: str | Path | None = None,
    at: Position | None = None,
) -> list[Path]:
    """Send figures to every logger, and to disk when no dashboard logger exists or ``save_dir`` is set.

    Keys are ``<namespace>/<name>``; W&B images carry a caption (the figure's title, epoch and step). Files are
    ``<namespace>/<name>_epoch<E>_step<S>.png`` (:func:`~lightning_attn.sinks.layout.output_path`). Figures are
    released afterwards (their canvases cleared), so a long run holds none. Returns the PNG paths written.
    ``at``: the epoch and step the figures describe (default :func:`~lightning_attn.sinks.layout.position` now; a
    caller that publishes later, from another thread, passes the one it took at the epoch's end).
    """
    written: list[Path] = []
    if not figures or not getattr(trainer, "is_global_zero", True):
        return written
    to_disk = save_dir is not None or not has_dashboard(trainer)
    where = at or position(trainer)
    for name, figure in figures.items():
        caption = f"{_title(figure) or name} (epoch {where.epoch}, step {where.step})"
        png, rgb = render_png(figure)
        key = f"{namespace}/{name}"
        for logger in _loggers(trainer):
            if _is_wandb(logger):
                logger.log_image(key=key, images=[rgb], step=step, caption=[caption])
            elif _is_tensorboard(logger):
                logger.experiment.add_image(key, rgb, global_step=step, dataformats="HWC")
        if to_disk:
            path = output_path(trainer, namespace, name, ".png", save_dir, where)
            path.write_bytes(png)
            written.append(path)
        figure.clear()
    return written


def _title(figure: Figure) -> str:
    """The figure's suptitle, else its first axes' title."""
    suptitle = figure.get_suptitle()
    if suptitle:
        return suptitle
    return next((ax.get_title() for ax in figure.axes if ax.get_title()), "")


def publish_table(
    trainer: Any,
    name: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    namespace: str,
    step: int,
    save_dir: str | Path | None = None,
    at: Position | None = None,
    caption: str | None = None,
) -> Path | None:
    """A table to W&B (``log_table``: a ``wandb.Table``), TensorBoard (Markdown text, after the ``caption`` line when
    given), both under ``<namespace>/<name>_table``, and a CSV file on disk (``<name>_epoch<E>_step<S>.csv``,
    starting with its header; a missing value is an empty cell)."""
    if not getattr(trainer, "is_global_zero", True):
        return None
    key = f"{namespace}/{name}{TABLE_SUFFIX}"
    clean_rows = [[to_jsonable(v) for v in row] for row in rows]
    for logger in _loggers(trainer):
        if _is_wandb(logger):
            logger.log_table(key=key, columns=list(columns), data=clean_rows, step=step)
        elif _is_tensorboard(logger):
            header = (f"{caption}\n\n" if caption else "") + "| " + " | ".join(columns) + " |\n|"
            header += "---|" * len(columns) + "\n"
            body = "\n".join("| " + " | ".join(_fmt(v) for v in row) + " |" for row in clean_rows)
            logger.experiment.add_text(key, header + body, global_step=step)
    path = output_path(trainer, namespace, name, ".csv", save_dir, at)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(clean_rows)
    return path


def publish_json(
    trainer: Any,
    name: str,
    data: Mapping[str, Any],
    *,
    namespace: str,
    save_dir: str | Path | None = None,
    at: Position | None = None,
) -> Path | None:
    """Write ``data`` as ``<namespace>/<name>_epoch<E>_step<S>.json`` (rank zero; NaN and infinities as ``null``,
    ``allow_nan=False``). Written to a temporary file first, then renamed, so a crash never leaves a truncated file
    that looks complete."""
    if not getattr(trainer, "is_global_zero", True):
        return None
    path = output_path(trainer, namespace, name, ".json", save_dir, at)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_jsonable(value: Any) -> Any:
    """Tensors, arrays and numbers to plain JSON types; NaN and infinities become ``None``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
