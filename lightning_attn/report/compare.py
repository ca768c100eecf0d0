"""``lightning-attn compare REPORT_A REPORT_B [...] --out DIR``: several explainability reports side by side.

Reads each report's ``report.json`` and ``samples.csv`` (never the model) and writes ``compare.json`` (every number)
and ``compare.html`` (self-contained, the report's page style, figures inline) with, per report:

- accuracy, ECE (with the calibration callback's 95% bootstrap interval ``ece_ci_low``/``ece_ci_high`` when the
  report holds it), MCE, NLL, Brier and mean confidence;
- per-class support, precision, recall and F1;
- per site and head: mean attention entropy, and where the report has a head-specialization section, the head's label
  (and whether it changed) and its importance;
- the most attended key positions (how often each is the top pair's key, over the report's samples);
- the samples present in every report, matched by the SHA-256 of their model inputs (``input_sha256`` of
  ``samples.csv``), and among them those whose prediction or correctness differs from the first report's.

Reports of different datasets (no sample in common) or of models with different classes cannot be matched: the command
then stops with one line and exit status 2. The output folder must be new, empty, or hold an earlier comparison: this
command never overwrites files it did not write.

``main(argv)`` returns the exit status (0 written, 2 bad input).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_attn.report import compare_page
from lightning_attn.report.page_data import head_importance, registry_heads
from lightning_attn.report.provenance import utc_now
from lightning_attn.report.summary import jsonable

__all__ = ["COMPARE_KIND", "CompareError", "LoadedReport", "compare_reports", "load_report", "main", "write_comparison"]

PROG = "lightning-attn compare"
#: ``kind`` of ``compare.json``: how the command recognises a folder holding its own earlier output.
COMPARE_KIND = "lightning_attn.compare"
COMPARE_SCHEMA_VERSION = "1.0"
#: Dataset measures compared (keys of report.json's ``dataset``).
MEASURES = ("accuracy", "ece", "mce", "nll", "brier", "mean_confidence")
#: Files and folders of a comparison (all that is replaced in a folder holding an earlier one).
OUTPUTS = ("compare.json", "compare.html", "figures")


class CompareError(ValueError):
    """Reports that cannot be compared, or an output folder that cannot be written, with a one-line message."""


@dataclass
class LoadedReport:
    """One report: its folder, a short ``label``, ``report.json`` and the rows of ``samples.csv`` by column."""

    path: Path
    label: str
    document: dict[str, Any]
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def column(self, name: str) -> list[str]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def load_report(path: str | Path, label: str | None = None) -> LoadedReport:
    """Read a report folder (or its ``report.json``).

    Raises:
        CompareError: no ``report.json``/``samples.csv`` there, or an unreadable one.
    """
    folder = Path(path)
    if folder.is_file() and folder.name == "report.json":
        folder = folder.parent
    if not (folder / "report.json").is_file():
        raise CompareError(f"{path} is not a report folder (no report.json)")
    try:
        document = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"cannot read {folder / 'report.json'}: {error}") from None
    if not isinstance(document, dict) or "dataset" not in document or "provenance" not in document:
        raise CompareError(f"{folder / 'report.json'} is not a lightning_attn report")
    samples = folder / "samples.csv"
    if not samples.is_file():
        raise CompareError(f"{folder} has no samples.csv")
    with samples.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        columns = next(reader)
        rows = list(reader)
    return LoadedReport(path=folder, label=label or folder.name, document=document, columns=columns, rows=rows)


# -----------------------------------------------------------------------------------------------------------------
# matching
# -----------------------------------------------------------------------------------------------------------------
def _class_names(report: LoadedReport) -> list[str]:
    return [str(c["name"]) for c in report.document["classwise"]]


def _sample_keys(report: LoadedReport) -> list[str]:
    """The key matching a sample across reports: its input hash; for reports without one (written before the column
    existed) its position, valid only between reports of identical inputs (checked by the caller)."""
    if "input_sha256" in report.columns:
        return report.column("input_sha256")
    return [f"#{row[0]}" for row in report.rows]


def check_comparable(reports: Sequence[LoadedReport]) -> list[str]:
    """Notes on the match of ``reports`` (duplicated inputs, samples in one report only).

    Raises:
        CompareError: different classes, or no sample in common (different datasets).
    """
    first = reports[0]
    notes: list[str] = []
    for other in reports[1:]:
        a, b = first.document["dataset"]["num_classes"], other.document["dataset"]["num_classes"]
        if a != b or _class_names(first) != _class_names(other):
            raise CompareError(
                f"reports {first.label} and {other.label} cannot be matched: their models have different "
                f"classes ({a}: {_class_names(first)[:5]} vs. {b}: {_class_names(other)[:5]})"
            )
        hashed = "input_sha256" in first.columns and "input_sha256" in other.columns
        if (
            not hashed
            and first.document["provenance"]["inputs_sha256"] != other.document["provenance"]["inputs_sha256"]
        ):
            raise CompareError(
                f"reports {first.label} and {other.label} cannot be matched: they have no per-sample input "
                "hashes (older reports) and their inputs differ"
            )
        if not set(_sample_keys(first)) & set(_sample_keys(other)):
            raise CompareError(
                f"reports {first.label} and {other.label} cannot be matched: no sample in common "
                "(different datasets or splits)"
            )
    for report in reports:
        keys = _sample_keys(report)
        if len(set(keys)) < len(keys):
            notes.append(
                f"{report.label}: {len(keys) - len(set(keys))} samples repeat an earlier input; the first of "
                "each is matched"
            )
    return notes


# -----------------------------------------------------------------------------------------------------------------
# the comparison
# -----------------------------------------------------------------------------------------------------------------
def _ece_interval(document: dict[str, Any]) -> tuple[float, float] | None:
    """The ECE's 95% bootstrap interval: the report's own calibration, else its calibration callback's metrics."""
    places = [document.get("calibration", {}), document.get("dataset", {})]
    results = document.get("sections", {}).get("calibration", {}).get("results")
    if isinstance(results, dict):
        places += [results.get("metrics", {}), results]
    for place in places:
        if isinstance(place, dict) and place.get("ece_ci_low") is not None and place.get("ece_ci_high") is not None:
            return float(place["ece_ci_low"]), float(place["ece_ci_high"])
    return None


