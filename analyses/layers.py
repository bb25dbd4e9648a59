"""Which modules and blocks carry the collection's variation, and which carry each labelled concept.

Why: w2w fine-tunes only attention q/v of the UNet; whether the identity signal lives in early
cross-attention or late self-attention decides where edits act and which modules a lighter space
could drop. Per module we measure how big the adapters are there (mean row norm), how much of the
collection's variance sits there (share of the total), how many directions it spreads over (effective
rank, Roy & Vetterli 2007) and, with labels, how well that module alone predicts each attribute.

Each measure is asked of the space (:meth:`~wsa.space.FittedSpace.module_spectra` and ``module_stats``), so
it is taken in the space's geometry with one code path: a module's stored columns for an explicit space
(in the stored units: the space's standardization would give every column the same variance), its ΔW
from the factors for a ΔW space.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from wsa.analyses import register_analyzer
from wsa.analyses.base import AnalysisContext, Analyzer, Figure, Metric, Result, Table, positive_int
from wsa.analyses.metrics import rank_auc
from wsa.labels import encode_attributes
from wsa.palette import OKABE_ITO

#: Colours per UNet stage (Okabe–Ito), so the bar chart reads down → mid → up at a glance.
STAGE_COLOURS = {
    "down": OKABE_ITO["blue"],
    "mid": OKABE_ITO["orange"],
    "up": OKABE_ITO["vermillion"],
    "other": OKABE_ITO["green"],
    "text": OKABE_ITO["purple"],
}
#: Readable module labels in figures: the long diffusers path pieces that carry no information.
_ABBREVIATIONS = (
    ("down_blocks.", "down."),
    ("up_blocks.", "up."),
    (".attentions.", ".att"),
    (".transformer_blocks.", ".tb"),
    ("text_encoder", "te"),
    (".text_model.encoder.layers.", ".L"),
)
#: Above this many modules the figures show blocks instead (labels would not be readable).
MAX_MODULES_IN_FIGURE = 150


def block_of(module: str) -> str:
    """The block a module belongs to: ``down_blocks.0``, ``mid_block``, ``up_blocks.3``, ``text_encoder`` …"""
    first = module.split(".")[0]
    if first.startswith("text_encoder"):
        return first
    m = re.search(r"\b(down_blocks|up_blocks)\.(\d+)", module)
    if m:
        return m.group(0)
    if "mid_block" in module:
        return "mid_block"
    m = re.match(r"((?:single_)?transformer_blocks|blocks|layers)\.(\d+)", module)
    return m.group(0) if m else first


def stage_of(block: str) -> str:
    if block.startswith("down_blocks"):
        return "down"
    if block == "mid_block":
        return "mid"
    if block.startswith("up_blocks"):
        return "up"
    return "text" if block.startswith("text_encoder") else "other"


def block_order(block: str) -> tuple[int, int, str]:
    """Sort key: down blocks, mid block, up blocks (by index), other denoiser blocks, text encoders."""
    rank = {"down": 0, "mid": 1, "up": 2, "other": 3, "text": 4}[stage_of(block)]
    m = re.search(r"\.(\d+)$", block)
    return rank, int(m.group(1)) if m else -1, block


def module_type(module: str) -> str:
    """The layer type within its block: ``attn1.to_q``, ``self_attn.q_proj``, ``attn1.to_out.0`` …"""
    parts = module.split(".")
    n = 3 if len(parts) >= 3 and parts[-1].isdigit() else 2
    return ".".join(parts[-n:])


def effective_rank(eigenvalues: np.ndarray) -> float:
    """``exp`` of the Shannon entropy of the normalised spectrum (Roy & Vetterli 2007); 0 for no variance."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _ridge_predict(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Closed-form ridge (one solve for every target column): a few-feature probe needs no iterative solver."""
    mu_z, mu_y = z_train.mean(axis=0), y_train.mean(axis=0)
    a = z_train - mu_z
    w = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ (y_train - mu_y))
    return (z_test - mu_z) @ w + mu_y


