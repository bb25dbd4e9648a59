"""Manifold, layers and outliers analyzers: plant-and-recover tests, each with a negative control.

Why planted data: every number these analyzers report has a known answer on data built for it — two
tight clusters must agree with their cluster label and a coin-flip label must sit at the shuffled
baseline; a flat 2-D sheet must map trustworthily and an isotropic cloud must not; variation planted in
one module must be found there and nowhere else; planted outliers and a planted duplicate must be
found exactly, and clean Gaussian data must raise no alarm.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from wsa.analyses import get_analyzer
from wsa.analyses.base import AnalysisContext, NotFittedError
from wsa.analyses.layers import Layers, block_of, effective_rank, module_type
from wsa.analyses.manifold import Manifold, knn_agreement, neighbour_indices
from wsa.analyses.outliers import Outliers, robust_z
from wsa.errors import ConfigError
from wsa.space import fit_space
from wsa.store.layout import build_layout


class _Store:
    """What these analyzers read from a store: matrix, ids, per-row facts, layout and block iteration."""

    def __init__(self, matrix: np.ndarray, *, layout=None, rows: list[dict] | None = None) -> None:
        self.matrix = np.asarray(matrix, dtype=np.float32)
        self.ids = [str(i) for i in range(len(matrix))]
        self.layout = layout
        self.rows = rows or [
            {
                "id": rid,
                "source": f"/adapters/{rid}/adapter_model.safetensors",
                "delta_norm": float(np.linalg.norm(self.matrix[i])),
                "sha256": f"hash-{rid}",
            }
            for i, rid in enumerate(self.ids)
        ]

    def iter_blocks(self, block_rows: int = 1024, rows=None):
        n = len(self.ids) if rows is None else len(rows)
        for start in range(0, n, block_rows):
            idx = slice(start, min(start + block_rows, n)) if rows is None else rows[start : start + block_rows]
            yield start, np.asarray(self.matrix[idx], dtype=np.float32)


def _ctx(x: np.ndarray, k: int, labels: pd.DataFrame | None = None, **store_kwargs) -> AnalysisContext:
    space = fit_space(np.asarray(x, dtype=np.float32), n_components=k, solver="exact", progress=False)
    return AnalysisContext(store=_Store(x, **store_kwargs), space=space, labels=labels, progress=False)


def _labels(n: int, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index([str(i) for i in range(n)], name="id"))


# ------------------------------------------------------------------------------------------------ manifold


def _two_clusters(n: int = 200, d: int = 30, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Two tight clusters 10 apart along one axis, a continuous gradient along another, plus coin flips."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(n) % 2
    gradient = rng.uniform(-3, 3, n)
    x = 0.3 * rng.standard_normal((n, d))
    x[:, 0] += 10 * cluster
    x[:, 1] += gradient
    labels = _labels(
        n,
        cluster=cluster,
        coin=rng.integers(0, 2, n),
        gradient=gradient,
        noise=rng.standard_normal(n),
        colour=rng.choice(["red", "green", "blue"], n),
    )
    return x, labels


def test_knn_agreement_finds_clusters_and_random_labels_sit_at_the_shuffled_baseline():
    x, labels = _two_clusters()
    ctx = _ctx(x, 10, labels)
    m = Manifold(methods=("pca",)).fit(ctx)
    rec = {(r["attribute"], r["space"]): r for r in m.agreement_}
    for space in ("PC space (10 PCs)", "pca map"):
        assert rec[("cluster", space)]["agreement"] > 0.99
        assert rec[("cluster", space)]["shuffled"] == pytest.approx(0.5, abs=0.05)
        assert rec[("gradient", space)]["agreement"] > 0.8  # Spearman of value vs neighbours' mean
        # Negative controls: labels unrelated to the geometry agree no better than shuffled ones.
        assert rec[("coin", space)]["agreement"] == pytest.approx(rec[("coin", space)]["shuffled"], abs=0.06)
        assert abs(rec[("noise", space)]["agreement"]) < 0.2
        assert rec[("colour", space)]["agreement"] == pytest.approx(1 / 3, abs=0.06)
        assert rec[("colour", space)]["kind"] == "categorical"


def test_trustworthiness_is_high_for_a_planted_sheet_and_lower_for_an_isotropic_cloud():
    rng = np.random.default_rng(1)
    sheet = np.zeros((300, 20))
    sheet[:, :2] = rng.uniform(-1, 1, (300, 2)) * [3, 2]
    sheet += 0.01 * rng.standard_normal(sheet.shape)
    cloud = rng.standard_normal((300, 20))
    t_sheet = Manifold(methods=("pca",)).fit(_ctx(sheet, 10)).trustworthiness_["pca"]
    t_cloud = Manifold(methods=("pca",)).fit(_ctx(cloud, 10)).trustworthiness_["pca"]
    assert t_sheet > 0.99
    assert t_cloud < 0.85


def test_neighbours_exclude_self_even_with_exact_duplicates():
    pts = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 6.0]])
    nb = neighbour_indices(pts, 2)
    assert all(i not in nb[i] for i in range(len(pts)))
    # The three copies agree fully; each far point has one same-label neighbour of two.
    assert knn_agreement(np.array([0, 0, 0, 1, 1]), nb, "binary") == pytest.approx(0.8)


def test_manifold_result_tables_figures_artifact_and_unlabelled_colouring():
    x, _ = _two_clusters(n=120)
    ctx = _ctx(x, 8)
    res = Manifold(methods=("pca",)).fit(ctx).result()
    coords = next(t for t in res.tables if t.name == "coordinates")
    assert coords.columns == ("id", "pca_x", "pca_y")
    assert len(coords.rows) == 120
    assert [f.name for f in res.figures] == ["pca_map"]
    assert res.figures[0].png.startswith(b"\x89PNG")
    assert any("ΔW norm" in n for n in res.notes)
    assert set(ctx.artifacts["manifold"]["coords"]) == {"pca"}
    np.testing.assert_allclose(ctx.artifacts["manifold"]["coords"]["pca"], ctx.space.coefficients[:, :2], rtol=1e-6)
    json.dumps(res.to_json())


def test_many_attributes_split_into_figures_of_limited_size(monkeypatch):
    import wsa.analyses.manifold as manifold

    monkeypatch.setattr(manifold, "PANELS_PER_FIGURE", 2)  # 12 in use; 2 keeps the test fast
    x, labels = _two_clusters(n=60)
    res = Manifold(methods=("pca",)).fit(_ctx(x, 5, labels[["cluster", "gradient", "colour"]])).result()
    assert [f.name for f in res.figures] == ["pca_map_1", "pca_map_2"]


def test_subsampling_above_max_points_is_deterministic_and_noted():
    x, labels = _two_clusters(n=200)
    a = Manifold(methods=("pca",), max_points=50).fit(_ctx(x, 5, labels))
    b = Manifold(methods=("pca",), max_points=50).fit(_ctx(x, 5, labels))
    assert len(a.ids_) == 50
    assert a.ids_ == b.ids_
    assert any("max_points=50" in n for n in a.result().notes)


def test_missing_umap_names_the_package(monkeypatch):
    x, _ = _two_clusters(n=40)
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    with pytest.raises(ConfigError, match="umap-learn"):
        Manifold(methods=("umap",)).fit(_ctx(x, 5))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:n_jobs value 1 overridden")
def test_umap_and_tsne_maps_keep_clusters_and_are_reproducible():
    x, labels = _two_clusters(n=300)
    a = Manifold(methods=("umap", "tsne")).fit(_ctx(x, 10, labels))
    b = Manifold(methods=("umap", "tsne")).fit(_ctx(x, 10, labels))
    for method in ("umap", "tsne"):
        rec = {r["attribute"]: r for r in a.agreement_ if r["space"] == f"{method} map"}
        assert rec["cluster"]["agreement"] > 0.99
        assert rec["coin"]["agreement"] == pytest.approx(rec["coin"]["shuffled"], abs=0.06)
        assert a.trustworthiness_[method] > 0.8
        np.testing.assert_allclose(a.coords_[method], b.coords_[method])
    res = a.result()
    assert [f.name for f in res.figures] == ["umap_map", "tsne_map"]
    assert next(t for t in res.tables if t.name == "coordinates").columns == (
        "id",
        "umap_x",
        "umap_y",
        "tsne_x",
        "tsne_y",
    )


# -------------------------------------------------------------------------------------------------- layers

# (module, in, out), listed in the layout out of UNet order so that the down → mid → up sort is tested.
MODULES = [
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 6, 12),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 6, 8),
]
PLANTED = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"


def _layout():
    return build_layout(
        "raw", [(m, "lora", (o, i), 1, 1.0, [("down", (1, i)), ("up", (o, 1))], None) for m, i, o in MODULES]
    )


def _planted_layers(n: int = 240, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Three unit-variance factors written into the planted module only; the rest is a constant plus 1e-2 noise."""
    rng = np.random.default_rng(seed)
    layout = _layout()
    x = 0.5 + 0.01 * rng.standard_normal((n, layout.n_features))
    cols = layout.module(PLANTED).columns
    z = rng.standard_normal((n, 3))
    basis = np.linalg.qr(rng.standard_normal((cols.stop - cols.start, 3)))[0].T
    x[:, cols] += z @ basis
    labels = _labels(n, planted=(z[:, 0] > 0).astype(int), coin=rng.integers(0, 2, n), score=z[:, 1])
    return x, labels


