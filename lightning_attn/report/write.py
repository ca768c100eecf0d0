"""The report's directory: made as a temporary directory with an ``INCOMPLETE`` marker while the loop runs
(:func:`incomplete_dir`), filled with every output file of a finished run and renamed to its final name only on
success (:func:`write_report`).

The library writes only where it may: a report goes to its requested directory when nothing is there or when that
directory holds a previous report of this library and nothing else (:func:`is_own_report`, by the :data:`MARKER`
file listing what the report wrote); otherwise to the first free sibling ``<dir>-1``, ``<dir>-2``, ...
(:func:`report_destination`), so that a user's folder or file at the path is never deleted or overwritten.

Files: ``samples.csv``, ``per_head.csv``, ``classwise.csv``, ``batches.csv``, ``saliency.csv`` (each starting with
its header, so that ``csv.DictReader`` and ``pandas.read_csv`` open them with no options), ``provenance.json`` beside
them, ``figures/*.png`` (provenance in a PNG text chunk), ``summary.md``, ``report.html`` and ``report.json``
(provenance included), which lists every other file with its SHA-256. JSON is written with ``allow_nan=False``.

**Outputs**, written at the end of the loop (after every callback's epoch end, so that the sections of a
calibration or head-specialization callback of the same Trainer, found in ``trainer.callbacks`` through
their ``.results`` and ``registry()``, are included; their absence is fine) into a temporary directory
with an ``INCOMPLETE`` marker, renamed to the final directory only on success:

- ``report.html``: self-contained page (figures inline as base64 PNG, sortable tables, no network);
- ``report.json``: every number, ``schema_version`` ``1.0``, valid against the packaged
  ``lightning_attn/report/report.schema.json``; lists every other file with its SHA-256;
- ``samples.csv`` (one row per sample), ``per_head.csv``, ``classwise.csv``, ``batches.csv``,
  ``saliency.csv``, each starting with its header (``pandas.read_csv(path)``, ``csv.DictReader``), and
  ``provenance.json`` beside them;
- ``summary.md``; ``figures/*.png`` (provenance in the PNG text chunk ``lightning_attn_provenance``).

Provenance in every output: SHA-256 of the model's ``state_dict`` (tensor bytes in sorted key order), of
the evaluated batches (streamed), of the report configuration, their combination ``report_sha256``,
library versions, start and end time (:mod:`lightning_attn.report.provenance`).

Directory: ``report_dir`` if given (dataloader ``k >= 1`` gets ``<report_dir>_dl<k>``), else
``<save_dir or log_dir/lightning_attn>/report/<test|val_epoch<E>>[_dl<k>]``. It is replaced only when it holds a
previous report and nothing else (:func:`~lightning_attn.report.write.is_own_report`); a file or a folder with
other files there is kept and the report goes to ``<dir>-1``, ``<dir>-2``, ... with a warning naming both.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_attn.report import render
from lightning_attn.report.explorer import write_explorer
from lightning_attn.report.provenance import combine_input_hashes, hash_config, library_versions, report_hash, utc_now
from lightning_attn.report.run import ReportRun, csv_cell
from lightning_attn.report.summary import jsonable, summarize, tables

__all__ = [
    "INCOMPLETE",
    "MARKER",
    "OutputSettings",
    "incomplete_dir",
    "is_own_report",
    "report_destination",
    "write_report",
]

INCOMPLETE = "INCOMPLETE"
#: The file that marks a directory as a finished report of this library: its first line says so, every other line
#: names one file or folder the report wrote (relative, ``/``-separated). Only such a directory is ever replaced.
MARKER = ".lightning_attn_report"
_MARKER_HEADER = "# written by lightning_attn's explainability report; replaced by the next report written here"


@dataclass(frozen=True)
class OutputSettings:
    """The report's arguments that shape its files (:class:`~lightning_attn.report.callback.ExplainabilityReport`)."""

    title: str
    calibration_bins: int
    saliency_target: str
    html_max_rows: int | None
    figures: bool
    figure_dpi: int


