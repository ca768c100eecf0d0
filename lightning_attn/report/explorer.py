"""The interactive attention explorer: the probe samples' attention maps packed for the page and the standalone
explorer page (``templates/explorer.html.j2``; the report embeds the same widget, ``templates/_explorer.html.j2``).

The maps travel inline, no network: every map of every (epoch, sample, site) concatenated, zlib-deflated and
base64-encoded; the browser inflates them with its own ``DecompressionStream``. Maps are exact float32 while their
values number at most :data:`MAX_EXACT_VALUES`; above that they are quantized to ``round(L a) / L`` with L = 255
(one byte each, absolute error at most 1/510), or coarser (63, 15 levels) when the packed data would exceed
:data:`MAX_BYTES`, so that a BERT-base explorer (12 x 12 heads, 4 samples, 128 tokens: 9.4 million weights) stays
under 8 MB whatever the weights (deflate stores 15 levels in at most about 4 bits each). The page's JavaScript API
(``window.lightningAttn``) is described in ``templates/explorer.js``.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_attn.report import html as page

__all__ = [
    "MAX_BYTES",
    "MAX_EXACT_VALUES",
    "QUANTIZATION_LEVELS",
    "explorer_context",
    "explorer_data",
    "write_explorer",
]

#: Maps with at most this many weights in all are stored as exact float32, larger ones as one byte per weight.
MAX_EXACT_VALUES = 1 << 21
#: Quantized maps use the first of these numbers of levels (``round(levels * a)``) whose packed data fits MAX_BYTES.
QUANTIZATION_LEVELS = (255, 63, 15)
#: Budget of the packed (deflated, base64) quantized maps in bytes.
MAX_BYTES = 6_000_000


def explorer_data(
    maps: Mapping[int, Mapping[int, Mapping[str, np.ndarray]]],
    *,
    titles: Mapping[int, str] | None = None,
    tokens: Mapping[int, Sequence[str]] | None = None,
    max_exact_values: int = MAX_EXACT_VALUES,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """The explorer's payload from ``maps[epoch][sample][site]`` ([heads, queries, keys] post-softmax weights), with
    per-sample ``titles`` and ``tokens`` (labels of the positions where a map's length matches). Sites are ordered by
    first appearance (forward order), samples and epochs ascending."""
    epochs = sorted(maps)
    samples = sorted({s for per_epoch in maps.values() for s in per_epoch})
    sites = list(dict.fromkeys(site for e in epochs for s in sorted(maps[e]) for site in maps[e][s]))
    heads = {site: 0 for site in sites}
    blocks: list[np.ndarray] = []
    chunks: list[dict[str, int]] = []
    offset = 0
    for e, epoch in enumerate(epochs):
        for s, sample in enumerate(samples):
            for layer, site in enumerate(sites):
                array = maps[epoch].get(sample, {}).get(site)
                if array is None:
                    continue
                array = np.asarray(array, dtype=np.float32)
                if array.ndim != 3:
                    raise ValueError(f"map of {site!r} (sample {sample}) has shape {array.shape}, not [H, Q, K]")
                heads[site] = max(heads[site], array.shape[0])
                h, q, k = array.shape
                chunks.append({"e": e, "s": s, "l": layer, "h": h, "q": q, "k": k, "o": offset})
                blocks.append(array.reshape(-1))
                offset += array.size
    flat = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if flat.size <= max_exact_values:
        levels, data = 0, _pack(flat.astype("<f4"))
    else:
        for levels in QUANTIZATION_LEVELS:  # the finest quantization whose page stays within max_bytes
            data = _pack(np.rint(np.clip(flat, 0.0, 1.0) * levels).astype(np.uint8))
            if len(data) <= max_bytes:
                break
    return {
        "epochs": [int(e) for e in epochs],
        "samples": [
            {
                "id": int(sample),
                "title": (titles or {}).get(sample, f"sample {sample}"),
                "tokens": [str(t) for t in (tokens or {}).get(sample, [])] or None,
            }
            for sample in samples
        ],
        "sites": [{"name": site, "heads": heads[site]} for site in sites],
        "chunks": chunks,
        "encoding": "uint8" if levels else "float32",
        "levels": levels,
        "data": data,
    }


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(array.tobytes(), 6)).decode("ascii")


def explorer_context(data: Mapping[str, Any]) -> dict[str, Any]:
    """The template variables of the explorer widget for ``data`` (:func:`explorer_data`)."""
    note = (
        "Exact float32 weights."
        if data["encoding"] == "float32"
        else f"Weights quantized to steps of 1/{data['levels']} to keep the page small."
    )
    return {
        "explorer_json": page.script_json(data),
        "explorer_js": page.asset("explorer.js"),
        "explorer_note": f"{len(data['samples'])} probe samples, {len(data['sites'])} attention sites, "
        f"{len(data['epochs'])} epoch(s). {note}",
    }


def write_explorer(path: str | Path, data: Mapping[str, Any], *, title: str = "Attention explorer") -> Path:
    """Write the standalone explorer page of ``data`` (:func:`explorer_data`) to ``path`` (one file, no network:
    also what goes to W&B as ``wandb.Html``)."""
    path = Path(path)
    template = page.environment().get_template("explorer.html.j2")
    path.write_text(
        template.render(
            title=title,
            subtitle="lightning_attn attention explorer",
            style=page.asset("style.css"),
            **explorer_context(data),
        ),
        encoding="utf-8",
    )
    return path
