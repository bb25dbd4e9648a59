"""Straight-line interpolation between models: do attributes change smoothly along the path?

Why: weights2weights (Dravid et al., arXiv 2406.09413) shows that identities can be blended by
walking between two models. If the space is "linear enough", every probed attribute should move
monotonically from one endpoint's value to the other's, close to the straight line between them.
Two paths are compared: the straight line between the two models' PC coefficients, and the straight
line between their weights (the rows as the space decomposes them: stored rows, or ΔW in a ΔW space).
An affine projection maps the weight-space line onto the PC-space line, so their probe scores agree;
what differs is the weight path's *residual* off the space, reported along the path (with k below full
rank, a weight-space midpoint keeps part of both endpoints' residuals, while every point of the PC path
lies in the space). The residual comes from the endpoints' inner products alone
(:class:`wsa.space.FittedSpace`), so the analyzer has one code path for either geometry.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, SkipAnalysis, Table, positive_int
from wsa.errors import ConfigError
from wsa.labels import encode_attributes
from wsa.palette import CYCLE, OKABE_ITO
from wsa.sampling import interpolate_pc, probe_scores

#: Candidate pairs scored when choosing pairs automatically (keeps the choice O(1) in n_models).
N_CANDIDATES = 5000
#: Figure size limits: at most this many attributes (columns) in the small multiples.
MAX_FIGURE_ATTRIBUTES = 4


def _pairs_ok(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, (list, tuple)) or not v:
        return False
    return all(isinstance(p, (list, tuple)) and len(p) == 2 and p[0] != p[1] for p in v)


def monotonicity(scores: np.ndarray) -> float:
    """Spearman correlation of score vs step, signed so that +1 means "moves towards the second endpoint".

    NaN when the two endpoints score the same (there is no direction to be monotone in).
    """
    s = np.asarray(scores, dtype=np.float64)
    delta = s[-1] - s[0]
    scale = max(float(np.max(np.abs(s))), 1.0)
    if abs(delta) <= 1e-12 * scale or np.ptp(s) == 0:
        return float("nan")
    r = np.corrcoef(np.arange(len(s), dtype=np.float64), rankdata(s))[0, 1]
    return float(np.sign(delta) * r)


def max_deviation(scores: np.ndarray) -> float:
    """Largest gap between the scores and the straight line joining the endpoint scores (score units)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.linspace(0.0, 1.0, len(s))
    return float(np.max(np.abs(s - ((1 - t) * s[0] + t * s[-1]))))


