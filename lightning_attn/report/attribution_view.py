"""How the report shows its layer attributions: the token view (each token of a probe coloured by its share of the
saliency) and the Grad-CAM overlays over the probes' input images."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_attn.plots.attribution import plot_gradcam_overlay
from lightning_attn.report import html as page
from lightning_attn.report.run import ReportRun

__all__ = ["figures", "token_view_html"]

#: Probes drawn in one Grad-CAM figure.
MAX_OVERLAYS = 6


def figures(run: ReportRun, summary: dict[str, Any]) -> list[tuple[str, str, str, Figure]]:
    """The Grad-CAM overlay figure ``(file name, title, caption, figure)`` when probes have a grid map and an image."""
    drawn = [
        p
        for p in summary["saliency"]["probes"]
        if p.get("gradcam") and p["gradcam"]["grid"] and int(p["sample"]) in run.probe_images
    ][:MAX_OVERLAYS]
    if not drawn:
        return []
    cam = drawn[0]["gradcam"]
    figure = plot_gradcam_overlay(
        [run.probe_images[int(p["sample"])] for p in drawn],
        [np.asarray(p["gradcam"]["map"], dtype=float) for p in drawn],
        labels=[f"sample {p['sample']}: class {p['explained_class']}" for p in drawn],
        title=f"Grad-CAM on {cam['layer']}",
    )
    caption = (
        f"relu(sum_c w_c A_c) on {cam['layer']} ({cam['grid'][0]}x{cam['grid'][1]} patches"
        f"{', [CLS] dropped' if cam['dropped_cls'] else ''}), w_c the token-mean gradient of the explained class"
    )
    return [("gradcam", "Grad-CAM", caption, figure)]


def _token_span(token: str, share: float, attribution: float, peak: float) -> str:
    strength = share / peak if peak > 0 else 0.0
    colour = "214,39,40" if attribution >= 0 else "31,119,180"  # red: for the explained class, blue: against it
    return (
        f'<span class="tok" style="background:rgba({colour},{strength:.3f})" '
        f'title="share {share:.3f}, attribution {attribution:.4g}">{page.esc(token)}</span>'
    )


def token_view_html(summary: dict[str, Any]) -> str:
    """The token view: per probe its tokens, each shaded by its share of ``|attribution|`` (red for, blue against the
    explained class); empty when no probe has token saliency."""
    probes = [p for p in summary["saliency"]["probes"] if p.get("tokens")]
    if not probes:
        return ""
    first = probes[0]["tokens"]
    method = "integrated gradients" if first["method"] == "integrated_gradients" else "gradient x input"
    parts = [
        "<h3>Token saliency</h3><style>.tok{padding:1px 3px;margin:1px;border-radius:3px;display:inline-block;"
        'font-family:"DejaVu Sans Mono",monospace;font-size:12px}.toks{margin:4px 0 10px 0;line-height:1.9}</style>',
        f'<p class="note">{page.esc(method)} on the output of <code>{page.esc(first["layer"])}</code>, '
        "summed over the hidden axis; each token shaded by its share of the probe's total |attribution| "
        "(red: raises the explained class, blue: lowers it; hover for numbers).</p>",
    ]
    for probe in probes:
        entry = probe["tokens"]
        peak = max(entry["share"], default=0.0)
        spans = "".join(
            _token_span(t, s, a, peak)
            for t, s, a in zip(entry["tokens"], entry["share"], entry["attribution"], strict=True)
        )
        parts.append(
            f"<div><b>sample {probe['sample']}</b> (target {probe['target']}, predicted {probe['predicted']}, "
            f'explaining {probe["explained_class"]})<div class="toks">{spans}</div></div>'
        )
    return "".join(parts)
