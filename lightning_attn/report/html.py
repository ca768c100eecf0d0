"""The self-contained HTML page of the explainability report.

One file, no network access: figures are embedded as ``data:image/png;base64`` URIs, style and script are
inline. Tables with ``class="sortable"`` sort on a click of their header (numbers numerically, text
alphabetically; again to reverse). On ``window.onload`` the page checks itself and writes the result into
``<div id="checks">`` (``data-images``, ``data-images-loaded`` = images with ``naturalWidth > 0``,
``data-rows`` = rows of the per-sample table, ``data-expected-rows``, ``data-status`` = ``ok``/``fail``);
opened as ``report.html#selftest`` it also sorts the per-sample table by confidence and records whether
the column came out ordered (``data-sort``). Headless browsers can read these with ``--dump-dom``.

The per-sample table is streamed from the per-sample CSV into the page row by row (never held in memory).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

__all__ = ["figure_html", "nested_html", "table_html", "write_page"]

STYLE = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dee7; --accent:#3558a8; --bg:#ffffff; --soft:#f5f7fb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
header { background: #1f2a44; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header .sub { color: #c5cde0; font-size: 13px; }
main { padding: 8px 28px 40px 28px; max-width: 1500px; }
nav { margin: 12px 0; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
section { margin: 26px 0; }
h2 { font-size: 18px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; min-width:
140px; }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 12px 0; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: var(--soft); position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-sort="asc"]::after { content: " \\25B2"; }
table.sortable th[data-sort="desc"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.wrong td { background: #fdf0f0; }
.scroll { max-height: 640px; overflow: auto; border: 1px solid var(--line); }
figure { display: inline-block; margin: 8px 16px 16px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; max-width: 720px; }
.note { color: var(--muted); font-size: 12.5px; }
.warn { color: #8a4b00; background: #fff6e5; border: 1px solid #f1d39a; padding: 6px 10px; border-radius: 4px; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
#checks { color: var(--muted); font-size: 11px; margin-top: 30px; }
"""

SCRIPT = """
(function () {
  function key(cell) {
    var raw = cell.getAttribute('data-v');
    if (raw === null) raw = cell.textContent;
    var text = raw.trim();
    var num = Number(text);
    if (text !== '' && isFinite(num)) return {n: true, v: num};
    return {n: false, v: text.toLowerCase()};
  }
  function sortTable(table, col, ascending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      var r;
      if (x.n && y.n) r = x.v - y.v;
      else if (x.n !== y.n) r = x.n ? -1 : 1;
      else r = x.v < y.v ? -1 : (x.v > y.v ? 1 : 0);
      return ascending ? r : -r;
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (row) { fragment.appendChild(row); });
    body.appendChild(fragment);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) th.setAttribute('data-sort', ascending ? 'asc' : 'desc'); else th.removeAttribute('data-sort');
    });
  }
  function makeSortable(table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () {
        sortTable(table, col, th.getAttribute('data-sort') !== 'asc');
      });
    });
  }
  document.addEventListener('DOMContentLoaded', function () {
    Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), makeSortable);
  });
  window.addEventListener('load', function () {
    var checks = document.getElementById('checks');
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) loaded++;
    }
    var table = document.getElementById('samples');
    var rows = table && table.tBodies.length ? table.tBodies[0].rows.length : 0;
    var expected = Number(checks.getAttribute('data-expected-rows'));
    checks.setAttribute('data-images', String(images.length));
    checks.setAttribute('data-images-loaded', String(loaded));
    checks.setAttribute('data-rows', String(rows));
    var ok = loaded === images.length && rows === expected;
    if (table && window.location.hash === '#selftest') {
      var header = table.tHead.rows[0].cells, col = -1;
      for (var c = 0; c < header.length; c++) { if (header[c].textContent === 'confidence') col = c; }
      var sorted = col >= 0;
      if (sorted) {
        sortTable(table, col, true);
        var body = table.tBodies[0].rows;
        for (var r = 1; r < body.length; r++) {
          if (Number(body[r - 1].cells[col].textContent) > Number(body[r].cells[col].textContent)) { sorted = false;
          break; }
        }
      }
      checks.setAttribute('data-sort', sorted ? 'ok' : 'fail');
      ok = ok && sorted;
    }
    checks.setAttribute('data-status', ok ? 'ok' : 'fail');
    checks.textContent = 'self-check: ' + loaded + '/' + images.length + ' images loaded, ' + rows + '/' + expected +
      ' per-sample rows' + (ok ? ' (ok)' : ' (FAILED)');
  });
})();
"""


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