@register_analyzer
class Interpolation(Analyzer):
    """Walk straight lines between pairs of models (PC and weight space); score attributes along them.

    Parameters
    ----------
    pairs : list of (id_a, id_b) or None, default=None
        Endpoint pairs by adapter id. ``None`` picks ``n_pairs`` pairs: those differing in the most
        binary attributes (labels or probes), otherwise random pairs; the choice depends only on
        ``ctx.random_state``.
    n_pairs : int, default=6
        Pairs chosen automatically (ignored when ``pairs`` is given).
    steps : int, default=9
        Points per path, endpoints included (at least 3, so monotonicity is defined).

    Attributes
    ----------
    pairs_ : list of (str, str)
    differing_ : list of int or None
        Binary labels that differ between each pair's endpoints (``None`` without binary labels).
    t_ : ndarray of shape (steps,)
    pc_paths_ : ndarray of shape (n_pairs, steps, k)
    weight_paths_pc_ : ndarray of shape (n_pairs, steps, k) or None
        The weight-space paths projected into PC space (``None`` without a store).
    residual_norms_ : ndarray of shape (n_pairs, steps) or None
        ``‖r(t)‖``, the part of the weight path ``x̃(t)`` off the space, in the space's units (stored weights
        minus the mean, divided by the per-column scale when the space standardizes; ΔW in a ΔW space):
        what decoding the projection would lose. Convex in ``t``, so never above the endpoints'.
    residual_fractions_ : ndarray of shape (n_pairs, steps) or None
        The same divided by ``‖x̃(t)‖`` (the distance from the mean); it can rise midway, where the path
        passes nearer the mean.
    scores_ : dict
        ``"pc"``/``"weight"`` -> attr -> ndarray of shape (n_pairs, steps), in data-SD units.
    per_pair_ : pandas.DataFrame or None
        One row per (pair, attribute, path): monotonicity, max deviation, endpoint difference.
    table_ : pandas.DataFrame or None
        Aggregated per attribute.
    """

    name: ClassVar[str] = "interpolation"
    title: ClassVar[str] = "Interpolation: attribute smoothness along straight paths"
    reference: ClassVar[str] = "Dravid et al. 2024, Interpreting the Weight Space of Customized Diffusion Models"
    requires_labels: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("probes",)  # reads their ctx.artifacts when they ran
    _parameter_constraints: ClassVar[dict[str, tuple[Any, str]]] = {
        "pairs": (_pairs_ok, "None or a non-empty list of (id_a, id_b) pairs with id_a != id_b"),
        "n_pairs": (positive_int, "a positive int"),
        "steps": (lambda v: positive_int(v) and v >= 3, "an int >= 3"),
    }

    def __init__(self, *, pairs: list[tuple[str, str]] | None = None, n_pairs: int = 6, steps: int = 9) -> None:
        self.pairs = pairs
        self.n_pairs = n_pairs
        self.steps = steps

    # ------------------------------------------------------------------ fitting
    def fit(self, ctx: AnalysisContext) -> Interpolation:
        self._validate_params()
        space = ctx.space
        z = np.asarray(space.coefficients, dtype=np.float64)
        ids = [str(i) for i in space.ids]
        if len(ids) < 2:
            raise SkipAnalysis(f"interpolation needs at least 2 adapters; the space has {len(ids)}")
        index = {i: n for n, i in enumerate(ids)}
        probes = ctx.artifacts.get("probes") or None
        notes: list[str] = []
        warnings: list[str] = []
        binary = self._binary_labels(ctx, probes, ids)
        pairs, differing = self._choose_pairs(ctx, ids, index, binary)

        t = np.linspace(0.0, 1.0, self.steps)
        pc_paths = np.stack([interpolate_pc(z[index[a]], z[index[b]], self.steps) for a, b in pairs])
        weight_paths, residual_norms, residual_fractions = self._weight_paths(ctx, pairs, notes, warnings)

        scores: dict[str, dict[str, np.ndarray]] = {"pc": {}, "weight": {}}
        per_pair = table = None
        if probes is None or not probes.get("models"):
            notes.append(
                "No probes artifact (no labels, or the probes analyzer did not run): attribute scores skipped."
            )
        elif int(probes["k"]) > z.shape[1]:
            notes.append(f"Probes use {probes['k']} coefficients but the space has {z.shape[1]}: scores skipped.")
        else:
            scores, per_pair, table = self._score(probes, z, pc_paths, weight_paths, pairs, notes)

        notes.append(
            "The weight-space line projects onto the PC-space line (the projection is affine), so the two paths score "
            "alike; the weight path differs by its residual off the space, shown along the path."
        )
        notes.append(
            "Decoded image strips of these paths appear when a decoder is configured (ctx.artifacts['interpolation'])."
        )
        ctx.artifacts["interpolation"] = {
            "pairs": pairs,
            "t": t,
            "pc_paths": pc_paths,
            "weight_paths_pc": weight_paths,
            "residual_norms": residual_norms,
            "residual_fractions": residual_fractions,
        }
        self.pairs_ = pairs
        self.differing_ = differing
        self.t_ = t
        self.pc_paths_ = pc_paths
        self.weight_paths_pc_ = weight_paths
        self.residual_norms_ = residual_norms
        self.residual_fractions_ = residual_fractions
        self.scores_ = scores
        self.per_pair_ = per_pair
        self.table_ = table
        self.notes_ = notes
        self.warnings_ = warnings
        return self

    @staticmethod
    def _binary_labels(ctx: AnalysisContext, probes: dict[str, Any] | None, ids: list[str]) -> np.ndarray | None:
        """(n_models, n_binary) float matrix of binary labels (NaN = missing), aligned to ``ids``."""
        if ctx.labels is None:
            return None
        encoded = encode_attributes(ctx.labels, ids)  # as the probes encode them: 0/1, NaN where missing
        cols = [a for a, e in encoded.items() if e.kind == "binary"]
        if probes is not None and probes.get("kinds"):
            cols = [a for a in cols if probes["kinds"].get(a) == "binary"]
        if not cols:
            return None
        return np.stack([encoded[c].values for c in cols], axis=1)

    def _choose_pairs(
        self, ctx: AnalysisContext, ids: list[str], index: dict[str, int], binary: np.ndarray | None
    ) -> tuple[list[tuple[str, str]], list[int | None]]:
        if self.pairs is not None:
            pairs = [(str(a), str(b)) for a, b in self.pairs]
            missing = sorted({i for p in pairs for i in p if i not in index})
            if missing:
                raise ConfigError(
                    f"interpolation pairs name ids that are not in the space: {', '.join(map(repr, missing[:5]))}"
                )
        else:
            rng = np.random.default_rng(ctx.random_state)
            n = len(ids)
            n_all = n * (n - 1) // 2
            if n_all <= N_CANDIDATES:
                a, b = np.triu_indices(n, k=1)
                order = rng.permutation(len(a))
                cand = np.stack([a[order], b[order]], axis=1)
            else:
                a = rng.integers(0, n, size=N_CANDIDATES)
                b = (a + rng.integers(1, n, size=N_CANDIDATES)) % n
                cand = np.stack([a, b], axis=1)
            if binary is not None:
                diff = np.nansum(np.abs(binary[cand[:, 0]] - binary[cand[:, 1]]), axis=1)
                cand = cand[np.argsort(-diff, kind="stable")]
            chosen: list[tuple[int, int]] = []
            used: set[int] = set()
            for i, j in cand:  # prefer pairs with fresh endpoints, so pairs show different models
                if len(chosen) == self.n_pairs:
                    break
                if i not in used and j not in used:
                    chosen.append((int(i), int(j)))
                    used.update((int(i), int(j)))
            for i, j in cand:
                if len(chosen) == min(self.n_pairs, len(cand)):
                    break
                if (int(i), int(j)) not in chosen:
                    chosen.append((int(i), int(j)))
            pairs = [(ids[i], ids[j]) for i, j in chosen]
        differing: list[int | None] = []
        for a, b in pairs:
            if binary is None:
                differing.append(None)
            else:
                differing.append(int(np.nansum(np.abs(binary[index[a]] - binary[index[b]]))))
        return pairs, differing

    def _weight_paths(
        self, ctx: AnalysisContext, pairs: list[tuple[str, str]], notes: list[str], warnings: list[str]
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """The straight weight-space line between each pair, in PC space, and its residual off the space.

        No point of the line is formed. Projection onto the space is affine, so the line's PC coordinates are
        the straight line between the endpoints' coefficients, and its residual is ``r(t) = (1−t)·r_a + t·r_b``:
        ``‖r(t)‖² = (1−t)²‖r_a‖² + t²‖r_b‖² + 2t(1−t)⟨r_a, r_b⟩`` (and ``‖x̃(t)‖²`` likewise), from the pairs'
        inner products (:meth:`~wsa.space.FittedSpace.member_inner`, ``member_residual_inner``) — in the
        space's units, for either geometry.
        """
        store = ctx.store
        if store is None:
            notes.append("No store rows available: weight-space paths skipped.")
            return None, None, None
        in_store = {str(i) for i in store.ids}
        missing = sorted({i for p in pairs for i in p if i not in in_store})
        if missing:
            raise ConfigError(f"interpolation ids missing from the store: {', '.join(map(repr, missing[:5]))}")
        space = ctx.space
        z = np.asarray(space.coefficients, dtype=np.float64)
        member = {str(i): n for n, i in enumerate(space.ids)}
        ia = np.asarray([member[a] for a, _ in pairs], dtype=np.int64)
        ib = np.asarray([member[b] for _, b in pairs], dtype=np.int64)
        first, second = np.concatenate([ia, ib, ia]), np.concatenate([ia, ib, ib])  # (a, a), (b, b), (a, b)
        k_aa, k_bb, k_ab = space.member_inner(store, first, second).reshape(3, -1)
        r_aa, r_bb, r_ab = space.member_residual_inner(store, first, second).reshape(3, -1)
        # The endpoints' norms split into coefficients and residual (the components are orthonormal) only when
        # the store holds the rows the space was fitted on.
        kept = np.concatenate([(z[ia] ** 2).sum(axis=1), (z[ib] ** 2).sum(axis=1)])
        whole, resid = np.concatenate([k_aa, k_bb]), np.concatenate([r_aa, r_bb])
        gap = float(np.max(np.abs(whole - kept - resid) / np.maximum(whole, 1e-300)))
        if gap > 1e-3:
            warnings.append(
                f"The endpoints' norms differ from their coefficients plus residual by up to {gap:.2g} (relative): "
                "the space was not fitted on these store rows as stored."
            )
        t = np.linspace(0.0, 1.0, self.steps)[None, :]
        u, v, w = (1 - t) ** 2, t**2, 2 * t * (1 - t)

        def along(aa: np.ndarray, bb: np.ndarray, ab: np.ndarray) -> np.ndarray:
            return np.sqrt(np.clip(u * aa[:, None] + v * bb[:, None] + w * ab[:, None], 0.0, None))

        norms, size = along(r_aa, r_bb, r_ab), along(k_aa, k_bb, k_ab)
        paths = np.stack([interpolate_pc(z[i], z[j], self.steps) for i, j in zip(ia, ib, strict=True)])
        return paths, norms, np.divide(norms, size, out=np.zeros_like(norms), where=size > 0)

    def _score(
        self,
        probes: dict[str, Any],
        z: np.ndarray,
        pc_paths: np.ndarray,
        weight_paths: np.ndarray | None,
        pairs: list[tuple[str, str]],
        notes: list[str],
    ) -> tuple[dict[str, dict[str, np.ndarray]], pd.DataFrame, pd.DataFrame]:
        """Probe scores along every path, in data-SD units, and the per-attribute smoothness table."""
        pk = int(probes["k"])
        kinds = probes.get("kinds", {})
        data = probe_scores(probes, z[:, :pk])
        skipped = sorted(a for a, kind in kinds.items() if kind == "categorical")
        if skipped:
            notes.append(
                "Categorical probes are not scored along paths (a class-probability vector has no single direction): "
                + ", ".join(skipped)
            )
        attrs = sorted(a for a in data if kinds.get(a, "continuous") != "categorical")
        centre = {a: float(np.mean(data[a])) for a in attrs}
        sd = {a: float(np.std(data[a])) or 1.0 for a in attrs}
        n_pairs, steps = pc_paths.shape[:2]
        paths = {"pc": pc_paths} if weight_paths is None else {"pc": pc_paths, "weight": weight_paths}
        scores: dict[str, dict[str, np.ndarray]] = {"pc": {}, "weight": {}}
        for path, coef in paths.items():
            raw = probe_scores(probes, coef.reshape(n_pairs * steps, -1)[:, :pk])
            for a in attrs:
                scores[path][a] = (raw[a].reshape(n_pairs, steps) - centre[a]) / sd[a]
        records = []
        for path in paths:
            for a in attrs:
                for p, (id_a, id_b) in enumerate(pairs):
                    s = scores[path][a][p]
                    records.append(
                        {
                            "path": path,
                            "attribute": a,
                            "type": kinds.get(a, "continuous"),
                            "pair": p,
                            "id_a": id_a,
                            "id_b": id_b,
                            "endpoint_difference": float(s[-1] - s[0]),
                            "monotonicity": monotonicity(s),
                            "max_deviation": max_deviation(s),
                        }
                    )
        per_pair = pd.DataFrame(records)
        rows = []
        for a in attrs:
            row: dict[str, Any] = {"attribute": a, "type": kinds.get(a, "continuous")}
            for path in paths:
                part = per_pair[(per_pair["path"] == path) & (per_pair["attribute"] == a)]
                mono = part["monotonicity"].to_numpy(dtype=float)
                row[f"{path}_mean_monotonicity"] = float(np.nanmean(mono)) if np.isfinite(mono).any() else float("nan")
                row[f"{path}_mean_max_deviation"] = float(part["max_deviation"].mean())
            row["mean_abs_endpoint_difference"] = float(
                per_pair[(per_pair["path"] == "pc") & (per_pair["attribute"] == a)]["endpoint_difference"].abs().mean()
            )
            rows.append(row)
        notes.append(
            "Scores are in data-SD units (probe score minus its mean over the training models, divided by its SD); "
            "binary probes score log-odds."
        )
        return scores, per_pair, pd.DataFrame(rows)

    # ------------------------------------------------------------------ reporting
    def result(self) -> Result:
        self._check_is_fitted()
        metrics: list[Metric] = []
        tables: list[Table] = []
        figures: list[Figure] = []
        pair_rows = []
        for p, (a, b) in enumerate(self.pairs_):
            row: dict[str, Any] = {
                "pair": p,
                "id_a": a,
                "id_b": b,
                "differing_binary_labels": self.differing_[p],
                "pc_distance": float(np.linalg.norm(self.pc_paths_[p, -1] - self.pc_paths_[p, 0])),
            }
            if self.residual_norms_ is not None:
                r, f = self.residual_norms_[p], self.residual_fractions_[p]
                row["residual_endpoints"] = float(max(r[0], r[-1]))
                row["residual_midpoint"] = float(r[len(r) // 2])
                row["residual_fraction_endpoints"] = float(max(f[0], f[-1]))
                row["residual_fraction_midpoint"] = float(f[len(f) // 2])
            pair_rows.append(row)
        pair_frame = pd.DataFrame(pair_rows)
        if self.table_ is not None and len(self.table_):
            metrics.append(
                Metric(
                    "mean monotonicity (PC path)",
                    float(np.nanmean(self.table_["pc_mean_monotonicity"])),
                    True,
                    chance=0.0,
                )
            )
            metrics.append(
                Metric(
                    "mean max deviation (PC path)",
                    float(self.table_["pc_mean_max_deviation"].mean()),
                    False,
                    units="data SD",
                )
            )
            tables.append(
                Table.from_frame(
                    "smoothness",
                    "Per attribute, averaged over pairs: monotonicity (Spearman of probe score vs step, +1 = moves "
                    "steadily from the first model's value to the second's) and the largest gap from the straight "
                    "line between the endpoint scores (data SD). Look for monotonicity near 1 and small deviations.",
                    self.table_,
                )
            )
            figures.append(self._score_figure())
        if self.residual_norms_ is not None:
            metrics.append(
                Metric(
                    "weight-path midpoint residual",
                    float(np.mean(self.residual_fractions_[:, self.steps // 2])),
                    None,
                    units="fraction of ‖x − mean‖",
                )
            )
            figures.append(self._residual_figure())
        tables.append(
            Table.from_frame(
                "pairs",
                "Interpolated pairs: how many binary labels differ, the distance between their PC coefficients, "
                "and the weight path's residual off the space (norm in the space's units — stored weights, over "
                "the per-column scale if the space standardizes, or ΔW in a ΔW space — and as a fraction of "
                "‖x − mean‖) at the endpoints (larger of the two) and at the midpoint.",
                pair_frame,
            )
        )
        data: dict[str, Any] = {
            "steps": self.steps,
            "t": self.t_,
            "pairs": [list(p) for p in self.pairs_],
            "pair_summary": pair_frame.to_dict(orient="records"),
            "residual_norms": self.residual_norms_,
            "residual_fractions": self.residual_fractions_,
            "scores": {path: {a: v for a, v in d.items()} for path, d in self.scores_.items()},
            "smoothness": None if self.table_ is None else self.table_.to_dict(orient="records"),
            "per_pair": None if self.per_pair_ is None else self.per_pair_.to_dict(orient="records"),
        }
        if self.table_ is not None and len(self.table_):
            summary = (
                f"{len(self.pairs_)} pairs, {self.steps} steps: attributes change with mean monotonicity "
                f"{np.nanmean(self.table_['pc_mean_monotonicity']):.2f} and mean max deviation "
                f"{self.table_['pc_mean_max_deviation'].mean():.2f} data SD along PC-space paths."
            )
        else:
            summary = (
                f"{len(self.pairs_)} pairs, {self.steps} steps interpolated (no probes: attribute scores skipped)."
            )
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(self.notes_),
            warnings=tuple(self.warnings_),
            data=data,
            params=self.get_params(),
        )

    def _figure_attributes(self) -> list[str]:
        """The attributes that change most between endpoints (most informative panels)."""
        assert self.table_ is not None
        ranked = self.table_.sort_values("mean_abs_endpoint_difference", ascending=False, kind="stable")
        return list(ranked["attribute"][:MAX_FIGURE_ATTRIBUTES])

    def _score_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        attrs = self._figure_attributes()
        n_pairs = len(self.pairs_)
        fig, axes = plt.subplots(
            n_pairs, len(attrs), figsize=(2.6 * len(attrs) + 0.6, 1.9 * n_pairs + 0.6), squeeze=False, sharex=True
        )
        steps = np.arange(self.steps)
        for p in range(n_pairs):
            for j, a in enumerate(attrs):
                ax = axes[p, j]
                s = self.scores_["pc"][a][p]
                ax.plot(
                    steps, np.linspace(s[0], s[-1], self.steps), color=OKABE_ITO["grey"], linestyle=":", linewidth=1
                )
                ax.plot(steps, s, color=CYCLE[0], marker="o", markersize=3, linewidth=1.5, label="PC path")
                if a in self.scores_["weight"]:
                    ax.plot(
                        steps,
                        self.scores_["weight"][a][p],
                        color=CYCLE[1],
                        linestyle="--",
                        linewidth=1.2,
                        label="weight path",
                    )
                if p == 0:
                    ax.set_title(a, fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"pair {p}\n(data SD)", fontsize=8)
                if p == n_pairs - 1:
                    ax.set_xlabel("step", fontsize=8)
                ax.tick_params(labelsize=7)
        axes[0, 0].legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return Figure.from_matplotlib(
            "scores_along_paths",
            "Probe score (data SD) against interpolation step, one row per pair, for the attributes that differ most "
            "between endpoints; dotted grey is the straight line between endpoint scores. Look for curves that climb "
            "or fall steadily along the dotted line; the dashed weight-space path should lie on the PC path.",
            fig,
        )

    def _residual_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        assert self.residual_fractions_ is not None
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for p, r in enumerate(self.residual_fractions_):
            ax.plot(self.t_, r, marker="o", markersize=3, color=CYCLE[p % len(CYCLE)], label=f"pair {p}")
        ax.axhline(0.0, color=OKABE_ITO["grey"], linestyle=":", linewidth=1, label="PC path (in the space)")
        ax.set_xlabel("t (0 = first model, 1 = second)")
        ax.set_ylabel("residual off the space\n(fraction of ‖x − mean‖)")
        ax.legend(fontsize=7, frameon=False, ncol=2)
        fig.tight_layout()
        return Figure.from_matplotlib(
            "weight_path_residual",
            "Fraction of each weight-space path point (distance from the mean) that lies off the PC space; every "
            "PC-path point has 0. Look at the middle: a rise means the blended model is less well described by "
            "the space than either endpoint (its residual is what decoding the PC-path midpoint drops); a high "
            "line throughout means the space misses much of these models.",
            fig,
        )
