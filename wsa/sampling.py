"""Gaussian sampling in w2w space, novelty of samples, and straight-line paths (maths behind ``wsa sample``).

Why these pieces: weights2weights (Dravid et al., arXiv 2406.09413, §4.2 "Sampling") draws new
identities by fitting an independent Gaussian to each principal-component coefficient of the
training models and sampling from it. Whether such samples are *new* models or near-copies of
training models is a nearest-neighbour question in the same PC coordinates, so novelty lives here
too. Interpolation (w2w's "identity interpolation") is a straight line either between two
coefficient vectors or between two flattened weight rows; both helpers share one formula.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "GaussianModel",
    "fit_gaussian",
    "interpolate_pc",
    "interpolate_weights",
    "novelty",
    "novelty_summary",
    "probe_scores",
    "train_nn_distances",
]

Kind = Literal["diagonal", "full"]


@dataclass(frozen=True)
class GaussianModel:
    """A Gaussian over PC coefficients, fitted by :func:`fit_gaussian`.

    Attributes
    ----------
    kind : {"diagonal", "full"}
        ``"diagonal"`` draws every coefficient independently (w2w's sampler); ``"full"`` uses the
        covariance.
    mean : ndarray of shape (k,)
        Mean coefficient vector.
    std : ndarray of shape (k,)
        Per-coefficient standard deviation (for ``"full"``: square root of the covariance diagonal).
    covariance : ndarray of shape (k, k) or None
        The (optionally shrunk) covariance; ``None`` for ``"diagonal"``.
    shrinkage : float or None
        Shrinkage intensity actually used (Ledoit-Wolf's estimate or the given value); ``None`` when
        the empirical covariance was used or for ``"diagonal"``.
    n_samples : int
        Number of training models the Gaussian was fitted on.
    factor : ndarray of shape (k, k) or None
        ``L`` with ``L @ L.T == covariance`` (from an eigendecomposition, so a singular covariance
        is fine); ``None`` for ``"diagonal"``.
    """

    kind: Kind
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    covariance: npt.NDArray[np.float64] | None
    shrinkage: float | None
    n_samples: int
    factor: npt.NDArray[np.float64] | None = None

    @property
    def n_components(self) -> int:
        return int(self.mean.shape[0])

    def sample(
        self, n: int, *, temperature: float = 1.0, random_state: int | np.random.Generator | None = None
    ) -> npt.NDArray[np.float64]:
        """Draw ``n`` coefficient vectors; ``temperature`` multiplies the standard deviation.

        ``temperature=0`` returns ``n`` copies of the mean (a degenerate sampler, useful as a
        negative control for diversity checks); values above 1 reach further into the tails.

        Returns
        -------
        ndarray of shape (n, k)
        """
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature!r}")
        rng = np.random.default_rng(random_state)
        eps = rng.standard_normal((n, self.n_components))
        if self.kind == "diagonal":
            return self.mean + temperature * eps * self.std
        assert self.factor is not None  # set by fit_gaussian for "full"
        return self.mean + temperature * (eps @ self.factor.T)


def fit_gaussian(
    coefficients: npt.ArrayLike, kind: Kind = "diagonal", shrinkage: float | Literal["ledoit_wolf"] | None = None
) -> GaussianModel:
    """Fit a Gaussian to PC coefficients: w2w's independent per-coefficient model, or a full one.

    Why both: in exact PCA coordinates of the rows the space was fitted on, the coefficients are
    uncorrelated by construction (``Z = U S`` so ``Zᵀ Z`` is diagonal), and ``"full"`` equals
    ``"diagonal"`` up to finite-sample cross-terms. They differ where the space was fitted on other
    rows, by a randomized or streaming solver, or on a subset: then ``"full"`` keeps the residual
    correlations that ``"diagonal"`` throws away. Comparing the two is a cheap check of w2w's
    independence assumption.

    Parameters
    ----------
    coefficients : array-like of shape (n_samples, k)
        PC coefficients of the training models (``space.coefficients``).
    kind : {"diagonal", "full"}, default="diagonal"
    shrinkage : float in [0, 1], "ledoit_wolf" or None, default=None
        Only for ``kind="full"``: ``"ledoit_wolf"`` uses scikit-learn's Ledoit-Wolf estimate, a float
        a fixed shrinkage towards a scaled identity (``ShrunkCovariance``), ``None`` the empirical
        covariance. Useful when ``k`` is close to or above ``n_samples``.

    Returns
    -------
    GaussianModel
    """
    z = np.asarray(coefficients, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"coefficients must be a 2-D array with at least 2 rows; got shape {z.shape}")
    if kind not in ("diagonal", "full"):
        raise ValueError(f"kind must be 'diagonal' or 'full'; got {kind!r}")
    mean = z.mean(axis=0)
    if kind == "diagonal":
        if shrinkage is not None:
            raise ValueError("shrinkage applies to kind='full' only (a diagonal model has no cross-terms to shrink)")
        return GaussianModel("diagonal", mean, z.std(axis=0, ddof=1), None, None, z.shape[0])

    used: float | None = None
    if shrinkage is None:
        cov = np.cov(z, rowvar=False, ddof=1).reshape(z.shape[1], z.shape[1])
    elif shrinkage == "ledoit_wolf":
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf(assume_centered=False).fit(z)
        cov, used = lw.covariance_, float(lw.shrinkage_)
    elif isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1:
        from sklearn.covariance import ShrunkCovariance

        cov, used = ShrunkCovariance(shrinkage=float(shrinkage)).fit(z).covariance_, float(shrinkage)
    else:
        raise ValueError(f"shrinkage must be None, 'ledoit_wolf' or a float in [0, 1]; got {shrinkage!r}")
    cov = 0.5 * (cov + cov.T)
    # eigh rather than Cholesky: with k >= n_samples the covariance is singular, which is fine to sample.
    w, v = np.linalg.eigh(cov)
    factor = v * np.sqrt(np.clip(w, 0.0, None))
    return GaussianModel("full", mean, np.sqrt(np.clip(np.diag(cov), 0.0, None)), cov, used, z.shape[0], factor)


def _nearest(query: np.ndarray, train: np.ndarray, n_neighbors: int, batch: int) -> np.ndarray:
    """Distances to the ``n_neighbors`` nearest rows of ``train``, in query batches to bound memory."""
    from sklearn.neighbors import NearestNeighbors

    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch!r}")
    nn = NearestNeighbors(n_neighbors=n_neighbors, algorithm="brute").fit(train)
    out = np.empty((query.shape[0], n_neighbors), dtype=np.float64)
    for start in range(0, query.shape[0], batch):
        dist, _ = nn.kneighbors(query[start : start + batch], n_neighbors=n_neighbors)
        out[start : start + batch] = dist
    return out


def novelty(samples: npt.ArrayLike, train: npt.ArrayLike, *, batch: int = 256) -> npt.NDArray[np.float64]:
    """Euclidean distance from each sample to its nearest training model, in PC coordinates.

    Read it against :func:`train_nn_distances`: a sampler that produces new models puts its
    samples about as far from the training set as training models are from each other; one that
    memorises puts them much closer.

    Parameters
    ----------
    samples : array-like of shape (n, k)
    train : array-like of shape (n_train, k)
    batch : int, default=256
        Query rows per nearest-neighbour call.

    Returns
    -------
    ndarray of shape (n,)
    """
    s = np.asarray(samples, dtype=np.float64)
    t = np.asarray(train, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"samples and train must be 2-D with the same width; got {s.shape} and {t.shape}")
    if s.shape[0] == 0:
        return np.empty(0)
    return _nearest(s, t, 1, batch)[:, 0]


def train_nn_distances(
    train: npt.ArrayLike, *, rows: npt.ArrayLike | None = None, batch: int = 256
) -> npt.NDArray[np.float64]:
    """Leave-one-out nearest-neighbour distance of training models: the yardstick for :func:`novelty`.

    Each queried model's distance to the closest *other* training model (a duplicate counts, at
    distance 0). ``rows`` limits the queries to a subset (each still searched against all of
    ``train``), which keeps this O(len(rows) · n_train · k) on large collections.

    Parameters
    ----------
    train : array-like of shape (n_train, k)
    rows : array-like of int, optional
        Indices of the training models to query; all by default.
    batch : int, default=256

    Returns
    -------
    ndarray of shape (len(rows),)
    """
    t = np.asarray(train, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"train must be 2-D with at least 2 rows; got shape {t.shape}")
    query = t if rows is None else t[np.asarray(rows, dtype=np.intp)]
    # The two nearest neighbours of a training row are itself (distance 0) and its true nearest
    # other row; with duplicates both are at distance 0, which is still the right answer.
    return _nearest(query, t, 2, batch)[:, 1]


def novelty_summary(sample_nn: npt.ArrayLike, train_nn: npt.ArrayLike, *, percentile: float = 5.0) -> dict[str, float]:
    """Compare samples' nearest-training distances with training models' leave-one-out distances.

    ``novelty_ratio`` (median over median) near 1 means samples are as new as training models are
    to each other; ``memorised_fraction`` is the share of samples closer to a training model than
    ``percentile`` % of training models are to their nearest neighbour (chance level: about
    ``percentile / 100``; copies of training models score 1).

    Parameters
    ----------
    sample_nn : array-like of shape (n,)
        From :func:`novelty`.
    train_nn : array-like of shape (m,)
        From :func:`train_nn_distances`.
    percentile : float, default=5.0

    Returns
    -------
    dict
        ``median_novelty``, ``median_train_nn``, ``novelty_ratio``, ``threshold``, ``memorised_fraction``.
    """
    d = np.asarray(sample_nn, dtype=np.float64)
    ref = np.asarray(train_nn, dtype=np.float64)
    if d.size == 0 or ref.size == 0:
        raise ValueError("sample_nn and train_nn must be non-empty")
    med, ref_med = float(np.median(d)), float(np.median(ref))
    threshold = float(np.percentile(ref, percentile))
    return {
        "median_novelty": med,
        "median_train_nn": ref_med,
        "novelty_ratio": med / ref_med if ref_med > 0 else float("nan"),
        "threshold": threshold,
        "memorised_fraction": float(np.mean(d < threshold)) if threshold > 0 else float(np.mean(d <= 0)),
    }


def _lerp(x0: np.ndarray, x1: np.ndarray, steps: int) -> np.ndarray:
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both endpoints); got {steps!r}")
    if x0.shape != x1.shape or x0.ndim != 1:
        raise ValueError(f"endpoints must be 1-D of the same length; got {x0.shape} and {x1.shape}")
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return (1.0 - t) * x0[None, :] + t * x1[None, :]


def interpolate_pc(c0: npt.ArrayLike, c1: npt.ArrayLike, steps: int) -> npt.NDArray[np.float64]:
    """Straight path between two coefficient vectors, endpoints included (``t = linspace(0, 1, steps)``).

    Returns
    -------
    ndarray of shape (steps, k)
    """
    return _lerp(np.asarray(c0, dtype=np.float64), np.asarray(c1, dtype=np.float64), steps)


def interpolate_weights(x0: npt.ArrayLike, x1: npt.ArrayLike, steps: int) -> npt.NDArray[np.float32]:
    """Straight path between two flattened weight rows, endpoints included, in float32 (rows are large).

    Unlike :func:`interpolate_pc`, the path keeps each endpoint's residual off the PC space, so its
    points are real weight vectors rather than projections.

    Returns
    -------
    ndarray of shape (steps, n_features)
    """
    a = np.asarray(x0, dtype=np.float64)
    b = np.asarray(x1, dtype=np.float64)
    return _lerp(a, b, steps).astype(np.float32)


def probe_scores(probes: Mapping[str, Any], coefficients: npt.ArrayLike) -> dict[str, npt.NDArray[np.float64]]:
    """Score coefficient vectors with the fitted attribute probes (the ``probes`` analyzer's artifact).

    One continuous score per attribute, so paths and samples can be compared on one scale: binary
    probes give log-odds of the positive class (``classes_[1]``; linear in the coefficients for a
    logistic probe, so a straight path gives a straight score), continuous probes their
    prediction, categorical probes the class probabilities (one column per ``classes_`` entry).

    Parameters
    ----------
    probes : mapping
        ``{"k": k, "kinds": {attr: "binary"|"continuous"|"categorical"}, "models": {attr: estimator}}``;
        models take the first ``k`` coefficients.
    coefficients : array-like of shape (n, >= k)

    Returns
    -------
    dict
        ``attr -> ndarray of shape (n,)`` (binary, continuous) or ``(n, n_classes)`` (categorical).
    """
    z = np.asarray(coefficients, dtype=np.float64)
    k = int(probes["k"])
    if z.ndim != 2 or z.shape[1] < k:
        raise ValueError(f"probes use {k} coefficients; got an array of shape {z.shape}")
    z = z[:, :k]
    out: dict[str, npt.NDArray[np.float64]] = {}
    kinds = probes.get("kinds", {})
    for attr, model in probes["models"].items():
        kind = kinds.get(attr, "continuous")
        if kind == "binary":
            if hasattr(model, "decision_function"):
                score = np.asarray(model.decision_function(z), dtype=np.float64)
            else:
                p = np.clip(np.asarray(model.predict_proba(z), dtype=np.float64)[:, 1], 1e-12, 1 - 1e-12)
                score = np.log(p) - np.log1p(-p)
            out[attr] = score.reshape(-1)
        elif kind == "categorical":
            out[attr] = np.asarray(model.predict_proba(z), dtype=np.float64)
        else:
            out[attr] = np.asarray(model.predict(z), dtype=np.float64).reshape(-1)
    return out