def is_own_report(path: Path) -> bool:
    """Whether ``path`` is a directory that holds a report of this library and nothing else: its :data:`MARKER` file
    and only the files and folders that the marker lists (a file a user added makes it not ours)."""
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if not lines or lines[0] != _MARKER_HEADER:
        return False
    written = {MARKER, *lines[1:]}
    return all(entry.relative_to(path).as_posix() in written for entry in path.rglob("*"))


def report_destination(requested: Path) -> tuple[Path, str | None]:
    """Where the report bound for ``requested`` goes: ``requested`` itself when nothing is there or it is a previous
    report of this library (:func:`is_own_report`), else the first sibling ``<name>-1``, ``<name>-2``, ... that is
    free or a previous report. Returns it and, when it is a sibling, a warning naming both."""
    if not (requested.exists() or requested.is_symlink()) or is_own_report(requested):
        return requested, None
    for k in itertools.count(1):
        candidate = requested.with_name(f"{requested.name}-{k}")
        if not (candidate.exists() or candidate.is_symlink()) or is_own_report(candidate):
            what = "a file" if not requested.is_dir() else "a folder with files this library did not write"
            return candidate, (
                f"{requested} is {what}, which the report never deletes or overwrites: "
                f"the report goes to {candidate} instead"
            )
    raise AssertionError("unreachable")


