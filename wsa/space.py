"""The w2w space: a PCA of a store's rows, fitted exactly, in memory (randomized) or out of core (streaming).

Why three solvers: weights2weights (arXiv 2406.09413) fits PCA on 64,974 × 99,648 float32 rows (26 GB),
which does not fit in memory on most machines, while small collections deserve an exact answer. The
solvers share one sign rule and one standardization, so on data where all three are accurate they give
the same :class:`Space` (tested against each other and against scikit-learn).

* ``exact`` — loads the rows, centers/scales them, and for ``n <= D`` diagonalises the ``n × n`` Gram
  matrix in float64 (the usual case for adapters: far fewer models than parameters); otherwise a float64
  SVD. Every component is exact up to float32 rounding of the data.
* ``randomized`` — Halko, Martinsson & Tropp (2011), Algorithm 4.4: a Gaussian range finder with
  ``n_oversamples`` extra columns and ``n_iter`` power iterations, QR re-orthonormalisation after every
  product (as scikit-learn's ``randomized_range_finder`` with ``power_iteration_normalizer="QR"``), on
  the parameter side, then Rayleigh–Ritz inside that subspace (as ``torch.svd_lowrank`` does for wide
  matrices).
* ``streaming`` — the same algorithm with every product against the data computed block by block from the
  store, so memory stays ``O(D·l + N·l + block_rows·D)`` with ``l = n_components + n_oversamples``.
  Passes over the data: moments, ``X̃ᵀΩ``, two per power iteration, ``X̃Q`` (which also gives the
  coefficients).

Sign rule (scikit-learn's ``svd_flip(u_based_decision=False)``, which ``PCA`` uses): the entry of largest
absolute value of every component is positive, and the coefficients follow. Same rule on every path.

On disk (``Space.save``), version 1: ``space.safetensors`` holds the arrays (``mean``, ``scale``,
``components``, ``singular_values``, ``explained_variance``, ``coefficients``); ``space.json`` holds
``wsa_space_version``, ``total_variance``, ``n_samples``, ``ids``, ``config`` and the sha256 of the
safetensors file, so a pair left mismatched by an interrupted save is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save
from tqdm import tqdm

from wsa.atomic import write_bytes
from wsa.devices import resolve_device
from wsa.errors import ConfigError, StoreError
from wsa.store import Store

SPACE_VERSION = 1
SPACE_JSON = "space.json"
SPACE_TENSORS = "space.safetensors"
SOLVERS = ("auto", "exact", "randomized", "streaming")
#: ``solver="auto"`` uses the exact solver up to this many rows or columns (whichever is smaller).
EXACT_MAX_DIM = 4000
#: Rows per block default to about this many bytes of float32 data.
_BLOCK_BYTES = 64 * 2**20
_GPU_BLOCK_BYTES = 256 * 2**20  # float32 blocks made from the GPU copy
_SKETCH_ROWS = 4096  # Ω is drawn in chunks of this many rows (same Ω for every block size)
_TENSOR_NAMES = ("mean", "scale", "components", "singular_values", "explained_variance", "coefficients")
#: ``n_components_for`` counts a fraction as reached within this much (float32 data cannot do better).
_FRACTION_TOL = 1e-6


# --------------------------------------------------------------------------------------------- the Space


def components_for(ratio: npt.NDArray[np.float64], fraction: float) -> int | None:
    """Smallest k whose cumulative ``ratio`` reaches ``fraction`` (within float32 rounding), else None."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be a number in (0, 1]; got {fraction!r}")
    hit = np.flatnonzero(np.cumsum(ratio) >= fraction - _FRACTION_TOL)  # NaN compares False
    return int(hit[0]) + 1 if hit.size else None


