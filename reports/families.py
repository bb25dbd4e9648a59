"""The top page of a multi-family analysis: one section per model family, and every file left out.

Why a page of its own: a folder that mixes SD 1.5, SDXL and Flux LoRAs has no one space (their
modules differ), so ``wsa analyze`` fits one per family under ``OUT/<family>/``; this page says what
was found, links each family's report with its headline, and lists the files no family took.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from wsa.atomic import write_bytes

_CSS = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "section{border:1px solid #ddd;border-radius:8px;padding:0.5rem 1rem;margin:1rem 0}"
    "table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:2px 10px;text-align:left}"
    ".err{color:#a00}.muted{color:#666}"
)


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def write_family_index(
    out: str | Path,
    entries: Sequence[Mapping[str, Any]],
    problems: Sequence[tuple[str, str]],
    run: Mapping[str, Any],
) -> Path:
    """Write ``out/index.html`` and ``out/results.json`` for per-family ``entries``; return the index path.

    Each entry: ``family``, ``adapters``, ``example`` (a file), and ``report`` (relative link) with
    ``headline`` or ``error`` (why that family has no report). ``problems``: files no family could take.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for e in entries:
        head = e.get("headline") or {}
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in head.items())
        if "report" in e:
            body = f'<p><a href="{_e(e["report"])}">Open the {_e(e["family"])} report</a></p><table>{rows}</table>'
        else:
            body = f'<p class="err">No report: {_e(e.get("error", "not analysed"))}</p>'
        sections.append(
            f'<section id="family-{_e(e["family"])}"><h2>{_e(e["family"])}</h2>'
            f'<p class="muted">{_e(e["adapters"])} file(s) of this family, e.g. {_e(e["example"])}; its space holds '
            "those that share one module layout (its report's first section lists the others, with why)</p>"
            f"{body}</section>"
        )
    if problems:
        lines = "".join(f"<tr><td>{_e(p)}</td><td>{_e(r)}</td></tr>" for p, r in problems)
        sections.append(
            '<section id="left-out"><h2>Files no family took</h2>'
            f"<table><tr><th>file</th><th>reason</th></tr>{lines}</table></section>"
        )
    listing = ", ".join(f"{e['family']} ({e['adapters']})" for e in entries)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>wsa report — {len(entries)} model families</title><style>{_CSS}</style></head><body>"
        f"<h1>wsa report — {len(entries)} model families</h1>"
        f"<p>The inputs hold adapters of several model families: {_e(listing)}. Their modules differ, so each "
        "family has its own space and report below.</p>"
        f"{''.join(sections)}</body></html>\n"
    )
    payload = {"run": dict(run), "families": [dict(e) for e in entries], "problems": [list(p) for p in problems]}
    write_bytes(out / "results.json", (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())
    index = out / "index.html"
    write_bytes(index, page.encode("utf-8"))
    return index