def incomplete_dir(final_dir: Path, owner: int) -> tuple[Path, str]:
    """Make a fresh temporary directory for the report bound for ``final_dir`` (a new sibling named after it, this
    process and ``owner``, the report's ``id``; never an existing path) holding only an ``INCOMPLETE`` marker;
    returns it and the start time."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    name = f".{final_dir.name}.incomplete-{os.getpid()}-{owner % 100000}"
    for k in itertools.count():  # a new name (a partial report of an earlier run here stays); mkdir keeps the umask
        tmp_dir = final_dir.parent / (f"{name}-{k}" if k else name)
        try:
            tmp_dir.mkdir()
            break
        except FileExistsError:
            continue
    started = utc_now()
    (tmp_dir / INCOMPLETE).write_text(
        f"This report is INCOMPLETE: it is being written (started {started}) or its run failed.\n"
        f"A finished report is renamed to {final_dir.name}/ and has no INCOMPLETE file.\n"
    )
    return tmp_dir, started


def write_report(
    run: ReportRun, config: dict[str, Any], sections: dict[str, Any], *, global_step: int, settings: OutputSettings
) -> dict[str, Any]:
    """Write every file of a finished ``run`` (samples closed, at least one sample) into its temporary directory and
    rename that to ``run.final_dir`` (replacing only a previous report of this library there, else to a sibling:
    :func:`report_destination`; ``run.final_dir`` becomes where it went). ``config`` is the report's configuration
    (hashed into the provenance), ``sections`` the other callbacks'
    (:func:`~lightning_attn.report.summary.other_sections`).
    Returns the content of ``report.json`` plus its ``directory``."""
    config_sha = hash_config(config)
    if run.world_size > 1 and run.input_digests:
        inputs_sha = combine_input_hashes(run.input_digests)
        num_batches = sum(count for _, _, count in run.input_digests)
    else:
        inputs_sha, num_batches = run.hasher.hexdigest(), run.hasher.count
    provenance: dict[str, Any] = {
        "report_sha256": report_hash(run.model_sha256, inputs_sha, config_sha),
        "model_sha256": run.model_sha256,
        "inputs_sha256": inputs_sha,
        "config_sha256": config_sha,
        "model_class": run.model_class,
        "num_samples": run.count,
        "num_batches": num_batches,
        "world_size": run.world_size,
        "stage": run.stage,
        "dataloader_idx": run.dataloader_idx,
        "epoch": run.epoch,
        "global_step": global_step,
        "checkpoint": run.checkpoint,
        "started_utc": run.started,
        "finished_utc": utc_now(),
        "versions": library_versions(),
    }
    summary = summarize(
        run,
        config,
        sections,
        title=settings.title,
        calibration_bins=settings.calibration_bins,
        saliency_target=settings.saliency_target,
    )
    tmp = run.tmp_dir
    files: dict[str, dict[str, Any]] = {}
    # CSVs start with their header (a comment line above it would be read as the header by csv and pandas): the
    # provenance goes to provenance.json beside them; the per-sample body already streamed is renamed, never loaded
    (tmp / "samples.csv.part").rename(tmp / "samples.csv")
    files["samples.csv"] = {"rows": run.count, "kind": "per-sample"}
    for name, (columns, rows) in tables(summary).items():
        _write_csv(tmp / name, columns, rows)
        files[name] = {"rows": len(rows), "kind": name[:-4]}
    (tmp / "provenance.json").write_text(
        json.dumps(jsonable(provenance), indent=2, sort_keys=True, allow_nan=False), encoding="utf-8"
    )
    files["provenance.json"] = {"kind": "provenance"}

    # figures
    (tmp / "figures").mkdir()
    figures = render.figures(run, summary) if settings.figures else []
    rendered: list[tuple[str, str, str, bytes]] = []
    png_meta = {
        "Software": f"lightning_attn {provenance['versions'].get('lightning_attn', '')}".strip(),
        "lightning_attn_provenance": json.dumps(jsonable(provenance), sort_keys=True, allow_nan=False),
    }
    for name, title, caption, figure in figures:
        png = _render_png(figure, settings.figure_dpi, png_meta)
        path = f"figures/{name}.png"
        (tmp / path).write_bytes(png)
        files[path] = {"kind": "figure", "title": title}
        rendered.append((name, title, caption, png))
    figures.clear()

    # Markdown and HTML
    (tmp / "summary.md").write_text(
        render.markdown(summary, provenance, [*sorted(files), "report.html", "report.json"], title=settings.title),
        encoding="utf-8",
    )
    files["summary.md"] = {"kind": "summary"}
    explorer = render.write_html(
        tmp / "report.html",
        run,
        summary,
        provenance,
        rendered,
        title=settings.title,
        html_max_rows=settings.html_max_rows,
        files=[*sorted(files)],
    )
    files["report.html"] = {"kind": "html"}
    if explorer is not None:  # the explorer alone too: one small page for W&B (wandb.Html) or a browser
        write_explorer(tmp / "explorer.html", explorer, title=f"{settings.title}: attention explorer")
        files["explorer.html"] = {"kind": "html"}
    for name, entry in files.items():
        entry["sha256"] = _file_sha256(tmp / name)
        entry["bytes"] = (tmp / name).stat().st_size
    summary["files"] = {name: files[name] for name in sorted(files)}
    summary["provenance"] = provenance
    document = jsonable(summary)
    (tmp / "report.json").write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")

    # publish: the temporary directory becomes the final one (replacing only a previous report of this library)
    written = sorted(entry.relative_to(tmp).as_posix() for entry in tmp.rglob("*") if entry.name != INCOMPLETE)
    (tmp / MARKER).write_text("\n".join([_MARKER_HEADER, *written]) + "\n", encoding="utf-8")
    (tmp / INCOMPLETE).unlink()
    final, moved = report_destination(run.final_dir)  # again: something may have appeared there during the run
    if moved is not None:
        rank_zero_warn(f"ExplainabilityReport: {moved}", category=UserWarning)
    trash = None
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-{os.getpid()}-", dir=final.parent))
        final.rename(trash / final.name)
    tmp.rename(final)
    run.final_dir = final
    run.finished = True
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    document["directory"] = str(final)
    return document


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(v) for v in row])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _render_png(figure: Figure, dpi: int, metadata: Mapping[str, str]) -> bytes:
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata=dict(metadata))
    figure.clear()
    return buffer.getvalue()
