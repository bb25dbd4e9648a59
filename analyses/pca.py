"""PCA of the collection: the spectrum, how many PCs matter, and whether the space generalises.

The paper's key test is reconstruction of *held-out* models: if adapters not used to fit the space
are reconstructed about as well as the fitted ones, the space is a property of the family, not of
the sample (w2w, Sec. 3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from wsa.analyses import register_analyzer
from wsa.analyses.base import (
    AnalysisContext,
    Analyzer,
    Figure,
    Metric,
    Result,
    SkipAnalysis,
    Table,
    fraction,
    positive_int,
)
from wsa.palette import OKABE_ITO

if TYPE_CHECKING:  # pragma: no cover
    from wsa.space import FittedSpace


def residual_fractions(ctx: AnalysisContext, k: int | None = None, block_rows: int = 2048) -> np.ndarray:
    """Per fitted row: ``‖x̃ − x̂_k‖² / ‖x̃‖²`` in the (centered, scaled) space with the first ``k`` PCs."""
    space = ctx.space
    total = space.member_sq_norms(ctx.store, block_rows)  # both spaces answer it (one code path)
    coef = space.coefficients[:, :k]
    kept = np.einsum("ij,ij->i", coef, coef, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(1.0 - kept / total, 0.0, 1.0)


#: Why every analyzer is skipped on a collection of identical adapters.
NO_VARIANCE = "all adapters are identical: no variance to analyse"


def has_variance(space: FittedSpace) -> bool:
    """Is there anything to analyse: a finite, positive total variance that is not float rounding of zero?

    Ten copies of one adapter give a total variance of exactly 0 (or ~1e-14 of ‖mean‖² from rounding);
    every ratio would then be 0/0. ``‖mean‖²`` comes from the space (:meth:`~wsa.space.FittedSpace.mean_sq_norm`),
    in its own units, so one test serves either geometry.
    """
    total = float(space.total_variance)
    if not math.isfinite(total) or total <= 0:
        return False
    explained = np.asarray(space.explained_variance, dtype=np.float64)
    if explained.size and not (np.isfinite(explained).all() and explained.max() > 0):
        return False
    n = max(int(space.n_samples) - 1, 1)
    norm = space.mean_sq_norm()
    # x − mean of identical float32 rows is 0 up to a few ulp: ~1e-13·‖mean‖² in all
    return not (norm > 0 and total * n <= 1e-10 * norm)


@register_analyzer
class PCA(Analyzer):
    name: ClassVar[str] = "pca"
    title: ClassVar[str] = "Principal components: the subspace"
    reference: ClassVar[str] = (
        "Dravid et al., Interpreting the Weight Space of Customized Diffusion Models, arXiv 2406.09413"
    )
    _parameter_constraints: ClassVar[dict] = {
        "heldout_fraction": (lambda v: v == 0 or fraction(v), "0 (off) or a fraction in (0, 1)"),
        "heldout_ks": (
            lambda v: v is None or (len(v) > 0 and all(int(k) > 0 for k in v)),
            "None or a list of positive ints",
        ),
        "eval_k": (lambda v: v is None or positive_int(v), "None or a positive int"),
    }

    def __init__(
        self, *, heldout_fraction: float = 0.2, heldout_ks: list[int] | None = None, eval_k: int | None = None
    ) -> None:
        self.heldout_fraction = heldout_fraction
        self.heldout_ks = heldout_ks
        self.eval_k = eval_k

    def fit(self, ctx: AnalysisContext) -> PCA:
        self._validate_params()
        space = ctx.space
        if not has_variance(space):
            raise SkipAnalysis(NO_VARIANCE)
        self.k_ = int(space.n_components)
        self.ratio_ = np.asarray(space.explained_variance_ratio, dtype=np.float64)
        self.cumulative_ = np.cumsum(self.ratio_)
        self.needed_ = {f"{int(f * 100)}%": space.n_components_for(f) for f in (0.9, 0.95, 0.99)}
        # Per-model error at a k that means something: with all N-1 PCs every fitted model is exact.
        self.eval_k_ = min(self.eval_k or self.needed_["95%"] or self.k_, self.k_)
        self.residual_ = residual_fractions(ctx, self.eval_k_)
        self.ids_ = list(space.ids)
        self.heldout_: dict[str, Any] | None = None
        n = space.n_samples
        if self.heldout_fraction and n >= 10:
            k_max = min(self.k_, int(n * (1 - self.heldout_fraction)) - 1)
            ks = self.heldout_ks or sorted({int(k) for k in np.unique(np.geomspace(1, max(k_max, 1), num=12).round())})
            ks = [k for k in ks if k <= k_max]
            if ks:  # in the space's own geometry (dual form, kernel PCA on the train Gram, for a ΔW space)
                self.heldout_ = space.heldout(
                    ctx.store,
                    ks,
                    test_fraction=self.heldout_fraction,
                    random_state=ctx.random_state,
                    progress=ctx.progress,
                )
        return self

    def result(self) -> Result:
        self._check_is_fitted()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = []
        k = np.arange(1, self.k_ + 1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].semilogy(k, self.ratio_, color=OKABE_ITO["blue"], lw=1.5)
        axes[0].set(xlabel="principal component", ylabel="explained variance ratio", title="Spectrum")
        axes[1].plot(k, self.cumulative_, color=OKABE_ITO["blue"], lw=1.5)
        for frac, color in ((0.9, OKABE_ITO["orange"]), (0.95, OKABE_ITO["vermillion"]), (0.99, OKABE_ITO["purple"])):
            axes[1].axhline(frac, color=color, ls="--", lw=1, label=f"{frac:.0%}")
        axes[1].set(xlabel="number of PCs", ylabel="cumulative explained variance", ylim=(0, 1.02), title="Cumulative")
        axes[1].legend(loc="lower right", frameon=False)
        figures.append(
            Figure.from_matplotlib(
                "spectrum",
                "Left: variance per component (log scale) — a sharp drop means a low-dimensional space. "
                "Right: cumulative share; where it crosses the dashed lines is how many PCs 90/95/99% need.",
                fig,
            )
        )
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.hist(self.residual_, bins=40, color=OKABE_ITO["green"])
        ax.set(xlabel=f"unexplained fraction of ‖x − mean‖² with k={self.eval_k_} PCs", ylabel="models")
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        figures.append(
            Figure.from_matplotlib(
                "reconstruction",
                f"Per-model reconstruction error with the first {self.eval_k_} components (enough for 95% of the "
                "variance). Models far to the right are not well described by the space (see the outliers section).",
                fig,
            )
        )
        metrics = [
            Metric("PCs for 95% variance", None if self.needed_["95%"] is None else float(self.needed_["95%"]), False),
            Metric(f"mean reconstruction error at k={self.eval_k_}", float(np.nanmean(self.residual_)), False),
        ]
        notes = []
        data: dict[str, Any] = {
            "n_components": self.k_,
            "explained_variance_ratio": self.ratio_,
            "cumulative": self.cumulative_,
            "pcs_needed": self.needed_,
            "reconstruction_k": self.eval_k_,
            "reconstruction_error": dict(zip(self.ids_, self.residual_.tolist(), strict=True)),
        }
        if self.heldout_ is not None:
            h = self.heldout_
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            ax.plot(h["k"], h["train_error"], "o-", color=OKABE_ITO["blue"], label="fitted models")
            ax.plot(h["k"], h["heldout_error"], "s-", color=OKABE_ITO["vermillion"], label="held-out models")
            ax.set(xscale="log", xlabel="number of PCs k", ylabel="relative reconstruction error", ylim=(0, 1.02))
            ax.legend(frameon=False)
            figures.append(
                Figure.from_matplotlib(
                    "heldout",
                    "The paper's key test: error of models NOT used to fit the space (orange) against fitted ones "
                    "(blue). Close curves that fall with k mean the space generalises; an orange curve stuck near "
                    "1 means it only memorises the sample.",
                    fig,
                )
            )
            metrics.append(
                Metric(f"held-out error at k={h['k'][-1]}", float(h["heldout_error"][-1]), False, chance=1.0)
            )
            data["heldout"] = h
            gap = float(h["heldout_error"][-1]) - float(h["train_error"][-1])
            notes.append(f"Held-out minus fitted error at k={h['k'][-1]}: {gap:+.3f}.")
        needed = ", ".join(f"{key}: {v if v is not None else f'> {self.k_}'}" for key, v in self.needed_.items())
        table = Table(
            "components",
            "Explained variance per component",
            ("pc", "explained_variance_ratio", "cumulative"),
            tuple(
                (i + 1, float(r), float(c)) for i, (r, c) in enumerate(zip(self.ratio_, self.cumulative_, strict=True))
            ),
        )
        per_model = Table(
            "reconstruction",
            f"Per-model reconstruction error at k={self.eval_k_} (fraction of ‖x − mean‖² not captured)",
            ("id", "error"),
            tuple(sorted(zip(self.ids_, self.residual_.round(6).tolist(), strict=True), key=lambda r: -r[1])),
        )
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=f"{self.k_} components kept; PCs needed — {needed}.",
            metrics=tuple(metrics),
            tables=(table, per_model),
            figures=tuple(figures),
            notes=tuple(notes),
            data=data,
            params=self.get_params(),
        )
