"""Render analyzer :class:`Result` objects as one self-contained HTML page, a JSON twin and CSV tables.

Why this shape (see /work/shared/research/peers.md §3): a summary with alerts comes first, as in
ydata-profiling's overview; every number also goes to ``results.json`` so runs can be diffed without
parsing HTML (ydata#224); large tables are truncated in the page and written in full as CSV, and
figures are small PNGs, so the page stays a few MB and opens in any browser (ydata#1579, Evidently#15);
nothing is fetched from the network (no CDN, no web fonts); a "Reproduce" section echoes the command,
resolved config, versions, input fingerprint and timings (mergekit's card, lm-eval's results JSON).

Every string that comes from inputs or results is passed through :func:`html.escape` — ids, file
names, labels, captions and notes may hold anything, including markup. The output is deterministic:
the same results and ``run_info`` give the same bytes (no clock is read here).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import shlex
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsa.atomic import write_bytes
from wsa.reports.assets import CSS, ERROR_JS, SORT_JS
from wsa.results import Figure, Metric, Result, Table, json_safe

_MIDDOT = " \u00b7 "

#: Above this size the summary warns that the page may be slow to open (ydata-profiling's lesson).
MAX_REPORT_BYTES = 20 * 1024 * 1024

# run_info keys rendered in dedicated places; every other key is listed under "Inputs and environment".
_DEDICATED_KEYS = frozenset(
    {"title", "input_name", "headline", "warnings", "command", "config", "versions", "timings_s", "timings"}
)


def write_report(results: Sequence[Result], run_info: Mapping[str, Any], out: str | Path) -> Path:
    """Write ``index.html``, ``results.json`` and one CSV per table into ``out``; return the index path.

    Parameters
    ----------
    results : sequence of Result
        In the order they should appear (the order the analyzers ran).
    run_info : mapping
        What the run knows about itself, echoed in the summary and the "Reproduce" section. Keys read:
        ``title`` (input name in the page title), ``headline`` (mapping label -> value, shown as summary
        cards), ``warnings`` (list of run-level alerts; when absent, the results' warnings are listed),
        ``command`` (argv list or string), ``config`` (mapping or TOML/JSON text), ``versions``
        (mapping), ``timings_s`` (mapping step/analyzer name -> seconds). Any other key (inputs, store
        fingerprint, platform, ...) is listed as is. Must be JSON-serialisable after cleaning.
    out : str or Path
        Report folder, created if missing. Files are written atomically; ``index.html`` last, so its
        presence means the folder is complete.

    Returns
    -------
    Path
        ``out / "index.html"``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_info = dict(run_info)
    results = [_note_nonfinite(r) for r in results]

    csv_names = _csv_names(results)
    for (i, j), filename in csv_names.items():
        write_bytes(out / filename, _csv_bytes(results[i].tables[j]))

    payload = {"run": json_safe(run_info), "results": [r.to_json() for r in results]}
    text = json.dumps(payload, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    write_bytes(out / "results.json", text.encode("utf-8"))

    page = _render_page(results, run_info, csv_names, size_alert=None)
    if len(page) > MAX_REPORT_BYTES:
        alert = (
            f"This page is {len(page) / 2**20:.1f} MB (over {MAX_REPORT_BYTES // 2**20} MB) and may open slowly; "
            "lower the number or resolution of figures, or the max_rows_in_report of large tables."
        )
        page = _render_page(results, run_info, csv_names, size_alert=alert)
    index = out / "index.html"
    write_bytes(index, page)
    return index


# ---------------------------------------------------------------------------------------------- files


def _note_nonfinite(result: Result) -> Result:
    """Never silently: a result holding NaN/Inf gets a note saying how many and how they are written."""
    from dataclasses import replace

    bad = count_nonfinite(result)
    if not bad:
        return result
    note = (
        f"{bad:,} non-finite value(s) (NaN/Inf) in this section are written as null in results.json, as empty "
        "CSV cells and as '\u2014' or 'n/a' on this page."
    )
    return replace(result, notes=(*result.notes, note))


def count_nonfinite(value: Any, _depth: int = 0) -> int:
    """How many NaN/±Inf floats a result (or any nesting of dicts, lists, arrays and dataclasses) holds."""
    import numpy as np

    if _depth > 50:
        return 0
    if isinstance(value, Result):
        parts: list[Any] = [value.metrics, value.tables, dict(value.data)]
        return sum(count_nonfinite(p, _depth + 1) for p in parts)
    if isinstance(value, Metric):
        return count_nonfinite([value.value, value.chance, value.ci], _depth + 1)
    if isinstance(value, Table):
        return count_nonfinite(value.rows, _depth + 1)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            return int(value.size - np.isfinite(value).sum())
        if value.dtype == object:
            return sum(count_nonfinite(v, _depth + 1) for v in value.ravel().tolist())
        return 0
    if isinstance(value, (float, np.floating)):
        return 0 if math.isfinite(float(value)) else 1
    if isinstance(value, Mapping):
        return sum(count_nonfinite(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(count_nonfinite(v, _depth + 1) for v in value)
    return 0


def _safe_filename(text: str) -> str:
    """Names come from analyzers (and may echo inputs): keep them to one harmless path component."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return name or "table"


def _csv_names(results: Sequence[Result]) -> dict[tuple[int, int], str]:
    """(result index, table index) -> ``<analyzer>_<table>.csv`` for tables with ``write_csv``.

    Collisions (two results of one analyzer, names equal after sanitising) get ``-2``, ``-3``, ...
    """
    names: dict[tuple[int, int], str] = {}
    used: set[str] = {"results.json", "index.html"}
    for r, result in enumerate(results):
        for i, table in enumerate(result.tables):
            if not table.write_csv:
                continue
            stem = f"{_safe_filename(result.analyzer)}_{_safe_filename(table.name)}"
            name, n = f"{stem}.csv", 1
            while name.lower() in used:
                n += 1
                name = f"{stem}-{n}.csv"
            used.add(name.lower())
            names[(r, i)] = name
    return names


#: A text cell starting with one of these opens as a formula in spreadsheet programs (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    """Numbers as numbers; text from inputs (file names, metadata, label names) never as a formula.

    Following OWASP's advice on CSV injection, a text cell (column headers included) that starts with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``, which spreadsheet
    programs read as "this is text" (also text such as ``"-1"``: it came from an input as text). Numbers
    (int, float, a negative one too) are written unchanged; NaN/Inf are written as empty cells
    (``write_report`` notes how many).
    """
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, (int, bool)):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_field(cell: str) -> str:
    """RFC 4180 quoting. Unlike :mod:`csv` with a ``\\n`` terminator, a lone CR is quoted too: an id holding
    ``\\r`` must not start a new row in the reader."""
    if any(ch in cell for ch in ',"\r\n'):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def _csv_line(cells: Sequence[str]) -> str:
    if len(cells) == 1 and cells[0] == "":
        return '""\n'  # a row of one empty cell is not a blank line
    return ",".join(_csv_field(c) for c in cells) + "\n"


def _csv_bytes(table: Table) -> bytes:
    buf = io.StringIO()
    buf.write(_csv_line([_csv_cell(c) for c in table.columns]))
    for row in table.rows:
        buf.write(_csv_line([_csv_cell(json_safe(v)) for v in row]))
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------------------ formatting


def _e(value: Any) -> str:
    """Escape for both text and attribute positions (quotes included)."""
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    """Fixed, locale-free number formatting so the same numbers always give the same bytes."""
    value = json_safe(value)
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _png_size(png: bytes) -> tuple[int, int] | None:
    """Width and height from the IHDR chunk, so the browser reserves space before decoding."""
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        return struct.unpack(">II", png[16:24])
    return None


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f"<p>{_e(p)}</p>" for p in parts)


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td class=mono>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping) and value:
        rows: list[tuple[str, Any]] = []
        for k in sorted(value, key=str):
            rows.extend(_flatten(f"{prefix}.{k}" if prefix else str(k), value[k]))
        return rows
    return [(prefix, value)]


# ----------------------------------------------------------------------------------------------- page


def _render_page(
    results: Sequence[Result],
    run_info: Mapping[str, Any],
    csv_names: Mapping[tuple[int, int], str],
    size_alert: str | None,
) -> bytes:
    title = run_info.get("title") or run_info.get("input_name") or "analysis"
    section_ids = _section_ids(results)
    timings = run_info.get("timings_s") or run_info.get("timings") or {}
    versions = run_info.get("versions") or {}
    subtitle = f"{len(results)} analyses"
    if isinstance(versions, Mapping) and versions.get("wsa"):
        subtitle = f"wsa {versions['wsa']} \u00b7 {subtitle}"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network at all: everything the page needs is inline, and the policy enforces it.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>wsa report \u2014 {_e(title)}</title>",
        f"<script>{ERROR_JS}</script>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        '<header class="top"><div class="inner">',
        f"<h1>wsa report \u2014 {_e(title)}</h1>",
        f"<p>{_e(subtitle)}</p>",
        "</div></header>",
        "<main>",
        _summary(results, run_info, section_ids, size_alert),
        _toc(results, section_ids),
    ]
    first_figure = 1  # figures are numbered through the whole report, so "Figure 3" is unambiguous
    for r, result in enumerate(results):
        tables_csv = {j: name for (i, j), name in csv_names.items() if i == r}
        parts.append(_section(result, section_ids[r], tables_csv, timings, first_figure))
        first_figure += len(result.figures)
    parts.append(_reproduce(run_info, timings))
    parts.append("</main>")
    parts.append(
        "<footer>Generated by wsa. This file is self-contained and works offline, which does not make it safe to "
        "share: it may show images generated from adapters of real people. All numbers are in "
        '<a href="results.json">results.json</a>.</footer>'
    )
    parts.append(f"<script>{SORT_JS}</script>")
    parts.append("</body>")
    parts.append("</html>")
    return ("\n".join(parts) + "\n").encode("utf-8")


def _section_ids(results: Sequence[Result]) -> list[str]:
    ids: list[str] = []
    used: set[str] = {"summary", "contents", "reproduce"}
    for result in results:
        base = f"r-{_slug(result.analyzer)}"
        sid, n = base, 1
        while sid in used:
            n += 1
            sid = f"{base}-{n}"
        used.add(sid)
        ids.append(sid)
    return ids


def _summary(
    results: Sequence[Result], run_info: Mapping[str, Any], section_ids: Sequence[str], size_alert: str | None
) -> str:
    headline = run_info.get("headline") or {}
    items = list(headline.items()) if isinstance(headline, Mapping) else [tuple(x) for x in headline]
    cards = []
    for label, value in items:
        bad = str(label).lower() in {"warnings", "alerts"} and _is_number(value) and value > 0
        text_cls = "" if _is_number(value) else " text"
        cards.append(
            f'<div class="card{" bad" if bad else ""}"><div class="label">{_e(label)}</div>'
            f'<div class="value{text_cls}">{_e(_fmt(value))}</div></div>'
        )

    if "warnings" in run_info:
        alerts = [(str(w), None) for w in run_info.get("warnings") or []]
    else:
        alerts = [(f"{r.analyzer}: {w}", sid) for r, sid in zip(results, section_ids, strict=True) for w in r.warnings]
    if size_alert:
        alerts.append((size_alert, None))
    if alerts:
        lis = "".join(
            f"<li>{_e(text)}{f' (<a href=#{anchor}>see section</a>)' if anchor else ''}</li>" for text, anchor in alerts
        )
        alert_html = (
            f'<div class="alerts" role="note"><h3><span class="icon" aria-hidden="true">\u26a0</span>'
            f"Alerts ({len(alerts)})</h3><ul>{lis}</ul></div>"
        )
    else:
        alert_html = '<div class="ok">No alerts: no analyzer raised a warning.</div>'
    return (
        '<section id="summary"><h2>Summary</h2>'
        f'<div class="cards">{"".join(cards)}</div>{alert_html}'
        '<p class="muted">Every number below is also in <a href="results.json">results.json</a>; '
        "full tables are CSV files next to this page. Click a table header to sort.</p></section>"
    )


def _toc(results: Sequence[Result], section_ids: Sequence[str]) -> str:
    items = []
    for result, sid in zip(results, section_ids, strict=True):
        badge = f' <span class="badge" title="warnings">\u26a0 {len(result.warnings)}</span>' if result.warnings else ""
        items.append(f'<li><a href="#{sid}">{_e(result.title or result.analyzer)}</a>{badge}</li>')
    items.append('<li><a href="#reproduce">Reproduce this run</a></li>')
    return f'<nav class="toc" id="contents" aria-label="Contents"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def _metric_card(metric: Metric) -> str:
    arrow = ""
    if metric.higher_is_better is True:
        arrow = '<span class="arrow up" title="higher is better" aria-label="higher is better">&uarr;</span>'
    elif metric.higher_is_better is False:
        arrow = '<span class="arrow down" title="lower is better" aria-label="lower is better">&darr;</span>'
    units = f' <span class="sub">{_e(metric.units)}</span>' if metric.units else ""
    value = "n/a" if json_safe(metric.value) is None else _fmt(metric.value)
    sub = []
    if metric.ci is not None:
        sub.append(f"CI [{_fmt(metric.ci[0])}, {_fmt(metric.ci[1])}]")
    if metric.chance is not None:
        sub.append(f"chance {_fmt(metric.chance)}")
    sub_html = f'<div class="sub">{_e(_MIDDOT.join(sub))}</div>' if sub else ""
    return (
        f'<div class="card"><div class="label">{_e(metric.name)}</div>'
        f'<div class="value">{_e(value)}{units}{arrow}</div>{sub_html}</div>'
    )


def _figure(fig: Figure, number: int, anchor: str) -> str:
    size = _png_size(fig.png)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (
        f'<figure id="{anchor}"><img src="{fig.data_uri}" alt="{_e(fig.caption or fig.name)}"{dims}>'
        f"<figcaption><b>Figure {number} ({_e(fig.name)}).</b> {_e(fig.caption)}</figcaption></figure>"
    )


def _cell(value: Any) -> str:
    value = json_safe(value)
    if _is_number(value):
        return f'<td class="num" data-v="{value!r}">{_e(_fmt(value))}</td>'
    if value is None:
        return '<td data-v="">\u2014</td>'
    if isinstance(value, bool):
        return f"<td>{_e(_fmt(value))}</td>"
    return f"<td>{_e(_fmt(value))}</td>"


def _table(table: Table, csv_name: str | None, anchor: str) -> str:
    shown = table.rows[: max(int(table.max_rows_in_report), 0)]
    numeric = [
        any(json_safe(row[j]) is not None for row in shown)
        and all(_is_number(json_safe(row[j])) or json_safe(row[j]) is None for row in shown)
        for j in range(len(table.columns))
    ]
    head = "".join(
        f'<th scope="col"{" class=num" if num else ""}><button type="button">{_e(c)}</button>'
        '<span class="dir" aria-hidden="true"></span></th>'
        for c, num in zip(table.columns, numeric, strict=True)
    )
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown)
    link = f'<a href="{_e(csv_name)}">{_e(csv_name)}</a>' if csv_name else None
    notes = []
    if len(shown) < len(table.rows):
        where = f"the full table is in {link}" if link else "the full table is in results.json"
        notes.append(
            f'<p class="truncated warning"><span class="icon" aria-hidden="true">\u2139</span>'
            f"Showing the first {len(shown):,} of {len(table.rows):,} rows; {where}. "
            "Sorting applies to the rows shown.</p>"
        )
    elif link:
        notes.append(f'<p class="truncated muted">CSV: {link}</p>')
    return (
        f'<div class="table" id="{anchor}"><p class="tablecap"><b>Table: {_e(table.name)}.</b> {_e(table.caption)}</p>'
        f'<div class="tablewrap"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"</div>{''.join(notes)}</div>"
    )


def _section(
    result: Result, sid: str, csv_names: Mapping[int, str], timings: Mapping[str, Any], first_figure: int
) -> str:
    parts = [
        f'<section class="result" id="{sid}">',
        f'<h2>{_e(result.title or result.analyzer)}<span class="name mono">{_e(result.analyzer)}</span></h2>',
        f'<div class="summary">{_paragraphs(result.summary)}</div>',
    ]
    if result.warnings:
        lis = "".join(f"<li>{_e(w)}</li>" for w in result.warnings)
        parts.append(
            f'<div class="warning" role="note"><b><span class="icon" aria-hidden="true">\u26a0</span>Warning'
            f"{'s' if len(result.warnings) > 1 else ''}</b><ul>{lis}</ul></div>"
        )
    if result.metrics:
        parts.append(f'<div class="cards">{"".join(_metric_card(m) for m in result.metrics)}</div>')
    for i, fig in enumerate(result.figures, start=1):
        parts.append(_figure(fig, first_figure + i - 1, f"{sid}-fig-{i}"))
    for i, table in enumerate(result.tables):
        parts.append(_table(table, csv_names.get(i), f"{sid}-table-{i + 1}"))
    if result.notes:
        parts.append("<h3>Notes</h3><ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in result.notes) + "</ul>")
    params = json.dumps(json_safe(dict(result.params)), sort_keys=True, indent=2, ensure_ascii=False)
    elapsed = timings.get(result.analyzer) if isinstance(timings, Mapping) else None
    elapsed_html = f"<p>Elapsed: {_e(_fmt(elapsed))} s</p>" if _is_number(elapsed) else ""
    parts.append(
        f"<details><summary>Parameters and timing</summary>{elapsed_html}<pre>{_e(params)}</pre></details></section>"
    )
    return "".join(parts)


def _reproduce(run_info: Mapping[str, Any], timings: Any) -> str:
    parts = ['<section id="reproduce"><h2>Reproduce</h2>']
    command = run_info.get("command")
    if isinstance(command, (list, tuple)):
        command = shlex.join(str(c) for c in command)
    parts.append("<h3>Command</h3>")
    parts.append(f"<pre>{_e(command)}</pre>" if command else '<p class="muted">Not recorded (run from Python).</p>')
    config = run_info.get("config")
    if config is not None:
        text = (
            config
            if isinstance(config, str)
            else json.dumps(json_safe(config), sort_keys=True, indent=2, ensure_ascii=False)
        )
        parts.append(f"<h3>Resolved configuration</h3><pre>{_e(text)}</pre>")
    versions = run_info.get("versions")
    if isinstance(versions, Mapping) and versions:
        parts.append("<h3>Versions</h3>" + _kv_table([(str(k), versions[k]) for k in sorted(versions, key=str)]))
    rest = [(k, run_info[k]) for k in sorted(run_info, key=str) if k not in _DEDICATED_KEYS]
    if rest:
        rows = [row for key, value in rest for row in _flatten(str(key), value)]
        parts.append("<h3>Inputs and environment</h3>" + _kv_table(rows))
    if isinstance(timings, Mapping) and timings:
        rows = [(str(k), f"{_fmt(v)} s" if _is_number(v) else v) for k, v in timings.items()]
        total = sum(v for v in timings.values() if _is_number(v))
        rows.append(("total", f"{_fmt(float(total))} s"))
        parts.append("<h3>Timings</h3>" + _kv_table(rows))
    parts.append("</section>")
    return "".join(parts)
