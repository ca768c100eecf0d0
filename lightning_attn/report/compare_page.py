"""The page of a comparison of reports (:mod:`lightning_attn.report.compare`): its figures and ``compare.html``, in
the report's page style (:mod:`lightning_attn.report.html`: self-contained, sortable tables, a self-check of the
changed-samples table)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_attn.plots import compare as plots
from lightning_attn.report import html as page
from lightning_attn.report.write import _render_png

__all__ = ["figures", "page_html"]


def figures(comparison: dict[str, Any], dpi: int) -> list[tuple[str, str, str, bytes]]:
    """The comparison's figures ``(file name, title, caption, PNG bytes)``: measures with intervals, class-wise F1, and
    the per-head entropy of the first and last report with their difference."""
    labels = [r["label"] for r in comparison["reports"]]
    metrics = comparison["metrics"]
    intervals = [
        None if low is None else (low, high)
        for low, high in zip(metrics["ece_ci_low"], metrics["ece_ci_high"], strict=True)
    ]
    drawn = [
        (
            "measures",
            "Accuracy and calibration",
            "per report; ECE with its 95% bootstrap interval where the report has one",
            plots.plot_metric_intervals(
                labels, {k: metrics[k] for k in ("accuracy", "ece", "brier")}, {"ece": intervals}
            ),
        )
    ]
    classes = comparison["classwise"]
    drawn.append(
        (
            "classwise_f1",
            "Class-wise F1",
            "per true class and report",
            plots.plot_grouped_bars(
                [c["name"] for c in classes],
                labels,
                [[c["f1"][r] for c in classes] for r in range(len(labels))],
                ylabel="F1",
                title="Class-wise F1",
            ),
        )
    )
    heads = comparison["heads"]
    if heads:
        sites = list(dict.fromkeys(h["site"] for h in heads))
        width = max(h["head"] for h in heads) + 1
        first, last = np.full((len(sites), width), np.nan), np.full((len(sites), width), np.nan)
        for h in heads:
            row = sites.index(h["site"])
            first[row, h["head"]] = np.nan if h["entropy_mean"][0] is None else h["entropy_mean"][0]
            last[row, h["head"]] = np.nan if h["entropy_mean"][-1] is None else h["entropy_mean"][-1]
        drawn.append(
            (
                "head_entropy",
                "Per-head attention entropy",
                f"{labels[0]}, {labels[-1]} and their difference",
                plots.plot_head_difference(sites, first, last, labels=(labels[0], labels[-1])),
            )
        )
    metadata = {"Software": "lightning_attn compare"}
    return [(name, title, caption, _render_png(figure, dpi, metadata)) for name, title, caption, figure in drawn]


def _fmt_list(values: Sequence[Any]) -> list[Any]:
    return ["" if v is None else v for v in values]


def page_html(
    comparison: dict[str, Any], pngs: Sequence[tuple[str, str, str, bytes]], max_rows: int, subtitle: str
) -> str:
    """``compare.html``: reports, measures, class-wise, heads, top positions and the changed samples (the first
    ``max_rows`` of them; ``#checks`` counts that table's rows), with the rendered figures ``pngs`` inline."""
    labels = [r["label"] for r in comparison["reports"]]
    blocks = []
    blocks.append(
        '<section id="reports"><h2>Reports</h2>'
        + page.table_html(
            [
                "label",
                "title",
                "stage",
                "samples",
                "model class",
                "model sha256",
                "inputs sha256",
                "report sha256",
                "path",
            ],
            [
                [
                    r["label"],
                    r["title"],
                    r["stage_key"],
                    r["num_samples"],
                    r["model_class"],
                    (r["model_sha256"] or "")[:16],
                    (r["inputs_sha256"] or "")[:16],
                    (r["report_sha256"] or "")[:16],
                    r["path"],
                ]
                for r in comparison["reports"]
            ],
            sortable=False,
        )
        + "".join(f'<p class="warn">{page.esc(n)}</p>' for n in comparison["notes"])
        + "</section>"
    )
    metrics = comparison["metrics"]
    blocks.append(
        '<section id="measures"><h2>Measures</h2>'
        + page.table_html(
            ["measure", *labels], [[name, *_fmt_list(values)] for name, values in metrics.items()], sortable=False
        )
        + "".join(page.figure_html(t, png, c) for name, t, c, png in pngs if name == "measures")
        + "</section>"
    )
    class_rows = [
        [
            c["class"],
            c["name"],
            *(c[key][r] for key in ("support", "precision", "recall", "f1") for r in range(len(labels))),
        ]
        for c in comparison["classwise"]
    ]
    blocks.append(
        '<section id="classwise"><h2>Class-wise</h2>'
        + page.table_html(
            [
                "class",
                "name",
                *(f"{key} {label}" for key in ("support", "precision", "recall", "f1") for label in labels),
            ],
            class_rows,
        )
        + "".join(page.figure_html(t, png, c) for name, t, c, png in pngs if name == "classwise_f1")
        + "</section>"
    )
    head_rows = [
        [
            h["site"],
            h["head"],
            *_fmt_list(h["entropy_mean"]),
            *_fmt_list(h["label"]),
            "yes" if h["label_changed"] else "",
            *_fmt_list(h["importance"]),
        ]
        for h in comparison["heads"]
    ]
    changed_labels = sum(h["label_changed"] for h in comparison["heads"])
    blocks.append(
        '<section id="heads"><h2>Attention heads</h2>'
        '<p class="note">Mean normalized attention entropy per head; labels and normalized importance (Michel et al. '
        f"2019) from the reports' head-specialization sections where present ({changed_labels} heads changed "
        "label).</p>"
        + "".join(page.figure_html(t, png, c) for name, t, c, png in pngs if name == "head_entropy")
        + page.table_html(
            [
                "site",
                "head",
                *(f"entropy {label}" for label in labels),
                *(f"label {label}" for label in labels),
                "label changed",
                *(f"importance {label}" for label in labels),
            ],
            head_rows,
        )
        + "</section>"
    )
    position_rows = [
        [label, site, ", ".join(f"{key} ({share:.2f})" for key, share in keys)]
        for label, sites in comparison["top_positions"].items()
        for site, keys in sites.items()
    ]
    blocks.append(
        '<section id="positions"><h2>Top attended positions</h2><p class="note">Key positions most often the key of '
        "a sample's top attention pair (share of samples).</p>"
        + page.table_html(["report", "site", "top keys (share)"], position_rows, sortable=False)
        + "</section>"
    )
    samples = comparison["samples"]
    shown = samples["changed"][:max_rows]
    rows = [
        [
            s["input_sha256"],
            s["target"],
            *s["sample"],
            *s["predicted"],
            *(int(c) for c in s["correct"]),
            *s["confidence"],
        ]
        for s in shown
    ]
    columns = [
        "input_sha256",
        "target",
        *(f"sample {label}" for label in labels),
        *(f"predicted {label}" for label in labels),
        *(f"correct {label}" for label in labels),
        *(f"confidence {label}" for label in labels),
    ]
    summary = (
        f"{samples['matched']} samples in every report (matched by input hash); {len(samples['changed'])} changed: "
        f"{samples['prediction_changed']} predictions, {samples['correctness_changed']} correctness "
        f"({samples['fixed']} fixed, {samples['broken']} broken from {labels[0]} to {labels[-1]})."
    )
    more = (
        f'<p class="warn">first {len(shown)} of {len(samples["changed"])} shown; all in compare.json</p>'
        if len(shown) < len(samples["changed"])
        else ""
    )
    blocks.append(
        f'<section id="samples-changed"><h2>Changed samples</h2><p class="note">{page.esc(summary)}</p>{more}'
        '<div class="scroll">' + page.table_html(columns, rows, table_id="samples") + "</div></section>"
    )
    nav = [
        ("reports", "Reports"),
        ("measures", "Measures"),
        ("classwise", "Class-wise"),
        ("heads", "Heads"),
        ("positions", "Positions"),
        ("samples-changed", "Changed samples"),
    ]
    title = "Comparison of " + ", ".join(labels)
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n',
            f"<title>{page.esc(title)}</title>\n<style>{page.STYLE}</style>\n</head><body>\n",
            f'<header><h1>{page.esc(title)}</h1><div class="sub">{page.esc(subtitle)}</div></header>',
            "<main>\n<nav>" + "".join(f'<a href="#{a}">{page.esc(t)}</a>' for a, t in nav) + "</nav>\n",
            "\n".join(blocks),
            f'\n<div id="checks" data-status="pending" data-expected-rows="{len(shown)}">'
            "self-check pending (needs JavaScript)</div>\n",
            f"</main>\n<script>{page.SCRIPT}</script>\n</body></html>\n",
        ]
    )
