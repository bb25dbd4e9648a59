"""2-D maps of the collection (PCA, UMAP, optionally t-SNE) and how well they keep neighbourhoods and labels.

Why: a map is only worth reading if it is faithful. Each map is scored by *trustworthiness* (are a
point's map neighbours also its neighbours in the k-dim PC space? Venna & Kaski 2001) and, per label,
by *k-NN label agreement* in the map and in the full PC space against a shuffled-label baseline. A
concept that clusters in the PC space but not on the map is a property of the map, not of the models.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, SkipAnalysis, Table, positive_int
from wsa.errors import ConfigError
from wsa.labels import encode_attributes
from wsa.palette import CYCLE

METHODS = ("pca", "umap", "tsne")
#: Okabe & Ito (2008) colour-blind-safe palette, ordered so that two classes get blue vs vermillion.
OTHER_COLOUR = "#BBBBBB"
#: Attributes per figure (small-multiples grid of at most 3 × 4 panels).
PANELS_PER_FIGURE = 12
#: Shuffles averaged for the chance level of k-NN agreement.
N_SHUFFLES = 5


def neighbour_indices(points: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest other points of every point (self excluded even when duplicates tie with it).

    Returns
    -------
    ndarray of shape (n_points, k), int
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(points)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points, return_distance=False)
    is_self = idx == np.arange(n)[:, None]
    # A row whose own index was pushed out by exact duplicates drops its farthest neighbour instead.
    is_self[~is_self.any(axis=1), -1] = True
    return idx[~is_self].reshape(n, k)


def knn_agreement(values: np.ndarray, neighbours: np.ndarray, kind: str) -> float:
    """How much a point's neighbours share its label.

    Binary/categorical: mean fraction of the neighbours with the same label (chance ≈ Σ p_c²).
    Continuous: Spearman correlation between a point's value and its neighbours' mean (chance ≈ 0).
    """
    if kind == "continuous":
        from scipy.stats import spearmanr

        rho = spearmanr(values, values[neighbours].mean(axis=1)).statistic
        return float(rho) if np.isfinite(rho) else float("nan")
    return float((values[neighbours] == values[:, None]).mean())


def shuffled_agreement(values: np.ndarray, neighbours: np.ndarray, kind: str, rng: np.random.Generator) -> float:
    """Chance level: the same neighbour graph with the labels permuted (mean of a few shuffles)."""
    return float(np.mean([knn_agreement(rng.permutation(values), neighbours, kind) for _ in range(N_SHUFFLES)]))


@register_analyzer
class Manifold(Analyzer):
    """2-D maps of the PC coefficients, scored by trustworthiness and by k-NN label agreement.

    Parameters
    ----------
    methods : sequence of {"pca", "umap", "tsne"}, default=("pca", "umap")
        Maps to draw. ``pca`` is PC1 × PC2 (exact, linear); ``umap`` (umap-learn) and ``tsne``
        (scikit-learn) are non-linear embeddings of the first ``n_components`` PC coefficients.
    n_components : int, default=50
        PCs the maps, trustworthiness and full-space agreement are computed from (capped at the space's).
    n_neighbors, min_dist : int, float, default=15, 0.1
        UMAP's neighbourhood size and packing.
    perplexity : float, default=30
        t-SNE's perplexity (capped at ``(n - 1) / 3``).
    max_points : int, default=20000
        Above this many models a fixed random subset (seeded by ``ctx.random_state``) is mapped.
    trust_neighbors : int, default=10
        Neighbourhood size of trustworthiness and of k-NN label agreement.

    Attributes
    ----------
    ids_ : list of str
        Ids of the mapped models (all, or the subset).
    coords_ : dict of str to ndarray of shape (n_points, 2)
        The map coordinates per method.
    trustworthiness_ : dict of str to float
    agreement_ : list of dict
        One record per (attribute, space): ``attribute``, ``kind``, ``space``, ``agreement``, ``shuffled``.
    """

    name: ClassVar[str] = "manifold"
    title: ClassVar[str] = "Maps of the collection (PCA / UMAP / t-SNE)"
    reference: ClassVar[str] = (
        "McInnes et al., UMAP, arXiv 1802.03426; van der Maaten & Hinton, t-SNE, JMLR 2008; "
        "Venna & Kaski, trustworthiness, ICANN 2001"
    )
    _parameter_constraints: ClassVar[dict] = {
        "methods": (
            lambda v: not isinstance(v, str) and len(v) > 0 and all(m in METHODS for m in v) and len(set(v)) == len(v),
            f"a non-empty list of distinct methods from {list(METHODS)}",
        ),
        "n_components": (lambda v: positive_int(v) and v >= 2, "an int >= 2"),
        "n_neighbors": (lambda v: positive_int(v) and v >= 2, "an int >= 2"),
        "min_dist": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a float in [0, 1]"),
        "perplexity": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive float"),
        "max_points": (lambda v: positive_int(v) and v >= 10, "an int >= 10"),
        "trust_neighbors": (positive_int, "a positive int"),
        "color_by": (
            lambda v: not isinstance(v, str) and all(isinstance(c, str) and c for c in v),
            "a list of label column names",
        ),
    }

    def __init__(
        self,
        *,
        methods: tuple[str, ...] | list[str] = ("pca", "umap"),
        n_components: int = 50,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        perplexity: float = 30.0,
        max_points: int = 20000,
        trust_neighbors: int = 10,
        color_by: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.methods = methods
        self.color_by = color_by
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.perplexity = perplexity
        self.max_points = max_points
        self.trust_neighbors = trust_neighbors

    def fit(self, ctx: AnalysisContext) -> Manifold:
        from sklearn.manifold import trustworthiness

        self._validate_params()
        space = ctx.space
        coefs = np.asarray(space.coefficients, dtype=np.float64)
        n_all = len(coefs)
        if n_all < 5:
            raise SkipAnalysis(f"manifold needs at least 5 adapters; the space has {n_all}")
        k = min(int(self.n_components), coefs.shape[1])
        rng = np.random.default_rng(ctx.random_state)
        rows = np.arange(n_all)
        if n_all > self.max_points:
            rows = np.sort(rng.choice(n_all, size=self.max_points, replace=False))
        self.rows_ = rows
        self.n_total_ = n_all
        self.k_ = k
        x = coefs[rows, :k]
        n = len(x)
        all_ids = [str(i) for i in space.ids]
        self.ids_ = [all_ids[i] for i in rows]

        self.coords_: dict[str, np.ndarray] = {}
        for method in self.methods:
            self.coords_[method] = self._embed(method, x, ctx.random_state)

        # sklearn requires n_neighbors < n_samples / 2 for trustworthiness.
        self.trust_k_ = max(1, min(int(self.trust_neighbors), (n - 1) // 2 - 1))
        self.trustworthiness_ = {
            m: float(trustworthiness(x, c, n_neighbors=self.trust_k_)) for m, c in self.coords_.items()
        }

        encoded = encode_attributes(ctx.labels, all_ids)
        self.colour_warnings_: list[str] = []
        if self.color_by:
            # A warning, not an error: after a split by family a metadata field may be absent or constant in one
            # family (every Flux file says "flux1"), and that family's report must still be written.
            unknown = [c for c in self.color_by if c not in encoded]
            if unknown:
                self.colour_warnings_.append(
                    f"--color-by {', '.join(unknown)}: not a label column that varies here (columns: "
                    f"{', '.join(encoded) or 'none'}); maps coloured by the other columns"
                )
            chosen = {c: encoded[c] for c in self.color_by if c in encoded}
            encoded = chosen or encoded
        self.labels_ = {name: (e.kind, e.values[rows]) for name, e in encoded.items()}
        self.class_names_ = {name: e.names for name, e in encoded.items()}
        spaces = {f"PC space ({k} PCs)": x, **{f"{m} map": c for m, c in self.coords_.items()}}
        self.agreement_: list[dict[str, Any]] = []
        graphs: dict[tuple[str, bytes], np.ndarray] = {}
        for attr, (kind, vals) in self.labels_.items():
            present = np.isfinite(vals)
            m = int(present.sum())
            k_lab = min(int(self.trust_neighbors), m - 2)
            for space_name, pts in spaces.items():
                rec: dict[str, Any] = {"attribute": attr, "kind": kind, "space": space_name, "n_labelled": m}
                if k_lab < 1 or len(np.unique(vals[present])) < 2:
                    rec.update(agreement=float("nan"), shuffled=float("nan"))
                else:
                    key = (space_name, np.packbits(present).tobytes())
                    if key not in graphs:
                        graphs[key] = neighbour_indices(pts[present], k_lab)
                    nb = graphs[key]
                    v = vals[present]
                    rec.update(
                        agreement=knn_agreement(v, nb, kind),
                        shuffled=shuffled_agreement(v, nb, kind, np.random.default_rng(ctx.random_state)),
                    )
                rec["lift"] = rec["agreement"] - rec["shuffled"]
                self.agreement_.append(rec)

        # Colour for the unlabelled case: ΔW norm when the store has it, else PC1.
        self.colour_name_, self.colour_ = "PC1 coefficient", x[:, 0]
        if not self.labels_:
            norms = _delta_norms(ctx, [all_ids[i] for i in rows])
            if norms is not None:
                self.colour_name_, self.colour_ = "ΔW norm", norms

        ctx.artifacts["manifold"] = {
            "ids": list(self.ids_),
            "coords": {m: c.copy() for m, c in self.coords_.items()},
            "rows": rows.copy(),
            "trustworthiness": dict(self.trustworthiness_),
        }
        return self

    def _embed(self, method: str, x: np.ndarray, random_state: int) -> np.ndarray:
        n = len(x)
        if method == "pca":
            out = x[:, :2]
            return np.column_stack([out, np.zeros((n, 2 - out.shape[1]))]) if out.shape[1] < 2 else out.copy()
        if method == "umap":
            try:
                import umap
            except ImportError:
                raise ConfigError(
                    "method 'umap' needs umap-learn; install it with `pip install umap-learn` "
                    "or drop 'umap' from manifold.methods"
                ) from None
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=min(int(self.n_neighbors), n - 1),
                min_dist=float(self.min_dist),
                random_state=random_state,
                n_jobs=1,  # a seed makes UMAP single-threaded anyway; saying so silences its warning
            )
            return np.asarray(reducer.fit_transform(x), dtype=np.float64)
        from sklearn.manifold import TSNE

        perplexity = min(float(self.perplexity), max(1.0, (n - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state)
        return np.asarray(tsne.fit_transform(x), dtype=np.float64)

    def result(self) -> Result:
        self._check_is_fitted()
        figures = []
        for method, coords in self.coords_.items():
            figures.extend(self._figures(method, coords))

        coord_frame = pd.DataFrame({"id": self.ids_})
        for method, coords in self.coords_.items():
            coord_frame[f"{method}_x"] = coords[:, 0]
            coord_frame[f"{method}_y"] = coords[:, 1]
        tables = [
            Table.from_frame(
                "coordinates",
                "2-D coordinates of every mapped model (the full list is in the CSV).",
                coord_frame,
                max_rows_in_report=50,
            )
        ]
        agreement = pd.DataFrame(
            self.agreement_,
            columns=["attribute", "kind", "space", "n_labelled", "agreement", "shuffled", "lift"],
        )
        if len(agreement):
            tables.append(
                Table.from_frame(
                    "agreement",
                    f"k-NN label agreement ({self.trust_neighbors} neighbours): fraction of neighbours with the "
                    "same label (binary/categorical) or Spearman ρ of value vs neighbours' mean (continuous), "
                    "against shuffled labels. A lift near 0 means the concept does not cluster in that space.",
                    agreement,
                )
            )

        metrics = [
            Metric(f"trustworthiness ({m})", t, True, chance=0.5, ci=None) for m, t in self.trustworthiness_.items()
        ]
        full = f"PC space ({self.k_} PCs)"
        for rec in [r for r in self.agreement_ if r["space"] == full][:6]:
            metrics.append(
                Metric(f"k-NN agreement in PC space: {rec['attribute']}", rec["agreement"], True, rec["shuffled"])
            )

        notes = [
            f"Maps computed from the first {self.k_} PC coefficients; trustworthiness uses "
            f"{self.trust_k_} neighbours (1 = every map neighbour is a true neighbour; ≈ 0.5 = random)."
        ]
        if len(self.ids_) < self.n_total_:
            notes.append(
                f"{self.n_total_} models are more than max_points={self.max_points}: a fixed random subset of "
                f"{len(self.ids_)} (seeded) was mapped."
            )
        if not self.labels_:
            notes.append(f"No labels given: maps are coloured by {self.colour_name_}.")
        best = max(self.trustworthiness_.items(), key=lambda kv: kv[1])
        summary = (
            f"{len(self.coords_)} map(s) of {len(self.ids_)} models; most faithful: {best[0]} "
            f"(trustworthiness {best[1]:.3f})."
        )
        data: dict[str, Any] = {
            "n_points": len(self.ids_),
            "n_total": self.n_total_,
            "subsampled": len(self.ids_) < self.n_total_,
            "n_components": self.k_,
            "trust_neighbors": self.trust_k_,
            "trustworthiness": self.trustworthiness_,
            "agreement": self.agreement_,
            "ids": self.ids_,
            "coordinates": {m: np.round(c, 5) for m, c in self.coords_.items()},
        }
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(notes),
            warnings=tuple(self.colour_warnings_),
            data=data,
            params=self.get_params(),
        )

    def _figures(self, method: str, coords: np.ndarray) -> list[Figure]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(coords)
        size = float(np.clip(4000 / n, 0.5, 18))
        # Draw in a fixed random order so that no class systematically hides another.
        order = np.random.default_rng(0).permutation(n)
        axis_names = {"pca": ("PC1", "PC2"), "umap": ("UMAP 1", "UMAP 2"), "tsne": ("t-SNE 1", "t-SNE 2")}[method]
        panels = [(a, kind, v, self.class_names_.get(a, {})) for a, (kind, v) in self.labels_.items()]
        if not panels:
            panels = [(self.colour_name_, "continuous", np.asarray(self.colour_, dtype=np.float64), {})]
        agree = {r["attribute"]: r for r in self.agreement_ if r["space"] == f"{method} map"}
        figures = []
        n_figs = math.ceil(len(panels) / PANELS_PER_FIGURE)
        for f in range(n_figs):
            chunk = panels[f * PANELS_PER_FIGURE : (f + 1) * PANELS_PER_FIGURE]
            ncols = min(4, len(chunk))
            nrows = math.ceil(len(chunk) / ncols)
            fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.3 * nrows), squeeze=False)
            for ax in axes.flat[len(chunk) :]:
                ax.set_visible(False)
            for ax, (attr, kind, vals, names) in zip(axes.flat, chunk, strict=False):
                _scatter(ax, coords[order], vals[order], kind, size, names)
                title = _short(attr, 32)
                if attr in agree and np.isfinite(agree[attr]["agreement"]):
                    r = agree[attr]
                    title += f"\nkNN agreement {r['agreement']:.2f} (shuffled {r['shuffled']:.2f})"
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(axis_names[0], fontsize=8)
                ax.set_ylabel(axis_names[1], fontsize=8)
                ax.tick_params(labelsize=7)
            fig.tight_layout()
            part = f" (part {f + 1} of {n_figs})" if n_figs > 1 else ""
            figures.append(
                Figure.from_matplotlib(
                    f"{method}_map" + (f"_{f + 1}" if n_figs > 1 else ""),
                    f"{method.upper()} map of {n} models{part}, one panel per attribute. Look for colours that "
                    f"form regions rather than salt-and-pepper; the panel titles give k-NN agreement against "
                    f"shuffled labels. Trustworthiness of this map: {self.trustworthiness_[method]:.3f}"
                    + (" (UMAP/t-SNE distances between clusters are not meaningful)." if method != "pca" else "."),
                    fig,
                )
            )
        return figures


def _scatter(ax: Any, coords: np.ndarray, vals: np.ndarray, kind: str, size: float, names: dict[int, str]) -> None:
    """One panel: categories in Okabe–Ito with a legend, numbers in viridis with a colourbar, missing in grey."""
    missing = ~np.isfinite(vals)
    if missing.any():
        ax.scatter(*coords[missing].T, s=size, c=OTHER_COLOUR, alpha=0.4, linewidths=0, label="no label")
    pts, v = coords[~missing], vals[~missing]
    if kind == "continuous":
        sc = ax.scatter(*pts.T, s=size, c=v, cmap="viridis", linewidths=0)
        ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        return
    classes, counts = np.unique(v, return_counts=True)
    shown = classes[np.argsort(-counts, kind="stable")][: len(CYCLE) - 1 if len(classes) > len(CYCLE) else None]
    colours = np.full(len(v), OTHER_COLOUR, dtype=object)
    for i, c in enumerate(shown):
        colours[v == c] = CYCLE[i]
    ax.scatter(*pts.T, s=size, c=list(colours), linewidths=0)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=CYCLE[i], label=_short(names.get(int(c), str(c)), 18))
        for i, c in enumerate(shown)
    ]
    if len(shown) < len(classes):
        handles.append(Line2D([], [], ls="", marker="o", color=OTHER_COLOUR, label="other"))
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="best", markerscale=0.8, handletextpad=0.2)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _delta_norms(ctx: AnalysisContext, ids: list[str]) -> np.ndarray | None:
    """ΔW norms from the store manifest, aligned to ``ids``; None when any is missing."""
    by_id = {str(r.get("id")): r.get("delta_norm") for r in ctx.store.rows}
    vals = [by_id.get(i) for i in ids]
    if any(v is None for v in vals):
        return None
    out = np.asarray(vals, dtype=np.float64)
    return out if np.isfinite(out).all() else None