def probe_score(z: np.ndarray, y: np.ndarray, kind: str, random_state: int) -> tuple[float, str]:
    """Cross-validated (up to 5 folds) score of a linear probe on ``z``: AUC for classes, R² for numbers.

    The probe is a closed-form ridge on the standardized features (a linear discriminant for classes):
    this analyzer runs one probe per module × attribute, so it must cost milliseconds, and the per-module
    *ranking* of signal is what matters here (the probes analyzer fits the calibrated models).

    Returns
    -------
    score : float
        ROC AUC (binary), macro one-vs-rest AUC (categorical) or R² (continuous); NaN when there are too
        few labelled rows or a class too small to split.
    metric : str
        ``"auc"`` or ``"r2"``.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    present = np.isfinite(y)
    z, y = z[present].astype(np.float64), y[present]
    # Standardizing once before the folds uses no label, so it leaks nothing a probe could exploit.
    sd = z.std(axis=0)
    z = (z - z.mean(axis=0)) / np.where(sd > 0, sd, 1)
    if kind == "continuous":
        if len(y) < 10 or np.ptp(y) == 0:
            return float("nan"), "r2"
        pred = np.empty(len(y))
        for tr, te in KFold(n_splits=5, shuffle=True, random_state=random_state).split(z):
            pred[te] = _ridge_predict(z[tr], y[tr, None], z[te])[:, 0]
        scores = [
            1 - np.sum((y[te] - pred[te]) ** 2) / max(np.sum((y[te] - y[te].mean()) ** 2), 1e-300)
            for _, te in KFold(n_splits=5, shuffle=True, random_state=random_state).split(z)
        ]
        return float(np.mean(scores)), "r2"
    y = y.astype(int)
    classes, counts = np.unique(y, return_counts=True)
    n_splits = min(5, int(counts.min())) if len(counts) > 1 else 0
    if n_splits < 2:
        return float("nan"), "auc"
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    scores = []
    for tr, te in StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state).split(z, y):
        pred = _ridge_predict(z[tr], onehot[tr], z[te])
        if len(classes) == 2:
            scores.append(rank_auc(onehot[te, 1], pred[:, 1]))
        else:
            scores.append(np.nanmean([rank_auc(onehot[te, c], pred[:, c]) for c in range(len(classes))]))
    return float(np.nanmean(scores)), "auc"


def skill(score: float, metric: str) -> float:
    """Signal above chance on one scale: ``2·AUC − 1`` for AUC (chance 0.5), R² as is (chance 0)."""
    return 2 * score - 1 if metric == "auc" else score


@register_analyzer
class Layers(Analyzer):
    """Per-module (and per-block, per-layer-type) size, variance share, effective rank and attribute signal.

    Parameters
    ----------
    max_rows : int, default=2000
        Models (a fixed random subset when there are more) used for the effective rank, the module PCs and
        the probes; variance and norms always use every model of the space.
    probe_components : int, default=16
        Each module's columns are reduced to their top PCs (from the subset) before probing, so a probe
        on a 2,560-column module costs what one on 16 features does and modules of different widths compete
        on equal terms.
    block_rows : int, default=512
        Rows per streamed block.

    Attributes
    ----------
    modules_ : pandas.DataFrame
        One row per module: ``module``, ``block``, ``type``, ``n_features``, ``mean_norm``, ``variance``,
        ``variance_share``, ``column_share``, ``effective_rank`` and one ``signal:<attribute>`` column per
        attribute (AUC or R²).
    blocks_, types_ : pandas.DataFrame
        The same aggregated per block and per layer type (signal = best module's).
    metrics_ : dict of str to str
        ``"auc"`` or ``"r2"`` per attribute.
    """

    name: ClassVar[str] = "layers"
    title: ClassVar[str] = "Where the variation lives: modules and blocks"
    reference: ClassVar[str] = (
        "Dravid et al., weights2weights, arXiv 2406.09413; Roy & Vetterli, The effective rank, EUSIPCO 2007"
    )
    _parameter_constraints: ClassVar[dict] = {
        "max_rows": (lambda v: positive_int(v) and v >= 10, "an int >= 10"),
        "probe_components": (positive_int, "a positive int"),
        "block_rows": (positive_int, "a positive int"),
    }

    def __init__(self, *, max_rows: int = 2000, probe_components: int = 16, block_rows: int = 512) -> None:
        self.max_rows = max_rows
        self.probe_components = probe_components
        self.block_rows = block_rows

    def fit(self, ctx: AnalysisContext) -> Layers:
        self._validate_params()
        store, space = ctx.store, ctx.space
        modules = list(store.layout.modules)
        ids = [str(i) for i in space.ids]
        n = len(ids)
        rng = np.random.default_rng(ctx.random_state)
        sub = np.arange(n) if n <= self.max_rows else np.sort(rng.choice(n, size=self.max_rows, replace=False))
        # Each module as the space's geometry sees it (its stored columns, or its ΔW from the factors).
        spectra = space.module_spectra(store, modules, sub, self.probe_components, self.block_rows)
        eranks, scores = self._subset_pass(ctx, enumerate(spectra), ids, sub)
        variance, sqnorms = space.module_stats(store, modules, block_rows=self.block_rows)

        total = float(variance.sum())
        d_total = sum(m.size for m in modules)
        frame = pd.DataFrame(
            {
                "module": [m.name for m in modules],
                "block": [block_of(m.name) for m in modules],
                "type": [module_type(m.name) for m in modules],
                "n_features": [m.size for m in modules],
                "mean_norm": np.sqrt(sqnorms).mean(axis=0),
                "variance": variance,
                "variance_share": variance / total if total > 0 else np.full(len(modules), np.nan),
                "column_share": [m.size / d_total for m in modules],
                "effective_rank": eranks,
            }
        )
        for attr, vals in scores.items():
            frame[f"signal:{attr}"] = vals
        order = sorted(range(len(modules)), key=lambda i: (block_order(frame["block"][i]), i))
        self.modules_ = frame.iloc[order].reset_index(drop=True)
        self.blocks_ = self._aggregate("block", sqnorms[:, order])
        self.types_ = self._aggregate("type", sqnorms[:, order])
        self.n_models_ = n
        self.n_subset_ = len(sub)
        return self

    def _subset_pass(
        self,
        ctx: AnalysisContext,
        spectra: Iterable[tuple[int, tuple[np.ndarray, np.ndarray]]],
        ids: list[str],
        sub: np.ndarray,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Effective rank and (with labels) probe scores per module, from ``(module, (eigenvalues, scores))``."""
        labels = {a: (e.kind, e.values[sub]) for a, e in encode_attributes(ctx.labels, ids).items()}
        self.metrics_: dict[str, str] = {}
        eranks = np.zeros(len(ctx.store.layout.modules))
        scores = {a: np.full(len(eranks), np.nan) for a in labels}
        for i, (eigvals, z) in spectra:
            eranks[i] = effective_rank(eigvals)
            for attr, (kind, y) in labels.items():
                score, metric = probe_score(z, y, kind, ctx.random_state)
                scores[attr][i] = score
                self.metrics_[attr] = metric
        return eranks, scores

    def _aggregate(self, key: str, sqnorms: np.ndarray) -> pd.DataFrame:
        """Group modules by ``key``: sums of features and variance, the group's own mean row norm, best signal."""
        frame = self.modules_
        groups: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(frame[key]):
            groups[g].append(i)
        names = sorted(groups, key=block_order) if key == "block" else sorted(groups)
        signal_cols = [c for c in frame.columns if c.startswith("signal:")]
        records = []
        for g in names:
            idx = groups[g]
            sub = frame.iloc[idx]
            rec: dict[str, Any] = {
                key: g,
                "n_modules": len(idx),
                "n_features": int(sub["n_features"].sum()),
                "mean_norm": float(np.sqrt(sqnorms[:, idx].sum(axis=1)).mean()),
                "variance_share": float(sub["variance_share"].sum()),
                "column_share": float(sub["column_share"].sum()),
            }
            for c in signal_cols:
                vals = sub[c].to_numpy(dtype=np.float64)
                rec[c] = float(np.nanmax(vals)) if np.isfinite(vals).any() else float("nan")
            records.append(rec)
        return pd.DataFrame(records)

    def result(self) -> Result:
        self._check_is_fitted()
        mods, blocks = self.modules_, self.blocks_
        attrs = [c.removeprefix("signal:") for c in mods.columns if c.startswith("signal:")]
        figures = [self._variance_figure()]
        if attrs:
            figures.append(self._signal_figure(attrs))
        top = mods.sort_values("variance_share", ascending=False).iloc[0]
        top_block = blocks.sort_values("variance_share", ascending=False).iloc[0]
        metrics = [
            Metric("largest module variance share", float(top["variance_share"]), units="fraction"),
            Metric("largest block variance share", float(top_block["variance_share"]), units="fraction"),
            Metric("median module effective rank", float(mods["effective_rank"].median())),
        ]
        best_modules: dict[str, dict[str, Any]] = {}
        for a in attrs:
            col = mods[f"signal:{a}"].to_numpy(dtype=np.float64)
            if not np.isfinite(col).any():
                continue
            i = int(np.nanargmax(col))
            metric = self.metrics_[a]
            best_modules[a] = {"module": mods["module"][i], "score": float(col[i]), "metric": metric}
            metrics.append(
                Metric(
                    f"best single-module {metric.upper()}: {a}", float(col[i]), True, 0.5 if metric == "auc" else 0.0
                )
            )
        sig_caption = (
            ""
            if not attrs
            else " Columns 'signal:<attribute>' give the cross-validated AUC or R² of a probe on that module alone."
        )
        tables = [
            Table.from_frame(
                "modules",
                "Per module, in down → mid → up order: mean row norm over models, variance and its share of the "
                "collection's total (compare with column_share: a larger variance share means more variation per "
                f"parameter), effective rank of the centered models × columns block.{sig_caption}",
                mods,
            ),
            Table.from_frame("blocks", "The same per block (signal: the best module of the block).", blocks),
            Table.from_frame("types", "The same per layer type (attn1/attn2, to_q/to_v …).", self.types_),
        ]
        notes = [
            f"Variance and norms use all {self.n_models_} models; effective rank and probes use "
            f"{self.n_subset_} (each module reduced to its top {self.probe_components} PCs before probing)."
        ]
        summary = (
            f"{len(mods)} modules in {len(blocks)} blocks; most variance in {top_block['block']} "
            f"({top_block['variance_share']:.1%}), largest module {top['module']} ({top['variance_share']:.1%})."
        )
        if best_modules:
            summary += " Strongest single-module signal: " + "; ".join(
                f"{a} → {v['module']} ({v['metric'].upper()} {v['score']:.2f})"
                for a, v in list(best_modules.items())[:3]
            )
        data = {
            "modules": mods.to_dict(orient="list"),
            "blocks": blocks.to_dict(orient="list"),
            "types": self.types_.to_dict(orient="list"),
            "probe_metric": self.metrics_,
            "best_module": best_modules,
            "n_models": self.n_models_,
            "n_subset": self.n_subset_,
        }
        return Result(
            analyzer=self.name,
            title=self.title,
            summary=summary,
            metrics=tuple(metrics),
            tables=tuple(tables),
            figures=tuple(figures),
            notes=tuple(notes),
            data=data,
            params=self.get_params(),
        )

    def _variance_figure(self) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        use_modules = len(self.modules_) <= MAX_MODULES_IN_FIGURE
        frame = self.modules_ if use_modules else self.blocks_
        labels = [_abbreviate(s) for s in (frame["module"] if use_modules else frame["block"])]
        blocks = frame["block"]
        colours = [STAGE_COLOURS[stage_of(b)] for b in blocks]
        y = np.arange(len(frame))
        fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.17 * len(frame) + 1)))
        ax.barh(y, frame["variance_share"], color=colours, height=0.8)
        ax.plot(frame["column_share"], y, "|", color="black", ms=7, label="share of columns")
        ax.set_yticks(y, labels, fontsize=6 if len(frame) > 40 else 8)
        ax.invert_yaxis()
        ax.set_xlabel("share of the collection's variance")
        stages = [s for s in STAGE_COLOURS if any(stage_of(b) == s for b in blocks)]
        handles = [Patch(color=STAGE_COLOURS[s], label=s) for s in stages]
        handles.append(ax.get_legend_handles_labels()[0][0])
        ax.legend(handles=handles, fontsize=8, frameon=False, loc="lower right")
        what = "module" if use_modules else "block"
        return Figure.from_matplotlib(
            "variance_share",
            f"Share of the collection's variance per {what}, top to bottom in down → mid → up order. A bar far "
            "past its black tick (that module's share of the columns) carries more variation than its size "
            "explains — the adapters differ mostly there.",
            fig,
        )

    def _signal_figure(self, attrs: list[str]) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        use_modules = len(self.modules_) <= MAX_MODULES_IN_FIGURE
        frame = self.modules_ if use_modules else self.blocks_
        labels = [_abbreviate(s) for s in (frame["module"] if use_modules else frame["block"])]
        raw = np.column_stack([frame[f"signal:{a}"].to_numpy(dtype=np.float64) for a in attrs])
        sk = np.column_stack([[skill(v, self.metrics_.get(a, "auc")) for v in raw[:, j]] for j, a in enumerate(attrs)])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(attrs) + 3), max(2.5, 0.17 * len(frame) + 1.2)))
        im = ax.imshow(np.clip(sk, 0, 1), aspect="auto", cmap="cividis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(np.arange(len(frame)), labels, fontsize=6 if len(frame) > 40 else 8)
        ax.set_xticks(
            np.arange(len(attrs)), [a if len(a) <= 18 else a[:17] + "…" for a in attrs], rotation=45, ha="right"
        )
        if raw.size <= 400:
            for (i, j), v in np.ndenumerate(raw):
                if np.isfinite(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if sk[i, j] < 0.6 else "black",
                    )
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="skill: 2·AUC − 1 or R² (0 = chance)")
        what = "module" if use_modules else "block (best module)"
        return Figure.from_matplotlib(
            "attribute_signal",
            f"How well each {what} alone predicts each attribute (cross-validated linear probe on its top "
            f"{self.probe_components} PCs; numbers are AUC or R²). Bright rows are where a concept is written; "
            "a uniformly dark column means no single module carries it.",
            fig,
        )


def _abbreviate(name: str) -> str:
    for long, short in _ABBREVIATIONS:
        name = name.replace(long, short)
    return name
