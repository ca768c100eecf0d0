"""What an epoch's statistics cover: the batches recorded and seen (:mod:`lightning_attn.callbacks.budget`) and the
rows counted per site, as the JSON outputs and the dashboards' table captions say it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["coverage_caption", "coverage_record", "site_rows"]


def site_rows(per_head: Tensor | Iterable[float]) -> int:
    """The rows a site's statistics cover: the most rows any of its heads counted (NaN and missing heads left out;
    heads of one site see the same rows unless a mask empties a row for some heads only).

    >>> site_rows([96.0, 96.0, float("nan")]), site_rows([])
    (96, 0)
    """
    values = per_head.detach().flatten().tolist() if isinstance(per_head, Tensor) else list(per_head)
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return round(max(finite, default=0.0))


def coverage_record(coverage: Mapping[str, int], rows: Mapping[str, Tensor | Iterable[float]]) -> dict[str, Any]:
    """``{"batches": recorded, "batches_seen": seen, "rows": {site: rows}}``: ``coverage`` (the budget's counts)
    with the rows of each site (:func:`site_rows` of its per-head row counts).

    >>> coverage_record({"batches": 8, "batches_seen": 48}, {"l0": [96.0, 96.0]})
    {'batches': 8, 'batches_seen': 48, 'rows': {'l0': 96}}
    """
    return {**coverage, "rows": {site: site_rows(per_head) for site, per_head in rows.items()}}


def coverage_caption(coverage: Mapping[str, Any], overhead_budget: float | None = None) -> str:
    """One line for a table: the batches recorded of those seen, the budget when one applied, the rows per site.

    >>> coverage_caption({"batches": 8, "batches_seen": 48, "rows": {"a": 96, "b": 80}}, 0.2)
    'recorded 8 of 48 batches (budget 20%), 80 to 96 rows per site'
    >>> coverage_caption({"batches": 5, "batches_seen": 5, "rows": {"a": 60}})
    'recorded 5 of 5 batches, 60 rows per site'
    """
    line = f"recorded {coverage['batches']} of {coverage['batches_seen']} batches"
    if overhead_budget is not None:
        line += f" (budget {overhead_budget:.0%})"
    rows = sorted(set(coverage.get("rows", {}).values()))
    if rows:
        line += f", {rows[0]} rows per site" if len(rows) == 1 else f", {rows[0]} to {rows[-1]} rows per site"
    return line
