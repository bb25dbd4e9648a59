"""Adapters that do not belong: duplicates, models far from the rest, and models the space cannot describe.

Why: a collection scraped from the web holds re-uploads (the same file under two names, or the same
weights re-saved), broken or over-trained adapters (a ΔW ten times the usual size) and adapters of
another kind (not in the span of the others). Each inflates or bends the space; each is cheap to find
from the PC coefficients plus the part of every member the space does not hold (one streamed pass for an
explicit space; from the fit alone for a ΔW space). Every number is in the space's units and asked through
:class:`wsa.space.FittedSpace`, so the analyzer runs unchanged in either geometry.

Three outlier tests, each with a threshold that keeps false alarms rare on clean data:

* Mahalanobis distance² in the top-k PC space against χ²(k) at ``1 − alpha / n`` (Bonferroni, so the
  chance of any false alarm over the whole collection is about ``alpha`` for Gaussian data);
* reconstruction residual ``‖x − x̂‖`` (what the space misses), robust z-score (median/MAD) above
  ``z_threshold`` (3.5, Iglewicz & Hoaglin 1993);
* ΔW norm from the store manifest, robust z-score of its logarithm beyond ±``z_threshold``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, Table, fraction, positive_int
from wsa.palette import OKABE_ITO

#: Consistency constant: MAD × 1.4826 estimates σ for Gaussian data.
MAD_TO_SIGMA = 1.4826
#: Candidate duplicate pairs checked exactly (each check reads the pair's two rows).
MAX_PAIRS_CHECKED = 5000
#: Dimensions of the normalised coefficients searched for duplicate candidates.
SEARCH_DIMS = 16
#: Points labelled by id in the figure.
MAX_LABELS = 15


def robust_z(values: np.ndarray) -> np.ndarray | None:
    """``(v − median) / (1.4826 · MAD)``; None when the MAD is 0 (no spread to judge against)."""
    med = np.median(values)
    mad = MAD_TO_SIGMA * np.median(np.abs(values - med))
    if not mad > 0:
        return None
    return (values - med) / mad


def member_cosines(ctx: AnalysisContext, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact cosine of each pair of members ``a[p]``, ``b[p]`` (positions in ``space.ids``), centred (and scaled)
    as the space sees them: ``⟨x̃_a, x̃_b⟩ / (‖x̃_a‖ ‖x̃_b‖)``, NaN where a member equals the mean.

    From the pairs' own rows through :meth:`~wsa.space.FittedSpace.member_inner` (for a ΔW space: their factor
    Grams), so the candidates the coefficient bound leaves are checked exactly, in either geometry.
    """
    if not len(a):
        return np.zeros(0)
    space = ctx.space
    ends = np.unique(np.concatenate([a, b]))
    inner = space.member_inner(ctx.store, np.concatenate([a, ends]), np.concatenate([b, ends]))
    sq = np.clip(inner[len(a) :], 0.0, None)  # ‖x̃‖² of each member involved, in the order of ``ends``
    den = np.sqrt(sq[np.searchsorted(ends, a)] * sq[np.searchsorted(ends, b)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, inner[: len(a)] / den, np.nan)


@register_analyzer
class Outliers(Analyzer):
    """Near-duplicates (same file or cosine ≥ threshold) and outlying adapters (three robust tests).

    Parameters
    ----------
    n_components : int, default=20
        PCs of the Mahalanobis test (capped at the space's and at ``n − 2``).
    alpha : float, default=0.05
        Family-wise false-alarm rate of the Mahalanobis test (Bonferroni over the models).
    z_threshold : float, default=3.5
        Robust z-score beyond which a residual (one-sided) or log ΔW norm (two-sided) is flagged.
    cosine_threshold : float, default=0.999
        Cosine similarity of centered (standardized) rows at or above which two adapters are near-duplicates.
    block_rows : int, default=512
        Rows per streamed block.

    Attributes
    ----------
    ids_, sources_ : list of str
    mahalanobis_ : ndarray of shape (n,)
        Squared Mahalanobis distance in the top-``k_`` PC space.
    residual_ : ndarray of shape (n,)
        ``‖x̃ − x̂‖`` with all the space's components, in the space's units (centred and scaled rows; ΔW for
        a ΔW space): :meth:`~wsa.space.FittedSpace.member_residual_sq`.
    flags_ : list of dict
        One record per (model, reason): ``id``, ``source``, ``reason``, ``score``, ``threshold``.
    duplicates_ : list of dict
        One record per pair: ``id_a``, ``id_b``, ``source_a``, ``source_b``, ``cosine``, ``same_file``.
    """

    name: ClassVar[str] = "outliers"
    title: ClassVar[str] = "Outliers and near-duplicates"
    reference: ClassVar[str] = (
        "Iglewicz & Hoaglin, How to Detect and Handle Outliers, 1993 (modified z-score); "
        "Mahalanobis distance with a χ² threshold"
    )
    _parameter_constraints: ClassVar[dict] = {
        "n_components": (positive_int, "a positive int"),
        "alpha": (fraction, "a fraction in (0, 1)"),
        "z_threshold": (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            "a positive number",
        ),
        "cosine_threshold": (fraction, "a fraction in (0, 1)"),
        "block_rows": (positive_int, "a positive int"),
    }

    def __init__(
        self,
        *,
        n_components: int = 20,
        alpha: float = 0.05,
        z_threshold: float = 3.5,
        cosine_threshold: float = 0.999,
        block_rows: int = 512,
    ) -> None:
        self.n_components = n_components
        self.alpha = alpha
        self.z_threshold = z_threshold
        self.cosine_threshold = cosine_threshold
        self.block_rows = block_rows

    def fit(self, ctx: AnalysisContext) -> Outliers:
        from scipy.stats import chi2

        self._validate_params()
        store, space = ctx.store, ctx.space
        index = {rid: i for i, rid in enumerate(store.ids)}
        self.ids_ = [str(i) for i in space.ids]
        rows = np.asarray([index[rid] for rid in self.ids_], dtype=np.int64)
        meta = [store.rows[i] for i in rows]
        self.sources_ = [str(r.get("source", "")) for r in meta]
        n = len(rows)
        self.notes_: list[str] = []

        # What the space misses of each member, in its units (one streamed pass for an explicit space).
        resid_sq = space.member_residual_sq(store, self.block_rows)
        coefs = np.asarray(space.coefficients, dtype=np.float64)
        self.residual_ = np.sqrt(resid_sq)
        norm = np.sqrt((coefs**2).sum(axis=1) + resid_sq)

        # Mahalanobis in the top-k PC space, with the coefficients' own mean and variance.
        self.k_ = max(1, min(int(self.n_components), space.n_components, n - 2))
        ck = coefs[:, : self.k_]
        var = ck.var(axis=0, ddof=1)
        var = np.where(var > 0, var, np.inf)
        self.mahalanobis_ = (((ck - ck.mean(axis=0)) ** 2) / var).sum(axis=1)
        self.maha_threshold_ = float(chi2.ppf(1 - self.alpha / n, self.k_))

        flags: list[dict[str, Any]] = []

        def flag(i: int, reason: str, score: float, threshold: float) -> None:
            flags.append(
                {
                    "id": self.ids_[i],
                    "source": self.sources_[i],
                    "reason": reason,
                    "score": score,
                    "threshold": threshold,
                }
            )

        for i in np.flatnonzero(self.mahalanobis_ > self.maha_threshold_):
            flag(int(i), "far from the others (Mahalanobis d²)", float(self.mahalanobis_[i]), self.maha_threshold_)

        # Residuals all at float noise mean the components span the data: nothing is off the space.
        self.residual_z_ = None
        if np.median(self.residual_) > 1e-4 * max(float(np.median(norm)), 1e-30):
            self.residual_z_ = robust_z(self.residual_)
        if self.residual_z_ is None:
            self.notes_.append("Residual test skipped: the space reproduces every model (no residual spread).")
        else:
            for i in np.flatnonzero(self.residual_z_ > self.z_threshold):
                flag(
                    int(i),
                    "not described by the space (residual robust z)",
                    float(self.residual_z_[i]),
                    self.z_threshold,
                )

        self.delta_norm_ = np.array([np.nan if r.get("delta_norm") is None else float(r["delta_norm"]) for r in meta])
        self.delta_z_ = None
        if np.isfinite(self.delta_norm_).all() and (self.delta_norm_ > 0).all():
            # On the log scale: norms are positive and multiplicative (5× too large is as odd as 5× too
            # small), and their right-skewed spread would otherwise flag the upper tail of clean data.
            self.delta_z_ = robust_z(np.log(self.delta_norm_))
        if self.delta_z_ is None:
            self.notes_.append("ΔW-norm test skipped: the store has no ΔW norms for some models, or they do not vary.")
        else:
            for i in np.flatnonzero(np.abs(self.delta_z_) > self.z_threshold):
                side = "large" if self.delta_z_[i] > 0 else "small"
                flag(int(i), f"unusually {side} ΔW norm (robust z)", float(self.delta_z_[i]), self.z_threshold)
        self.flags_ = flags

        self.duplicates_ = self._duplicates(ctx, coefs, resid_sq, norm, meta)
        ctx.artifacts["outliers"] = {
            "ids": sorted({f["id"] for f in flags}),
            "duplicates": [(d["id_a"], d["id_b"]) for d in self.duplicates_],
        }
        return self

    def _duplicates(
        self,
        ctx: AnalysisContext,
        coefs: np.ndarray,
        resid_sq: np.ndarray,
        norm: np.ndarray,
        meta: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Same-file pairs (sha256) and pairs with cosine ≥ threshold, found without an n² pass over rows.

        For unit rows ``u = x̃ / ‖x̃‖``, cosine ≥ t means ``‖u_i − u_j‖² ≤ 2(1 − t)``. Splitting ``x̃`` into
        its PC coefficients ``c`` and the residual ``e`` gives the lower bound
        ``‖u_i − u_j‖² ≥ ‖c_i/‖x̃_i‖ − c_j/‖x̃_j‖‖² + (‖e_i‖/‖x̃_i‖ − ‖e_j‖/‖x̃_j‖)²``, and any projection of it
        (the first few coefficients) is smaller still. So: radius search in a few normalised coefficients,
        prune with the bound, then check the survivors exactly (:func:`member_cosines`).
        """
        from sklearn.neighbors import NearestNeighbors

        pairs: dict[tuple[int, int], dict[str, Any]] = {}
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(meta):
            if r.get("sha256"):
                by_hash[str(r["sha256"])].append(i)
        for members in by_hash.values():
            for j in members[1:]:
                pairs[(members[0], j)] = {"same_file": True}

        ok = norm > 0
        pos = np.flatnonzero(ok)
        u = coefs[ok] / norm[ok, None]
        rho = np.sqrt(resid_sq[ok]) / norm[ok]
        radius2 = 2 * (1 - self.cosine_threshold)
        slack = 1e-6  # float32 rounding of the stored rows
        if len(pos) > 1:
            search = u[:, :SEARCH_DIMS]
            nn = NearestNeighbors(radius=float(np.sqrt(radius2 + slack))).fit(search)
            candidates = []
            for a, neigh in enumerate(nn.radius_neighbors(search, return_distance=False)):
                for b in neigh[neigh > a]:
                    bound = float(((u[a] - u[b]) ** 2).sum() + (rho[a] - rho[b]) ** 2)
                    if bound <= radius2 + slack:
                        candidates.append((bound, int(pos[a]), int(pos[b])))
            candidates.sort()
            if len(candidates) > MAX_PAIRS_CHECKED:
                self.notes_.append(
                    f"{len(candidates)} candidate near-duplicate pairs; "
                    f"only the {MAX_PAIRS_CHECKED} closest were checked."
                )
                candidates = candidates[:MAX_PAIRS_CHECKED]
            for _, a, b in candidates:
                pairs.setdefault((a, b), {"same_file": False})

        # Exact cosine from the members' own rows for every candidate pair.
        ordered = sorted(pairs.items())
        first = np.asarray([a for (a, _), _ in ordered], dtype=np.int64)
        second = np.asarray([b for (_, b), _ in ordered], dtype=np.int64)
        cosines = member_cosines(ctx, first, second)
        out = []
        for ((a, b), info), cos in zip(ordered, cosines.tolist(), strict=True):
            if info["same_file"] or cos >= self.cosine_threshold:
                out.append(
                    {
                        "id_a": self.ids_[a],
                        "id_b": self.ids_[b],
                        "source_a": self.sources_[a],
                        "source_b": self.sources_[b],
                        "cosine": cos,
                        "same_file": info["same_file"],
                    }
                )
        return out

    def result(self) -> Result:
        self._check_is_fitted()
        flagged = sorted({f["id"] for f in self.flags_})
        n = len(self.ids_)
        flags = pd.DataFrame(self.flags_, columns=["id", "source", "reason", "score", "threshold"])
        dups = pd.DataFrame(self.duplicates_, columns=["id_a", "id_b", "source_a", "source_b", "cosine", "same_file"])
        tables = [
            Table.from_frame(
                "outliers",
                "Flagged adapters, one row per reason (a model can fail several tests). Check the source file: "
                "re-uploads, failed trainings and adapters of another kind are the usual causes.",
                flags,
            ),
            Table.from_frame(
                "duplicates",
                f"Pairs that are the same file (same sha256) or whose centered rows have cosine ≥ "
                f"{self.cosine_threshold}. Keep one of each pair so duplicates do not count twice in the space.",
                dups,
            ),
            Table.from_frame(
                "scores",
                "Every model's scores: squared Mahalanobis distance in the top PCs, residual norm off the space "
                "and robust z-scores.",
                pd.DataFrame(
                    {
                        "id": self.ids_,
                        "mahalanobis_d2": self.mahalanobis_,
                        "residual": self.residual_,
                        "residual_z": self.residual_z_ if self.residual_z_ is not None else np.nan,
                        "delta_norm": self.delta_norm_,
                        "delta_norm_z": self.delta_z_ if self.delta_z_ is not None else np.nan,
                    }
                ),
                max_rows_in_report=50,
            ),
        ]
        metrics = [
            Metric("outlying adapters", float(len(flagged)), False, units="models"),
            Metric("near-duplicate pairs", float(len(self.duplicates_)), False, units="pairs"),
        ]
        notes = [
            f"Mahalanobis test in the top {self.k_} PCs: d² > {self.maha_threshold_:.1f} (χ²({self.k_}) at "
            f"1 − {self.alpha}/{n}). Residual and ΔW-norm tests: robust z beyond {self.z_threshold}.",
            *self.notes_,
        ]
        summary = f"{len(flagged)} of {n} adapters flagged as outliers; {len(self.duplicates_)} near-duplicate pair(s)."
        data = {
            "n_models": n,
            "k": self.k_,
            "mahalanobis_threshold": self.maha_threshold_,
            "flagged": flagged,
            "flags": self.flags_,
            "duplicates": self.duplicates_,
            "scores": {
                "id": self.ids_,
                "mahalanobis_d2": self.mahalanobis_,
                "residual": self.residual_,
                "residual_z": self.residual_z_,
                "delta_norm_z": self.delta_z_,
            },
        }
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=(self._figure(flagged),),
            notes=tuple(notes),
            data=data,
            params=self.get_params(),
        )

    def _figure(self, flagged: list[str]) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        mask = np.isin(np.asarray(self.ids_, dtype=object), flagged)
        x, y = self.mahalanobis_, self.residual_
        ax.scatter(x[~mask], y[~mask], s=10, c=OKABE_ITO["blue"], alpha=0.5, linewidths=0, label="models")
        ax.scatter(x[mask], y[mask], s=28, c=OKABE_ITO["vermillion"], marker="D", linewidths=0, label="flagged")
        ax.axvline(self.maha_threshold_, color=OKABE_ITO["orange"], ls="--", lw=1, label="Mahalanobis threshold")
        if self.residual_z_ is not None:
            med = np.median(y)
            line = med + self.z_threshold * MAD_TO_SIGMA * np.median(np.abs(y - med))
            ax.axhline(line, color=OKABE_ITO["purple"], ls="--", lw=1, label="residual threshold")
        ax.set_xscale("log")
        worst = sorted(np.flatnonzero(mask), key=lambda i: -x[i] / self.maha_threshold_)[:MAX_LABELS]
        for i in worst:
            label = self.ids_[i] if len(self.ids_[i]) <= 24 else self.ids_[i][:23] + "…"
            ax.annotate(label, (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"Mahalanobis d² in the top {self.k_} PCs (log)", ylabel="residual ‖x − x̂‖ off the space")
        ax.legend(fontsize=8, frameon=False)
        return Figure.from_matplotlib(
            "outliers",
            "Each model: how far it sits from the others inside the space (x) against how much of it the space "
            "cannot express (y). Points right of the orange line or above the pink line are flagged (diamonds; "
            "ΔW-norm outliers are flagged too but may sit anywhere). Labelled: the most extreme ids.",
            fig,
        )