def test_layers_finds_the_module_that_carries_variation_and_signal():
    x, labels = _planted_layers()
    m = Layers().fit(_ctx(x, 10, labels, layout=_layout()))
    mods = m.modules_.set_index("module")
    assert mods.loc[PLANTED, "variance_share"] >= 0.9
    assert mods["variance_share"].sum() == pytest.approx(1.0)
    assert 2.8 < mods.loc[PLANTED, "effective_rank"] < 3.6  # three planted factors
    assert mods.drop(PLANTED)["effective_rank"].min() > 8  # isotropic noise spreads over many directions
    assert mods["signal:planted"].idxmax() == PLANTED
    assert mods.loc[PLANTED, "signal:planted"] > 0.95
    assert mods.drop(PLANTED)["signal:planted"].max() < 0.7
    assert mods["signal:score"].idxmax() == PLANTED
    assert mods.loc[PLANTED, "signal:score"] > 0.9
    # Negative control: a coin-flip label has no signal anywhere.
    assert mods["signal:coin"].max() < 0.7
    assert m.metrics_ == {"planted": "auc", "coin": "auc", "score": "r2"}


def test_layers_orders_and_aggregates_blocks_and_types():
    x, labels = _planted_layers()
    m = Layers().fit(_ctx(x, 10, labels, layout=_layout()))
    assert list(m.modules_["block"]) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1"]
    blocks = m.blocks_.set_index("block")
    assert blocks.loc["mid_block", "variance_share"] >= 0.9
    assert blocks.loc["mid_block", "n_features"] == 18
    types = m.types_.set_index("type")
    assert set(types.index) == {"attn1.to_q", "attn2.to_v"}
    assert types.loc["attn2.to_v", "variance_share"] >= 0.9
    # A block's mean row norm is the mean over models of the norm of all its modules' columns.
    cols = _layout().module(PLANTED).columns
    assert blocks.loc["mid_block", "mean_norm"] == pytest.approx(np.linalg.norm(x[:, cols], axis=1).mean(), rel=1e-5)
    res = m.result()
    assert {f.name for f in res.figures} == {"variance_share", "attribute_signal"}
    assert {t.name for t in res.tables} == {"modules", "blocks", "types"}
    assert res.data["best_module"]["planted"]["module"] == PLANTED
    json.dumps(res.to_json())