def _heads(reports: Sequence[LoadedReport]) -> list[dict[str, Any]]:
    """Per (site, head) of the first report: entropy, label, normalized and raw importance in each report (``None``
    where absent)."""
    entropy = [{s["name"]: s.get("entropy_mean") for s in r.document["attention"]["sites"]} for r in reports]
    registries = [registry_heads(r.document) for r in reports]
    rows = []
    for site, values in entropy[0].items():
        for head in range(len(values or [])):
            per = [e.get(site) for e in entropy]
            labels = [reg.get((site, head), {}).get("label") for reg in registries]
            known = [label for label in labels if label is not None]
            rows.append(
                {
                    "site": site,
                    "head": head,
                    "entropy_mean": [v[head] if v is not None and head < len(v) else None for v in per],
                    "label": labels,
                    "label_changed": len(set(known)) > 1,
                    "importance": [head_importance(reg.get((site, head), {}))[1] for reg in registries],
                    "importance_raw": [head_importance(reg.get((site, head), {}))[0] for reg in registries],
                }
            )
    return rows


def _top_positions(report: LoadedReport, count: int = 5) -> dict[str, list[list[Any]]]:
    """Per pair site: the ``count`` key positions most often the key of a sample's top attention pair, with their
    share of the samples."""
    out: dict[str, list[list[Any]]] = {}
    for column in (c for c in report.columns if c.endswith("/top_pairs")):
        keys: Counter[int] = Counter()
        cells = [cell for cell in report.column(column) if cell]
        for cell in cells:
            first = cell.split(";")[0]
            keys[int(first.split(">")[1].split(":")[0])] += 1
        out[column[: -len("/top_pairs")]] = [[key, hits / len(cells)] for key, hits in keys.most_common(count)]
    return out


def _changed_samples(reports: Sequence[LoadedReport]) -> dict[str, Any]:
    """Samples present in every report (by input hash) whose prediction or correctness differs from the first's."""
    tables = []
    for report in reports:
        index = {
            name: report.columns.index(name) for name in ("sample", "target", "predicted", "correct", "confidence")
        }
        by_key: dict[str, list[str]] = {}
        for key, row in zip(_sample_keys(report), report.rows, strict=True):
            by_key.setdefault(key, row)
        tables.append((index, by_key))
    common = [key for key in tables[0][1] if all(key in table for _, table in tables[1:])]
    changed = []
    counts = {"prediction_changed": 0, "correctness_changed": 0, "fixed": 0, "broken": 0}
    for key in common:
        rows = [(index, table[key]) for index, table in tables]
        predicted = [int(row[i["predicted"]]) for i, row in rows]
        correct = [bool(int(row[i["correct"]])) for i, row in rows]
        if len(set(predicted)) == 1 and len(set(correct)) == 1:
            continue
        counts["prediction_changed"] += len(set(predicted)) > 1
        counts["correctness_changed"] += len(set(correct)) > 1
        counts["fixed"] += (not correct[0]) and correct[-1]
        counts["broken"] += correct[0] and not correct[-1]
        first_index, first_row = rows[0]
        changed.append(
            {
                "input_sha256": key,
                "target": int(first_row[first_index["target"]]),
                "sample": [int(row[i["sample"]]) for i, row in rows],
                "predicted": predicted,
                "correct": correct,
                "confidence": [float(row[i["confidence"]]) for i, row in rows],
            }
        )
    return {
        "matched": len(common),
        "only_in": {r.label: len(table) - len(common) for r, (_, table) in zip(reports, tables, strict=True)},
        **counts,
        "changed": changed,
    }


