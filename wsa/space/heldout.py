"""Checks of a fitted space: principal angles between subspaces and the held-out reconstruction test."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from wsa.errors import ConfigError
from wsa.space.fit import (
    fit_space,
)
from wsa.space.sources import _make_source, _Source
from wsa.space.value import (
    Space,
)
from wsa.store import Store

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
