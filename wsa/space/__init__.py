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

Modules: ``value`` (the :class:`Space` value and its files), ``sources`` (rows block by block, moments,
standardization), ``solvers`` (the shared linear algebra and sign rule), ``fit`` (:func:`fit_space`),
``heldout`` (principal angles, the held-out test), ``protocol`` (:class:`FittedSpace`: the questions every
space answers, the ΔW space of :mod:`wsa.delta_space` included, so analyzers have one code path).
"""

from __future__ import annotations

from wsa.space.fit import fit_space
from wsa.space.heldout import heldout_reconstruction, heldout_split, principal_angles
from wsa.space.protocol import FittedSpace, WeightDirections
from wsa.space.value import EXACT_MAX_DIM, SOLVERS, SPACE_JSON, SPACE_TENSORS, SPACE_VERSION, Space, components_for

__all__ = [
    "EXACT_MAX_DIM",
    "SOLVERS",
    "SPACE_JSON",
    "SPACE_TENSORS",
    "SPACE_VERSION",
    "FittedSpace",
    "Space",
    "WeightDirections",
    "components_for",
    "fit_space",
    "heldout_reconstruction",
    "heldout_split",
    "principal_angles",
]
