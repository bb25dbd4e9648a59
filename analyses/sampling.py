"""Sampling new models from a Gaussian over PC coefficients: are samples new, and do they look like the data?

Why: weights2weights (Dravid et al., arXiv 2406.09413, §4.2) samples new identities by drawing each
PC coefficient from a Gaussian fitted to the training models. Two things decide whether that works:
*novelty* (samples should be about as far from their nearest training model as training models are
from each other, neither copies nor far-off outliers) and *fidelity* (the attribute mix of samples,
read by the linear probes, should match the data's). Both are measured here on coefficients only;
decoded image galleries of the samples come from the decoding step when one is configured.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, SkipAnalysis, Table, positive_int
from wsa.errors import ConfigError
from wsa.labels import encode_attributes
from wsa.palette import CYCLE, OKABE_ITO
from wsa.sampling import fit_gaussian, novelty, novelty_summary, probe_scores, train_nn_distances

#: Okabe-Ito colours (colour-blind safe): data labels, probe on data, then one per sampler kind.
MEMORISED_PERCENTILE = 5.0


def _kinds_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and len(set(v)) == len(v) and set(v) <= {"diagonal", "full"}


def _optional_positive_int(v: Any) -> bool:
    return v is None or positive_int(v)


def _temperature_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0


def _shrinkage_ok(v: Any) -> bool:
    return v is None or v == "ledoit_wolf" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)


def _encoded_labels(labels: pd.DataFrame | None, attr: str, kind: str) -> tuple[np.ndarray | None, Any]:
    """Labels encoded exactly as the probes encode them (``wsa.labels``): 0/1, class index or float.

    Returns the non-missing encoded values (``None`` without a matching column) and the column's
    :class:`~wsa.labels.AttributeInfo` (for the names behind the codes).
    """
    found = encode_attributes(labels[[attr]]).get(attr) if labels is not None and attr in labels.columns else None
    if found is None or found.kind != kind:
        return None, None if found is None else found.info
    values = found.values[np.isfinite(found.values)]
    return (values if len(values) else None), found.info


def _code(info: Any, cls: Any) -> float | None:
    """The ``wsa.labels`` code of a probe class: probes may train on codes, on booleans (binary: ``True`` is 1)
    or on the category names themselves."""
    if isinstance(cls, (bool, np.bool_, int, float, np.integer, np.floating)):
        return float(cls)
    if info is not None and info.kind == "categorical" and str(cls) in info.classes:
        return float(info.classes.index(str(cls)))
    return None


def _class_name(info: Any, cls: Any) -> str:
    """The label value behind a probe class (e.g. ``"yes"`` for code 1); the class itself otherwise."""
    code = _code(info, cls)
    if info is not None and code is not None and code.is_integer():
        if info.kind == "binary":
            names = {v: k for k, v in info.mapping.items()}
            return str(names.get(int(code), cls))
        if info.kind == "categorical" and 0 <= int(code) < len(info.classes):
            return str(info.classes[int(code)])
    return str(cls)


def _rate(values: np.ndarray | None, info: Any, cls: Any) -> float | None:
    code = _code(info, cls)
    return None if values is None or code is None else float(np.mean(values == code))


@register_analyzer
class Sampling(Analyzer):
    """Fit Gaussians to the PC coefficients, sample, and measure novelty and attribute fidelity.

    Parameters
    ----------
    n_samples : int, default=256
        Models drawn per sampler kind.
    kinds : tuple of {"diagonal", "full"}, default=("diagonal", "full")
        ``"diagonal"`` is w2w's sampler (independent coefficients); ``"full"`` uses the covariance.
    temperature : float, default=1.0
        Multiplies the sampling standard deviation (0 gives the mean every time).
    n_components : int or None, default=None
        Leading coefficients modelled (``k``); ``None`` uses all of the space's.
    shrinkage : None, "ledoit_wolf" or float in [0, 1], default=None
        Covariance shrinkage for the ``"full"`` sampler.
    n_reference : int, default=2048
        Training models whose leave-one-out nearest-neighbour distance forms the reference
        distribution (each searched against all training models; a subset keeps this fast on 65k).

    Attributes
    ----------
    k_ : int
    models_ : dict of kind -> GaussianModel
    train_nn_ : ndarray of shape (n_reference_,)
        Leave-one-out nearest-neighbour distances of the reference training models.
    novelty_ : dict of kind -> ndarray of shape (n_samples,)
    summary_ : pandas.DataFrame
        One row per sampler kind (novelty, memorisation, diversity).
    attributes_ : pandas.DataFrame or None
        Attribute statistics of data vs samples; ``None`` without probes.
    notes_ : list of str
    warnings_ : list of str
    """

    name: ClassVar[str] = "sampling"
    title: ClassVar[str] = "Sampling: novelty and attribute fidelity of Gaussian samples"
    reference: ClassVar[str] = "Dravid et al. 2024, Interpreting the Weight Space of Customized Diffusion Models, §4.2"
    requires_labels: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("probes",)  # reads their ctx.artifacts when they ran
    _parameter_constraints: ClassVar[dict[str, tuple[Any, str]]] = {
        "n_samples": (lambda v: positive_int(v) and v >= 2, "an int >= 2"),
        "kinds": (_kinds_ok, 'a non-empty tuple of distinct values from ("diagonal", "full")'),
        "temperature": (_temperature_ok, "a finite float >= 0"),
        "n_components": (_optional_positive_int, "None or a positive int"),
        "shrinkage": (_shrinkage_ok, "None, 'ledoit_wolf' or a float in [0, 1]"),
        "n_reference": (lambda v: positive_int(v) and v >= 2, "an int >= 2"),
    }

    def __init__(
        self,
        *,
        n_samples: int = 256,
        kinds: tuple[str, ...] = ("diagonal", "full"),
        temperature: float = 1.0,
        n_components: int | None = None,
        shrinkage: float | str | None = None,
        n_reference: int = 2048,
    ) -> None:
        self.n_samples = n_samples
        self.kinds = kinds
        self.temperature = temperature
        self.n_components = n_components
        self.shrinkage = shrinkage
        self.n_reference = n_reference

    def fit(self, ctx: AnalysisContext) -> Sampling:
        self._validate_params()
        z_all = np.asarray(ctx.space.coefficients, dtype=np.float64)
        n_train, k_space = z_all.shape
        if n_train < 3:
            raise SkipAnalysis(f"sampling needs at least 3 adapters; the space has {n_train}")
        k = k_space if self.n_components is None else int(self.n_components)
        if k > k_space:
            raise ConfigError(f"The 'n_components' parameter of sampling must be <= {k_space} (the space's k); got {k}")
        z = z_all[:, :k]
        rng = np.random.default_rng(ctx.random_state)
        notes: list[str] = []
        warnings: list[str] = []

        ref_rows = np.sort(rng.choice(n_train, size=min(self.n_reference, n_train), replace=False))
        train_nn = train_nn_distances(z, rows=ref_rows)
        threshold = float(np.percentile(train_nn, MEMORISED_PERCENTILE))
        # Diversity yardstick: NN distances shrink with more points, so compare samples with an equal-size
        # subset of training models rather than with all of them.
        n_div = min(self.n_samples, n_train)
        div_ref = z[np.sort(rng.choice(n_train, size=n_div, replace=False))]
        div_ref_median = float(np.median(train_nn_distances(div_ref)))

        models, samples, nov, rows = {}, {}, {}, []
        for kind in self.kinds:
            model = fit_gaussian(z, kind, shrinkage=self.shrinkage if kind == "full" else None)
            s = model.sample(self.n_samples, temperature=float(self.temperature), random_state=rng)
            d = novelty(s, z)
            within = train_nn_distances(s)
            models[kind], samples[kind], nov[kind] = model, s, d
            p95 = float(np.percentile(train_nn, 95))
            row = {
                "sampler": kind,
                **novelty_summary(d, train_nn, percentile=MEMORISED_PERCENTILE),
                "diversity_ratio": float(np.median(within)) / div_ref_median if div_ref_median > 0 else float("nan"),
                "p95_novelty_ratio": float(np.percentile(d, 95)) / p95 if p95 > 0 else float("nan"),
            }
            row.pop("threshold")
            rows.append(row)
            if row["memorised_fraction"] > 0.5:
                warnings.append(
                    f"{kind} sampler: {row['memorised_fraction']:.0%} of samples are closer to a training model than "
                    f"{MEMORISED_PERCENTILE:g}% of training models are to each other (near-copies)."
                )
            if row["diversity_ratio"] < 0.5:
                warnings.append(
                    f"{kind} sampler: samples are {row['diversity_ratio']:.2f}× as spread out as an equal number of "
                    "training models (collapsed sampler; temperature too low?)."
                )
        summary = pd.DataFrame(rows)
        if "full" in self.kinds and "diagonal" in self.kinds:
            notes.append(
                "In exact PCA coordinates the coefficients are uncorrelated, so 'full' and 'diagonal' agree up to "
                "finite-sample cross-terms; a gap between them means the space was fitted on other rows or "
                "approximately."
            )
        if n_train > len(ref_rows):
            notes.append(
                f"Training nearest-neighbour distances use {len(ref_rows)} of {n_train} models as queries "
                "(each searched against all models)."
            )

        attributes = self._attributes(ctx, z_all, k, samples, notes)
        notes.append(
            "Decoded image galleries of the samples appear when a decoder is configured (ctx.artifacts['sampling'] "
            "holds the sampled coefficients)."
        )
        ctx.artifacts["sampling"] = {
            "k": k,
            "temperature": float(self.temperature),
            "samples": samples,
            "models": models,
            "novelty": nov,
        }
        self.k_ = k
        self.models_ = models
        self.train_nn_ = train_nn
        self.memorised_threshold_ = threshold
        self.novelty_ = nov
        self.summary_ = summary
        self.attributes_ = attributes
        self.notes_ = notes
        self.warnings_ = warnings
        return self

    def _attributes(
        self, ctx: AnalysisContext, z_all: np.ndarray, k: int, samples: dict[str, np.ndarray], notes: list[str]
    ) -> pd.DataFrame | None:
        """Probe-read attribute statistics of the data (labels and probe) and of each sampler's samples."""
        probes = ctx.artifacts.get("probes")
        if not probes or not probes.get("models"):
            notes.append(
                "No probes artifact (no labels, or the probes analyzer did not run): attribute fidelity skipped."
            )
            return None
        pk = int(probes["k"])
        if pk > z_all.shape[1]:
            notes.append(
                f"Probes use {pk} coefficients but the space has {z_all.shape[1]}: attribute fidelity skipped."
            )
            return None
        if k < pk:
            # Coefficients the samplers do not model sit at their training mean.
            notes.append(
                f"Samples model {k} coefficients; the probes read {pk}, so coefficients {k}..{pk} sit at the mean."
            )
        fill = z_all[:, :pk].mean(axis=0)

        def pad(s: np.ndarray) -> np.ndarray:
            if s.shape[1] >= pk:
                return s[:, :pk]
            return np.hstack([s, np.broadcast_to(fill[s.shape[1] :], (s.shape[0], pk - s.shape[1]))])

        data_scores = probe_scores(probes, z_all[:, :pk])
        sample_scores = {kind: probe_scores(probes, pad(s)) for kind, s in samples.items()}
        kinds = probes.get("kinds", {})
        records: list[dict[str, Any]] = []
        for attr in sorted(data_scores):
            kind = kinds.get(attr, "continuous")
            encoded, info = _encoded_labels(ctx.labels, attr, kind)
            model = probes["models"][attr]
            if kind in ("binary", "categorical"):
                if kind == "binary":
                    codes = list(getattr(model, "classes_", (0, 1)))[1:]
                    data_rate = [np.mean(data_scores[attr] > 0)]
                    sample_rate = {sk: [np.mean(sample_scores[sk][attr] > 0)] for sk in samples}
                else:
                    codes = list(getattr(model, "classes_", range(data_scores[attr].shape[1])))
                    pred = np.argmax(data_scores[attr], axis=1)
                    data_rate = [np.mean(pred == ci) for ci in range(len(codes))]
                    sample_rate = {
                        sk: [np.mean(np.argmax(sample_scores[sk][attr], axis=1) == ci) for ci in range(len(codes))]
                        for sk in samples
                    }
                for ci, code in enumerate(codes):
                    rec = {
                        "attribute": attr,
                        "type": kind,
                        "statistic": f"rate of {_class_name(info, code)}",
                        "labels": _rate(encoded, info, code),
                        "probe_on_data": float(data_rate[ci]),
                    }
                    for sk in samples:
                        rec[f"samples_{sk}"] = float(sample_rate[sk][ci])
                    records.append(rec)
            else:
                for stat, fn in (("mean", np.mean), ("std", np.std)):
                    rec = {
                        "attribute": attr,
                        "type": kind,
                        "statistic": stat,
                        "labels": None if encoded is None else float(fn(encoded)),
                        "probe_on_data": float(fn(data_scores[attr])),
                    }
                    for sk in samples:
                        rec[f"samples_{sk}"] = float(fn(sample_scores[sk][attr]))
                    records.append(rec)
        frame = pd.DataFrame(records)
        notes.append(
            "Attribute rates of samples are read by the probes; compare them with 'probe_on_data' (the same probes "
            "on the training models), which cancels probe bias, as well as with the labels."
        )
        return frame

    def result(self) -> Result:
        self._check_is_fitted()
        summary = self.summary_
        first = summary.iloc[0]
        metrics = [
            Metric(f"novelty ratio ({first['sampler']})", float(first["novelty_ratio"]), None, chance=1.0, units="×"),
            Metric(
                f"memorised fraction ({first['sampler']})",
                float(first["memorised_fraction"]),
                False,
                chance=MEMORISED_PERCENTILE / 100,
            ),
            Metric(
                f"diversity ratio ({first['sampler']})", float(first["diversity_ratio"]), None, chance=1.0, units="×"
            ),
        ]
        gap = self._rate_gaps()
        if gap is not None:
            metrics.append(Metric("max attribute-rate gap (samples vs probe on data)", gap, False))
        tables = [
            Table.from_frame(
                "novelty",
                "Per sampler: median distance from a sample to its nearest training model vs the median leave-one-out "
                "nearest-neighbour distance among training models (ratio ≈ 1 means samples are as new as training "
                "models are to each other; ≪ 1 means near-copies); 'memorised_fraction' is the share of samples closer "
                f"than the {MEMORISED_PERCENTILE:g}th percentile of training distances; 'diversity_ratio' compares the "
                "spread among samples with an equal number of training models.",
                summary,
            )
        ]
        if self.attributes_ is not None:
            tables.append(
                Table.from_frame(
                    "attributes",
                    "Attribute statistics: label rate (or mean/std), the probes read on the training models, and the "
                    "probes read on each sampler's samples. Samples should match 'probe_on_data'.",
                    self.attributes_,
                )
            )
        figures = [self._novelty_figure()]
        if self.attributes_ is not None and len(self.attributes_):
            figures.append(self._attribute_figure())
        data: dict[str, Any] = {
            "k": self.k_,
            "temperature": float(self.temperature),
            "memorised_threshold": self.memorised_threshold_,
            "train_nn": {
                "n": len(self.train_nn_),
                "median": float(np.median(self.train_nn_)),
                "percentiles": {str(p): float(np.percentile(self.train_nn_, p)) for p in (5, 25, 50, 75, 95)},
            },
            "samplers": summary.to_dict(orient="records"),
            "novelty_percentiles": {
                kind: {str(p): float(np.percentile(d, p)) for p in (5, 25, 50, 75, 95)}
                for kind, d in self.novelty_.items()
            },
            "attributes": None if self.attributes_ is None else self.attributes_.to_dict(orient="records"),
            "shrinkage": {kind: m.shrinkage for kind, m in self.models_.items()},
        }
        summary_text = (
            f"{len(self.models_)} Gaussian sampler(s) on k={self.k_} coefficients, {self.n_samples} samples each at "
            f"temperature {float(self.temperature):g}: samples sit {float(first['novelty_ratio']):.2f}× the typical "
            f"training nearest-neighbour distance from the data ({first['sampler']}), "
            f"{float(first['memorised_fraction']):.0%} flagged as near-copies."
        )
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary_text,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(self.notes_),
            warnings=tuple(self.warnings_),
            data=data,
            params=self.get_params(),
        )

    def _rate_gaps(self) -> float | None:
        frame = self.attributes_
        if frame is None:
            return None
        rates = frame[frame["type"] != "continuous"]
        cols = [c for c in rates.columns if c.startswith("samples_")]
        if not len(rates) or not cols:
            return None
        return float(np.max(np.abs(rates[cols].to_numpy(dtype=float) - rates[["probe_on_data"]].to_numpy(dtype=float))))

    def _novelty_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        everything = np.concatenate([self.train_nn_, *self.novelty_.values()])
        bins = np.linspace(0.0, float(everything.max()) * 1.02 + 1e-12, 40)
        ax.hist(
            self.train_nn_,
            bins=bins,
            density=True,
            color=OKABE_ITO["grey"],
            alpha=0.6,
            label="training (leave-one-out NN)",
        )
        for i, (kind, d) in enumerate(self.novelty_.items()):
            ax.hist(
                d,
                bins=bins,
                density=True,
                histtype="step",
                linewidth=2,
                color=CYCLE[2 + i],
                label=f"samples: {kind}",
            )
        ax.axvline(
            self.memorised_threshold_,
            color=OKABE_ITO["vermillion"],
            linestyle="--",
            linewidth=1,
            label=f"{MEMORISED_PERCENTILE:g}th pct of training (memorised below)",
        )
        ax.set_xlabel("distance to nearest training model (PC coefficients)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, frameon=False)
        fig.tight_layout()
        return Figure.from_matplotlib(
            "novelty",
            "Distance from each sample to its nearest training model (outlined) against the same distance among "
            "training models (grey). Look for overlap: mass left of the dashed line means near-copies, mass far to "
            "the right means samples off the data.",
            fig,
        )

    def _attribute_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frame = self.attributes_
        assert frame is not None
        rates = frame[frame["type"] != "continuous"].head(24)
        cont = frame[(frame["type"] == "continuous") & (frame["statistic"] == "mean")].head(12)
        stds = frame[(frame["type"] == "continuous") & (frame["statistic"] == "std")].head(12)
        series = ["labels", "probe_on_data"] + [f"samples_{k}" for k in self.models_]
        panels = [p for p in (("rates", rates), ("continuous", cont)) if len(p[1])]
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(max(6.0, 0.6 * max(len(p[1]) for p in panels) + 3), 3.4 * len(panels)),
            squeeze=False,
        )
        width = 0.8 / len(series)
        for ax, (kind, part) in zip(axes[:, 0], panels, strict=True):
            x = np.arange(len(part))
            for j, col in enumerate(series):
                vals = pd.to_numeric(part[col], errors="coerce").to_numpy(dtype=float)
                xs = x + (j - (len(series) - 1) / 2) * width
                style = {"color": CYCLE[j], "label": col.replace("_", " ")}
                if kind == "rates":
                    ax.bar(xs, vals, width, **style)  # a NaN rate (no label column) draws no bar
                else:
                    err = pd.to_numeric(stds[col], errors="coerce").to_numpy(dtype=float)
                    ax.errorbar(xs, vals, yerr=err, fmt="o", capsize=3, **style)
            labels = [
                f"{a}\n{s}" if kind == "rates" else a for a, s in zip(part["attribute"], part["statistic"], strict=True)
            ]
            ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("rate" if kind == "rates" else "mean ± std of score")
            if kind == "rates":
                ax.set_ylim(0, 1)
        axes[0, 0].legend(fontsize=8, frameon=False, ncol=len(series))
        fig.tight_layout()
        return Figure.from_matplotlib(
            "attribute_rates",
            "Attribute mix of the data and of the samples, as read by the probes (top: rate of each class; bottom: "
            "mean ± std of continuous scores). Look for sample bars matching 'probe on data'; missing label bars mean "
            "the label column is absent.",
            fig,
        )