def test_layers_subset_and_no_labels():
    x, _ = _planted_layers()
    m = Layers(max_rows=60, block_rows=50).fit(_ctx(x, 10, None, layout=_layout()))
    assert m.n_subset_ == 60
    assert not [c for c in m.modules_.columns if c.startswith("signal:")]
    assert m.modules_.set_index("module").loc[PLANTED, "variance_share"] >= 0.9
    assert [f.name for f in m.result().figures] == ["variance_share"]


def test_layer_naming_rules():
    assert block_of("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k") == "down_blocks.2"
    assert block_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_v") == "mid_block"
    assert block_of("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj") == "text_encoder_2"
    assert block_of("single_transformer_blocks.7.attn.to_q") == "single_transformer_blocks.7"
    assert module_type("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == "attn1.to_out.0"
    assert effective_rank(np.array([1.0, 1.0, 1.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(np.array([1.0, 0.0])) == pytest.approx(1.0)


def test_layers_on_a_real_store(tmp_path):
    """The same analyzer on a store written by ingest: names, offsets and blocks come from a real layout."""
    from wsa import ingest
    from wsa.synthetic import synth_collection

    mods = [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
        ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 6, 8),
    ]
    attrs = synth_collection(tmp_path / "lora", 24, modules=mods, n_factors=2, progress=False)
    store = ingest(tmp_path / "lora", tmp_path / "store", progress=False)
    space = fit_space(store, n_components=5, solver="exact", progress=False)
    labels = attrs.set_index("id").reindex(list(space.ids))
    ctx = AnalysisContext(store=store, space=space, labels=labels, progress=False)
    m = Layers().fit(ctx)
    assert list(m.blocks_["block"]) == ["down_blocks.0", "up_blocks.1"]
    assert m.modules_["variance_share"].sum() == pytest.approx(1.0)
    assert (m.modules_["mean_norm"] > 0).all()


# ------------------------------------------------------------------------------------------------ outliers

N_OUT, D_OUT = 300, 60


def _gaussian(seed: int = 0) -> np.ndarray:
    """Five latent factors in 60 dimensions plus isotropic noise: clean data with no outlier."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((D_OUT, 5)))[0].T
    z = rng.standard_normal((N_OUT, 5)) * np.linspace(3, 1, 5)
    return z @ basis + 0.1 * rng.standard_normal((N_OUT, D_OUT)), basis


def test_clean_gaussian_data_raises_no_alarm():
    x, _ = _gaussian()
    m = Outliers().fit(_ctx(x, 20))
    assert m.flags_ == []
    assert m.duplicates_ == []
    assert m.residual_z_ is not None
    assert m.delta_z_ is not None


def test_planted_outliers_and_duplicate_are_found_exactly():
    x, basis = _gaussian()
    x[10] = 12 * basis[4]  # 12 σ out along a direction the space holds
    off = np.linalg.qr(np.column_stack([basis.T, np.ones(D_OUT)]))[0][:, -1]
    x[20] += 1.5 * off  # a direction none of the others use
    x[41] = x[40] + 1e-4 * np.random.default_rng(5).standard_normal(D_OUT)  # a re-saved copy
    store = _Store(x)
    store.rows[30]["delta_norm"] *= 20  # an adapter whose ΔW is twenty times the usual size
    ctx = _ctx(x, 20)
    ctx.store = store
    m = Outliers().fit(ctx)
    reasons = {(f["id"], f["reason"].split(" (")[0]) for f in m.flags_}
    assert {rid for rid, _ in reasons} == {"10", "20", "30"}
    assert ("10", "far from the others") in reasons
    assert ("30", "unusually large ΔW norm") in reasons
    assert [(d["id_a"], d["id_b"]) for d in m.duplicates_] == [("40", "41")]
    assert m.duplicates_[0]["cosine"] > 0.999
    assert not m.duplicates_[0]["same_file"]
    assert ctx.artifacts["outliers"]["ids"] == ["10", "20", "30"]
    res = m.result()
    table = next(t for t in res.tables if t.name == "outliers")
    assert table.columns == ("id", "source", "reason", "score", "threshold")
    assert {r[1] for r in table.rows} <= {f"/adapters/{i}/adapter_model.safetensors" for i in ("10", "20", "30")}
    assert res.figures[0].png.startswith(b"\x89PNG")
    json.dumps(res.to_json())


def test_same_file_hash_is_reported_even_when_rows_differ():
    x, _ = _gaussian()
    store = _Store(x)
    store.rows[7]["sha256"] = store.rows[3]["sha256"]
    ctx = _ctx(x, 20)
    ctx.store = store
    dups = Outliers().fit(ctx).duplicates_
    assert len(dups) == 1
    assert (dups[0]["id_a"], dups[0]["id_b"], dups[0]["same_file"]) == ("3", "7", True)
    assert dups[0]["cosine"] < 0.5


def test_streamed_residual_matches_the_direct_computation():
    x, _ = _gaussian()
    ctx = _ctx(x, 20)
    m = Outliers(block_rows=37).fit(ctx)
    xc = x - ctx.space.mean
    direct = np.linalg.norm(xc - xc @ ctx.space.components.T @ ctx.space.components, axis=1)
    np.testing.assert_allclose(m.residual_, direct, rtol=1e-3)


def test_residual_test_is_skipped_when_the_space_holds_everything():
    x, _ = _gaussian()
    m = Outliers().fit(_ctx(x[:50, :30], 30))
    assert m.residual_z_ is None
    assert any("Residual test skipped" in n for n in m.result().notes)


def test_robust_z_ignores_the_outlier_it_scores():
    v = np.r_[np.random.default_rng(0).standard_normal(99), 50.0]
    z = robust_z(v)
    assert z[-1] > 30
    assert robust_z(np.ones(5)) is None


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ["manifold", "layers", "outliers"])
def test_registered_and_not_fitted(name):
    cls = get_analyzer(name)
    assert cls.name == name
    with pytest.raises(NotFittedError):
        cls().result()


@pytest.mark.parametrize(
    ("cls", "bad"),
    [
        (Manifold, {"methods": ("pca", "mds")}),
        (Manifold, {"methods": "pca"}),
        (Manifold, {"n_components": 1}),
        (Layers, {"max_rows": 0}),
        (Outliers, {"alpha": 1.5}),
        (Outliers, {"cosine_threshold": 1.0}),
    ],
)
def test_bad_parameters_fail_with_the_parameter_named(cls, bad):
    x, _ = _two_clusters(n=40)
    with pytest.raises(ConfigError, match=repr(next(iter(bad)))):
        cls(**bad).fit(_ctx(x, 5))
