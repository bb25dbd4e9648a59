"""Where rows come from while fitting: a store or an array, block by block, with their moments and standardization."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from wsa.errors import ConfigError
from wsa.store import Store

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