def row_html(row: Sequence[Any], css_class: str | None = None) -> str:
    cells = []
    for value in row:
        text = value if isinstance(value, str) else fmt(value)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and _is_number(value)
        ):
            exact = value if isinstance(value, str) else repr(value)
            if isinstance(value, str):
                text = value if value.strip().lstrip("+-").isdigit() else fmt(float(value))
            cells.append(f'<td class="num" data-v="{esc(exact)}">{esc(text)}</td>')
        else:
            cells.append(f"<td>{esc(text)}</td>")
    klass = f' class="{css_class}"' if css_class else ""
    return f"<tr{klass}>{''.join(cells)}</tr>"


def figure_html(title: str, png: bytes, caption: str = "") -> str:
    """An ``<img>`` with the PNG inline as base64 (no file or network access needed)."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{esc(title)}</b>{(' — ' + esc(caption)) if caption else ''}</figcaption></figure>"
    )


def nested_html(data: Any, *, max_rows: int = 400, max_inline: int = 24) -> str:
    """A two-column table of the scalar leaves of nested mappings/lists (``path``, ``value``); short lists of
    numbers inline, long ones summarized (every number is in the JSON file)."""
    rows: list[tuple[str, str]] = []

    def visit(value: Any, path: str) -> None:
        if len(rows) >= max_rows:
            return
        if isinstance(value, Mapping):
            if not value:
                rows.append((path, "{}"))
            for key, item in value.items():
                visit(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple)):
            flat = all(isinstance(v, (int, float)) or v is None for v in value)
            if flat and len(value) <= max_inline:
                rows.append((path, "[" + ", ".join("\u2013" if v is None else fmt(v) for v in value) + "]"))
            elif flat:
                numbers = [v for v in value if isinstance(v, (int, float))]
                summary = f"{len(value)} values" + (
                    f", min {fmt(min(numbers))}, max {fmt(max(numbers))}" if numbers else ""
                )
                rows.append((path, summary + " (all in report.json)"))
            else:
                for index, item in enumerate(value[:max_inline]):
                    visit(item, f"{path}[{index}]")
                if len(value) > max_inline:
                    rows.append((path, f"... {len(value) - max_inline} more entries (all in report.json)"))
        else:
            rows.append((path, fmt(value)))

    visit(data, "")
    note = f'<p class="note">first {max_rows} entries shown; all in report.json</p>' if len(rows) >= max_rows else ""
    return table_html(["key", "value"], rows, sortable=False) + note


def write_page(
    handle: IO[str],
    *,
    title: str,
    subtitle: str,
    meta: Mapping[str, str],
    nav: Sequence[tuple[str, str]],
    blocks: Iterable[str],
    samples_columns: Sequence[str],
    samples_rows: Iterable[Sequence[str]],
    expected_rows: int,
    total_rows: int,
    wrong_column: str | None = "correct",
) -> None:
    """Write the page to ``handle``: head, navigation, the given HTML ``blocks`` (sections), then the per-sample
    table streamed from ``samples_rows`` (``expected_rows`` of the ``total_rows`` samples shown)."""
    handle.write('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n')
    handle.write('<meta name="viewport" content="width=device-width, initial-scale=1">\n')
    for name, content in meta.items():
        handle.write(f'<meta name="{esc(name)}" content="{esc(content)}">\n')
    handle.write(f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head><body>\n")
    handle.write(f'<header><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div></header>\n<main>\n<nav>')
    handle.write("".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav))
    handle.write("</nav>\n")
    for block in blocks:
        handle.write(block)
        handle.write("\n")
    handle.write('<section id="per-sample"><h2>Per-sample explanations</h2>')
    if expected_rows < total_rows:
        handle.write(
            f'<p class="warn">The table shows the first {expected_rows} of {total_rows} samples '
            "(html_max_rows); samples.csv has all of them.</p>"
        )
    handle.write(
        '<p class="note">Click a column header to sort. Rows of wrong predictions are tinted. '
        "Top pairs: <code>query&gt;key:weight</code> of the head-averaged map.</p>"
    )
    handle.write('<div class="scroll"><table id="samples" class="sortable"><thead><tr>')
    handle.write("".join(f"<th>{esc(c)}</th>" for c in samples_columns))
    handle.write("</tr></thead><tbody>\n")
    wrong_index = (
        list(samples_columns).index(wrong_column)
        if wrong_column is not None and wrong_column in samples_columns
        else None
    )
    for row in samples_rows:
        wrong = wrong_index is not None and row[wrong_index] in ("0", "false", "False")
        handle.write(row_html(row, "wrong" if wrong else None))
        handle.write("\n")
    handle.write("</tbody></table></div></section>\n")
    handle.write(
        f'<div id="checks" data-status="pending" data-expected-rows="{int(expected_rows)}">self-check pending '
        "(needs JavaScript)</div>\n"
    )
    handle.write(f"</main>\n<script>{SCRIPT}</script>\n</body></html>\n")