def compare_reports(reports: Sequence[LoadedReport]) -> dict[str, Any]:
    """The content of ``compare.json`` for ``reports`` (the first is the reference of the changed samples).

    Raises:
        CompareError: fewer than two reports, or reports that cannot be matched (:func:`check_comparable`).
    """
    if len(reports) < 2:
        raise CompareError("compare needs at least two reports")
    notes = check_comparable(reports)
    documents = [r.document for r in reports]
    metrics: dict[str, list[Any]] = {name: [d["dataset"].get(name) for d in documents] for name in MEASURES}
    intervals = [_ece_interval(d) for d in documents]
    metrics["ece_ci_low"] = [None if i is None else i[0] for i in intervals]
    metrics["ece_ci_high"] = [None if i is None else i[1] for i in intervals]
    classwise = []
    for k, entry in enumerate(documents[0]["classwise"]):
        classwise.append(
            {
                "class": k,
                "name": entry["name"],
                **{
                    key: [d["classwise"][k][key] for d in documents] for key in ("support", "precision", "recall", "f1")
                },
            }
        )
    return {
        "kind": COMPARE_KIND,
        "schema_version": COMPARE_SCHEMA_VERSION,
        "created_utc": utc_now(),
        "reports": [
            {
                "label": r.label,
                "path": str(r.path),
                "title": r.document.get("title"),
                "stage_key": r.document.get("stage_key"),
                "num_samples": r.document["dataset"]["num_samples"],
                **{
                    key: r.document["provenance"].get(key)
                    for key in ("report_sha256", "model_sha256", "inputs_sha256", "model_class", "epoch", "global_step")
                },
            }
            for r in reports
        ],
        "metrics": metrics,
        "classwise": classwise,
        "heads": _heads(reports),
        "top_positions": {r.label: _top_positions(r) for r in reports},
        "samples": _changed_samples(reports),
        "notes": notes,
    }


# -----------------------------------------------------------------------------------------------------------------
# output
# -----------------------------------------------------------------------------------------------------------------
def _prepare_out(out: Path, reports: Sequence[LoadedReport]) -> None:
    """Make ``out`` ready: new, empty, or holding an earlier comparison (whose files alone are removed)."""
    resolved = out.resolve()
    for report in reports:
        if resolved == report.path.resolve():
            raise CompareError(f"--out {out} is the report folder of {report.label}: choose a new folder")
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        previous = out / "compare.json"
        try:
            kind = json.loads(previous.read_text(encoding="utf-8")).get("kind") if previous.is_file() else None
        except (OSError, json.JSONDecodeError, AttributeError):
            kind = None
        if kind != COMPARE_KIND:
            raise CompareError(f"--out {out} holds files that {PROG} did not write: choose a new or empty folder")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_comparison(
    reports: Sequence[LoadedReport],
    out: str | Path,
    *,
    figures: bool = True,
    figure_dpi: int = 90,
    html_max_rows: int = 1000,
) -> dict[str, Any]:
    """Compare ``reports`` (:func:`compare_reports`) and write ``compare.json``, ``compare.html`` and ``figures/*.png``
    into ``out``.

    Raises:
        CompareError: reports that cannot be matched, or an ``out`` holding files this command did not write.
    """
    comparison = compare_reports(reports)
    folder = Path(out)
    _prepare_out(folder, reports)
    pngs = compare_page.figures(comparison, figure_dpi) if figures else []
    (folder / "figures").mkdir()
    for name, _, _, png in pngs:
        (folder / "figures" / f"{name}.png").write_bytes(png)
    (folder / "compare.html").write_text(
        compare_page.page_html(comparison, pngs, html_max_rows, f"{PROG} · {comparison['created_utc']}"),
        encoding="utf-8",
    )
    (folder / "compare.json").write_text(json.dumps(jsonable(comparison), indent=2, allow_nan=False), encoding="utf-8")
    return comparison


def _labels(paths: Sequence[str], given: str | None) -> list[str]:
    if given:
        labels = [part.strip() for part in given.split(",")]
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise CompareError(f"--labels needs {len(paths)} distinct names, got {given!r}")
        return labels
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}/{Path(p).resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"R{i + 1}" for i in range(len(paths))]
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit status: 0 written, 2 reports that cannot be compared or a bad --out.",
    )
    parser.add_argument(
        "reports", nargs="+", metavar="REPORT", help="report folders (or their report.json), the first is the reference"
    )
    parser.add_argument(
        "--out", "-o", required=True, metavar="DIR", help="new folder (or one holding an earlier comparison)"
    )
    parser.add_argument("--labels", metavar="A,B,...", help="short names of the reports (default: their folder names)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument(
        "--html-max-rows", type=int, default=1000, metavar="N", help="changed samples shown in the HTML (JSON has all)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-attn compare``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        if len(args.reports) < 2:
            raise CompareError("compare needs at least two reports")
        labels = _labels(args.reports, args.labels)
        reports = [load_report(path, label) for path, label in zip(args.reports, labels, strict=True)]
        comparison = write_comparison(
            reports, args.out, figures=not args.no_figures, html_max_rows=max(1, args.html_max_rows)
        )
    except CompareError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    samples = comparison["samples"]
    print(str(Path(args.out) / "compare.html"))
    print(
        f"{PROG}: wrote {args.out} ({len(reports)} reports, {samples['matched']} samples matched, "
        f"{len(samples['changed'])} changed)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
