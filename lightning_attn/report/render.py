"""The human-readable parts of a finished report: its figures (matplotlib), ``summary.md`` and the self-contained
``report.html`` (the Jinja2 template ``templates/report.html.j2``, :mod:`lightning_attn.report.html`), all drawn
from the summary (:func:`~lightning_attn.report.summary.summarize`) and the run.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure

from lightning_attn.plots import report as plots
from lightning_attn.plots._common import as_array
from lightning_attn.plots.calibration import plot_confidence_histogram, plot_reliability_diagram
from lightning_attn.report import attribution_view, page_data
from lightning_attn.report import html as page
from lightning_attn.report.explorer import explorer_context
from lightning_attn.report.run import ReportRun
from lightning_attn.report.summary import SCHEMA_VERSION, jsonable, tables

__all__ = ["figures", "markdown", "write_html"]


def figures(run: ReportRun, summary: dict[str, Any]) -> list[tuple[str, str, str, Figure]]:
    """The figures of a report, ``(file name, title, caption, figure)``, from its ``summary`` and ``run`` (per-batch
    rows,
    position saliency maps)."""
    out: list[tuple[str, str, str, Figure]] = []
    cal = summary["calibration"]
    bins = cal["bins"]
    edges = [b["lower"] for b in bins] + [bins[-1]["upper"]]
    dataset = summary["dataset"]
    out.append(
        (
            "reliability",
            "Reliability diagram",
            f"accuracy per equal-width confidence bin ({cal['n_bins']} bins); ECE {_f(cal['ece'])}, MCE "
            f"{_f(cal['mce'])}",
            plot_reliability_diagram(  # the CalibrationMonitor's diagram: one style for the monitor and the report
                edges,
                as_array([b["accuracy"] for b in bins], none_as_nan=True),
                as_array([b["confidence"] for b in bins], none_as_nan=True),
                [b["count"] for b in bins],
                ece=cal["ece"],
                title="Reliability",
            ),
        )
    )
    out.append(
        (
            "confidence",
            "Confidence histogram",
            "confidence of correct and incorrect predictions",
            plot_confidence_histogram(
                edges,
                [b["correct"] for b in bins],
                [b["incorrect"] for b in bins],
                accuracy=dataset.get("accuracy"),
                confidence=dataset.get("mean_confidence"),
                title="Confidence of correct and incorrect predictions",
            ),
        )
    )
    group = summary["correct_vs_incorrect"]
    names = [n for n in group if group[n]["effect_size"] is not None]
    if names:
        out.append(
            (
                "correct_vs_incorrect",
                "Correct vs. incorrect",
                "standardized difference of every per-sample measure (positive: larger for correct predictions)",
                plots.plot_effect_sizes(names, [group[n]["effect_size"] for n in names]),
            )
        )
    classes = summary["classwise"]
    out.append(
        (
            "classwise",
            "Class-wise precision and recall",
            "per true class",
            plots.plot_classwise(
                [c["name"] for c in classes],
                [c["support"] for c in classes],
                [c["recall"] for c in classes],
                [c["precision"] for c in classes],
            ),
        )
    )
    if len(run.batch_rows) > 1:
        out.append(
            (
                "batches",
                "Per-batch statistics",
                "accuracy and mean confidence of each batch",
                plots.plot_batch_accuracy([r[2] for r in run.batch_rows], [r[3] for r in run.batch_rows]),
            )
        )
    sites = [s for s in summary["attention"]["sites"] if "entropy_mean" in s]
    if sites:
        width = max(len(s["entropy_mean"]) for s in sites)
        matrix = np.full((len(sites), width), np.nan)
        for i, s in enumerate(sites):
            matrix[i, : len(s["entropy_mean"])] = s["entropy_mean"]
        out.append(
            (
                "head_entropy",
                "Mean attention entropy per head",
                "normalized entropy in [0, 1] averaged over samples (0: one key, 1: uniform)",
                plots.plot_head_matrix(
                    [s["name"] for s in sites],
                    matrix,
                    title="Mean normalized entropy per head",
                    label="entropy",
                    vmin=0,
                    vmax=1,
                ),
            )
        )
    relevance = summary["saliency"]["head_relevance"]
    if relevance:
        names = list(relevance)
        width = max(len(v["share"]) for v in relevance.values())
        matrix = np.full((len(names), width), np.nan)
        for i, name in enumerate(names):
            matrix[i, : len(relevance[name]["share"])] = relevance[name]["share"]
        out.append(
            (
                "head_relevance",
                "Head relevance (gradient-weighted)",
                "share of sum(max(A * dA, 0)) of each head within its site, mean over probe samples",
                plots.plot_head_matrix(
                    names, matrix, title="Head relevance share", label="share", cmap="magma", vmin=0
                ),
            )
        )
    probes = summary["saliency"]["probes"]
    labels = [f"sample {p['sample']} (class {p['explained_class']})" for p in probes]
    for name, agg in summary["saliency"]["aggregate"].items():
        shares = [p["inputs"][name]["share"] for p in probes if name in p["inputs"]]
        if shares:
            out.append(
                (
                    f"saliency_{_safe(name)}",
                    f"Gradient x input: {name}",
                    "share of |gradient x input| per feature (rows: probe samples; bars: mean)",
                    plots.plot_feature_saliency(
                        agg["feature_names"],
                        shares,
                        sample_labels=labels[: len(shares)],
                        title=f"Feature saliency of input '{name}'",
                    ),
                )
            )
    for name, entries in run.probe_positions.items():
        entries = entries[:4]
        maps = np.stack([m for _, m, _ in entries]) if len({m.shape for _, m, _ in entries}) == 1 else None
        if maps is not None:
            out.append(
                (
                    f"saliency_map_{_safe(name)}",
                    f"Gradient x input over positions: {name}",
                    "|gradient x input| per position and feature, first probe samples",
                    plots.plot_position_saliency(
                        maps,
                        feature_names=summary["saliency"]["aggregate"].get(name, {}).get("feature_names"),
                        sample_labels=[f"sample {s}" for s, _, _ in entries],
                        title=f"Saliency map of input '{name}'",
                        pooled=entries[0][2],
                    ),
                )
            )
    rolled = [p for p in probes if p["rollout"] is not None]
    if rolled and len({len(p["rollout"]["mean_row"]) for p in rolled}) == 1:
        sites_used = rolled[0]["rollout"]["sites"]
        out.append(
            (
                "rollout",
                "Gradient-weighted attention rollout",
                f"token relevance (mean over output rows) through {len(sites_used)} sites: {', '.join(sites_used)}",
                plots.plot_rollout_relevance(
                    [p["rollout"]["mean_row"] for p in rolled],
                    sample_labels=[f"sample {p['sample']}" for p in rolled],
                    title="Gradient-weighted rollout relevance",
                ),
            )
        )
    out += attribution_view.figures(run, summary)
    return out


def markdown(summary: dict[str, Any], provenance: dict[str, Any], files: list[str], *, title: str) -> str:
    """``summary.md``: provenance, dataset measures, correct vs. incorrect, class-wise, attention, saliency, notes and
    the list of ``files``. Every name and text that may come from the user (title, class, site and feature names,
    notes) is escaped (:func:`_md`, :func:`_code`): a Markdown viewer renders raw HTML, so a ``<script>`` in a class
    name would run there."""
    d = summary["dataset"]
    lines = [
        f"# {_md(title)}",
        "",
        f"Stage `{summary['stage_key']}`, {d['num_samples']} samples in {d['num_batches']} batches, "
        f"{d['num_classes']} classes. Written {provenance['finished_utc']}.",
        "",
        "## Provenance",
        "",
        "| item | value |",
        "|---|---|",
    ]
    for key in (
        "report_sha256",
        "model_sha256",
        "inputs_sha256",
        "config_sha256",
        "model_class",
        "started_utc",
        "finished_utc",
    ):
        lines.append(f"| {key} | {_code(provenance[key])} |")
    if provenance.get("world_size", 1) > 1:
        lines.append(f"| world_size | {provenance['world_size']} (inputs_sha256 combines the ranks' hashes) |")
    lines.append("| versions | " + ", ".join(f"{_md(k)} {_md(v)}" for k, v in provenance["versions"].items()) + " |")
    lines += ["", "## Dataset", "", "| measure | value |", "|---|---|"]
    for key in (
        "accuracy",
        "mean_confidence",
        "ece",
        "mce",
        "nll",
        "brier",
        "mean_margin",
        "mean_output_entropy",
        "num_correct",
        "num_incorrect",
    ):
        lines.append(f"| {key} | {_f(d[key])} |")
    lines += [
        "",
        "## Correct vs. incorrect predictions",
        "",
        "| measure | mean (correct) | mean (incorrect) | difference | effect size |",
        "|---|---|---|---|---|",
    ]
    for name, g in summary["correct_vs_incorrect"].items():
        lines.append(
            f"| {_md(name)} | {_f(g['correct']['mean'])} | {_f(g['incorrect']['mean'])} "
            f"| {_f(g['difference'])} | {_f(g['effect_size'])} |"
        )
    lines += [
        "",
        "## Class-wise",
        "",
        "| class | support | predicted | precision | recall | f1 | mean confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["classwise"]:
        lines.append(
            f"| {_md(c['name'])} | {c['support']} | {c['predicted']} | {_f(c['precision'])} "
            f"| {_f(c['recall'])} | {_f(c['f1'])} | {_f(c['mean_confidence_true'])} |"
        )
    sites = [s for s in summary["attention"]["sites"] if "entropy_mean" in s]
    if sites:
        lines += [
            "",
            "## Attention sites",
            "",
            "| site | heads | mean entropy | most focused head |",
            "|---|---|---|---|",
        ]
        for s in sites:
            lines.append(
                f"| {_code(s['name'])} | {s['num_heads']} | {_f(float(np.mean(s['entropy_mean'])))} "
                f"| h{s['most_focused_head']} |"
            )
    for pair, entry in summary["attention"]["modality_pairs"].items():
        lines.append(
            f"\nModality agreement {_code(pair)}: mean {_f(entry['all']['mean'])} over {entry['all']['n']} samples."
        )
    sal = summary["saliency"]
    if sal["num_probes"]:
        lines += ["", f"## Saliency ({sal['num_probes']} probe samples, {sal['target']} class)", ""]
        for name, agg in sal["aggregate"].items():
            lines.append(f"- input {_code(name)}: " + ", ".join(f"{_md(f)} {_f(v)}" for f, v in agg["top"][:5]))
        for site, rel in sal["head_relevance"].items():
            top = int(np.argmax(rel["share"])) if rel["share"] else 0
            share = _f(rel["share"][top] if rel["share"] else None)
            lines.append(f"- head relevance {_code(site)}: most relevant h{top} ({share})")
    if summary["sections"]:
        lines += ["", "## Other callbacks", ""] + [
            f"- {_md(k)}: {_code(v['callback'])} (see report.json / report.html)"
            for k, v in summary["sections"].items()
        ]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {_md(n)}" for n in summary["notes"]]
    lines += ["", "## Files", ""] + [f"- {_code(f)}" for f in files] + [""]
    return "\n".join(lines)


def _md(value: Any) -> str:
    """``value`` as inert Markdown text: HTML special characters as entities (no tag or script survives), table
    pipes, link brackets and backticks escaped, one line."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    for char in ("\\", "|", "[", "]", "`"):
        text = text.replace(char, "\\" + char)
    return text


def _code(value: Any) -> str:
    """``value`` as a Markdown code span (inert: no HTML is rendered inside one), its backticks replaced so that it
    cannot close the span early, table pipes escaped, one line."""
    return "`" + " ".join(str(value).split()).replace("`", "'").replace("|", "\\|") + "`"


