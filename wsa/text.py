"""Strings from input files made safe to print: control and bidi characters shown as escapes.

Why: a header value or a file name is the file author's text; printed raw, ``\\x1b[…`` sequences
re-colour or rewrite the user's terminal and U+202E reverses what they read.
"""

from __future__ import annotations

import unicodedata


def terminal_safe(value: object, limit: int = 300) -> str:
    """``value`` as one printable line: control/format characters escaped, at most ``limit`` characters."""
    text = str(value)
    out = []
    for ch in text:
        if ch in "\t" or not unicodedata.category(ch).startswith("C"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    line = "".join(out)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (its first), at most ``limit`` characters; its type if it has none.

    Why: third-party errors (safetensors, json, numpy) span lines; wsa's messages are one line each.
    """
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
