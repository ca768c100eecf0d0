"""Every figure kind of :mod:`lightning_attn.plots`, rendered into one folder with an ``index.html`` beside it.

    python -m lightning_attn.gallery OUT [--heads 4] [--layers 3]

The figures are drawn from synthetic data shaped like a digits ViT's (17 tokens: [CLS] and a 4x4 patch grid,
``--layers`` layers of ``--heads`` heads) rather than from a training run: a run takes minutes on a CPU and its
figures depend on the run, while a gallery exists to show what each figure looks like (and to review them all at
once). The values are seeded, so the gallery is the same on every machine.
"""

from __future__ import annotations

import argparse
import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_attn import plots
from lightning_attn.plots.attribution import plot_gradcam_overlay
from lightning_attn.plots.head_roles import plot_head_importance, plot_head_timeline

__all__ = ["GalleryEntry", "build_gallery", "gallery_entries", "main"]

TOKENS = ["CLS"] + [f"r{r}c{c}" for r in range(4) for c in range(4)]


@dataclass(frozen=True)
class GalleryEntry:
    """One figure of the gallery: its file stem, the plot function that draws it and what it shows."""

    name: str
    function: str
    description: str
    draw: Callable[[], Figure]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def gallery_entries(heads: int = 4, layers: int = 3, epochs: int = 5, seed: int = 0) -> list[GalleryEntry]:
    """The gallery's figures, each drawn lazily from seeded synthetic data of the given size."""
    rng = np.random.default_rng(seed)
    length = len(TOKENS)
    sites = [f"encoder.layers.{i}.self_attn" for i in range(layers)]
    head_ids = [f"{site}/h{h}" for site in sites for h in range(heads)]
    maps = _softmax(rng.normal(0, 2, size=(layers, heads, length, length)))
    samples = _softmax(rng.normal(0, 2, size=(3, length, length)))
    per_head = {
        name: rng.uniform(low, high, size=(layers, heads))
        for name, (low, high) in {"entropy": (0.5, 2.8), "max_weight": (0.1, 0.9), "sink_share": (0.0, 0.6)}.items()
    }
    rollout = _softmax(rng.normal(0, 1.5, size=(2, length, length)))
    edges = np.linspace(0, 1, 11)
    confidence = (edges[:-1] + edges[1:]) / 2
    accuracy = np.clip(confidence - rng.uniform(0, 0.15, size=10), 0, 1)
    count = rng.integers(5, 80, size=10)
    classes = 10
    history = [
        {"epoch": e, "ece": 0.2 / (e + 1), "mce": 0.4 / (e + 1), "nll": 1.5 / (e + 1), "brier": 0.6 / (e + 1)}
        for e in range(epochs)
    ]
    type_scores = {
        "previous_token": rng.uniform(0, 1, (layers, heads)),
        # duplicate-token and induction scores compare token ids: an image model has none
        "duplicate_token": np.full((layers, heads), math.nan),
        "induction": np.full((layers, heads), math.nan),
        "sink": rng.uniform(0, 1, (layers, heads)),
        "broad": rng.uniform(0, 1, (layers, heads)),
    }
    roles = ["sink", "broad", "previous_token", None]
    role_labels = [[roles[int(rng.integers(0, len(roles)))] for _ in head_ids] for _ in range(epochs)]
    gate_sites = [f"encoder.layers.{i}.gate" for i in range(layers)]
    images = [rng.uniform(0, 1, (8, 8)) for _ in range(3)]
    many_sites = [f"encoder.layers.{i}.gate" for i in range(12)]

    def evolution() -> Figure:
        series = {
            "entropy": rng.uniform(0, 1, (epochs, len(head_ids))),
            "hsi": rng.uniform(0, 1, (epochs, len(head_ids))),
        }
        return plots.plot_head_evolution(list(range(epochs)), series, head_ids, title="Per-head evolution (val)")

    entries = [
        GalleryEntry(
            "head_statistics",
            "plot_head_statistics",
            "Site x head heatmap of each streamed statistic (entropy, max weight, sink share).",
            lambda: plots.plot_head_statistics(per_head, sites, title="Per-head attention statistics (val, epoch 4)"),
        ),
        GalleryEntry(
            "attention_maps",
            "plot_attention_maps",
            "Head-averaged attention maps of the probe samples, query x key.",
            lambda: plots.plot_attention_maps(
                samples, query_labels=TOKENS, key_labels=TOKENS, title=f"{sites[0]}: head mean, val epoch 4"
            ),
        ),
        GalleryEntry(
            "attention_heads",
            "plot_attention_heads",
            "Every head's map of one sample on a shared colour scale.",
            lambda: plots.plot_attention_heads(
                maps[0],
                query_labels=TOKENS,
                key_labels=TOKENS,
                title=f"{sites[0]}: per head, probe 0 (label 3), val epoch 4",
            ),
        ),
        GalleryEntry(
            "rollout",
            "plot_rollout",
            "Attention rollout per sample and each input token's contribution to [CLS].",
            lambda: plots.plot_rollout(
                rollout, labels=TOKENS, title=f"Attention rollout over {layers} self-attention sites (val epoch 4)"
            ),
        ),
        GalleryEntry(
            "layer_evolution",
            "plot_layer_evolution",
            "Statistics by depth: mean over heads with a band of the std across heads.",
            lambda: plots.plot_layer_evolution(
                sites,
                {name: values.mean(1) for name, values in per_head.items()},
                {name: values.std(1) for name, values in per_head.items()},
            ),
        ),
        GalleryEntry(
            "head_contributions",
            "plot_head_contributions",
            "Mean max weight per head, one panel per layer on a shared y axis, error bars: std over rows.",
            lambda: plots.plot_head_contributions(
                sites,
                per_head["max_weight"],
                per_head["max_weight"] / 5,
                title="Head contributions: mean max weight per head (val, epoch 4; error bars: std over rows)",
            ),
        ),
        GalleryEntry(
            "top_positions",
            "plot_top_positions",
            "The most attended positions of each layer (share of attention received).",
            lambda: plots.plot_top_positions({site: [(TOKENS[k], 0.3 / (k + 1)) for k in range(5)] for site in sites}),
        ),
        GalleryEntry(
            "modality_pair",
            "plot_modality_pair",
            "Cross-modal attention A->B, B->A transposed and their difference.",
            lambda: plots.plot_modality_pair(
                samples[0, :8, 8:], samples[1, 8:, :8], names=("image", "text"), agreement=0.42
            ),
        ),
        GalleryEntry(
            "reliability_diagram",
            "plot_reliability_diagram",
            "Accuracy against confidence per bin, with the sample histogram below.",
            lambda: plots.plot_reliability_diagram(edges, accuracy, confidence, count, ece=0.05, title="val"),
        ),
        GalleryEntry(
            "confidence_histogram",
            "plot_confidence_histogram",
            "Confidence of correct and incorrect predictions.",
            lambda: plots.plot_confidence_histogram(edges, count, count // 4, title="val"),
        ),
        GalleryEntry(
            "classwise_reliability",
            "plot_classwise_reliability",
            "One reliability diagram per class.",
            lambda: plots.plot_classwise_reliability(
                edges,
                np.tile(accuracy, (classes, 1)),
                np.tile(confidence, (classes, 1)),
                np.tile(count, (classes, 1)),
                title="val",
            ),
        ),
        GalleryEntry(
            "calibration_trend",
            "plot_calibration_trend",
            "Calibration errors and proper scores over epochs.",
            lambda: plots.plot_calibration_trend(history),
        ),
        GalleryEntry(
            "hsi",
            "plot_hsi",
            "Head Specialization Index per head against its threshold, labels on the specialised ones.",
            lambda: plots.plot_hsi(
                rng.uniform(0, 1, len(head_ids)).tolist(), head_ids, ["position"] * len(head_ids), 0.3
            ),
        ),
        GalleryEntry(
            "feature_correlations",
            "plot_feature_correlations",
            "Pearson correlation of each head's statistic with each input feature.",
            lambda: plots.plot_feature_correlations(
                rng.uniform(-1, 1, (len(head_ids), 3)), head_ids, ["ink", "row", "column"]
            ),
        ),
        GalleryEntry(
            "head_type_scores",
            "plot_head_type_scores",
            "Head-type scores per layer and head; token-identity types say they need token ids.",
            lambda: plots.plot_head_type_scores(type_scores, sites),
        ),
        GalleryEntry(
            "head_redundancy",
            "plot_head_redundancy",
            "Pairwise Jensen-Shannon distance between heads and the near-duplicate clusters.",
            lambda: plots.plot_head_redundancy(
                np.abs(rng.normal(0.3, 0.1, (len(head_ids), len(head_ids)))), head_ids, [head_ids[:2]], 0.1
            ),
        ),
        GalleryEntry(
            "head_evolution",
            "plot_head_evolution",
            "Per-head entropy and HSI over epochs (lines only up to 10 heads).",
            evolution,
        ),
        GalleryEntry(
            "head_evolution_one_epoch",
            "plot_head_evolution",
            "The same with one epoch (a test stage): bars of that epoch, no pretend trend.",
            lambda: plots.plot_head_evolution(
                [4], {"entropy": rng.uniform(0, 1, (1, len(head_ids)))}, head_ids, title="Per-head evolution (test)"
            ),
        ),
        GalleryEntry(
            "head_timeline",
            "plot_head_timeline",
            "Each head's role label over epochs, dots where it changes.",
            lambda: plot_head_timeline(list(range(epochs)), role_labels, head_ids, [{"epoch": 2, "head": head_ids[0]}]),
        ),
        GalleryEntry(
            "head_importance",
            "plot_head_importance",
            "Normalised head importance (Michel et al. 2019), layers x heads.",
            lambda: plot_head_importance(rng.uniform(0, 1, (layers, heads)), sites),
        ),
        GalleryEntry(
            "channel_heatmaps",
            "plot_channel_heatmaps",
            "Most variable channels of a gate over positions, per layer and sample.",
            lambda: plots.plot_channel_heatmaps(
                {site: rng.normal(0, 1, (2, 6, length)) for site in gate_sites}, position_labels=TOKENS
            ),
        ),
        GalleryEntry(
            "over_time",
            "plot_over_time",
            "Mean gate per layer over positions, band: std.",
            lambda: plots.plot_over_time(
                {site: rng.uniform(0, 1, length) for site in gate_sites},
                {site: rng.uniform(0, 0.1, length) for site in gate_sites},
                position_labels=TOKENS,
            ),
        ),
        GalleryEntry(
            "over_time_many_sites",
            "plot_over_time",
            "The same for 12 layers: a labelled site x position heatmap instead of 12 lines.",
            lambda: plots.plot_over_time({site: rng.uniform(0, 1, length) for site in many_sites}),
        ),
        GalleryEntry(
            "weights_over_time",
            "plot_weights_over_time",
            "Pooling weights over positions per layer (shared y): mean, std band, probe samples.",
            lambda: plots.plot_weights_over_time(
                {site: _softmax(rng.normal(0, 1, length)) for site in gate_sites},
                {site: rng.uniform(0, 0.02, length) for site in gate_sites},
                {site: _softmax(rng.normal(0, 1, (3, length))) for site in gate_sites},
            ),
        ),
        GalleryEntry(
            "weight_statistics",
            "plot_weight_statistics",
            "Entropy and max weight of the pooling weights per layer and head.",
            lambda: plots.plot_weight_statistics(
                {
                    site: {"entropy": rng.uniform(1, 2.8, heads), "max_weight": rng.uniform(0, 1, heads)}
                    for site in sites
                }
            ),
        ),
        GalleryEntry(
            "weight_histograms",
            "plot_weight_histograms",
            "Per-head histograms of attention weights per layer, on a shared y axis.",
            lambda: plots.plot_weight_histograms(
                {site: rng.integers(1, 500, (heads, 20)) for site in sites}, np.linspace(0, 1, 21)
            ),
        ),
        GalleryEntry(
            "gradcam",
            "plot_gradcam_overlay",
            "Each input image above its Grad-CAM map, one colour bar.",
            lambda: plot_gradcam_overlay(
                images, [rng.uniform(0, 1, (4, 4)) for _ in images], labels=["7 (p=0.93)", "3 (p=0.61)", "1 (p=0.99)"]
            ),
        ),
    ]
    return entries


def build_gallery(out: Path, heads: int = 4, layers: int = 3) -> list[tuple[GalleryEntry, Figure]]:
    """Render every entry into ``out/<name>.png``, write ``out/index.html`` listing them; the entries with their
    drawn figures (laid out: their artists' boxes are final)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = gallery_entries(heads=heads, layers=layers)
    items, drawn = [], []
    for entry in entries:
        figure = entry.draw()
        FigureCanvasAgg(figure).print_png(str(out / f"{entry.name}.png"))
        drawn.append((entry, figure))
        items.append(
            f'<section id="{entry.name}"><h2>{html.escape(entry.name)} <code>{entry.function}</code></h2>'
            f"<p>{html.escape(entry.description)}</p>"
            f'<img src="{entry.name}.png" alt="{html.escape(entry.description)}" loading="lazy"></section>'
        )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lightning_attn figure gallery</title>'
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%;border:1px solid #ddd}"
        "section{margin:2em 0}</style></head><body><h1>lightning_attn figure gallery</h1>"
        f"<p>{len(entries)} figures from seeded synthetic data ({layers} layers x {heads} heads, 17 tokens).</p>"
        + "\n".join(items)
        + "</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_attn.gallery", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs and index.html")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args(argv)
    drawn = build_gallery(args.out, heads=args.heads, layers=args.layers)
    print(f"{len(drawn)} figures in {args.out / 'index.html'}")


if __name__ == "__main__":
    main()
