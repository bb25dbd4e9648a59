"""One space protocol: the explicit space and the ΔW space answer every question the same way on the same ΔW.

Why this test: the analyzers have one code path each, written against :class:`wsa.space.FittedSpace`; that is
only sound if the two implementations mean the same thing by every answer. The ΔW geometry can be computed two
ways — explicit PCA of dense ΔW rows (a ``--repr delta`` store) and the dual form from the factors
(``fit_delta_gram`` on the raw store) — so on one small collection every protocol method, and every refactored
analyzer's key numbers, must agree between the two within float tolerance. A gauge twin (``B·2``, ``A/2``: other
factors, the same ΔW) is in the collection, so the factor route must see it as the duplicate it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import wsa
from wsa.analyses.base import AnalysisContext
from wsa.analyses.interpolation import Interpolation
from wsa.analyses.layers import Layers
from wsa.analyses.outliers import Outliers
from wsa.analyses.pca import PCA, has_variance
from wsa.analyses.probes import Probes
from wsa.delta_space import DeltaSpace
from wsa.errors import ConfigError
from wsa.gram import fit_delta_gram
from wsa.space import FittedSpace, Space, WeightDirections, fit_space
from wsa.synthetic import synth_collection

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 12, 10),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 7, 10),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 9, 14),
]
N, K = 29, 8


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory):
    """(explicit Space on dense ΔW rows, its store, DeltaSpace from the raw factors, its store, labels)."""
    from safetensors.torch import load_file, save_file

    root: Path = tmp_path_factory.mktemp("protocol")
    attrs = synth_collection(root / "loras", N, rank=1, modules=MODULES, n_factors=4, a_jitter=0.3, progress=False)
    original = sorted(p for p in (root / "loras").iterdir() if p.is_dir())[3]
    twin = root / "loras" / f"{original.name}_twin"
    shutil.copytree(original, twin)
    weights = twin / "unet" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * (2.0 if "lora_B" in k else 0.5) for k, v in tensors.items()}, str(weights))
    raw = wsa.ingest([root / "loras"], root / "raw", progress=False)
    dense = wsa.ingest([root / "loras"], root / "delta", repr="delta", progress=False)
    explicit = fit_space(dense, K, solver="exact", progress=False)
    dual = fit_delta_gram(raw, K, progress=False)
    assert explicit.ids == dual.ids
    labels = attrs.set_index("id").reindex(list(explicit.ids))
    return explicit, dense, dual, raw, labels, (original.name, twin.name)


def _signs(explicit: Space, dual: DeltaSpace) -> np.ndarray:
    """Per component, +1 or −1: the two fits may sign a component differently (nothing else may differ)."""
    return np.sign(np.sum(explicit.coefficients * dual.coefficients, axis=0))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(b))), 1e-300))


def test_both_spaces_satisfy_the_protocol(twins) -> None:
    explicit, _, dual, _, _, _ = twins
    assert isinstance(explicit, FittedSpace) and isinstance(dual, FittedSpace)
    assert (explicit.geometry, dual.geometry) == ("explicit", "delta")
    assert not isinstance(object(), FittedSpace)  # the check is not vacuous


def test_spectrum_and_coefficients_agree(twins) -> None:
    explicit, _, dual, _, _, _ = twins
    assert (explicit.n_samples, explicit.n_components) == (dual.n_samples, dual.n_components) == (N + 1, K)
    np.testing.assert_allclose(dual.explained_variance, explicit.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(dual.singular_values, explicit.singular_values, rtol=1e-4)
    np.testing.assert_allclose(dual.explained_variance_ratio, explicit.explained_variance_ratio, rtol=1e-4)
    assert dual.total_variance == pytest.approx(explicit.total_variance, rel=1e-5)
    assert dual.n_components_for(0.5) == explicit.n_components_for(0.5)
    signs = _signs(explicit, dual)
    assert _rel(dual.coefficients * signs, explicit.coefficients) < 1e-3
    assert dual.mean_sq_norm() == pytest.approx(explicit.mean_sq_norm(), rel=1e-5)
    assert has_variance(explicit) and has_variance(dual)


def test_member_norms_inner_products_and_residuals_agree(twins) -> None:
    explicit, dense, dual, raw, _, _ = twins
    np.testing.assert_allclose(dual.member_sq_norms(raw), explicit.member_sq_norms(dense), rtol=1e-4)
    rng = np.random.default_rng(0)
    a = np.r_[rng.integers(0, N + 1, 40), 0, 5]
    b = np.r_[rng.integers(0, N + 1, 40), 0, 7]
    inner_e, inner_d = explicit.member_inner(dense, a, b), dual.member_inner(raw, a, b)
    scale = float(explicit.member_sq_norms(dense).max())
    assert np.max(np.abs(inner_d - inner_e)) < 1e-4 * scale
    # Against the definition, on the dense ΔW rows: ⟨x_a − mean, x_b − mean⟩.
    rows = {rid: i for i, rid in enumerate(dense.ids)}
    x = dense.matrix[[rows[i] for i in explicit.ids]].astype(np.float64)
    xc = x - x.mean(axis=0)
    assert np.max(np.abs(inner_e - np.einsum("ij,ij->i", xc[a], xc[b]))) < 1e-5 * scale
    resid_e, resid_d = explicit.member_residual_inner(dense, a, b), dual.member_residual_inner(raw, a, b)
    assert np.max(np.abs(resid_d - resid_e)) < 1e-4 * scale
    sq_e, sq_d = explicit.member_residual_sq(dense), dual.member_residual_sq(raw)
    assert np.max(np.abs(sq_d - sq_e)) < 1e-4 * scale
    assert sq_e.min() >= 0 and sq_e.max() > 1e-3 * scale  # eight of 29 directions: something is left over
    np.testing.assert_allclose(explicit.member_residual_inner(dense, np.arange(N + 1), np.arange(N + 1)), sq_e)
    with pytest.raises(ConfigError, match="positions"):
        dual.member_inner(raw, [0, N + 1], [0, 1])


def test_heldout_test_agrees(twins) -> None:
    explicit, dense, dual, raw, _, _ = twins
    ks = [1, 2, 4, 8]
    e = explicit.heldout(dense, ks, test_fraction=0.2, random_state=3, progress=False)
    d = dual.heldout(raw, ks, test_fraction=0.2, random_state=3, progress=False)
    assert e["k"] == d["k"] == ks and e["heldout_ids"] == d["heldout_ids"] and e["n_train"] == d["n_train"]
    np.testing.assert_allclose(d["heldout_error"], e["heldout_error"], atol=1e-4)
    np.testing.assert_allclose(d["train_error"], e["train_error"], atol=1e-4)


def test_per_module_questions_agree(twins) -> None:
    explicit, dense, dual, raw, _, _ = twins
    mods_e, mods_d = list(dense.layout.modules), list(raw.layout.modules)
    assert [m.name for m in mods_e] == [m.name for m in mods_d]
    var_e, sq_e = explicit.module_stats(dense, mods_e, block_rows=7)
    var_d, sq_d = dual.module_stats(raw, mods_d, block_rows=7)
    np.testing.assert_allclose(var_d, var_e, rtol=1e-4)
    np.testing.assert_allclose(sq_d, sq_e, rtol=1e-4)
    np.testing.assert_allclose(var_e.sum(), explicit.total_variance, rtol=1e-5)  # modules split the total
    members = [0, 3, 4, 9, 20]
    for g_e, g_d in zip(
        explicit.module_grams(dense, mods_e, members), dual.module_grams(raw, mods_d, members), strict=True
    ):
        assert g_e.shape == g_d.shape == (5, 5)
        assert _rel(g_d, g_e) < 1e-4
    for (ev_e, sc_e), (ev_d, sc_d) in zip(
        explicit.module_spectra(dense, mods_e, k=3), dual.module_spectra(raw, mods_d, k=3), strict=True
    ):
        np.testing.assert_allclose(ev_d[:6], ev_e[:6], rtol=1e-4)
        assert sc_e.shape == sc_d.shape == (N + 1, 3)
        assert _rel(np.abs(sc_d), np.abs(sc_e)) < 1e-3  # PC scores up to sign


def test_feature_and_gram_routes_give_one_spectrum() -> None:
    """A module narrower than the members is decomposed as its covariance: same eigenvalues and scores."""
    from wsa.space.protocol import feature_spectrum, gram_spectrum

    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1]) + 7.0  # an offset centring removes
    ev_f, sc_f = feature_spectrum(x, 4)
    ev_g, sc_g = gram_spectrum(x @ x.T, 4)
    assert ev_f.shape == (6,) and ev_g.shape == (40,)
    np.testing.assert_allclose(ev_f, ev_g[:6], rtol=1e-8)
    np.testing.assert_allclose(ev_g[6:], 0.0, atol=1e-8 * ev_g[0])
    np.testing.assert_allclose(np.abs(sc_f), np.abs(sc_g), atol=1e-8 * np.abs(sc_g).max())
    # Directions without variance are not scores: a rank-2 block gives two columns, not four.
    assert gram_spectrum((x[:, :2] - x[:, :2].mean(0)) @ (x[:, :2] - x[:, :2].mean(0)).T, 4)[1].shape == (40, 2)


def test_directions_in_weights_are_the_same_direction_of_delta_w(twins) -> None:
    """Explicit: vectors over the ΔW columns; ΔW space: weights over the members. Σ_i w_i ΔW_i is the same vector."""
    explicit, dense, dual, _, _, _ = twins
    d = np.eye(K)[:3]
    d[2] = (d[0] + d[1]) / np.sqrt(2)
    # The same three unit directions in both fits (the explicit components may be signed the other way).
    we, wd = explicit.directions_in_weights(d * _signs(explicit, dual)), dual.directions_in_weights(d)
    assert isinstance(we, WeightDirections) and (we.basis, wd.basis) == ("features", "members")
    assert we.standardized.shape == (3, dense.n_features) and wd.standardized.shape == (3, N + 1)
    rows = {rid: i for i, rid in enumerate(dense.ids)}
    x = dense.matrix[[rows[i] for i in explicit.ids]].astype(np.float64)
    assert _rel(wd.standardized.astype(np.float64) @ x, we.standardized) < 1e-3
    np.testing.assert_allclose(wd.raw_norms, we.raw_norms, rtol=1e-4)
    np.testing.assert_allclose(we.raw_norms, 1.0, rtol=1e-5)


def _contexts(twins, **kwargs) -> tuple[AnalysisContext, AnalysisContext]:
    explicit, dense, dual, raw, labels, _ = twins
    return (
        AnalysisContext(store=dense, space=explicit, labels=labels, progress=False, **kwargs),
        AnalysisContext(store=raw, space=dual, labels=labels, progress=False, **kwargs),
    )


def test_pca_and_outliers_give_the_same_numbers(twins) -> None:
    ce, cd = _contexts(twins)
    pe, pd_ = PCA(heldout_ks=[1, 2, 4]).fit(ce), PCA(heldout_ks=[1, 2, 4]).fit(cd)
    np.testing.assert_allclose(pd_.ratio_, pe.ratio_, rtol=1e-4)
    np.testing.assert_allclose(pd_.residual_, pe.residual_, atol=1e-4)
    np.testing.assert_allclose(pd_.heldout_["heldout_error"], pe.heldout_["heldout_error"], atol=1e-4)
    oe, od = Outliers().fit(ce), Outliers().fit(cd)
    np.testing.assert_allclose(od.residual_, oe.residual_, rtol=1e-3, atol=1e-4 * oe.residual_.max())
    np.testing.assert_allclose(od.mahalanobis_, oe.mahalanobis_, rtol=1e-3)
    pair = twins[5]
    for found in (oe.duplicates_, od.duplicates_):  # the gauge twin is a duplicate in ΔW, on either route
        assert [(r["id_a"], r["id_b"]) for r in found] == [pair]
        assert found[0]["cosine"] > 0.99999
    assert {f["id"] for f in oe.flags_} == {f["id"] for f in od.flags_}


def test_interpolation_layers_and_probes_give_the_same_numbers(twins) -> None:
    ids = twins[0].ids
    pairs = [(ids[0], ids[1]), (ids[2], ids[9])]
    ce, cd = _contexts(twins)
    ie, id_ = Interpolation(pairs=pairs, steps=5).fit(ce), Interpolation(pairs=pairs, steps=5).fit(cd)
    np.testing.assert_allclose(id_.residual_norms_, ie.residual_norms_, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(id_.residual_fractions_, ie.residual_fractions_, atol=1e-4)
    assert not ie.warnings_ and not id_.warnings_  # the stores hold the rows the spaces were fitted on
    le, ld = Layers(probe_components=4).fit(ce), Layers(probe_components=4).fit(cd)
    assert list(le.modules_["module"]) == list(ld.modules_["module"])
    for key in ("variance", "variance_share", "mean_norm", "effective_rank"):
        np.testing.assert_allclose(ld.modules_[key], le.modules_[key], rtol=1e-4, err_msg=key)
    for col in (c for c in le.modules_.columns if c.startswith("signal:")):
        np.testing.assert_allclose(ld.modules_[col], le.modules_[col], atol=1e-3, err_msg=col)
    params = {"attributes": ["attr_0", "score_2"], "n_shuffles": 2, "n_bootstrap": 0, "debias": "none"}
    qe, qd = Probes(**params).fit(ce), Probes(**params).fit(cd)
    for attr in params["attributes"]:
        assert qd.fits_[attr].score == pytest.approx(qe.fits_[attr].score, abs=1e-3)
    np.testing.assert_allclose(qd.score_std_, qe.score_std_, rtol=1e-3)
    rows = {rid: i for i, rid in enumerate(twins[1].ids)}
    x = twins[1].matrix[[rows[i] for i in ids]].astype(np.float64)
    np.testing.assert_allclose(  # the same ΔW direction per probe, written in each space's basis
        qd.weight_directions_.standardized.astype(np.float64) @ x,
        qe.weight_directions_.standardized,
        atol=1e-3 * float(np.abs(qe.weight_directions_.standardized).max()),
    )


def test_directions_are_written_for_both_geometries(twins, tmp_path: Path) -> None:
    from wsa.directions import Directions

    ce, cd = _contexts(twins)
    params = {"attributes": ["attr_0"], "n_shuffles": 0, "n_bootstrap": 0}
    for ctx, out, basis, width in (
        (ce, tmp_path / "e", "features", twins[1].n_features),
        (cd, tmp_path / "d", "members", N + 1),
    ):
        Probes(**params).fit(ctx).write_artifacts(out)
        loaded = Directions.load(out / "space")
        assert loaded.meta["weight_basis"] == basis and loaded.meta["n_features"] == width
        assert loaded.pc["attr_0"].shape == (K,)