@dataclass(frozen=True, eq=False)
class Space:
    """A fitted PCA of adapter rows: the coordinates w2w edits, samples and inverts in.

    Immutable (arrays are read-only) so an analyzer cannot change the space another one reads.

    Attributes
    ----------
    mean : ndarray of shape (n_features,), float32
        Column means of the fitted rows; zeros if fitted with ``center=False``.
    scale : ndarray of shape (n_features,), float32
        Column standard deviations (``ddof=1``, as ``torch.std`` in w2w) if fitted with
        ``standardize=True``, with 1 for zero-variance columns; otherwise ones.
    components : ndarray of shape (n_components, n_features), float32
        Orthonormal principal directions in the standardized space ``(x - mean) / scale``, by
        decreasing variance, signed so the largest-magnitude entry of each is positive.
    singular_values : ndarray of shape (n_components,), float64
        Singular values of the standardized data matrix, descending.
    explained_variance : ndarray of shape (n_components,), float64
        ``singular_values**2 / (n_samples - 1)``.
    total_variance : float
        ``||X̃||_F² / (n_samples - 1)`` of the standardized data (the sum of the column variances when
        centered), so ``explained_variance / total_variance`` are variance fractions.
    n_samples : int
        Rows fitted.
    ids : tuple of str
        Ids of the rows fitted, in order (store ids, or ``"0", "1", …`` for a plain matrix).
    coefficients : ndarray of shape (n_samples, n_components), float32
        PC coordinates of the fitted rows, equal to ``transform`` of those rows.
    config : dict
        How the space was fitted (resolved solver, options, device, store path and fingerprint, versions,
        elapsed seconds); JSON-serializable.
    """

    mean: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]
    components: npt.NDArray[np.float32]
    singular_values: npt.NDArray[np.float64]
    explained_variance: npt.NDArray[np.float64]
    total_variance: float
    n_samples: int
    ids: tuple[str, ...]
    coefficients: npt.NDArray[np.float32]
    config: dict[str, Any]

    explicit: ClassVar[bool] = True  # holds its components (``wsa.gram.DeltaSpace`` does not)

    def __post_init__(self) -> None:
        for name in _TENSOR_NAMES:
            getattr(self, name).setflags(write=False)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_ratio(self) -> npt.NDArray[np.float64]:
        """Fraction of the total variance per component, shape (n_components,); NaN if the data had none."""
        if self.total_variance <= 0:
            return np.full(self.n_components, np.nan)
        return self.explained_variance / self.total_variance

    def n_components_for(self, fraction: float) -> int | None:
        """Smallest number of components whose cumulative explained variance reaches ``fraction``.

        Returns ``None`` when the components kept do not reach it (or the data had no variance), so a
        caller cannot mistake "not enough components fitted" for an answer. A fraction counts as reached
        within 1e-6, the rounding of float32 data, so ``1.0`` is reached at full rank.
        """
        return components_for(self.explained_variance_ratio, fraction)

    def transform(self, X: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """PC coordinates of rows: ``((X - mean) / scale) @ components.T``.

        Parameters
        ----------
        X : array of shape (n, n_features) or (n_features,)
            float16, float32 or float64, memory-mapped or not (e.g. ``store.matrix``); read in blocks of
            about 64 MB so a memory map is never loaded whole.

        Returns
        -------
        ndarray of shape (n, n_components) or (n_components,), float32
        """
        X = X if isinstance(X, np.ndarray) else np.asarray(X)
        single = X.ndim == 1
        X2 = X[None] if single else X
        if X2.ndim != 2 or X2.shape[1] != self.n_features:
            raise ConfigError(
                f"X must have shape (n, {self.n_features}) (the space's n_features); got {tuple(X.shape)}"
            )
        out = np.empty((X2.shape[0], self.n_components), dtype=np.float32)
        step = _default_block_rows(self.n_features)
        for start in range(0, X2.shape[0], step):
            block = np.asarray(X2[start : start + step], dtype=np.float32)
            out[start : start + step] = ((block - self.mean) / self.scale) @ self.components.T
        return out[0] if single else out

    def inverse_transform(self, Z: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Rows from PC coordinates: ``mean + scale * (Z @ components[:m])`` with ``m = Z.shape[-1]``.

        Fewer than ``n_components`` columns reconstruct with the leading components only (the rank-m
        approximation), which is how w2w edits and truncates.

        Parameters
        ----------
        Z : array of shape (n, m) or (m,), m <= n_components

        Returns
        -------
        ndarray of shape (n, n_features) or (n_features,), float32
        """
        Z = np.asarray(Z, dtype=np.float32)
        if Z.ndim not in (1, 2) or Z.shape[-1] > self.n_components:
            raise ConfigError(
                f"Z must have shape (n, m) with m <= n_components = {self.n_components}; got {tuple(Z.shape)}"
            )
        m = Z.shape[-1]
        return (Z @ self.components[:m]) * self.scale + self.mean

    def save(self, folder: str | Path) -> None:
        """Write ``space.safetensors`` then ``space.json`` into ``folder``, each atomically.

        The JSON carries the sha256 of the tensors file and is written last, so a crash between the two
        writes leaves a pair that :meth:`load` refuses instead of mixing two fits.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        blob = safetensors_save({name: np.ascontiguousarray(getattr(self, name)) for name in _TENSOR_NAMES})
        write_bytes(folder / SPACE_TENSORS, blob)
        meta = {
            "wsa_space_version": SPACE_VERSION,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "n_components": self.n_components,
            "n_features": self.n_features,
            "n_samples": self.n_samples,
            "total_variance": self.total_variance,
            "ids": list(self.ids),
            "config": self.config,
        }
        write_bytes(folder / SPACE_JSON, json.dumps(meta, indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, folder: str | Path) -> Space:
        """Read a folder written by :meth:`save`; every inconsistency is a :class:`~wsa.errors.StoreError`."""
        folder = Path(folder)
        json_path, tensors_path = folder / SPACE_JSON, folder / SPACE_TENSORS
        if not json_path.is_file():
            raise StoreError(f"not a saved space (no {SPACE_JSON}); fit one and call Space.save", folder)
        try:
            meta = json.loads(json_path.read_text())
        except OSError as exc:
            raise StoreError(f"cannot read {SPACE_JSON} ({exc.strerror or exc})", folder) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"{SPACE_JSON} is not valid JSON ({exc}); save the space again", folder) from None
        if not isinstance(meta, dict):
            raise StoreError(f"{SPACE_JSON} is not a JSON object; save the space again", folder)
        if meta.get("kind") == "delta-gram":
            raise StoreError(
                "this space is a PCA of ΔW fitted from factor Grams (wsa analyze --space delta): it has no explicit "
                "components to sample, edit, invert or decode with; analyze with --space explicit for those "
                "(raw factors of a uniform-rank collection)",
                folder,
            )
        version = meta.get("wsa_space_version")
        if version != SPACE_VERSION:
            raise StoreError(
                f"space format version {version!r}; this wsa reads version {SPACE_VERSION}; refit the space", folder
            )
        if not tensors_path.is_file():
            raise StoreError(f"{SPACE_TENSORS} is missing; save the space again", folder)
        try:
            blob = tensors_path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {SPACE_TENSORS} ({exc.strerror or exc})", folder) from None
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise StoreError(
                f"{SPACE_TENSORS} does not match {SPACE_JSON} (sha256 differs: interrupted save or mixed files); "
                "save the space again",
                folder,
            )
        try:
            tensors = safetensors_load(blob)
        except (SafetensorError, ValueError) as exc:
            raise StoreError(f"{SPACE_TENSORS} cannot be read ({exc}); save the space again", folder) from None
        missing = sorted(set(_TENSOR_NAMES) - set(tensors))
        unexpected = sorted(set(tensors) - set(_TENSOR_NAMES))
        if missing or unexpected:
            raise StoreError(f"{SPACE_TENSORS}: missing {missing}, unexpected {unexpected}; save it again", folder)
        k, d, n = (_meta_field(meta, key, _is_count, "a non-negative integer", folder) for key in _COUNTS)
        ids = tuple(
            _meta_field(
                meta,
                "ids",
                lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                "a list of strings",
                folder,
            )
        )
        if len(set(ids)) != len(ids):
            raise StoreError(f"{SPACE_JSON} field 'ids' repeats an id; save the space again", folder)
        total = float(_meta_field(meta, "total_variance", _is_finite_number, "a finite number >= 0", folder))
        config = dict(_meta_field(meta, "config", lambda v: isinstance(v, dict), "an object", folder))
        shapes = {
            "mean": (d,),
            "scale": (d,),
            "components": (k, d),
            "singular_values": (k,),
            "explained_variance": (k,),
            "coefficients": (n, k),
        }
        bad = [
            f"{name} {tensors[name].shape} != {shape}" for name, shape in shapes.items() if tensors[name].shape != shape
        ]
        if bad or len(ids) != n:
            bad += [] if len(ids) == n else [f"{len(ids)} ids for {n} samples"]
            raise StoreError(f"inconsistent shapes ({'; '.join(bad)}); save the space again", folder)
        for name in _TENSOR_NAMES:
            t = tensors[name]
            if not np.issubdtype(t.dtype, np.floating):
                raise StoreError(f"{SPACE_TENSORS}: {name} is {t.dtype}, expected floats; save the space again", folder)
            if not np.isfinite(t).all():
                raise StoreError(f"{SPACE_TENSORS}: {name} holds NaN or Inf values; refit the space", folder)
        if not np.all(tensors["scale"] > 0):
            raise StoreError(f"{SPACE_TENSORS}: scale has values <= 0; refit the space", folder)
        f32 = {name: tensors[name].astype(np.float32, copy=False) for name in ("mean", "scale", "components")}
        return cls(
            mean=f32["mean"],
            scale=f32["scale"],
            components=f32["components"],
            singular_values=tensors["singular_values"].astype(np.float64, copy=False),
            explained_variance=tensors["explained_variance"].astype(np.float64, copy=False),
            total_variance=total,
            n_samples=n,
            ids=ids,
            coefficients=tensors["coefficients"].astype(np.float32, copy=False),
            config=config,
        )


_COUNTS = ("n_components", "n_features", "n_samples")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _meta_field(meta: dict, key: str, ok: Callable[[Any], bool], want: str, folder: Path) -> Any:
    """``meta[key]`` if present and ``ok``; otherwise one StoreError naming the field."""
    if key not in meta:
        raise StoreError(f"{SPACE_JSON} lacks the field {key!r}; save the space again", folder)
    value = meta[key]
    if not ok(value):
        raise StoreError(f"{SPACE_JSON} field {key!r} is {value!r:.60}, expected {want}; save the space again", folder)
    return value


# ------------------------------------------------------------------------------------------ data sources


@dataclass(frozen=True)
class _Source:
    """Rows to fit: a store or an in-memory/memory-mapped matrix, optionally a sorted subset."""

    matrix: np.ndarray
    rows: npt.NDArray[np.int64] | None
    ids: tuple[str, ...]
    store: Store | None

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def d(self) -> int:
        return int(self.matrix.shape[1])

    def blocks(self, block_rows: int, owned: bool = True) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """``(start, float32 block)`` in row order.

        ``owned``: each block is a fresh writable array the caller may change (the CPU solvers centre in
        place). ``owned=False`` hands out views where it can — for callers that only copy the block
        elsewhere (to a GPU), so a matrix in host memory is not copied twice.
        """
        if self.store is not None:
            it: Iterable[tuple[int, np.ndarray]] = self.store.iter_blocks(block_rows, rows=self.rows)
        else:
            it = (
                (
                    s,
                    self.matrix[s : s + block_rows]
                    if self.rows is None
                    else self.matrix[self.rows[s : s + block_rows]],
                )
                for s in range(0, self.n, block_rows)
            )
        for start, block in it:
            out = np.asarray(block, dtype=np.float32)
            # A float32 memory map comes back as a read-only view; the solvers center blocks in place.
            yield start, (out if not owned or (out.flags.writeable and out.flags.owndata) else np.array(out))


def _make_source(store_or_matrix: Store | np.ndarray, rows: Sequence[int] | np.ndarray | None) -> _Source:
    if isinstance(store_or_matrix, Store):
        store, matrix, all_ids = store_or_matrix, store_or_matrix.matrix, store_or_matrix.ids
    elif isinstance(store_or_matrix, np.ndarray):
        store, matrix = None, store_or_matrix
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
            raise ConfigError(
                f"store_or_matrix must be a 2-D float array (n_rows, n_features); got shape {matrix.shape} "
                f"dtype {matrix.dtype}"
            )
        all_ids = [str(i) for i in range(matrix.shape[0])]
    else:
        raise ConfigError(f"store_or_matrix must be a wsa.Store or a 2-D numpy array; got {type(store_or_matrix)}")
    if rows is None:
        return _Source(matrix, None, tuple(all_ids), store)
    idx = np.asarray(rows)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ConfigError(f"rows must be a 1-D sequence of row indices; got {idx.dtype} array of shape {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= matrix.shape[0] or np.any(np.diff(idx) <= 0)):
        raise ConfigError(
            f"rows must be strictly increasing indices in [0, {matrix.shape[0]}) (sorted, no repeats); "
            f"got {idx[:5].tolist()}{'…' if idx.size > 5 else ''}"
        )
    return _Source(matrix, idx, tuple(all_ids[i] for i in idx), store)


class _Moments:
    """Column mean and sum of squared deviations in float64, merged block by block (Chan et al. 1979).

    Merging per-block centered sums avoids the cancellation of ``E[x²] - E[x]²`` on columns whose mean
    is large next to their spread. Blocks may be numpy arrays or torch tensors on any device (the sums
    live where the first block does), so a GPU pass keeps its blocks on the GPU.
    """

    def __init__(self, d: int) -> None:
        self.n = 0
        self.d = d
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    @classmethod
    def from_sums(cls, n: int, mean: np.ndarray, m2: np.ndarray) -> _Moments:
        """Moments already summed elsewhere (``_centre_in_memory``)."""
        mom = cls(len(mean))
        mom.n, mom._mean, mom._m2 = n, torch.from_numpy(mean), torch.from_numpy(m2)
        return mom

    def update(self, block: np.ndarray | torch.Tensor) -> None:
        if isinstance(block, torch.Tensor):
            b = block.to(torch.float64)
            mb = b.mean(dim=0)
            m2b = (b - mb).square_().sum(dim=0)
        else:  # numpy on the CPU (measured faster here than torch's float64 reductions on 2 cores)
            a = block.astype(np.float64)
            mean = a.mean(axis=0)
            a -= mean
            np.square(a, out=a)
            mb, m2b = torch.from_numpy(mean), torch.from_numpy(a.sum(axis=0))
        nb = block.shape[0]
        if self._mean is None:
            self._mean, self._m2 = torch.zeros_like(mb), torch.zeros_like(mb)
        n = self.n + nb
        delta = mb - self._mean
        self._mean += delta * (nb / n)
        self._m2 += m2b + delta.square() * (self.n * nb / n)
        self.n = n

    @property
    def mean(self) -> np.ndarray:
        return np.zeros(self.d) if self._mean is None else self._mean.cpu().numpy()

    @property
    def m2(self) -> np.ndarray:
        return np.zeros(self.d) if self._m2 is None else self._m2.cpu().numpy()


@dataclass(frozen=True)
class _Standardization:
    mean: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]
    total_variance: float
    standardize: bool

    def apply_(self, block: torch.Tensor | np.ndarray) -> None:
        """Center and scale a float32 block in place (the same float32 operations as ``Space.transform``)."""
        if isinstance(block, torch.Tensor):
            block.sub_(torch.as_tensor(self.mean, device=block.device))
            if self.standardize:
                block.div_(torch.as_tensor(self.scale, device=block.device))
        else:
            block -= self.mean
            if self.standardize:
                block /= self.scale


def _standardization(mom: _Moments, center: bool, standardize: bool, where: str) -> _Standardization:
    if not (np.isfinite(mom.mean).all() and np.isfinite(mom.m2).all()):
        raise ConfigError(f"{where}: the data contain NaN or Inf (or overflow float64); fix or drop those rows")
    n = mom.n
    var = mom.m2 / (n - 1)
    scale = np.where(var > 0, np.sqrt(var), 1.0).astype(np.float32) if standardize else np.ones_like(var, np.float32)
    mean = mom.mean.astype(np.float32) if center else np.zeros_like(var, np.float32)
    sumsq = mom.m2 if center else mom.m2 + n * mom.mean**2
    total = float((sumsq / scale.astype(np.float64) ** 2).sum() / (n - 1))
    return _Standardization(mean, scale, total, standardize)


def _centre_in_memory(X: np.ndarray, step: int, standardize: bool, where: str) -> _Standardization:
    """Centre (and scale) the loaded rows in place; the moments from them, in three passes over float32.

    Why not :class:`_Moments` here: its float64 copy of every block costs five passes over twice the
    bytes, the largest part of an in-memory fit's time beside the products. With the data in memory,
    the mean is one float64-accumulated sum, and ``Σ(x − m)² = Σ(x − c)² − n·(m − c)²`` with ``c`` the
    float32-rounded mean (the rows are centred on ``c`` anyway) needs no second float64 copy.
    """
    n, d = X.shape
    total = np.zeros(d, dtype=np.float64)
    for a in range(0, n, step):  # float64 sums: the mean to the last bit the streaming solver gets
        total += X[a : a + step].sum(axis=0, dtype=np.float64)
    mean = total / n
    c = mean.astype(np.float32)
    sumsq = np.zeros(d, dtype=np.float64)
    for a in range(0, n, step):
        block = X[a : a + step]
        block -= c
        sumsq += np.einsum("ij,ij->j", block, block)  # float32 within a block of a few hundred rows
    mom = _Moments.from_sums(n, mean, sumsq - n * (mean - c.astype(np.float64)) ** 2)
    std = _standardization(mom, True, standardize, where)
    if standardize:
        for a in range(0, n, step):
            X[a : a + step] /= std.scale
    return std


# --------------------------------------------------------------------------------------------- solvers


class _Clock:
    """Seconds (and, on CUDA, the running peak of allocated GPU memory) at the end of each phase of a fit.

    Why: a fit's total time says little about where to look; the phases go into ``config["phases"]``.
    The peak is read, never reset, so callers measuring around ``fit_space`` still see the whole fit.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.phases: dict[str, dict[str, float]] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        entry: dict[str, float] = {}
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / 2**30, 3)
        now = time.perf_counter()
        self.phases[name] = {"seconds": round(now - self._last, 3), **entry}
        self._last = now


def _orth(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a, mode="reduced").Q


def _sketch(n: int, n_columns: int, seed: int) -> torch.Tensor:
    """Gaussian Ω (n × l, float32) drawn on the CPU from ``seed`` in fixed 4096-row chunks.

    Why fixed chunks: every device and solver path starts from the same Ω whatever its block size.
    """
    chunks = []
    for c, start in enumerate(range(0, n, _SKETCH_ROWS)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chunks.append(torch.randn(min(_SKETCH_ROWS, n - start), n_columns, generator=g, dtype=torch.float32))
    return torch.cat(chunks)


def _randomized_range(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    rmatmul: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    n_columns: int,
    n_iter: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """An orthonormal basis Q (D × l, float32) of the top right singular subspace of X̃.

    Halko et al. 2011, Alg. 4.4 (subspace iteration), run on the parameter side: Q = orth(X̃ᵀΩ), then
    ``n_iter`` times Q = orth(X̃ᵀ·orth(X̃·Q)). Why that side: the components are then chosen inside
    span(Q) by :func:`_rayleigh_ritz`, and their coefficients come with the last product X̃·Q — one pass
    fewer than projecting QᵀX̃ and then the rows, at the same accuracy (measured at w2w's shape), and
    on a GPU the copy of the rows can be freed before the small decompositions. On CUDA these products
    run in TF32: they only choose the subspace.
    """
    with _tf32(device):
        q = _orth(rmatmul(_sketch(n, n_columns, seed).to(device)))
        for _ in range(n_iter):
            q = _orth(rmatmul(_orth(matmul(q))))
    return q


def _rayleigh_ritz(q: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Components (k × D, float64), singular values and coefficients (n × k) from Q and B = X̃·Q.

    ``B = U·S·Wᵀ`` (through QR of B and an SVD of the small R, in float64) gives the best k directions
    within span(Q): components ``(Q·W)ᵀ``; their coefficients ``X̃·Q·W = U·S`` come with B, so no
    further pass over the data is needed. Signs follow scikit-learn's ``svd_flip(u_based_decision=False)``.
    """
    qb, r = torch.linalg.qr(b.to(torch.float64), mode="reduced")
    u_r, s, wt = torch.linalg.svd(r, full_matrices=False)
    vt = (q.to(torch.float64) @ wt[:k].T).T
    sign = _component_signs(vt)
    coefficients = (qb @ u_r[:, :k]) * (s[:k] * sign)
    return vt * sign[:, None], s[:k], coefficients


@contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls inside the block (CUDA only), the caller's setting restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _exact_svd(X: np.ndarray, k: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` right singular vectors (float64, (k, D)) and values of the in-memory X̃ (n, D)."""
    n, d = X.shape
    if n > d:
        _, s, vt = torch.linalg.svd(torch.from_numpy(X).to(device, torch.float64), full_matrices=False)
        return vt[:k], s[:k]
    # n <= D: eigh of the n × n Gram matrix in float64, built from column chunks so no n × D float64 copy exists.
    step = max(1, _BLOCK_BYTES // (8 * n))
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for j in range(0, d, step):
        xc = torch.from_numpy(X[:, j : j + step]).to(device, torch.float64)
        gram.addmm_(xc, xc.T)
    evals, evecs = torch.linalg.eigh(gram)
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :k]
    v = torch.empty(k, d, dtype=torch.float64, device=device)
    for j in range(0, d, step):
        v[:, j : j + step] = u.T @ torch.from_numpy(X[:, j : j + step]).to(device, torch.float64)
    # Eigenvalues of the float64 Gram are good to ~n·eps·λ₀, so singular values to s₀·√(n·eps): below
    # (10× that) a direction cannot be recovered from the Gram; complete the basis with seeded random rows.
    # (A float32-style cut, s₀·max(n, D)·eps32 = 1.2 % of s₀ at w2w's width, discarded real components.)
    tol = float(s[0]) * 10.0 * math.sqrt(n * float(np.finfo(np.float64).eps))
    small = s <= tol
    v[~small] /= s[~small, None]
    if bool(small.any()):
        g = torch.Generator().manual_seed(seed)
        v[small] = torch.randn(int(small.sum()), d, generator=g, dtype=torch.float64).to(device)
    # The Gram route squares the condition number; one QR restores exact orthonormality (and orthogonalises
    # the completion against the real directions, which come first).
    q, r = torch.linalg.qr(v.T, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    return (q * sign).T, s


def _component_signs(vt: torch.Tensor) -> torch.Tensor:
    """±1 per row making its largest-|·| entry positive (scikit-learn ``svd_flip(u_based_decision=False)``)."""
    idx = vt.abs().argmax(dim=1)
    sign = torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), idx])
    sign[sign == 0] = 1
    return sign


def _flip_signs(vt: torch.Tensor) -> torch.Tensor:
    return vt * _component_signs(vt)[:, None]


# --------------------------------------------------------------------------------------------- fitting


def _gpu_cache_bytes(dev: torch.device, requested: int | None) -> int:
    if dev.type != "cuda":
        return 0
    if requested is not None:
        return int(requested)
    free, _ = torch.cuda.mem_get_info(dev)
    return int(min(14 * 2**30, free // 2))


def _default_block_rows(d: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(d, 1)))


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a small machine


def _check_int(name: str, value: Any, low: int, high: int | None = None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {bound}{' or None' if allow_none else ''}; got {value!r}")


def _choose_solver(solver: str, n: int, d: int, k: int, budget: int, dev: torch.device) -> str:
    """Resolve ``auto``; on a GPU the in-memory solvers must also fit in half its free memory."""
    if solver != "auto":
        return solver
    in_memory = 4 * n * d
    exact_extra = 16 * n * d if n > d else 8 * (n * n + k * d)  # float64 copy + U, or Gram + components
    gpu_room = torch.cuda.mem_get_info(dev)[0] // 2 if dev.type == "cuda" else math.inf
    exact_on_gpu = exact_extra if n > d else 8 * (n * n + k * d + n * _default_block_rows(d))
    if min(n, d) <= EXACT_MAX_DIM and in_memory + exact_extra <= budget and exact_on_gpu <= gpu_room:
        return "exact"
    return "randomized" if in_memory <= min(budget, gpu_room) else "streaming"


def fit_space(
    store_or_matrix: Store | np.ndarray,
    n_components: int = 100,
    *,
    center: bool = True,
    standardize: bool = False,
    solver: str = "auto",
    rows: Sequence[int] | np.ndarray | None = None,
    n_oversamples: int = 10,
    n_iter: int = 4,
    block_rows: int | None = None,
    device: str = "auto",
    random_state: int | None = 0,
    memory_budget_bytes: int | None = None,
    gpu_cache_bytes: int | None = None,
    progress: bool = True,
) -> Space:
    """Fit the w2w space: PCA of the rows of a store (or matrix), exactly or out of core.

    Parameters
    ----------
    store_or_matrix : Store or ndarray of shape (n_rows, n_features)
        A :class:`wsa.Store` (float32 or float16, memory-mapped; ids from the store) or a float array
        (ids ``"0"…``). Never modified.
    n_components : int, default=100
        Components kept, ``1 <= n_components <= min(n_samples, n_features)``.
    center : bool, default=True
        Subtract the column means (PCA). ``False`` gives an uncentered SVD; ``mean`` is then zeros.
    standardize : bool, default=False
        Divide by the column standard deviation with ``ddof=1`` (w2w z-scores with ``torch.std``, whose
        default is ``ddof=1``; scikit-learn's ``StandardScaler`` uses ``ddof=0``, which scales every column by
        the same extra ``sqrt(n / (n - 1))`` and so leaves the components unchanged). Zero-variance columns
        keep scale 1.
    solver : {"auto", "exact", "randomized", "streaming"}, default="auto"
        ``auto``: exact when ``min(n, D) <= 4000`` and it fits the memory budget, else randomized when the
        float32 data fit, else streaming. The choice is recorded in ``config["solver"]``.
    rows : sequence of int, optional
        Strictly increasing row indices to fit on (train/held-out splits); default all rows.
    n_oversamples : int, default=10
        Extra sketch columns for the randomized and streaming solvers (``l = n_components + n_oversamples``
        rounded up to a multiple of 8, capped at ``min(n, D)``; recorded as ``config["n_columns"]``).
    n_iter : int, default=4
        Power iterations for the randomized and streaming solvers (each is two passes over the data when
        streaming). More iterations sharpen components whose singular values are close to the cut.
    block_rows : int, optional
        Rows per block when reading the data; default about 64 MB of float32 per block.
    device : str, default="auto"
        ``"auto"`` (cuda if available, else cpu), ``"cpu"`` or ``"cuda[:N]"``. Matmuls on blocks run in
        float32 there; the small final decompositions in float64.
    random_state : int or None, default=0
        Seed of the random sketch (and of the basis completion of the exact solver beyond the data's rank).
        ``None`` draws a seed, recorded in ``config["random_state"]``.
    memory_budget_bytes : int, optional
        Memory ``auto`` may use for in-memory solvers; default a quarter of physical RAM.
    gpu_cache_bytes : int, optional
        Streaming on CUDA: GPU memory for an fp16 copy of the standardized rows, so passes after the
        first read the GPU, not the host (default 14 GiB, at most half the free memory; 0 turns it off).
        A matrix that does not fit is streamed from the host on every pass.
    progress : bool, default=True
        Show a tqdm bar on stderr over blocks read (``disable=None``: hidden when stderr is not a TTY).

    Returns
    -------
    Space

    Raises
    ------
    ConfigError
        A parameter value that is not allowed, or data containing NaN/Inf.
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {list(SOLVERS)}; got {solver!r}")
    for name, flag in (("center", center), ("standardize", standardize), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False; got {flag!r}")
    source = _make_source(store_or_matrix, rows)
    n, d = source.n, source.d
    if n < 2:
        raise ConfigError(f"rows must select at least 2 rows (variance needs n - 1 > 0); got {n}")
    _check_int("n_components", n_components, 1, min(n, d))
    _check_int("n_oversamples", n_oversamples, 0)
    _check_int("n_iter", n_iter, 0)
    _check_int("block_rows", block_rows, 1, allow_none=True)
    _check_int("random_state", random_state, 0, allow_none=True)
    _check_int("memory_budget_bytes", memory_budget_bytes, 1, allow_none=True)
    _check_int("gpu_cache_bytes", gpu_cache_bytes, 0, allow_none=True)
    if not isinstance(device, str):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}")
    dev = resolve_device(device)
    k = int(n_components)
    step = int(block_rows) if block_rows is not None else _default_block_rows(d)
    budget = int(memory_budget_bytes) if memory_budget_bytes is not None else _physical_memory() // 4
    used = _choose_solver(solver, n, d, k, budget, dev)
    seed = int(random_state) if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)
    # Rounded up to a multiple of 8: float32 GEMM kernels ran up to 1.4× faster at l = 112 than at 110.
    n_columns = min(-(-(k + int(n_oversamples)) // 8) * 8, n, d)
    where = str(source.store.path) if source.store is not None else "matrix"

    clock = _Clock(dev)
    n_blocks = math.ceil(n / step)
    passes = 3 + 2 * int(n_iter) if used == "streaming" else 1
    bar = tqdm(
        total=passes * n_blocks,
        desc=f"fit_space ({used})",
        unit="block",
        disable=None if progress else True,
        file=sys.stderr,
    )
    with bar:
        if used == "streaming":
            std, vt, s, coefficients = _fit_streaming(
                source,
                k,
                n_columns,
                int(n_iter),
                seed,
                dev,
                step,
                center,
                standardize,
                bar,
                where,
                _gpu_cache_bytes(dev, gpu_cache_bytes),
                clock,
            )
        else:
            X = np.empty((n, d), dtype=np.float32)
            mom = _Moments(d)
            if source.store is not None and source.rows is None and center:  # read straight into X
                for start in range(0, n, step):
                    source.store.read_rows(range(start, min(n, start + step)), out=X[start : start + step])
                    bar.update()
            else:
                for start, block in source.blocks(step):
                    X[start : start + len(block)] = block
                    if not center:
                        mom.update(block)
                    bar.update()
            if center:
                std = _centre_in_memory(X, step, standardize, where)
            else:
                std = _standardization(mom, center, standardize, where)
                for start in range(0, n, step):
                    std.apply_(X[start : start + step])
            clock.lap("load")
            if used == "exact":
                vt, s = _exact_svd(X, k, dev, seed)
                vt = _flip_signs(vt)
                components = vt.to(torch.float32).cpu().numpy()
                coefficients = X @ components.T
            else:
                xt = torch.from_numpy(X).to(dev)
                q = _randomized_range(lambda w: xt @ w, lambda u: xt.T @ u, n, n_columns, int(n_iter), seed, dev)
                clock.lap("range")
                b = xt @ q
                del xt
                vt, s, coef = _rayleigh_ritz(q, b, k)
                components = vt.to(torch.float32).cpu().numpy()
                coefficients = coef.to(torch.float32).cpu().numpy()
            del X
            clock.lap("components")
    if used == "streaming":
        components = vt.to(torch.float32).cpu().numpy()
    s64 = s.to(torch.float64).cpu().numpy()

    from wsa import __version__

    store = source.store
    config = {
        "solver": used,
        "solver_requested": solver,
        "center": center,
        "standardize": standardize,
        "n_components": k,
        "n_oversamples": int(n_oversamples),
        "n_columns": n_columns if used != "exact" else None,
        "n_iter": int(n_iter),
        "random_state": seed,
        "random_state_requested": None if random_state is None else int(random_state),
        "block_rows": step,
        "device": str(dev),
        "memory_budget_bytes": budget,
        "gpu_cache_bytes": _gpu_cache_bytes(dev, gpu_cache_bytes) if used == "streaming" else 0,
        "source": "store" if store is not None else "array",
        "store_path": str(store.path) if store is not None else None,
        "store_fingerprint": store.fingerprint if store is not None else None,
        "repr": store.repr if store is not None else None,
        "dtype": str(source.matrix.dtype),
        "n_features": d,
        "rows_subset": rows is not None,
        "versions": {"wsa": __version__, "numpy": np.__version__, "torch": torch.__version__},
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "phases": clock.phases,
    }
    return Space(
        mean=std.mean,
        scale=std.scale,
        components=components,
        singular_values=s64,
        explained_variance=s64**2 / (n - 1),
        total_variance=std.total_variance,
        n_samples=n,
        ids=source.ids,
        coefficients=np.ascontiguousarray(coefficients, dtype=np.float32),
        config=config,
    )


def _fit_streaming(
    source: _Source,
    k: int,
    n_columns: int,
    n_iter: int,
    seed: int,
    dev: torch.device,
    step: int,
    center: bool,
    standardize: bool,
    bar: tqdm,
    where: str,
    gpu_cache_bytes: int = 0,
    clock: _Clock | None = None,
) -> tuple[_Standardization, torch.Tensor, torch.Tensor, np.ndarray]:
    """Out-of-core randomized SVD: every product with X̃ is a pass over blocks; X̃ is never held whole.

    On a GPU with room for it (``gpu_cache_bytes``), the first pass also keeps an fp16 copy of the rows
    on the device — shifted and scaled by the first block's column means and spreads, so fp16 holds the
    variation, not the offsets — and every later pass reads that copy at memory speed instead of
    crossing the host link again (exact centring and scaling are applied on the fly in float32).
    """
    n, d = source.n, source.d
    clock = clock or _Clock(dev)
    mom = _Moments(d)
    cache: torch.Tensor | None = None
    shift = spread = None
    if dev.type == "cuda" and gpu_cache_bytes > 0 and n * d * 2 <= gpu_cache_bytes:
        cache = torch.empty(n, d, dtype=torch.float16, device=dev)
    for start, block in source.blocks(step, owned=dev.type != "cuda"):
        xb = _to_device(block, dev) if dev.type == "cuda" else block
        mom.update(xb)
        if cache is not None:
            xf = xb.float()
            if shift is None:
                shift = xf.mean(dim=0)
                spread = xf.std(dim=0) if xf.shape[0] > 1 else torch.ones_like(shift)
                spread = torch.where(spread > 0, spread, torch.ones_like(spread))
            part = ((xf - shift) / spread).half()
            if not bool(torch.isfinite(part).all()):  # beyond fp16's range: stream from the host instead
                cache = None
            else:
                cache[start : start + xb.shape[0]] = part
        bar.update()
    std = _standardization(mom, center, standardize, where)
    clock.lap("first_pass")
    if cache is not None:
        mean_t = torch.as_tensor(std.mean, device=dev)
        scale_t = torch.as_tensor(std.scale, device=dev)
        offset = (shift - mean_t) / scale_t  # x̃ = (c·spread + shift − mean) / scale
        factor = spread / scale_t

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        if cache is not None:
            # Larger blocks than the host reads (~256 MB of float32): fewer, fuller GEMMs.
            rows = max(step, _GPU_BLOCK_BYTES // (4 * d))
            for start in range(0, n, rows):
                xb = cache[start : start + rows].float()
                yield start, xb.mul_(factor).add_(offset)
                bar.update(-(-min(n, start + rows) // step) - (-(-start // step)))
            return
        for start, block in source.blocks(step, owned=dev.type != "cuda"):
            xb = _to_device(block, dev)
            std.apply_(xb)
            yield start, xb
            bar.update()

    def matmul(w: torch.Tensor) -> torch.Tensor:  # X̃ @ w: (n, l)
        out = torch.empty(n, w.shape[1], dtype=torch.float32, device=dev)
        for start, xb in blocks():
            torch.mm(xb, w, out=out[start : start + xb.shape[0]])
        return out

    def rmatmul(u: torch.Tensor) -> torch.Tensor:  # X̃ᵀ @ u: (D, l)
        acc = torch.zeros(d, u.shape[1], dtype=torch.float32, device=dev)
        for start, xb in blocks():
            acc.addmm_(xb.T, u[start : start + xb.shape[0]])
        return acc

    q = _randomized_range(matmul, rmatmul, n, n_columns, n_iter, seed, dev)
    clock.lap("range")
    b = matmul(q)  # the last pass: with the GPU copy gone, the small decompositions have its memory
    cache = None
    clock.lap("projection")
    vt, s, coefficients = _rayleigh_ritz(q, b, k)
    clock.lap("components")
    return std, vt, s, coefficients.to(torch.float32).cpu().numpy()


def _to_device(block: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host block on ``dev``, without an extra host copy of a read-only view (it is only read).

    ``non_blocking``: from page-locked memory (a pinned tensor's ``.numpy()``) the copy overlaps the
    next block's work; from ordinary memory CUDA copies synchronously either way.
    """
    if dev.type != "cuda":
        return torch.from_numpy(block)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(block).to(dev, non_blocking=True)


# ---------------------------------------------------------------------------------------------- helpers


def principal_angles(A: npt.ArrayLike, B: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Principal angles in degrees between the row spaces of ``A`` (k1, D) and ``B`` (k2, D).

    Why angles and not component-wise comparisons: components are only defined up to rotation within
    (near-)degenerate eigenvalues, while the subspace they span is stable. Returns ``min(k1, k2)``
    angles, largest first (``scipy.linalg.subspace_angles`` order); 0 means the spaces coincide.
    """
    from scipy.linalg import subspace_angles

    a, b = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ConfigError(f"A and B must be (k, D) matrices with the same D; got {a.shape} and {b.shape}")
    return np.degrees(subspace_angles(a.T, b.T))


def heldout_split(n: int, test_fraction: float, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), each sorted: the one split every held-out test uses (ΔW route too)."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be a number in (0, 1); got {test_fraction!r}")
    if n < 3:
        raise ConfigError(f"a held-out split needs at least 3 rows; got {n}")
    n_test = min(max(1, round(test_fraction * n)), n - 2)
    perm = np.random.default_rng(random_state).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def heldout_reconstruction(
    store_or_matrix: Store | np.ndarray,
    ks: Iterable[int],
    *,
    test_fraction: float = 0.2,
    random_state: int | None = 0,
    **fit_kwargs: Any,
) -> dict[str, list]:
    """Does the space generalise to models not used to fit it? (w2w's held-out test.)

    Splits the rows at random into train and held-out sets, fits one space with ``max(ks)`` components
    on the train rows and, for each ``k``, measures the mean relative residual
    ``||x̃ - x̃_k||² / ||x̃||²`` of the rank-``k`` reconstruction, where ``x̃ = (x - mean) / scale`` uses
    the train statistics. A real low-dimensional structure gives held-out errors that fall with ``k``
    to the noise floor; on unstructured data the held-out error stays near 1 however small the train
    error gets.

    Parameters
    ----------
    store_or_matrix : Store or ndarray of shape (n_rows, n_features)
    ks : iterable of int
        Ranks to evaluate, each in ``[0, min(n_train, n_features)]`` (0 gives 1 by definition).
    test_fraction : float, default=0.2
        Fraction of rows held out (at least 1 row; at least 2 stay for training).
    random_state : int or None, default=0
        Seeds the split and the fit.
    **fit_kwargs
        Passed to :func:`fit_space` (not ``rows`` or ``n_components``, which this function sets).

    Returns
    -------
    dict
        ``k`` (sorted, unique), ``train_error`` and ``heldout_error`` (one float per k), ``heldout_ids``,
        and ``n_train``.
    """
    for reserved in ("rows", "n_components"):
        if reserved in fit_kwargs:
            raise ConfigError(f"{reserved} must not be passed to heldout_reconstruction (it sets it); got {reserved}=…")
    everything = _make_source(store_or_matrix, None)
    n_all, d = everything.n, everything.d
    train, test = heldout_split(n_all, test_fraction, random_state)
    n_train = len(train)
    given = list(ks) if isinstance(ks, Iterable) and not isinstance(ks, (str, bytes)) else None
    ok = bool(given) and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in given)
    k_list = sorted({int(k) for k in given}) if ok else []
    if not ok or k_list[0] < 0 or k_list[-1] > min(n_train, d):
        raise ConfigError(f"ks must be a non-empty list of integers in [0, {min(n_train, d)}]; got {given or ks!r}")
    space = fit_space(store_or_matrix, max(k_list[-1], 1), rows=train, random_state=random_state, **fit_kwargs)
    step = int(space.config["block_rows"])
    progress = fit_kwargs.get("progress", True)
    errors = {}
    for name, idx in (("train_error", train), ("heldout_error", test)):
        source = _make_source(store_or_matrix, idx)
        errors[name] = _relative_residuals(space, source, k_list, step, progress)
    return {
        "k": k_list,
        "train_error": errors["train_error"],
        "heldout_error": errors["heldout_error"],
        "heldout_ids": list(_make_source(store_or_matrix, test).ids),
        "n_train": int(n_train),
    }


def _relative_residuals(space: Space, source: _Source, ks: list[int], step: int, progress: bool) -> list[float]:
    """Mean over rows of ``||x̃ - x̃_k||² / ||x̃||²`` for each k, streaming; rows equal to the mean count 0."""
    comps = space.components
    sums = np.zeros(len(ks))
    n_blocks = math.ceil(source.n / step)
    bar = tqdm(
        source.blocks(step),
        total=n_blocks,
        desc="reconstruct",
        unit="block",
        disable=None if progress else True,
        file=sys.stderr,
    )
    for _, block in bar:
        x = (block - space.mean) / space.scale
        coords = x @ comps.T
        denom = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        residual, done = x, 0
        for i, k in enumerate(ks):
            if k > done:
                residual = residual - coords[:, done:k] @ comps[done:k]
                done = k
            num = np.einsum("ij,ij->i", residual, residual, dtype=np.float64)
            sums[i] += np.divide(num, denom, out=np.zeros_like(num), where=denom > 0).sum()
    return [float(v / source.n) for v in sums]
