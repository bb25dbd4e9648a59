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

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wsa.adapter import Adapter
from wsa.errors import StoreError
from wsa.store.layout import Layout
from wsa.store.representations import decode

FORMAT_VERSION = 1
#: Largest float32 block :meth:`Store.iter_blocks` yields (two are in memory at once).
MAX_BLOCK_BYTES = 1 << 30
MANIFEST = "wsa_store.json"


class Store:
    """A built collection. ``matrix`` is read-only and memory-mapped; nothing is loaded eagerly."""

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
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except ValueError as exc:
            raise StoreError(f"{MANIFEST} is not valid JSON ({exc})", self.path) from None
        version = self.manifest.get("wsa_format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"store format version {version!r}; this wsa reads version {FORMAT_VERSION}", self.path)

    @cached_property
    def layout(self) -> Layout:
        return Layout.from_json(self.manifest["layout"])

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

    @cached_property
    def matrix(self) -> np.ndarray:
        """N × D, memory-mapped read-only (float32, or float16 if the store was built so)."""
        try:
            mm = np.load(self.matrix_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot open matrix file {self.manifest['matrix']} ({exc})", self.path) from None
        if mm.shape != (len(self.ids), self.n_features):
            raise StoreError(f"matrix shape {mm.shape} does not match the manifest", self.path)
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
        fd = os.open(self.matrix_path, os.O_RDONLY)
        try:
            k = 0
            while k < len(idx):
                run = 1
                while k + run < len(idx) and idx[k + run] == idx[k] + run:
                    run += 1
                offset = self._data_offset + int(idx[k]) * row_bytes
                if dtype == np.float32:  # straight into the result: one copy, not two
                    _pread_into(fd, memoryview(out[k : k + run]).cast("B"), offset, self.matrix_path)
                else:
                    data = os.pread(fd, run * row_bytes, offset)
                    out[k : k + run] = np.frombuffer(data, dtype=dtype).reshape(run, self.n_features)
                k += run
        finally:
            os.close(fd)
        return out

    @cached_property
    def _data_offset(self) -> int:
        with self.matrix_path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
            return fh.tell()

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


def open_store(path: str | Path) -> Store:
    """Open a store folder written by :func:`wsa.ingest`."""
    return Store(path)