def write_html(
    path: Path,
    run: ReportRun,
    summary: dict[str, Any],
    provenance: dict[str, Any],
    pngs: list[tuple[str, str, str, bytes]],
    *,
    title: str,
    html_max_rows: int | None,
    files: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Write ``report.html`` to ``path`` from ``templates/report.html.j2``: overview, the per-sample table (the
    first ``html_max_rows`` rows of the run's ``samples.csv``, ``None``: all, streamed), the drill-down, calibration,
    heads, attention with the explorer, saliency and provenance; ``pngs`` are the rendered figures (file name, title,
    caption, PNG), ``files`` the report's other files (linked). Returns the explorer's data
    (:func:`~lightning_attn.report.explorer.explorer_data`; ``None`` when no probe sample has attention maps)."""
    d = summary["dataset"]
    placed = {"reliability", "confidence", "classwise", "correct_vs_incorrect", "head_entropy", "head_relevance"}
    placed.add("rollout")
    figures = {name: Markup(page.figure_html(t, png, c)) for name, t, c, png in pngs}
    saliency_names = [n for n, *_ in pngs if n.startswith(("saliency", "gradcam"))]
    sal = summary["saliency"]
    head_table = page_data.head_rows(summary)
    per_head_columns, per_head_rows = tables(summary)["per_head.csv"]
    bins = summary["calibration"]["bins"]
    group = summary["correct_vs_incorrect"]
    class_columns = ["class", "name", "support", "predicted", "correct", "precision", "recall", "f1"]
    class_columns += ["mean_confidence_true", "mean_confidence_predicted", "mean_attention_entropy"]
    sections = summary["sections"]
    explorer = page_data.probe_explorer(run, summary)
    shown = run.count if html_max_rows is None else min(run.count, html_max_rows)
    context: dict[str, Any] = {
        "title": title,
        "subtitle": f"{summary['stage_key']} · {d['num_samples']} samples · model {provenance['model_class']} · "
        f"report sha256 {provenance['report_sha256'][:16]}… · {provenance['finished_utc']}",
        "meta": {
            "generator": "lightning_attn ExplainabilityReport",
            "lightning-attn-schema-version": SCHEMA_VERSION,
            **{
                f"lightning-attn-{k.replace('_', '-')}": str(provenance[k])
                for k in ("report_sha256", "model_sha256", "inputs_sha256", "config_sha256", "finished_utc")
            },
        },
        "style": page.asset("style.css"),
        "sortable_js": page.asset("sortable.js"),
        "report_js": page.asset("report.js"),
        "nav": [
            ("overview", "Overview"),
            ("per-sample", "Per-sample"),
            ("drill", "Drill-down"),
            ("calibration", "Calibration"),
            ("heads", "Heads"),
            ("attention", "Attention"),
            ("explorer", "Explorer"),
            ("saliency", "Saliency"),
            ("provenance", "Provenance"),
        ],
        "cards": [
            (k, _f(v))
            for k, v in (
                ("samples", d["num_samples"]),
                ("accuracy", d["accuracy"]),
                ("wrong", d["num_incorrect"]),
                ("mean confidence", d["mean_confidence"]),
                ("ECE", d["ece"]),
                ("NLL", d["nll"]),
                ("Brier", d["brier"]),
                ("attention sites", len(summary["attention"]["sites"])),
                ("probe samples", sal["num_probes"]),
            )
        ],
        "notes": summary["notes"],
        "shown": shown,
        "total": run.count,
        "classes": [(c["class"], c["name"]) for c in summary["classwise"]],
        "probes_json": page.script_json(jsonable(page_data.probe_views(run, summary))),
        "figures": figures,
        "bins_table": Markup(
            page.table_html(
                ["bin", "lower", "upper", "count", "accuracy", "confidence", "gap", "correct", "incorrect"],
                [
                    [
                        i,
                        b["lower"],
                        b["upper"],
                        b["count"],
                        b["accuracy"],
                        b["confidence"],
                        None if b["accuracy"] is None else b["accuracy"] - b["confidence"],
                        b["correct"],
                        b["incorrect"],
                    ]
                    for i, b in enumerate(bins)
                ],
            )
        ),
        "calibration_section": sections.get("calibration", {}).get("callback"),
        "classwise_table": Markup(
            page.table_html(class_columns, [[c[k] for k in class_columns] for c in summary["classwise"]])
        ),
        "groups_table": Markup(
            page.table_html(
                ["measure", "n correct", "mean correct", "n incorrect", "mean incorrect", "difference", "effect size"],
                [
                    [
                        name,
                        g["correct"]["n"],
                        g["correct"]["mean"],
                        g["incorrect"]["n"],
                        g["incorrect"]["mean"],
                        g["difference"],
                        g["effect_size"],
                    ]
                    for name, g in group.items()
                ],
            )
        ),
        "heads_note": "Label, types, HSI and primary feature from the head-specialization callback "
        + (
            f"({sections['head_specialization']['callback']})"
            if "head_specialization" in sections
            else "(none ran: empty)"
        )
        + "; entropy: mean normalized entropy over the report's samples; importance: normalized head importance "
        "(Michel et al. 2019) when measured; relevance share: gradient-weighted, probe samples.",
        "heads_table": Markup(page.table_html(page_data.HEAD_COLUMNS, head_table)) if head_table else "",
        "per_head_table": Markup(page.table_html(per_head_columns, per_head_rows)) if per_head_rows else "",
        "modality": [
            f"Modality agreement {pair} ({entry['sites'][0]} vs. {entry['sites'][1]}): mean {_f(entry['all']['mean'])}"
            f", correct {_f(entry['correct']['mean'])}, incorrect {_f(entry['incorrect']['mean'])}."
            for pair, entry in summary["attention"]["modality_pairs"].items()
        ],
        "saliency_note": (
            f"{sal['num_probes']} probe samples, explaining the {sal['target']} class. {sal['method']['inputs']}. "
            f"Rollout: {sal['method']['rollout']}."
            if sal["num_probes"]
            else "No probe samples (probe_samples=0)."
        ),
        "saliency_figures": [figures[n] for n in saliency_names],
        "saliency_html": Markup(attribution_view.token_view_html(summary)),
        "files": [*files, *(["explorer.html"] if explorer is not None else []), "report.json"],
        "provenance_table": Markup(
            page.table_html(
                ["item", "value"],
                [[k, v] for k, v in provenance.items() if k != "versions"]
                + [[f"version: {k}", v] for k, v in provenance["versions"].items()],
                sortable=False,
            )
        ),
        "config_table": Markup(
            page.table_html(
                ["argument", "value"],
                [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in summary["config"].items()],
                sortable=False,
            )
        ),
        "other_figures": [f for n, f in figures.items() if n not in placed and n not in saliency_names],
    }
    if explorer is not None:
        context.update(explorer_context(explorer))
    probes = {int(p["sample"]) for p in sal["probes"]}
    template = page.environment().get_template("report.html.j2")
    with (
        path.open("w", encoding="utf-8") as handle,
        (run.tmp_dir / "samples.csv").open(encoding="utf-8", newline="") as samples,
    ):
        reader = csv.reader(samples)
        columns = next(reader)
        if columns and columns[0].startswith("#"):  # a provenance line before the header
            columns = next(reader)
        context["columns"] = columns
        context["rows"] = page_data.sample_rows(columns, reader, shown, probes)
        for chunk in template.generate(**context):
            handle.write(chunk)
    return explorer


# -----------------------------------------------------------------------------------------------------------------
# helpers
# -----------------------------------------------------------------------------------------------------------------
def _f(value: Any) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "\u2013"
    return str(value)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_") or "input"
