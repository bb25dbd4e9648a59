"""Linear attribute probes in the w2w space, their edit directions, and those directions disentangled.

w2w finds an attribute's edit direction by least squares on the PC coordinates of labelled models
(``pinv(coefficients) @ labels``; Dravid et al., Sec. 3.2) and then makes directions independent of
correlated attributes by projection. This analyzer asks the question first: is the attribute
*linearly readable* from the space at all? It fits a cross-validated logistic (binary, one-vs-rest
for categories) or ridge (continuous) probe, puts a bootstrap interval on the out-of-fold score and
compares it with the same pipeline on shuffled labels, so an AUC of 0.6 on 300 models can be told
apart from chance. It then reports both direction estimates (least squares and the probe's normal),
how similar the attributes' directions are, what joint projection (debiasing) does to them, and the
spread of each attribute's score across the collection, which turns an edit strength into standard
deviations.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, SkipAnalysis, Table
from wsa.analyses.metrics import rank_auc
from wsa.directions import Directions
from wsa.errors import ConfigError
from wsa.labels import AttributeInfo, describe_attributes
from wsa.palette import OKABE_ITO

#: Logistic probes on at most this many PCs use the Newton-Cholesky solver, wider ones L-BFGS.
NEWTON_MAX_K = 256
#: Heatmaps print their values when there are at most this many directions.
ANNOTATE_MAX = 15
# Okabe–Ito colours (colour-blind safe).
_BLUE, _ORANGE, _VERMILLION, _GREY = OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["vermillion"], OKABE_ITO["grey"]


def _int_at_least(low: int):
    return lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and float(v) > 0


def _names_or(options: Sequence[str]):
    def check(v: Any) -> bool:
        if isinstance(v, str):
            return v in options
        return isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)

    return check


@dataclass
class _Fit:
    """Everything learned about one attribute (internal; the analyzer exposes it through ``result``)."""

    info: AttributeInfo
    metric: str
    n_labelled: int
    score: float
    ci: tuple[float, float]
    accuracy: float | None
    shuffled: npt.NDArray[np.float64]
    p_value: float
    n_splits: int
    model: Any
    directions: list[str]
    ls_raw: npt.NDArray[np.float64]  # (m, k) unnormalised least-squares solutions
    probe: npt.NDArray[np.float64]  # (m, k) unit probe normals
    dropped_classes: list[str] = field(default_factory=list)


@register_analyzer
class Probes(Analyzer):
    """Cross-validated linear probes per attribute, least-squares edit directions, debiasing and calibration.

    Parameters
    ----------
    n_components : int or None, default=None
        Probe the first ``k`` PC coordinates (capped at the space's size); ``None`` uses all of them.
        The default 256 keeps the cross-validated, shuffled-baseline logistic fits (hundreds per
        attribute) on the fast Newton solver; w2w's own probes use up to 1,000 PCs.
    cv : int, default=5
        Folds of the (stratified, shuffled) cross-validation; reduced to the smallest class count.
    c : float, default=1.0
        Inverse L2 regularisation of the logistic probes (scikit-learn ``C``).
    alpha : float, default=1.0
        L2 penalty of the ridge probes.
    n_shuffles : int, default=20
        Repeats of the whole cross-validation with permuted labels (the chance baseline); 0 turns it off.
    n_bootstrap : int, default=200
        Bootstrap resamples of the out-of-fold predictions for the 95% interval of the score; 0 = off.
    debias : "all", "none" or list of str, default="all"
        Attributes whose directions are projected out (jointly) of every other attribute's direction.
    attributes : list of str or None, default=None
        Probe only these label columns; ``None`` probes every usable column.

    Notes
    -----
    Features are the PC coordinates divided by one global factor (their RMS) before fitting, so
    ``c``/``alpha`` mean the same thing whatever the units of the weights; the fitted estimators'
    coefficients are scaled back, so the models in ``ctx.artifacts["probes"]["models"]`` take raw PC
    coordinates. A single scalar leaves every direction unchanged (unlike per-PC standardisation).
    """

    name: ClassVar[str] = "probes"
    title: ClassVar[str] = "Attribute probes and edit directions"
    reference: ClassVar[str] = (
        "Dravid et al., Interpreting the Weight Space of Customized Diffusion Models, arXiv 2406.09413 (Sec. 3.2)"
    )
    requires_labels: ClassVar[bool] = True
    _parameter_constraints: ClassVar[dict] = {
        "n_components": (lambda v: v is None or _int_at_least(1)(v), "None or a positive int"),
        "cv": (_int_at_least(2), "an int >= 2"),
        "c": (_positive_number, "a positive number"),
        "alpha": (_positive_number, "a positive number"),
        "n_shuffles": (_int_at_least(0), "an int >= 0"),
        "n_bootstrap": (_int_at_least(0), "an int >= 0"),
        "debias": (_names_or(("all", "none")), '"all", "none" or a list of attribute names'),
        "attributes": (
            lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(s, str) for s in v)),
            "None or a non-empty list of attribute names",
        ),
    }

    def __init__(
        self,
        *,
        n_components: int | None = 256,
        cv: int = 5,
        c: float = 1.0,
        alpha: float = 1.0,
        n_shuffles: int = 20,
        n_bootstrap: int = 200,
        debias: str | list[str] = "all",
        attributes: list[str] | None = None,
    ) -> None:
        self.n_components = n_components
        self.cv = cv
        self.c = c
        self.alpha = alpha
        self.n_shuffles = n_shuffles
        self.n_bootstrap = n_bootstrap
        self.debias = debias
        self.attributes = attributes

    # ------------------------------------------------------------------------------------------ fit

    def fit(self, ctx: AnalysisContext) -> Probes:
        """Probe every usable attribute, derive and debias directions, calibrate, and publish artifacts."""
        from tqdm import tqdm

        self._validate_params()
        space = ctx.space
        if ctx.labels is None:
            raise ConfigError("the probes analyzer needs a label table; pass --labels")
        coefficients = np.asarray(space.coefficients, dtype=np.float64)
        k_space = coefficients.shape[1]
        k = k_space if self.n_components is None else min(int(self.n_components), k_space)
        z = coefficients[:, :k]
        self.k_ = k
        ids = [str(i) for i in space.ids]
        labels = ctx.labels if list(ctx.labels.index) == ids else ctx.labels.reindex(ids)
        infos = describe_attributes(labels)
        if self.attributes is not None:
            unknown = [a for a in self.attributes if a not in infos]
            if unknown:
                raise ConfigError(f"probes attributes {unknown} are not label columns (columns: {sorted(infos)})")
            infos = {a: infos[a] for a in self.attributes}

        warnings: list[str] = list(labels.attrs.get("warnings", []))
        skipped = {a: info.reason for a, info in infos.items() if info.kind == "ignored"}
        # One global factor keeps C/alpha unit-free without changing any direction.
        feature_scale = float(np.sqrt(np.mean(z**2))) or 1.0
        fits: dict[str, _Fit] = {}
        todo = [a for a, info in infos.items() if info.kind != "ignored"]
        for attr in tqdm(todo, desc="probes", disable=not ctx.progress or None):
            info = infos[attr]
            # Seeded by name, so probing a subset of the attributes reproduces the same numbers.
            rng = np.random.default_rng([int(ctx.random_state), zlib.crc32(attr.encode())])
            fit = self._fit_attribute(info, labels[attr], z, feature_scale, rng)
            if isinstance(fit, str):
                skipped[attr] = fit
                warnings.append(f"attribute {attr!r} not probed: {fit}")
                continue
            if fit.dropped_classes:
                warnings.append(
                    f"attribute {attr!r}: classes {fit.dropped_classes} have fewer than 2 labelled models; left out"
                )
            fits[attr] = fit
        if not fits:
            raise SkipAnalysis(
                "no attribute could be probed ("
                + "; ".join(f"{a}: {r}" for a, r in skipped.items())
                + "); check the label table"
            )

        names = [d for f in fits.values() for d in f.directions]
        owner = [a for a, f in fits.items() for _ in f.directions]
        ls_raw = np.vstack([f.ls_raw for f in fits.values()])
        ls_norm = np.linalg.norm(ls_raw, axis=1)
        directions = _unit_rows(ls_raw)
        probe = np.vstack([f.probe for f in fits.values()])

        debias_set = self._debias_set(list(fits), infos)
        for attr in sorted(debias_set):
            if fits[attr].p_value > 0.05:
                warnings.append(
                    f"debiasing projects out {attr!r}, whose probe is not above chance (p={fits[attr].p_value:.2f}): "
                    "its direction is mostly noise and removing it also removes real signal; list the attributes "
                    "to project out with debias=[...]"
                )
        debiased, retained = _debias(directions, owner, debias_set)
        for name, kept in zip(names, retained, strict=True):
            if kept < 1e-6:
                warnings.append(
                    f"direction {name!r} lies in the span of the debiasing directions; its debiased direction is zero"
                )

        # Calibration: one "standard deviation" of an attribute's score across the whole collection.
        score_std = np.std(z @ directions.T, axis=0, ddof=1)
        debiased_std = np.std(z @ debiased.T, axis=0, ddof=1)

        # The same directions as changes of the weights, in the basis the space's geometry has (store columns
        # through the components, or weights over the members' ΔW for a ΔW space).
        weight = space.directions_in_weights(directions)
        debiased_weight = space.directions_in_weights(debiased)

        self.feature_scale_ = feature_scale
        self.infos_ = infos
        self.fits_ = fits
        self.skipped_ = skipped
        self.direction_names_ = names
        self.direction_attribute_ = dict(zip(names, owner, strict=True))
        self.ls_norm_ = ls_norm
        self.directions_ = directions
        self.probe_directions_ = probe
        self.debias_set_ = sorted(debias_set)
        self.debiased_ = debiased
        self.retained_ = retained
        self.score_std_ = score_std
        self.debiased_score_std_ = debiased_std
        self.cos_ls_ = directions @ directions.T
        self.cos_probe_ = probe @ probe.T
        self.cos_debiased_ = debiased @ directions.T
        self.weight_directions_ = weight
        self.debiased_weight_directions_ = debiased_weight
        self.warnings_ = warnings

        ctx.artifacts["probes"] = self.artifacts()
        return self

    def write_artifacts(self, out: Path) -> list[Path]:
        """``space/directions.*`` for ``wsa edit``, in either geometry (it steps along the PC vectors)."""
        return list(self.save_directions(Path(out) / "space"))

    def _debias_set(self, probed: list[str], infos: dict[str, AttributeInfo]) -> set[str]:
        if self.debias == "none":
            return set()
        if self.debias == "all":
            return set(probed)
        unknown = [a for a in self.debias if a not in infos]
        if unknown:
            raise ConfigError(f"probes debias names {unknown} that are not label columns (columns: {sorted(infos)})")
        not_probed = [a for a in self.debias if a not in probed]
        if not_probed:
            raise ConfigError(f"probes debias names {not_probed}, which have no direction (not probed)")
        return set(self.debias)

    def _fit_attribute(
        self,
        info: AttributeInfo,
        column: pd.Series,
        z: np.ndarray,
        feature_scale: float,
        rng: np.random.Generator,
    ) -> _Fit | str:
        """Cross-validate, bootstrap, shuffle and fit the final probe for one attribute (or say why not)."""
        y_all = info.encode(column)
        mask = ~np.isnan(y_all)
        kind = info.kind
        dropped: list[str] = []
        if kind == "categorical":
            counts = np.bincount(y_all[mask].astype(int), minlength=len(info.classes))
            rare = [i for i, n in enumerate(counts) if n < 2]
            dropped = [info.classes[i] for i in rare]
            mask &= ~np.isin(y_all, rare)
        y = y_all[mask]
        x = z[mask] / feature_scale
        n = len(y)
        if kind == "continuous":
            n_splits = min(self.cv, n)
            if n < 3 or np.ptp(y) == 0:
                return f"only {n} labelled models with distinct values"
        else:
            values, counts = np.unique(y, return_counts=True)
            if len(values) < 2:
                return "fewer than 2 classes among the labelled models"
            n_splits = min(self.cv, int(counts.min()))
            if n_splits < 2:
                return f"the rarest class has {int(counts.min())} labelled model(s); need at least 2"
        if kind == "categorical":
            # Re-index the classes that remain so they are 0..C-1.
            present = np.unique(y).astype(int)
            y = np.searchsorted(present, y.astype(int)).astype(np.float64)
            classes = [info.classes[i] for i in present]
        else:
            classes = []

        seed = int(rng.integers(2**31 - 1))
        perms = [rng.permutation(y) for _ in range(self.n_shuffles)]
        if kind == "continuous":
            # Ridge is linear in y: the real and every shuffled target share one fit per fold.
            oof_all = self._oof(x, np.column_stack([y, *perms]), kind, n_splits, seed)
            oof = oof_all[:, 0]
            shuffled = np.array([_score(kind, p, oof_all[:, i + 1])[0] for i, p in enumerate(perms)])
        else:
            oof = self._oof(x, y, kind, n_splits, seed)
            shuffled = np.array(
                [_score(kind, p, self._oof(x, p, kind, n_splits, seed + i + 1))[0] for i, p in enumerate(perms)]
            )
        score, accuracy = _score(kind, y, oof)
        metric = {"binary": "AUC", "continuous": "R²", "categorical": "macro AUC"}[kind]

        if self.n_bootstrap > 0:
            boot = np.empty(self.n_bootstrap)
            for b in range(self.n_bootstrap):
                idx = rng.integers(0, n, n)
                boot[b] = _score(kind, y[idx], oof[idx])[0]
            boot = boot[np.isfinite(boot)]
            ci = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot.size else (np.nan, np.nan)
        else:
            ci = (np.nan, np.nan)

        # Permutation p-value with the +1 correction (Phipson & Smyth 2010): never exactly 0.
        p_value = float((1 + np.sum(shuffled >= score)) / (1 + len(shuffled))) if len(shuffled) else np.nan

        model = self._estimator(kind).fit(
            x, y if kind != "categorical" else np.asarray(classes, dtype=object)[y.astype(int)]
        )
        _rescale_model(model, kind, feature_scale)

        # Least squares on centered data (== pinv(coefficients) @ centered labels, w2w's direction).
        zl = z[mask]
        zc = zl - zl.mean(axis=0)
        if kind == "categorical":
            targets = np.stack([(y == j).astype(np.float64) for j in range(len(classes))], axis=1)
            names = [f"{info.name}={c}" for c in classes]
            normals = np.vstack([est.coef_.reshape(-1) for est in model.estimators_])
        else:
            targets = y[:, None]
            names = [info.name]
            normals = np.asarray(model.coef_, dtype=np.float64).reshape(1, -1)
        targets = targets - targets.mean(axis=0)
        ls = np.linalg.lstsq(zc, targets, rcond=None)[0].T  # (m, k)
        return _Fit(
            info=info,
            metric=metric,
            n_labelled=n,
            score=float(score),
            ci=ci,
            accuracy=accuracy,
            shuffled=shuffled,
            p_value=p_value,
            n_splits=n_splits,
            model=model,
            directions=names,
            ls_raw=ls,
            probe=_unit_rows(normals),
            dropped_classes=dropped,
        )

    def _estimator(self, kind: str) -> Any:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.multiclass import OneVsRestClassifier

        if kind == "continuous":
            return Ridge(alpha=float(self.alpha))
        # Newton-Cholesky converges in a few steps and costs O(n k²) per step: the fastest for the usual
        # k <= a few hundred; L-BFGS (O(n k) per step) for wider problems.
        solver = "newton-cholesky" if self.k_ <= NEWTON_MAX_K else "lbfgs"
        logistic = LogisticRegression(C=float(self.c), class_weight="balanced", max_iter=2000, solver=solver)
        return OneVsRestClassifier(logistic) if kind == "categorical" else logistic

    def _oof(self, x: np.ndarray, y: np.ndarray, kind: str, n_splits: int, seed: int) -> np.ndarray:
        """Out-of-fold decision scores (binary (n,), categorical (n, C)) or predictions (continuous: shape of y).

        Continuous folds do not depend on ``y`` (plain K-fold), so a (n, T) ``y`` of several targets is
        cross-validated in one multi-output ridge fit per fold.
        """
        from sklearn.model_selection import KFold, StratifiedKFold

        splitter = (KFold if kind == "continuous" else StratifiedKFold)(n_splits, shuffle=True, random_state=seed)
        n_classes = int(y.max()) + 1 if kind == "categorical" else 1
        out = np.empty((len(y), n_classes)) if kind == "categorical" else np.empty(y.shape)
        for train, test in splitter.split(x, y if y.ndim == 1 else y[:, 0]):
            model = self._estimator(kind).fit(x[train], y[train])
            pred = model.predict(x[test]) if kind == "continuous" else model.decision_function(x[test])
            out[test] = np.reshape(pred, out[test].shape)
        return out

    # ------------------------------------------------------------------------------------ artifacts

    def artifacts(self) -> dict[str, Any]:
        """The dict later analyzers and ``wsa edit`` read (also put in ``ctx.artifacts["probes"]``).

        Directions are keyed by direction name: the attribute for binary and continuous attributes,
        ``"<attribute>=<class>"`` for each class of a categorical one. Models and ``kinds`` are keyed
        by attribute. ``directions_pc``/``debiased_pc``/``probe_pc`` hold unit vectors of shape (k,);
        ``score_std`` is the standard deviation of ``coefficients[:, :k] @ direction`` over the
        collection (an edit of strength ``s`` moves ``s * score_std`` along the unit direction).
        Binary models predict the 0/1 codes of ``label_mapping`` (``classes_ == [0, 1]``; the decision
        function is the log-odds of code 1); categorical models predict the class names.
        """
        self._check_is_fitted()
        names = self.direction_names_
        return {
            "k": self.k_,
            "kinds": {a: info.kind for a, info in self.infos_.items()},
            "models": {a: f.model for a, f in self.fits_.items()},
            "directions_pc": {d: self.directions_[i].copy() for i, d in enumerate(names)},
            "debiased_pc": {d: self.debiased_[i].copy() for i, d in enumerate(names)},
            "probe_pc": {d: self.probe_directions_[i].copy() for i, d in enumerate(names)},
            "score_std": {d: float(self.score_std_[i]) for i, d in enumerate(names)},
            "debiased_score_std": {d: float(self.debiased_score_std_[i]) for i, d in enumerate(names)},
            "direction_attribute": dict(self.direction_attribute_),
            "label_mapping": self._label_mapping(),
            "debias": list(self.debias_set_),
        }

    def _label_mapping(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for attr, info in self.infos_.items():
            if info.kind == "binary":
                out[attr] = dict(info.mapping)
            elif info.kind == "categorical":
                out[attr] = {c: i for i, c in enumerate(info.classes)}
        return out

    def save_directions(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``directions.safetensors`` and ``directions.json`` (each atomically) for ``wsa edit``.

        Tensors are named ``"<direction>/<part>"`` with parts :data:`wsa.directions.PARTS`: unit vectors in
        PC space (``pc``, ``debiased_pc``, ``probe_pc``; shape (k,)), and the same two edit directions as
        changes of the weights (:meth:`~wsa.space.FittedSpace.directions_in_weights`) in the space's units
        (``weight``, ``debiased_weight``) and as the raw change per unit step (``raw_weight``,
        ``debiased_raw_weight``). Their basis is ``meta["weight_basis"]``: ``"features"`` for an explicit
        space (``pc @ components``, shape (n_features,); raw = that times ``scale``), ``"members"`` for a ΔW
        space (one weight per member of ``space.ids``: the direction is ``Σ_i w_i · ΔW_i``; ``n_features``
        is then the number of members). The JSON holds kinds, score standard deviations, label mappings
        and ``k``; it is written last and carries the sha256 of the tensors file, so a half-finished pair
        is refused by :meth:`wsa.directions.Directions.load`.

        Returns
        -------
        (Path, Path)
            The tensors file and the JSON file.
        """
        self._check_is_fitted()
        weight, debiased = self.weight_directions_, self.debiased_weight_directions_
        vectors = {
            name: {
                "pc": self.directions_[i],
                "debiased_pc": self.debiased_[i],
                "probe_pc": self.probe_directions_[i],
                "weight": weight.standardized[i],
                "debiased_weight": debiased.standardized[i],
                "raw_weight": weight.raw[i],
                "debiased_raw_weight": debiased.raw[i],
            }
            for i, name in enumerate(self.direction_names_)
        }
        meta = {
            "wsa_version": _wsa_version(),
            "k": self.k_,
            "n_features": int(weight.standardized.shape[1]),
            "weight_basis": weight.basis,
            "kinds": {a: info.kind for a, info in self.infos_.items()},
            "label_mapping": self._label_mapping(),
            "debias": list(self.debias_set_),
            "directions": {
                name: {
                    "attribute": self.direction_attribute_[name],
                    "kind": self.infos_[self.direction_attribute_[name]].kind,
                    "score_std": float(self.score_std_[i]),
                    "debiased_score_std": float(self.debiased_score_std_[i]),
                    "retained_after_debias": float(self.retained_[i]),
                }
                for i, name in enumerate(self.direction_names_)
            },
            "params": _jsonable(self.get_params()),
        }
        return Directions(meta, vectors).save(folder)

    # --------------------------------------------------------------------------------------- result

    def result(self) -> Result:
        self._check_is_fitted()
        rows = []
        metrics = []
        attributes_data: dict[str, Any] = {}
        for attr, f in self.fits_.items():
            shuffled_mean = float(np.mean(f.shuffled)) if len(f.shuffled) else np.nan
            shuffled_p95 = float(np.percentile(f.shuffled, 95)) if len(f.shuffled) else np.nan
            rows.append(
                {
                    "attribute": attr,
                    "kind": f.info.kind,
                    "n_labelled": f.n_labelled,
                    "metric": f.metric,
                    "score": f.score,
                    "ci_low": f.ci[0],
                    "ci_high": f.ci[1],
                    "accuracy": f.accuracy,
                    "shuffled_mean": shuffled_mean,
                    "shuffled_p95": shuffled_p95,
                    "p_value": f.p_value,
                }
            )
            metrics.append(
                Metric(
                    name=f"{attr} ({f.metric})",
                    value=f.score,
                    higher_is_better=True,
                    chance=shuffled_mean,
                    ci=f.ci,
                    units=f.metric,
                )
            )
            attributes_data[attr] = {
                "kind": f.info.kind,
                "metric": f.metric,
                "n_labelled": f.n_labelled,
                "score": f.score,
                "ci": list(f.ci),
                "accuracy": f.accuracy,
                "shuffled": f.shuffled.tolist(),
                "shuffled_mean": shuffled_mean,
                "shuffled_p95": shuffled_p95,
                "p_value": f.p_value,
                "shuffles_at_or_above": int(np.sum(f.shuffled >= f.score)),
                "cv_folds": f.n_splits,
                "rule": f.info.rule,
                "mapping": dict(f.info.mapping),
                "classes": list(f.info.classes),
                "dropped_classes": list(f.dropped_classes),
            }
        scores = pd.DataFrame(rows)

        names = self.direction_names_
        m = len(names)
        off = np.abs(self.cos_ls_) - np.eye(m) * 2.0  # never pick a direction as its own neighbour
        idx_rows = []
        for i, name in enumerate(names):
            j = int(np.argmax(off[i])) if m > 1 else -1
            attr = self.direction_attribute_[name]
            idx_rows.append(
                {
                    "direction": name,
                    "attribute": attr,
                    "kind": self.infos_[attr].kind,
                    "ls_norm": float(self.ls_norm_[i]),
                    "raw_weight_norm": float(self.weight_directions_.raw_norms[i]),
                    "score_std": float(self.score_std_[i]),
                    "debiased_score_std": float(self.debiased_score_std_[i]),
                    "cos_ls_probe": float(self.directions_[i] @ self.probe_directions_[i]),
                    "max_abs_cos": float(abs(self.cos_ls_[i, j])) if j >= 0 else np.nan,
                    "most_similar": names[j] if j >= 0 else "",
                    "retained_after_debias": float(self.retained_[i]),
                }
            )
        index = pd.DataFrame(idx_rows)

        pairs = []
        for i, name in enumerate(names):
            for j, other in enumerate(names):
                if self.direction_attribute_[other] in self.debias_set_ and (
                    self.direction_attribute_[other] != self.direction_attribute_[name]
                ):
                    pairs.append(
                        {
                            "direction": name,
                            "projected_out": other,
                            "cos_before": float(self.cos_ls_[i, j]),
                            "cos_after": float(self.cos_debiased_[i, j]),
                        }
                    )
        debias_table = pd.DataFrame(pairs, columns=["direction", "projected_out", "cos_before", "cos_after"])

        tables = [
            Table.from_frame(
                "scores",
                "Cross-validated probe score per attribute (AUC for yes/no and categories, R² for numbers), its "
                "bootstrap 95% interval, and the same pipeline on shuffled labels. A probe is real when the interval "
                "sits above shuffled_p95 and p_value is small.",
                scores,
            ),
            Table.from_frame(
                "directions_index",
                "One row per edit direction: norm of the least-squares solution, spread of the score across the "
                "collection (one edit 'strength' unit), agreement with the probe normal (cos_ls_probe), and the most "
                "similar other direction. High max_abs_cos means editing one attribute also edits the other.",
                index,
            ),
        ]
        if len(debias_table):
            tables.append(
                Table.from_frame(
                    "debiasing",
                    "Cosine of each direction with each projected-out direction, before and after joint projection. "
                    "cos_after should be ~0; a direction that keeps little of itself (retained_after_debias in "
                    "directions_index) was mostly explained by the others.",
                    debias_table,
                )
            )

        figures = [self._score_figure(scores)]
        if m >= 2:
            figures.append(self._cosine_figure())
            if len(debias_table):
                figures.append(self._debias_figure())

        n_real = int(sum(1 for r in rows if np.isfinite(r["p_value"]) and r["p_value"] <= 0.05))
        best = max(rows, key=lambda r: r["score"] if r["kind"] != "continuous" else -np.inf, default=None)
        summary = f"{len(rows)} attribute(s) probed in the first {self.k_} PCs"
        if self.n_shuffles:
            summary += f"; {n_real} beat every-but-5% of shuffled-label runs (p ≤ 0.05)"
        if best is not None and best["kind"] != "continuous":
            summary += f"; best {best['metric']}: {best['attribute']} {best['score']:.3f}"
        summary += "."
        notes = [
            "Directions are w2w's least squares on centered PC coordinates (pinv(Z) @ centered labels), normalised; "
            "probe normals are the logistic/ridge coefficients. Both live in the space's units (standardized weights, "
            "or ΔW in a ΔW space); raw_weight_norm is the size of the weight change per unit step (the standardized "
            "vector times the per-feature scale).",
            "score_std is the standard deviation of each model's projection on the unit direction: an edit of "
            "strength s moves a model by s × score_std along the direction.",
            "p-values are permutation p-values (1 + #shuffles ≥ real) / (1 + #shuffles); with "
            f"{self.n_shuffles} shuffles the smallest possible is {1 / (1 + self.n_shuffles):.3f}."
            if self.n_shuffles
            else "Shuffled-label baseline off (n_shuffles=0).",
        ]
        notes += [f"Not probed: {a} ({r})." for a, r in self.skipped_.items()]
        data = {
            "k": self.k_,
            "feature_scale": self.feature_scale_,
            "attributes": attributes_data,
            "skipped": dict(self.skipped_),
            "directions": list(names),
            "direction_attribute": dict(self.direction_attribute_),
            "cos_ls": self.cos_ls_,
            "cos_probe": self.cos_probe_,
            "cos_debiased_vs_original": self.cos_debiased_,
            "debias": list(self.debias_set_),
            "retained_after_debias": self.retained_,
            "score_std": self.score_std_,
            "debiased_score_std": self.debiased_score_std_,
            "ls_norm": self.ls_norm_,
            "label_mapping": self._label_mapping(),
        }
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(notes),
            warnings=tuple(self.warnings_),
            data=data,
            params=self.get_params(),
        )

    def _score_figure(self, scores: pd.DataFrame) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            (label, scores[scores["kind"].isin(kinds)])
            for label, kinds in (
                ("AUC (binary; macro for categorical)", ("binary", "categorical")),
                ("R²", ("continuous",)),
            )
        ]
        panels = [(label, df) for label, df in panels if len(df)]
        height = max(2.5, 0.32 * max(len(df) for _, df in panels) + 1.2)
        fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), height), squeeze=False)
        for ax, (label, df) in zip(axes[0], panels, strict=True):
            pos = np.arange(len(df))[::-1]
            score = df["score"].to_numpy(dtype=float)
            lo = np.nan_to_num(score - df["ci_low"].to_numpy(dtype=float), nan=0.0)
            hi = np.nan_to_num(df["ci_high"].to_numpy(dtype=float) - score, nan=0.0)
            ax.barh(
                pos,
                score,
                xerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)],
                color=_BLUE,
                capsize=3,
                label="score (95% CI)",
            )
            ax.scatter(df["shuffled_mean"], pos, marker="|", s=250, color=_VERMILLION, zorder=3, label="shuffled mean")
            ax.scatter(df["shuffled_p95"], pos, marker="|", s=250, color=_ORANGE, zorder=3, label="shuffled 95th pct")
            ax.set_yticks(pos, df["attribute"].tolist(), fontsize=8)
            ax.set_xlabel(label)
            if label.startswith("AUC"):
                ax.axvline(0.5, color=_GREY, lw=0.8, ls="--")
                ax.set_xlim(min(0.3, float(np.nanmin(score)) - 0.05), 1.0)
            else:
                ax.axvline(0.0, color=_GREY, lw=0.8, ls="--")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.02), frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        return Figure.from_matplotlib(
            "scores",
            "Probe score per attribute with its bootstrap 95% interval (bars) against the shuffled-label baseline "
            "(vermillion: mean, orange: 95th percentile). Look for bars whose interval clears the orange mark; "
            "bars at the dashed chance line are not linearly readable from the space.",
            fig,
        )

    def _heatmap(self, ax: Any, matrix: np.ndarray, rows: list[str], cols: list[str], title: str) -> Any:
        im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
        fs = 8 if max(len(rows), len(cols)) <= 30 else 5
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fs)
        ax.set_yticks(range(len(rows)), rows, fontsize=fs)
        ax.set_title(title, fontsize=10)
        if max(len(rows), len(cols)) <= ANNOTATE_MAX:
            for (i, j), v in np.ndenumerate(matrix):
                text = f"{v + 0.0:.2f}" if abs(v) >= 0.005 else "0"
                colour = "white" if abs(v) > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        return im

    def _cosine_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.direction_names_
        side = max(4.0, 0.35 * len(names) + 2.0)
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
        self._heatmap(axes[0], self.cos_ls_, names, names, "least-squares directions")
        im = self._heatmap(axes[1], self.cos_probe_, names, names, "probe normals")
        fig.colorbar(im, ax=axes, shrink=0.7, label="cosine similarity")
        return Figure.from_matplotlib(
            "cosines",
            "Cosine similarity between attribute directions (left: w2w least squares; right: probe normals), red "
            "positive, blue negative, white unrelated. Strong off-diagonal colour means the attributes are entangled "
            "in this space: editing one moves the other unless debiased.",
            fig,
        )

    def _debias_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.direction_names_
        cols = [i for i, n in enumerate(names) if self.direction_attribute_[n] in self.debias_set_]
        col_names = [names[i] for i in cols]
        side = max(4.0, 0.35 * len(names) + 2.0)
        fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
        self._heatmap(axes[0], self.cos_ls_[:, cols], names, col_names, "before debiasing")
        im = self._heatmap(axes[1], self.cos_debiased_[:, cols], names, col_names, "after debiasing")
        fig.colorbar(im, ax=axes, shrink=0.7, label="cosine with projected-out direction")
        return Figure.from_matplotlib(
            "debiasing",
            "Cosine of each direction (rows) with the directions projected out (columns), before and after joint "
            "projection. After debiasing every cell off the attribute's own block should be white (≈ 0); its own "
            "block keeps its colour.",
            fig,
        )


