"""Sinks: the one place that knows W&B, TensorBoard and the disk.

Callbacks hand over matplotlib Figures, tables and JSON-able dicts; this module renders each figure
once to PNG and sends it to every logger of the Trainer through the logger's own API:

- ``WandbLogger``: ``log_image`` for figures, ``log_table`` for tables;
- ``TensorBoardLogger``: ``add_image`` of the rendered PNG (the same pixels W&B and the disk get,
  rendered once rather than once per sink as ``add_figure`` would) and ``add_text`` for tables;
- any run (CSV logger, no logger, or an explicit ``save_dir``): PNG, CSV and JSON files on disk.

Everything here runs on global rank zero only; callers still compute metrics on every rank.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image  # a matplotlib dependency

__all__ = ["output_dir", "publish_figures", "publish_json", "publish_table", "render_png", "to_jsonable"]


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


def output_dir(trainer: Any, namespace: str, save_dir: str | Path | None = None) -> Path:
    """Directory for on-disk outputs: ``save_dir/<namespace>``, else ``<log_dir>/lightning_attn/<namespace>``
    with the first logger's ``log_dir`` (CSV, TensorBoard), else, with no logger,
    ``<default_root_dir>/lightning_attn_logs/<namespace>`` (beside Lightning's ``lightning_logs``; a plain
    ``lightning_attn`` there would land in this package's source when run from a checkout).
    """
    if save_dir is not None:
        return Path(save_dir) / namespace
    for logger in _loggers(trainer):
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if root:
            return Path(root) / "lightning_attn" / namespace
    return Path(getattr(trainer, "default_root_dir", None) or ".") / "lightning_attn_logs" / namespace


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.<>=-]+", "_", name).strip("_") or "figure"


def render_png(figure: Figure, dpi: int = 100) -> tuple[bytes, np.ndarray]:
    """Render a Figure once: PNG bytes and the RGB array ``[H, W, 3]`` uint8."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    buffer = io.BytesIO()
    # Encode the pixels just drawn: a second draw through savefig (layout, text) costs as much again.
    Image.fromarray(rgb).save(buffer, format="png", compress_level=4)
    return buffer.getvalue(), rgb


def publish_figures(
    trainer: Any,
    figures: Mapping[str, Figure],
    *,
    namespace: str,
    step: int,
    save_dir: str | Path | None = None,
) -> list[Path]:
    """Send figures to every logger, and to disk when no dashboard logger exists or ``save_dir`` is set.

    Keys are ``<namespace>/<name>``. Figures are released afterwards (their canvases cleared), so a
    long run holds none. Returns the PNG paths written.
    """
    written: list[Path] = []
    if not figures or not getattr(trainer, "is_global_zero", True):
        return written
    to_disk = save_dir is not None or not has_dashboard(trainer)
    directory = output_dir(trainer, namespace, save_dir)
    for name, figure in figures.items():
        png, rgb = render_png(figure)
        key = f"{namespace}/{name}"
        for logger in _loggers(trainer):
            if _is_wandb(logger):
                logger.log_image(key=key, images=[rgb], step=step)
            elif _is_tensorboard(logger):
                logger.experiment.add_image(key, rgb, global_step=step, dataformats="HWC")
        if to_disk:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{_safe(name)}_step{step}.png"
            path.write_bytes(png)
            written.append(path)
        figure.clear()
    return written


def publish_table(
    trainer: Any,
    name: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    namespace: str,
    step: int,
    save_dir: str | Path | None = None,
) -> Path | None:
    """A table to W&B (``log_table``), TensorBoard (Markdown text) and a CSV file on disk."""
    if not getattr(trainer, "is_global_zero", True):
        return None
    key = f"{namespace}/{name}"
    clean_rows = [[to_jsonable(v) for v in row] for row in rows]
    for logger in _loggers(trainer):
        if _is_wandb(logger):
            logger.log_table(key=key, columns=list(columns), data=clean_rows, step=step)
        elif _is_tensorboard(logger):
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "\n".join("| " + " | ".join(_fmt(v) for v in row) + " |" for row in clean_rows)
            logger.experiment.add_text(key, header + body, global_step=step)
    directory = output_dir(trainer, namespace, save_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_safe(name)}_step{step}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(clean_rows)
    return path


def publish_json(
    trainer: Any, name: str, data: Mapping[str, Any], *, namespace: str, save_dir: str | Path | None = None
) -> Path | None:
    """Write ``data`` as ``<output_dir>/<name>.json`` (rank zero). Written to a temporary file first,
    then renamed, so a crash never leaves a truncated file that looks complete."""
    if not getattr(trainer, "is_global_zero", True):
        return None
    directory = output_dir(trainer, namespace, save_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_safe(name)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def _fmt(value: Any) -> str:
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
