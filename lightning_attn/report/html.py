"""Helpers of the self-contained HTML pages (the report, the comparison, the attention explorer).

One file, no network access: figures are embedded as ``data:image/png;base64`` URIs, style and script are
inline. The pages are Jinja2 templates under ``templates/`` (autoescape on: every value is escaped unless marked
safe here: the page's own CSS and JavaScript, JSON made inert by :func:`script_json`, HTML built by
:func:`table_html`/:func:`figure_html`, which escape every value). Tables with ``class="sortable"`` sort on a click
of their header (numbers numerically, text alphabetically; again to reverse; ``templates/sortable.js``). On
``window.onload`` the page checks itself and writes the result into ``<div id="checks">`` (``data-images``,
``data-images-loaded`` = images with ``naturalWidth > 0``, ``data-rows`` = rows of the ``#samples`` table,
``data-expected-rows``, ``data-status`` = ``ok``/``fail``); opened as ``page.html#selftest`` it also sorts the
``#samples`` table by confidence and records whether the column came out ordered (``data-sort``). Headless browsers
can read these with ``--dump-dom``.
"""

from __future__ import annotations

import base64
import functools
import html
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

__all__ = ["asset", "cell", "environment", "esc", "figure_html", "script_json", "table_html"]


@functools.cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the page templates (``lightning_attn/report/templates``), autoescape on."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lightning_attn.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@functools.cache
def asset(name: str) -> Markup:
    """A CSS or JavaScript file of ``templates/``, verbatim (our own code: safe to inline)."""
    return Markup(resources.files("lightning_attn.report").joinpath("templates", name).read_text(encoding="utf-8"))


def script_json(value: Any) -> Markup:
    """``value`` as JSON that is inert inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` as
    ``\\u`` escapes, so no ``</script>`` or comment opener in a name can end the element."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


STYLE = asset("style.css")
SCRIPT = asset("sortable.js")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits (integers as they are); ``None`` to an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.4g}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() != ""


def table_html(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    table_id: str | None = None,
    sortable: bool = True,
    row_class: Any = None,
) -> str:
    """An HTML table (numbers right-aligned and sorted numerically; exact value kept in ``data-v``)."""
    parts = [
        f'<table{f" id={json.dumps(table_id)}" if table_id else ""} class="{"sortable" if sortable else "plain"}">',
        "<thead><tr>",
        *(f"<th>{esc(c)}</th>" for c in columns),
        "</tr></thead><tbody>",
    ]
    for row in rows:
        parts.append(row_html(row, row_class(row) if row_class else None))
    parts.append("</tbody></table>")
    return "".join(parts)


def cell(value: Any) -> tuple[str, str | None]:
    """A table cell as ``(text, exact)``: a number (also one written as text) shown to 4 significant digits
    (integers as they are) with its exact value kept for sorting; anything else as text with ``exact`` ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value), repr(value)
    if isinstance(value, str) and _is_number(value):
        stripped = value.strip()
        return (stripped if stripped.lstrip("+-").isdigit() else fmt(float(stripped))), stripped
    return (value if isinstance(value, str) else fmt(value)), None


def row_html(row: Sequence[Any], css_class: str | None = None) -> str:
    cells = []
    for value in row:
        text, exact = cell(value)
        cells.append(
            f"<td>{esc(text)}</td>" if exact is None else f'<td class="num" data-v="{esc(exact)}">{esc(text)}</td>'
        )
    klass = f' class="{css_class}"' if css_class else ""
    return f"<tr{klass}>{''.join(cells)}</tr>"


def figure_html(title: str, png: bytes, caption: str = "") -> str:
    """An ``<img>`` with the PNG inline as base64 (no file or network access needed)."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{esc(title)}</b>{(' — ' + esc(caption)) if caption else ''}</figcaption></figure>"
    )
