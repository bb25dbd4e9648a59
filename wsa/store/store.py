"""The on-disk weight matrix: ``matrix-<token>.npy`` (N × D, memory-mapped) + ``wsa_store.json``.

Format (version 1), all in one folder:

* ``wsa_store.json`` — ``wsa_format_version``, ``wsa_version``, ``repr``, ``dtype``, ``n_rows``,
  ``n_features``, ``matrix`` (file name), ``layout`` (modules → parts, offsets, shapes, rank, scale),
  ``rows`` (per row: ``id``, ``source``, ``files`` fingerprints, ``sha256``, ``format``, ``kinds``,
  ``n_params``, ``delta_norm``), ``problems`` (skipped files and why), ``config`` (the ingest options).
* ``matrix-<token>.npy`` — a standard NumPy ``.npy`` (C order, float32 or float16), so any tool can
  ``np.load(..., mmap_mode="r")`` it. A new build writes a new token and then swaps the manifest
  atomically, so a crash never leaves a manifest pointing at a half-written matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wsa.adapter import Adapter
from wsa.errors import StoreError
from wsa.store.layout import REPRESENTATIONS, Layout, _is_int
from wsa.store.representations import decode
from wsa.text import first_line

FORMAT_VERSION = 1
#: Largest float32 block :meth:`Store.iter_blocks` yields (two are in memory at once).
MAX_BLOCK_BYTES = 1 << 30
MANIFEST = "wsa_store.json"


class Store:
    """A built collection. ``matrix`` is read-only and memory-mapped; nothing is loaded eagerly.

    The manifest is input like any other file: it is validated whole on open (:func:`validate_manifest`),
    and the matrix it names must be a plain ``matrix-*.npy`` file inside the store folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                " (an unfinished ingest is there: run `wsa ingest` again to resume)"
                if (self.path / ".partial").exists()
                else ""
            )
            raise StoreError(f"not a wsa store (no {MANIFEST}){hint}", self.path)
        try:
            text = manifest_path.read_bytes().decode("utf-8")
            self.manifest: dict[str, Any] = json.loads(text)
        except OSError as exc:
            raise StoreError(f"cannot read {MANIFEST} ({exc.strerror or exc})", self.path) from None
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"{MANIFEST} is not valid JSON ({first_line(exc)})", self.path) from None
        self.layout: Layout = validate_manifest(self.manifest, self.path)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the representation and every row's (id, content sha256): changes iff the inputs change.

        The one identity of a store's contents: a fitted space and a report both record it, so either can
        tell whether it was made from this store.
        """
        h = hashlib.sha256(self.repr.encode())
        for row in self.rows:
            h.update(f"\0{row['id']}\0{row.get('sha256')}\n".encode())
        return h.hexdigest()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.manifest["rows"]

    @cached_property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @cached_property
    def _index(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.ids)}

    @property
    def repr(self) -> str:
        return self.manifest["repr"]

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def matrix_path(self) -> Path:
        return self.path / self.manifest["matrix"]

    def _checked_matrix_path(self) -> Path:
        """The matrix file, if it is a regular file inside the store (a FIFO or device would block readers)."""
        path = self.matrix_path
        name = self.manifest["matrix"]
        try:
            st = os.stat(path)
        except OSError as exc:
            raise StoreError(f"cannot open matrix file {name!r} ({exc.strerror or exc})", self.path) from None
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"matrix file {name!r} is not a regular file; the store is damaged (rebuild it)", self.path
            )
        if not _inside(path, self.path):
            raise StoreError(f"matrix file {name!r} resolves outside the store folder; refusing it", self.path)
        return path

    @cached_property
    def matrix(self) -> np.ndarray:
        """N × D, memory-mapped read-only (float32, or float16 if the store was built so)."""
        path = self._checked_matrix_path()
        try:
            mm = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot open matrix file {self.manifest['matrix']} ({first_line(exc)})", self.path
            ) from None
        if mm.shape != (len(self.ids), self.n_features):
            raise StoreError(f"matrix shape {mm.shape} does not match the manifest", self.path)
        if mm.dtype != np.dtype(self.manifest["dtype"]) or (mm.ndim == 2 and not mm.flags.c_contiguous):
            raise StoreError(
                f"matrix file is {mm.dtype} {'C' if mm.flags.c_contiguous else 'Fortran'} order; the manifest "
                f"says {self.manifest['dtype']} (C order); the store is damaged (rebuild it)",
                self.path,
            )
        return mm

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, key: int | str) -> int:
        if isinstance(key, str):
            try:
                return self._index[key]
            except KeyError:
                raise StoreError(f"no row with id {key!r}", self.path) from None
        if not -len(self) <= key < len(self):
            raise StoreError(f"row {key} out of range (store has {len(self)} rows)", self.path)
        return key % len(self)

    def row(self, key: int | str) -> np.ndarray:
        """One row as a float32 array (by position or id)."""
        return np.asarray(self.matrix[self.index(key)], dtype=np.float32)

    def to_adapter(self, key: int | str) -> Adapter:
        """The adapter a row stands for; ``Adapter.delta`` gives its exact ΔW."""
        i = self.index(key)
        return decode(self.row(i), self.layout, path=f"{self.path}#{self.ids[i]}")

    def read_rows(self, rows: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Rows by index as a float32 array, read with ``pread`` (runs of consecutive rows in one call).

        Why not the memory map: pages touched through a map stay resident (and count as the process's
        RSS) until the kernel needs them; a streaming pass over 26 GB would look like 26 GB of memory.
        ``out``: read straight into this array (e.g. a slice of a matrix being loaded) instead of a new one.
        """
        dtype = np.dtype(self.manifest["dtype"])
        row_bytes = self.n_features * dtype.itemsize
        if out is None:
            out = np.empty((len(rows), self.n_features), dtype=np.float32)
        elif out.shape != (len(rows), self.n_features) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(len(rows), self.n_features)}")
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise StoreError(f"row index out of range (store has {len(self)} rows)", self.path)
        matrix_path = self._checked_matrix_path()
        data_offset = self._data_offset
        try:
            fd = os.open(matrix_path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot open matrix file ({exc.strerror or exc})", matrix_path) from None
        try:
            k = 0
            while k < len(idx):
                run = 1
                while k + run < len(idx) and idx[k + run] == idx[k] + run:
                    run += 1
                offset = data_offset + int(idx[k]) * row_bytes
                if dtype == np.float32:  # straight into the result: one copy, not two
                    _pread_into(fd, memoryview(out[k : k + run]).cast("B"), offset, matrix_path)
                else:
                    data = os.pread(fd, run * row_bytes, offset)
                    if len(data) != run * row_bytes:
                        raise StoreError(f"matrix file ends early (wanted {run * row_bytes} bytes)", matrix_path)
                    out[k : k + run] = np.frombuffer(data, dtype=dtype).reshape(run, self.n_features)
                k += run
        finally:
            os.close(fd)
        return out

    @cached_property
    def _data_offset(self) -> int:
        """Where the rows start in the matrix file, after its header is checked against the manifest."""
        path = self._checked_matrix_path()
        try:
            with path.open("rb") as fh:
                version = np.lib.format.read_magic(fh)
                reader = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = reader(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise StoreError(f"matrix file header cannot be read ({first_line(exc)})", path) from None
        want = (len(self.ids), self.n_features)
        if tuple(shape) != want or fortran or dtype != np.dtype(self.manifest["dtype"]):
            raise StoreError(
                f"matrix header says {dtype} {tuple(shape)}{' Fortran order' if fortran else ''}; the manifest says "
                f"{self.manifest['dtype']} {want}; the store is damaged (rebuild it)",
                path,
            )
        return offset

    def iter_blocks(self, block_rows: int = 1024, rows: Sequence[int] | None = None):
        """Yield ``(start, float32 block)`` over the matrix in bounded memory (for streaming solvers).

        The next block is read by a background thread while the caller works on this one (``pread``
        and BLAS both release the GIL), so a pass costs about max(read, compute), not their sum;
        at most two blocks are in memory. A block holds at most :data:`MAX_BLOCK_BYTES` of float32 (fewer
        rows than asked when rows are wide: a DiT-sized LoRA is ~0.3 GB a row), so callers' row counts
        never decide the memory.
        """
        n = len(self) if rows is None else len(rows)
        block_rows = max(1, min(block_rows, MAX_BLOCK_BYTES // (4 * max(1, self.n_features))))
        starts = range(0, n, block_rows)

        def read(start: int) -> np.ndarray:
            idx = range(start, min(start + block_rows, n)) if rows is None else rows[start : start + block_rows]
            return self.read_rows(idx)

        if len(starts) < 2:
            for start in starts:
                yield start, read(start)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsa-read") as pool:
            ahead = pool.submit(read, starts[0])
            for i, start in enumerate(starts):
                block = ahead.result()
                if i + 1 < len(starts):
                    ahead = pool.submit(read, starts[i + 1])
                yield start, block

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n_rows={len(self)}, n_features={self.n_features}, repr={self.repr!r})"


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` (``preadv`` may return short counts)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise StoreError(f"matrix file ends early (wanted {len(buffer)} bytes at offset {offset})", path)
        done += got


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) is directly inside ``folder``."""
    try:
        return path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        return False


def is_matrix_name(name: object) -> bool:
    """A bare ``matrix-*.npy`` file name: no folder part, no ``..``, no NUL, nothing a path could escape with."""
    return (
        isinstance(name, str)
        and _MATRIX_NAME.fullmatch(name) is not None
        and ".." not in name
        and "/" not in name
        and "\\" not in name
    )


_MATRIX_NAME = re.compile(r"matrix-[A-Za-z0-9_.-]{1,128}\.npy")
_DTYPES = ("float32", "float16")


def validate_manifest(manifest: Any, where: str | Path) -> Layout:
    """Check every key of a store manifest the code reads; returns its layout.

    Each failure is one :class:`StoreError` naming the store and the key. Checked: a JSON object; the format
    version; ``repr``/``dtype`` among the known ones; ``n_rows``/``n_features`` non-negative integers matching
    the rows and the layout; ``matrix`` a bare ``matrix-*.npy`` name; the layout (:meth:`Layout.from_json`);
    ``rows`` objects with a unique non-empty string ``id`` and well-typed facts; ``problems``/``left_out``.
    """

    def fail(key: str, problem: str) -> StoreError:
        return StoreError(
            f"{MANIFEST} key {key!r}: {problem}; the manifest was edited or damaged (rebuild the store)", where
        )

    if not isinstance(manifest, dict):
        raise StoreError(f"{MANIFEST} is {type(manifest).__name__}, expected a JSON object", where)
    version = manifest.get("wsa_format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise StoreError(f"store format version {version!r}; this wsa reads version {FORMAT_VERSION}", where)
    for key in ("repr", "dtype", "n_rows", "n_features", "matrix", "layout", "rows"):
        if key not in manifest:
            raise fail(key, "is missing")
    if manifest["repr"] not in REPRESENTATIONS:
        raise fail("repr", f"is {manifest['repr']!r}, expected one of {', '.join(REPRESENTATIONS)}")
    if manifest["dtype"] not in _DTYPES:
        raise fail("dtype", f"is {manifest['dtype']!r}, expected one of {', '.join(_DTYPES)}")
    for key in ("n_rows", "n_features"):
        if not _is_int(manifest[key]) or manifest[key] < 0:
            raise fail(key, f"is {manifest[key]!r}, expected a non-negative integer")
    if not is_matrix_name(manifest["matrix"]):
        raise fail("matrix", f"is {manifest['matrix']!r}, expected a file name matrix-<token>.npy inside the store")
    layout = Layout.from_json(manifest["layout"], where, key="layout", file=MANIFEST)
    if layout.repr != manifest["repr"]:
        raise fail("layout", f"repr {layout.repr!r} differs from the store's {manifest['repr']!r}")
    if layout.n_features != manifest["n_features"]:
        raise fail("n_features", f"is {manifest['n_features']}, but the layout has {layout.n_features} columns")
    rows = manifest["rows"]
    if not isinstance(rows, list):
        raise fail("rows", f"is {type(rows).__name__}, expected a list")
    if len(rows) != manifest["n_rows"]:
        raise fail("n_rows", f"is {manifest['n_rows']}, but there are {len(rows)} rows")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        _check_row(row, i, seen, fail)
    for key in ("problems", "left_out"):
        value = manifest.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(p, dict) and isinstance(p.get("source"), str) and isinstance(p.get("reason"), str) for p in value
        ):
            raise fail(key, "expected a list of {source, reason} strings")
    for key, kind in (("config", dict), ("family", str), ("inputs", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise fail(key, f"is {type(manifest[key]).__name__}, expected {kind.__name__}")
    return layout


def _check_row(row: Any, i: int, seen: set[str], fail) -> None:
    at = f"rows[{i}]"
    if not isinstance(row, dict):
        raise fail(at, f"is {type(row).__name__}, expected an object")
    rid = row.get("id")
    if not isinstance(rid, str) or not rid or "\x00" in rid:
        raise fail(f"{at}.id", f"is {rid!r}, expected a non-empty string")
    if rid in seen:
        raise fail(f"{at}.id", f"{rid!r} appears twice (ids must be unique)")
    seen.add(rid)
    for key, ok, want in (
        ("source", lambda v: isinstance(v, str), "a string"),
        ("files", lambda v: isinstance(v, list), "a list"),
        ("sha256", lambda v: isinstance(v, str), "a string"),
        ("format", lambda v: isinstance(v, str), "a string"),
        ("kinds", lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v), "a list of strings"),
    ):
        if key not in row:
            raise fail(f"{at}.{key}", "is missing")
        if not ok(row[key]):
            raise fail(f"{at}.{key}", f"is {row[key]!r:.80}, expected {want}")
    for key, ok, want in (
        ("family", lambda v: v is None or isinstance(v, str), "a string or null"),
        ("row", lambda v: v is None or (_is_int(v) and v >= 0), "a non-negative integer or null"),
        ("training", lambda v: isinstance(v, dict), "an object"),
        ("n_params", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        (
            "delta_norm",
            lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
            "a finite number or null",
        ),
    ):
        if key in row and not ok(row[key]):
            raise fail(f"{at}.{key}", f"is {row[key]!r:.80}, expected {want}")


def open_store(path: str | Path) -> Store:
    """Open a store folder written by :func:`wsa.ingest`."""
    return Store(path)