# ------------------------------------------------------------------------------------------------ helpers


def _unit_rows(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a, dtype=np.float64), where=norm > 0)


def _debias(
    directions: np.ndarray, owner: list[str], debias_set: set[str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Project each direction off the span of the *other* attributes' directions, jointly.

    Projecting one direction at a time is order dependent and leaves residual overlap when the others
    are themselves correlated; an orthonormal basis of their span (SVD, rank-revealing) removes it all
    at once. Classes of the same categorical attribute are never projected out of each other (their
    indicator directions nearly sum to zero, so that would erase them).

    Returns
    -------
    debiased : ndarray of shape (m, k)
        Unit vectors (zeros where nothing is left).
    retained : ndarray of shape (m,)
        Norm of what is left of each unit direction (1 = already orthogonal, 0 = fully explained).
    """
    m = len(directions)
    out = directions.copy()
    retained = np.ones(m)
    for i in range(m):
        others = [j for j in range(m) if owner[j] in debias_set and owner[j] != owner[i]]
        if not others:
            continue
        basis, s, _ = np.linalg.svd(directions[others].T, full_matrices=False)
        basis = basis[:, s > s.max() * 1e-10]
        rest = directions[i] - basis @ (basis.T @ directions[i])
        retained[i] = float(np.linalg.norm(rest))
        out[i] = rest / retained[i] if retained[i] > 1e-6 else 0.0
    return out, retained


def _score(kind: str, y: np.ndarray, pred: np.ndarray) -> tuple[float, float | None]:
    """(headline score, accuracy or None) of out-of-fold predictions."""
    if kind == "binary":
        return rank_auc(y, pred), float(np.mean((pred > 0) == (y == 1)))
    if kind == "categorical":
        aucs = [rank_auc((y == j).astype(float), pred[:, j]) for j in range(pred.shape[1])]
        aucs = [a for a in aucs if np.isfinite(a)]
        return (float(np.mean(aucs)) if aucs else np.nan), float(np.mean(np.argmax(pred, axis=1) == y))
    sst = float(np.sum((y - y.mean()) ** 2))
    return (1.0 - float(np.sum((y - pred) ** 2)) / sst if sst > 0 else np.nan), None


def _rescale_model(model: Any, kind: str, feature_scale: float) -> None:
    """Make a model fitted on ``z / feature_scale`` take raw PC coordinates ``z`` (exact for linear models)."""
    estimators = model.estimators_ if kind == "categorical" else [model]
    for est in estimators:
        est.coef_ = est.coef_ / feature_scale


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _wsa_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("wsa")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
