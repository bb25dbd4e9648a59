"""A header-only pass over a collection: each adapter's family and per-module ranks, without its tensors.

Why before the layout: a folder may mix families (one store each) and ranks (the gauge-fixed
representation pads every module to the collection's largest rank), and both must be known before
the first row is written. Headers are a few kilobytes, so this costs a small fraction of the ingest;
files that repeat one header (a zoo written by one trainer) are resolved once.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from wsa.errors import WsaError
from wsa.formats._tensorfile import header_only
from wsa.store.discover import Source

UNKNOWN_FAMILY = "unknown"


@dataclass(frozen=True)
class Scanned:
    """What the header says: ``family`` (``unknown`` when no family fits), ``ranks`` per module, or a ``problem``."""

    family: str = UNKNOWN_FAMILY
    ranks: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    candidates: tuple[str, ...] = ()  # other families the names also fit


def _header_key(src: Source) -> bytes | None:
    """The bytes that decide what a header-only read gives: config files whole, safetensors headers."""
    h = hashlib.sha256()
    for f in src.files:
        try:
            with f.open("rb") as fh:
                if f.suffix == ".safetensors":
                    head = fh.read(8)
                    if len(head) < 8:
                        return None
                    (n,) = struct.unpack("<Q", head)
                    if n > 100_000_000:
                        return None
                    h.update(head + fh.read(n))
                elif f.suffix == ".json":
                    h.update(fh.read())
                else:
                    return None  # pickles: no cheap header
        except OSError:
            return None
        h.update(str(f.name).encode())
    return h.digest()


def scan_one(src: Source, cache: dict[bytes, Scanned] | None = None) -> Scanned:
    if src.loader is not None:  # dataset rows: one layout, SD 1.5 modules (w2w); read from the dataset itself
        try:
            adapter = src.load()
        except WsaError as exc:
            return Scanned(problem=str(exc).removeprefix(f"{src.path}: "))
        return Scanned(adapter.family or UNKNOWN_FAMILY, {n: m.rank for n, m in adapter.modules.items()})
    key = _header_key(src) if cache is not None else None
    if key is not None and cache is not None and key in cache:
        return cache[key]
    try:
        with header_only():
            adapter = src.load()
        ranks = {n: m.rank for n, m in adapter.modules.items()}
        got = Scanned(adapter.family or UNKNOWN_FAMILY, ranks, None, adapter.family_candidates)
    except WsaError as exc:
        got = Scanned(problem=str(exc).removeprefix(f"{src.path}: "))
    except (OSError, ValueError, RuntimeError) as exc:  # a file that changed under us: the real read says what
        got = Scanned(problem=f"unreadable ({type(exc).__name__}: {str(exc)[:200]})")
    if key is not None and cache is not None:
        cache[key] = got
    return got


#: Scans already done in this process, by (path, size+mtime of its files). `wsa analyze` on a folder of several
#: families scans it to find the groups, then once per family inside ingest: the same files, the same answers.
_SEEN: dict[tuple[str, str], Scanned] = {}
_SEEN_MAX = 200_000


def scan(sources: Iterable[Source], workers: int = 2, progress: bool = True) -> list[Scanned]:
    """:func:`scan_one` for every source, in order (threads; a repeated header is resolved once, an unchanged
    file already scanned in this process is not read again)."""
    items = list(sources)
    cache: dict[bytes, Scanned] = {}
    cacheable = not _forced()

    def one(src: Source) -> Scanned:
        key = (str(src.path), repr(src.fingerprint())) if cacheable and src.loader is None else None
        if key is not None and key in _SEEN:
            return _SEEN[key]
        got = scan_one(src, cache)
        if key is not None:
            if len(_SEEN) > _SEEN_MAX:
                _SEEN.clear()
            _SEEN[key] = got
        return got

    with ThreadPoolExecutor(max_workers=workers) as pool:
        bar = tqdm(total=len(items), desc="scan", unit="adapter", disable=None if progress else True, file=sys.stderr)
        out = []
        for got in pool.map(one, items, chunksize=64):
            out.append(got)
            bar.update(1)
        bar.close()
    return out


def _forced() -> bool:
    from wsa.families.resolve import _FORCED

    return _FORCED.get() is not None


def family_groups(scanned: list[Scanned]) -> dict[str, list[int]]:
    """``{family: [source indices]}`` over the readable sources, families in order of size."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scanned):
        if s.problem is None:
            groups.setdefault(s.family, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def describe_groups(groups: dict[str, list[int]]) -> str:
    return ", ".join(f"{fam} ({len(ix)} file{'s' if len(ix) != 1 else ''})" for fam, ix in groups.items())


def max_ranks(scanned: Iterable[Scanned]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in scanned:
        for name, r in s.ranks.items():
            if r > out.get(name, 0):
                out[name] = r
    return out


__all__ = ["UNKNOWN_FAMILY", "Scanned", "describe_groups", "family_groups", "max_ranks", "scan", "scan_one"]
