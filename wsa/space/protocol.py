"""The questions every fitted space answers, whichever its geometry: :class:`FittedSpace`.

Why a protocol: wsa fits a PCA of adapters in two geometries — explicit components over the stored rows
(:class:`wsa.space.Space`, ``geometry = "explicit"``) and the gauge-invariant PCA of ΔW held in dual form
(:class:`wsa.delta_space.DeltaSpace`, ``geometry = "delta"``), which has no component matrix. The analyzers
ask both the same questions — the spectrum, the members' norms, inner products and residuals, the held-out
test, per-module statistics, directions as weights — and each space answers in its own geometry, so an
analyzer has one code path and never branches on ``geometry``.

Conventions shared by both implementations:

* **The space's units.** A member ``x̃_i`` is what the PCA decomposed: for an explicit space the stored row
  centred by the space's mean and divided by its scale, ``(x_i − mean) / scale``; for a ΔW space
  ``ΔW_i − mean ΔW`` under the Frobenius inner product. The components are orthonormal in these units, so
  ``‖x̃_i‖² = ‖c_i‖² + ‖r_i‖²`` with ``c_i`` the coefficients and ``r_i`` the residual off the space.
* **Members by position.** ``a``, ``b`` and ``members`` are positions in ``space.ids`` (the rows of
  ``space.coefficients``), never store rows: the space maps them onto its store.
* **Bounded memory.** Every method that reads the store reads blocks or column groups of bounded size,
  never the N × D matrix.

This module also holds what the two implementations share: which store rows the members are, reading
some members' rows or one module's columns of them, pairs in bounded chunks, and
:class:`WeightDirections`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from wsa.errors import ConfigError

#: The members' rows of one chunk of pairs are read into at most about this many bytes (float32).
PAIR_BYTES = 64 * 2**20
#: One module's columns of the members asked for are read in column groups of at most this many bytes.
MODULE_BUFFER_BYTES = 512 * 2**20
#: How :class:`WeightDirections` vectors are expressed: over the store's columns, or over the members.
WEIGHT_BASES = ("features", "members")


@dataclass(frozen=True)
class WeightDirections:
    """PC-space directions as changes of the weights, in the basis the space's geometry has.

    Why two bases: an explicit space's component matrix maps a PC direction onto the store's columns;
    a ΔW space has none, and its exact weight-space direction is a weighted sum of the members' ΔW
    (component j is ``Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW)``), so it is written as those weights.

    Attributes
    ----------
    basis : str
        ``"features"`` (one value per store column) or ``"members"`` (one weight per member, in the order
        of ``space.ids``: the direction is ``Σ_i w_i · ΔW_i``).
    standardized : ndarray of shape (m, n), float32
        The directions in the space's units (``directions @ components`` for an explicit space).
    raw : ndarray of shape (m, n), float32
        The change of the stored weights per unit step (``standardized × scale``; equal to ``standardized``
        where the space does not scale).
    raw_norms : ndarray of shape (m,), float64
        The weight-space norm of each ``raw`` change (for ``"members"``, of the ΔW it stands for).
    """

    basis: str
    standardized: np.ndarray
    raw: np.ndarray
    raw_norms: np.ndarray


@runtime_checkable
class FittedSpace(Protocol):
    """What an analyzer may ask a fitted space, in either geometry (see the module docstring for units).

    Implemented by :class:`wsa.space.Space` and :class:`wsa.delta_space.DeltaSpace`;
    ``isinstance(space, FittedSpace)`` checks that every member is present.
    """

    #: The geometry's name, as ``--space`` spells it: ``"explicit"`` or ``"delta"``.
    geometry: ClassVar[str]

    @property
    def ids(self) -> tuple[str, ...]:
        """Member ids, in the order of the rows of :attr:`coefficients`."""
        ...

    @property
    def n_samples(self) -> int:
        """Members fitted."""
        ...

    @property
    def n_components(self) -> int:
        """Components kept."""
        ...

    @property
    def coefficients(self) -> np.ndarray:
        """(n_samples, n_components) PC coordinates of the members."""
        ...

    @property
    def explained_variance(self) -> np.ndarray:
        """(n_components,) variance along each component (``singular_values² / (n_samples − 1)``)."""
        ...

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """(n_components,) fraction of :attr:`total_variance` per component; NaN without variance."""
        ...

    @property
    def singular_values(self) -> np.ndarray:
        """(n_components,) singular values of the centred (scaled) data, descending."""
        ...

    @property
    def total_variance(self) -> float:
        """``Σ_i ‖x̃_i‖² / (n_samples − 1)``: the denominator of every variance fraction."""
        ...

    @property
    def config(self) -> dict[str, Any]:
        """How the space was fitted (JSON-serializable)."""
        ...

    def n_components_for(self, fraction: float) -> int | None:
        """Smallest number of components reaching ``fraction`` of the variance, else None."""
        ...

    def mean_sq_norm(self) -> float:
        """``‖mean‖²`` in the space's units: how large the members are before centring.

        Why: a collection of identical adapters has a total variance of float rounding of this, not 0.
        """
        ...

    def member_sq_norms(self, store: Any, block_rows: int = 2048) -> np.ndarray:
        """(n_samples,) ``‖x̃_i‖²`` of every member."""
        ...

    def member_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        """(len(a),) float64 ``⟨x̃_a, x̃_b⟩`` for each pair of member positions ``a[p]``, ``b[p]``."""
        ...

    def member_residual_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        """(len(a),) float64 ``⟨r_a, r_b⟩`` of the pairs' residuals off the space (all components)."""
        ...

    def transform_adapters(self, adapters: Sequence[Any], store: Any, block_rows: int = 2048) -> np.ndarray:
        """PC coefficients (n, k) of adapters (any rank in a ΔW space) placed in the space: a new model's point."""
        ...

    def member_residual_sq(self, store: Any, block_rows: int = 2048) -> np.ndarray:
        """(n_samples,) float64 ``‖r_i‖² = ‖x̃_i‖² − ‖c_i‖²`` (clipped at 0) of every member."""
        ...

    def heldout(
        self,
        store: Any,
        ks: Sequence[int],
        *,
        test_fraction: float = 0.2,
        random_state: int | None = 0,
        progress: bool = True,
    ) -> dict[str, list]:
        """The held-out reconstruction test (w2w) in this geometry, fitted as this space was.

        Returns ``k``, ``train_error``, ``heldout_error`` (one mean relative residual per k),
        ``heldout_ids`` and ``n_train`` (:func:`wsa.space.heldout_reconstruction`).
        """
        ...

    def module_grams(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> Iterator[np.ndarray]:
        """One (s, s) float64 uncentred Gram per module of ``modules``, of the ``s`` members asked for."""
        ...

    def module_spectra(
        self,
        store: Any,
        modules: Sequence[Any],
        members: Sequence[int] | None = None,
        k: int = 16,
        block_rows: int = 512,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per module: the centred spectrum of the members asked for and their top-``k`` PC scores.

        The PCA of :meth:`module_grams` (:func:`gram_spectrum`), each space taking its cheapest exact route.
        """
        ...

    def module_stats(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per module: the members' variance (n_modules,) and their squared norms (n, n_modules)."""
        ...

    def directions_in_weights(self, directions: np.ndarray) -> WeightDirections:
        """(m, k') directions in PC coordinates (k' ≤ n_components) as changes of the weights."""
        ...


# ---------------------------------------------------------------------- shared by the two implementations


def member_rows(store: Any, ids: Sequence[str]) -> np.ndarray:
    """The store row of each member id, in the order of ``ids``; a missing id is one ConfigError."""
    index = {str(rid): i for i, rid in enumerate(store.ids)}
    missing = [rid for rid in ids if rid not in index]
    if missing:
        raise ConfigError(f"the store has no rows for {len(missing)} member(s) of the space, e.g. {missing[0]!r}")
    return np.asarray([index[rid] for rid in ids], dtype=np.int64)


def member_positions(members: Sequence[int] | None, n: int) -> np.ndarray:
    """``members`` as int64 positions in ``[0, n)`` (``None``: all of them), or one ConfigError."""
    if members is None:
        return np.arange(n, dtype=np.int64)
    pos = np.asarray(members)
    if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
        raise ConfigError(f"member positions must be a 1-D sequence of ints; got shape {pos.shape}, {pos.dtype}")
    pos = pos.astype(np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ConfigError(f"member positions must lie in [0, {n}) (the space's members); got {pos.min()}…{pos.max()}")
    return pos


def read_rows(store: Any, rows: np.ndarray, block_rows: int = 1024) -> np.ndarray:
    """Store rows ``rows`` as one float32 array, read through ``store.iter_blocks`` (bounded blocks)."""
    blocks = [block for _, block in store.iter_blocks(block_rows, rows=rows)]
    if not blocks:
        return np.empty((0, 0), dtype=np.float32)
    return np.concatenate(blocks).astype(np.float32, copy=False)


def pair_chunks(
    a: Sequence[int], b: Sequence[int], n: int, row_floats: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs of member positions in chunks whose rows fit :data:`PAIR_BYTES`.

    Yields ``(where, members, ia, ib)``: the chunk's slice of the pairs, the distinct members it needs (read
    once each) and, per pair, the index of ``a`` and of ``b`` in ``members``.
    """
    pa, pb = member_positions(a, n), member_positions(b, n)
    if pa.shape != pb.shape:
        raise ConfigError(f"a and b must pair up: {pa.size} and {pb.size} member positions")
    per = max(1, PAIR_BYTES // (4 * 4 * max(row_floats, 1)))  # two rows read and two gathered per pair
    for start in range(0, pa.size, per):
        where = slice(start, min(start + per, pa.size))
        members, inverse = np.unique(np.concatenate([pa[where], pb[where]]), return_inverse=True)
        m = where.stop - where.start
        yield where, members, inverse[:m], inverse[m:]


def module_columns(
    store: Any, modules: Sequence[Any], rows: np.ndarray, block_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, x)`` per module of ``modules``, in order: ``x`` its (len(rows), size) float32 columns of ``rows``.

    Why groups: reading the rows once per module would read the store once per module (hundreds of times
    at SD scale); holding every column would not fit. Consecutive modules are grouped up to
    :data:`MODULE_BUFFER_BYTES`, so the rows are read about ``s·D·4 / MODULE_BUFFER_BYTES`` times.
    """
    s = len(rows)
    groups: list[list[int]] = [[]]
    width = 0
    for i, m in enumerate(modules):
        if groups[-1] and (width + m.size) * s * 4 > MODULE_BUFFER_BYTES:
            groups.append([])
            width = 0
        groups[-1].append(i)
        width += m.size
    for group in groups:
        if not group:
            continue
        cols = np.concatenate([np.arange(modules[i].columns.start, modules[i].columns.stop) for i in group])
        lo, hi = int(cols.min()), int(cols.max()) + 1
        contiguous = hi - lo == len(cols)
        buf = np.empty((s, len(cols)), dtype=np.float32)
        for start, block in store.iter_blocks(block_rows, rows=rows):
            buf[start : start + len(block)] = block[:, lo:hi] if contiguous else block[:, cols]
        offset = 0
        for i in group:
            yield i, buf[:, offset : offset + modules[i].size]
            offset += modules[i].size


#: Eigen-directions below this fraction of the largest eigenvalue are float rounding of zero: left out of scores.
SCORE_TOL = 1e-10


def _top_scores(eigenvalues: np.ndarray, k: int) -> int:
    """How many of the top-``k`` directions carry variance (at least one, so a probe always gets a column)."""
    if not eigenvalues.size or k < 1:
        return 0
    return max(1, int(np.sum(eigenvalues[:k] > SCORE_TOL * eigenvalues[0])))


def gram_spectrum(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The centred spectrum of ``s`` members and their top-``k`` PC scores, from their uncentred (s, s) Gram.

    Double centring gives the Gram of the centred members, whose eigenvalues are the squared singular values
    of the centred members × features block (the covariance's non-zero eigenvalues) and whose eigenvectors
    times ``√λ`` are the PC scores — the same numbers whether the features were ever formed or not (ΔW never
    is). Directions at float rounding of zero (below :data:`SCORE_TOL` of the largest eigenvalue: the constant
    direction centring removes, a module narrower than ``k``) are left out of the scores, so a standardizing
    probe never sees rounding noise as a feature.

    Returns
    -------
    eigenvalues : ndarray of shape (s,), descending, clipped at 0
    scores : ndarray of shape (s, at most k)
    """
    g = np.asarray(gram, dtype=np.float64)
    g = g - g.mean(axis=0, keepdims=True)
    g -= g.mean(axis=1, keepdims=True)
    eigenvalues, vectors = np.linalg.eigh(g)
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
    kept = _top_scores(eigenvalues, k)
    return eigenvalues, vectors[:, ::-1][:, :kept] * np.sqrt(eigenvalues[:kept])


def feature_spectrum(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gram_spectrum` of rows whose features are at hand, from the smaller side of the centred block.

    Why: with ``s`` members of ``d`` features the Gram route costs ``s³`` and the covariance route ``d³`` (plus
    ``s·d·k`` for the scores ``x_c · V``); the non-zero eigenvalues and the scores are the same either way, so
    a module narrower than the number of members is decomposed as a d × d covariance.

    Returns
    -------
    eigenvalues : ndarray of shape (min(s, d),), descending, clipped at 0
    scores : ndarray of shape (s, at most k)
    """
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(axis=0, keepdims=True)
    s, d = xc.shape
    if s <= d:
        return gram_spectrum(xc @ xc.T, k)
    eigenvalues, vectors = np.linalg.eigh(xc.T @ xc)
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
    kept = _top_scores(eigenvalues, k)
    return eigenvalues, xc @ vectors[:, ::-1][:, :kept]
