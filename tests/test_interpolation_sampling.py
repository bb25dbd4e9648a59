"""Interpolation and sampling: plant-and-recover tests with positive and negative controls.

Why planted data: attributes that are exactly linear in the latent factors (hence in PC space) must
change monotonically and on a straight line along interpolation paths; a Gaussian sampler fitted to
Gaussian data must produce samples as novel as training models are to each other, with the same
attribute mix. Degenerate samplers (temperature 0, copies of training models) and a wiggly probe
are the negative controls that show each measure can fail. Probes are a stub built here with
scikit-learn, so these tests do not depend on the probes analyzer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from wsa.analyses import get_analyzer
from wsa.analyses.base import AnalysisContext, NotFittedError
from wsa.analyses.interpolation import Interpolation
from wsa.analyses.sampling import Sampling
from wsa.errors import ConfigError
from wsa.labels import describe_attributes
from wsa.sampling import (
    fit_gaussian,
    interpolate_pc,
    interpolate_weights,
    novelty,
    novelty_summary,
    probe_scores,
    train_nn_distances,
)
from wsa.space import fit_space

N, D, N_LATENT, K, PROBE_K = 300, 48, 6, 12, 8


@dataclass
class _Store:
    """What a space reads from a store for interpolation: the ids and blocks of rows."""

    matrix: np.ndarray
    ids: tuple[str, ...]

    def iter_blocks(self, block_rows: int = 1024, rows=None):
        rows = np.arange(len(self.ids)) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), block_rows):
            yield start, np.asarray(self.matrix[rows[start : start + block_rows]], dtype=np.float32)


def _planted(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Rows = latent factors (decreasing scale) times an orthonormal basis, plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, N_LATENT))
    basis = np.linalg.qr(rng.standard_normal((D, N_LATENT)))[0].T
    scales = np.linspace(3.0, 1.5, N_LATENT)
    x = (z * scales) @ basis + 0.05 * rng.standard_normal((N, D))
    ids = [str(i) for i in range(N)]
    labels = pd.DataFrame(
        {"attr_0": z[:, 0] > 0, "attr_1": z[:, 1] > 0, "score_2": z[:, 2]}, index=pd.Index(ids, name="id")
    )
    return x.astype(np.float32), labels


def _probes(space, labels: pd.DataFrame, k: int = PROBE_K) -> dict:
    """A stub of the probes analyzer's artifact: logistic probes for binary labels, ridge for continuous."""
    zk = np.asarray(space.coefficients, dtype=np.float64)[:, :k]
    models = {
        "attr_0": LogisticRegression(C=10.0, max_iter=2000).fit(zk, labels["attr_0"].to_numpy()),
        "attr_1": LogisticRegression(C=10.0, max_iter=2000).fit(zk, labels["attr_1"].to_numpy()),
        "score_2": Ridge(alpha=1e-3).fit(zk, labels["score_2"].to_numpy()),
    }
    kinds = {"attr_0": "binary", "attr_1": "binary", "score_2": "continuous"}
    return {"k": k, "kinds": kinds, "models": models}


@pytest.fixture(scope="module")
def planted():
    x, labels = _planted()
    space = fit_space(x, n_components=K, solver="exact", progress=False)
    return x, labels, space


def _ctx(planted, *, with_labels: bool = True, probes: dict | None = None, random_state: int = 0) -> AnalysisContext:
    x, labels, space = planted
    ctx = AnalysisContext(
        store=_Store(x, tuple(space.ids)),
        space=space,
        labels=labels if with_labels else None,
        random_state=random_state,
        progress=False,
    )
    if probes is not None:
        ctx.artifacts["probes"] = probes
    return ctx


# ------------------------------------------------------------------------------------- wsa.sampling maths


def test_fit_gaussian_recovers_moments_and_temperature_scales_spread():
    """Diagonal samples match the data's mean/std; temperature scales the std; 0 gives the mean."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -2.0]
    model = fit_gaussian(z, "diagonal")
    s = model.sample(20000, random_state=0)
    np.testing.assert_allclose(s.mean(axis=0), [0.0, 1.0, -2.0], atol=0.06)
    np.testing.assert_allclose(s.std(axis=0), [1.0, 2.0, 0.5], rtol=0.05)
    np.testing.assert_allclose(
        model.sample(5000, temperature=0.5, random_state=0).std(axis=0), [0.5, 1.0, 0.25], rtol=0.06
    )
    np.testing.assert_array_equal(model.sample(4, temperature=0.0, random_state=0), np.tile(model.mean, (4, 1)))


def test_full_gaussian_keeps_correlation_that_diagonal_drops():
    """On correlated coefficients, 'full' samples keep the correlation and 'diagonal' samples lose it."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal(3000)
    z = np.stack([a, 0.9 * a + 0.1 * rng.standard_normal(3000)], axis=1)
    full = fit_gaussian(z, "full").sample(20000, random_state=0)
    diag = fit_gaussian(z, "diagonal").sample(20000, random_state=0)
    assert np.corrcoef(full.T)[0, 1] == pytest.approx(np.corrcoef(z.T)[0, 1], abs=0.01)
    assert abs(np.corrcoef(diag.T)[0, 1]) < 0.03
    lw = fit_gaussian(z, "full", shrinkage="ledoit_wolf")
    assert lw.shrinkage is not None
    assert 0.0 <= lw.shrinkage <= 1.0
    with pytest.raises(ValueError, match="shrinkage"):
        fit_gaussian(z, "diagonal", shrinkage=0.1)


def test_full_equals_diagonal_in_exact_pca_coordinates(planted):
    """In exact PCA coordinates of the fitted rows the covariance is diagonal: the two models coincide."""
    _, _, space = planted
    full = fit_gaussian(space.coefficients, "full")
    diag = fit_gaussian(space.coefficients, "diagonal")
    off = full.covariance - np.diag(np.diag(full.covariance))
    assert np.max(np.abs(off)) < 1e-4 * np.max(np.diag(full.covariance))
    np.testing.assert_allclose(full.std, diag.std, rtol=1e-4)


def test_nearest_neighbour_distances_match_brute_force():
    """Leave-one-out NN distances and novelty agree with an explicit distance matrix; copies score 0."""
    rng = np.random.default_rng(3)
    train = rng.standard_normal((60, 5))
    dist = np.linalg.norm(train[:, None] - train[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(train_nn_distances(train, batch=7), dist.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(train_nn_distances(train, rows=[3, 10]), dist.min(axis=1)[[3, 10]], rtol=1e-6)
    queries = rng.standard_normal((9, 5))
    expected = np.linalg.norm(queries[:, None] - train[None], axis=-1).min(axis=1)
    np.testing.assert_allclose(novelty(queries, train, batch=4), expected, rtol=1e-6)
    assert np.max(novelty(train[:10], train)) < 1e-6


def test_interpolation_paths_are_straight_lines():
    """Endpoints are exact, the midpoint is the average; weight paths stay float32 (rows are large)."""
    c0, c1 = np.array([0.0, 2.0]), np.array([4.0, -2.0])
    path = interpolate_pc(c0, c1, 5)
    np.testing.assert_array_equal(path[0], c0)
    np.testing.assert_array_equal(path[-1], c1)
    np.testing.assert_allclose(path[2], [2.0, 0.0])
    w = interpolate_weights(np.ones(7, np.float32), np.zeros(7, np.float32), 3)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[1], 0.5)
    with pytest.raises(ValueError, match="steps"):
        interpolate_pc(c0, c1, 1)


def test_copies_of_training_models_are_flagged_as_memorised(planted):
    """Negative control: copies of training models are all 'memorised'; fresh Gaussian draws are not."""
    _, _, space = planted
    z = np.asarray(space.coefficients, dtype=np.float64)
    ref = train_nn_distances(z)
    copies = novelty_summary(novelty(z[:100], z), ref)
    fresh = novelty_summary(novelty(fit_gaussian(z).sample(200, random_state=0), z), ref)
    assert copies["memorised_fraction"] == 1.0
    assert copies["novelty_ratio"] < 0.01
    assert fresh["memorised_fraction"] < 0.2
    assert 0.5 < fresh["novelty_ratio"] < 2.0


# ------------------------------------------------------------------------------------- Interpolation


def test_linear_attributes_change_monotonically_along_paths(planted):
    """Planted linear attributes: Spearman >= 0.99 and near-zero deviation on both PC and weight paths."""
    _, labels, space = planted
    ctx = _ctx(planted, probes=_probes(space, labels))
    res = Interpolation(n_pairs=5, steps=9).fit(ctx).result()
    table = pd.DataFrame(res.data["smoothness"])
    assert set(table["attribute"]) == {"attr_0", "attr_1", "score_2"}
    for path in ("pc", "weight"):
        assert (table[f"{path}_mean_monotonicity"] >= 0.99).all()
        assert (table[f"{path}_mean_max_deviation"] < 1e-3).all()
    # The weight path projects onto the PC path, so their scores agree.
    for attr in ("attr_0", "score_2"):
        np.testing.assert_allclose(res.data["scores"]["weight"][attr], res.data["scores"]["pc"][attr], atol=1e-3)
    art = ctx.artifacts["interpolation"]
    assert art["pc_paths"].shape == (5, 9, K)
    np.testing.assert_allclose(art["pc_paths"][:, 0], space.coefficients[[space.ids.index(a) for a, _ in art["pairs"]]])
    assert {f.name for f in res.figures} == {"scores_along_paths", "weight_path_residual"}
    json.dumps(res.to_json())


class _Wiggly:
    """A nonlinear 'probe' (sin of the first coefficient): scores oscillate along a straight path."""

    def predict(self, z: np.ndarray) -> np.ndarray:
        return np.sin(3.0 * z[:, 0])


def test_wiggly_probe_is_neither_monotone_nor_straight(planted):
    """Negative control: a probe that is not linear in PC space gives low monotonicity and large deviation."""
    _, labels, space = planted
    probes = _probes(space, labels)
    probes["models"]["wiggly"] = _Wiggly()
    probes["kinds"]["wiggly"] = "continuous"
    table = Interpolation(n_pairs=6, steps=15).fit(_ctx(planted, probes=probes)).table_.set_index("attribute")
    row, linear = table.loc["wiggly"], table.loc["attr_0"]
    assert row["pc_mean_monotonicity"] < 0.8
    assert row["pc_mean_max_deviation"] > 0.5
    assert linear["pc_mean_monotonicity"] > 0.99


def test_weight_path_residual_dips_at_midpoint_only_when_space_is_truncated(planted):
    """k < rank: weight paths leave the space (residual > 0 throughout, never above the endpoints'); full rank: ~0."""
    x, _, _ = planted
    res = Interpolation(n_pairs=4, steps=9).fit(_ctx(planted, with_labels=False)).result()
    r = np.asarray(res.data["residual_norms"])
    frac = np.asarray(res.data["residual_fractions"])
    assert (frac[:, 0] > 0.005).all()
    assert (r[:, 4] <= np.maximum(r[:, 0], r[:, -1]) + 1e-6).all()
    # Independent endpoint residuals average to about 1/sqrt(2) of their size midway, not to 0.
    assert (r[:, 4] > 0.3 * np.minimum(r[:, 0], r[:, -1])).all()
    full = fit_space(x, n_components=D, solver="exact", progress=False)
    ctx = AnalysisContext(store=_Store(x, tuple(full.ids)), space=full, progress=False)
    r_full = np.asarray(Interpolation(n_pairs=4, steps=9).fit(ctx).result().data["residual_fractions"])
    assert r_full.max() < 1e-4


def test_automatic_pairs_prefer_differing_binary_attributes(planted):
    """With labels every chosen pair differs in both binary attributes; the choice is deterministic."""
    _, labels, space = planted
    a = Interpolation(n_pairs=6).fit(_ctx(planted, probes=_probes(space, labels), random_state=5))
    b = Interpolation(n_pairs=6).fit(_ctx(planted, probes=_probes(space, labels), random_state=5))
    assert a.pairs_ == b.pairs_
    assert a.differing_ == [2] * 6
    # Negative control: without labels pairs are random, and only about a half differ in both attributes.
    c = Interpolation(n_pairs=40).fit(_ctx(planted, with_labels=False, random_state=5))
    both = [
        (labels.loc[i, ["attr_0", "attr_1"]].to_numpy() != labels.loc[j, ["attr_0", "attr_1"]].to_numpy()).all()
        for i, j in c.pairs_
    ]
    assert np.mean(both) < 0.5


def test_explicit_pairs_and_bad_ids(planted):
    """Given pairs are used as given; unknown ids fail with the id named."""
    ids = planted[2].ids
    fitted = Interpolation(pairs=[(ids[0], ids[1])], steps=5).fit(_ctx(planted, with_labels=False))
    assert fitted.pairs_ == [(ids[0], ids[1])]
    with pytest.raises(ConfigError, match="nope"):
        Interpolation(pairs=[(ids[0], "nope")]).fit(_ctx(planted))
    with pytest.raises(ConfigError, match="steps"):
        Interpolation(steps=2).fit(_ctx(planted))


# ------------------------------------------------------------------------------------- Sampling


def test_diagonal_samples_are_novel_and_keep_the_attribute_mix(planted):
    """Samples sit about as far from the data as data from itself, with the planted 50/50 attribute rates."""
    _, labels, space = planted
    ctx = _ctx(planted, probes=_probes(space, labels))
    res = Sampling(n_samples=400).fit(ctx).result()
    rows = {r["sampler"]: r for r in res.data["samplers"]}
    for kind in ("diagonal", "full"):
        assert 0.5 < rows[kind]["novelty_ratio"] < 2.0
        assert rows[kind]["memorised_fraction"] < 0.2
        assert 0.5 < rows[kind]["diversity_ratio"] < 2.0
    attrs = pd.DataFrame(res.data["attributes"])
    rates = attrs[attrs["type"] == "binary"]
    assert len(rates) == 2
    for col in ("labels", "probe_on_data", "samples_diagonal", "samples_full"):
        np.testing.assert_allclose(rates[col].to_numpy(dtype=float), 0.5, atol=0.1)
    mean_row = attrs[(attrs["attribute"] == "score_2") & (attrs["statistic"] == "mean")].iloc[0]
    assert abs(mean_row["samples_diagonal"] - mean_row["labels"]) < 0.2
    art = ctx.artifacts["sampling"]
    assert art["samples"]["diagonal"].shape == (400, K)
    assert not res.warnings
    assert {f.name for f in res.figures} == {"novelty", "attribute_rates"}
    json.dumps(res.to_json())


def test_temperature_zero_collapses_and_is_flagged(planted):
    """Negative control: the mean every time has no diversity and the wrong attribute mix."""
    _, labels, space = planted
    fitted = Sampling(n_samples=100, temperature=0.0, kinds=("diagonal",)).fit(
        _ctx(planted, probes=_probes(space, labels))
    )
    assert fitted.summary_["diversity_ratio"].iloc[0] < 0.01
    assert any("collapsed" in w for w in fitted.warnings_)
    rates = fitted.attributes_[fitted.attributes_["type"] == "binary"]
    assert np.max(np.abs(rates["samples_diagonal"] - rates["probe_on_data"])) > 0.3


def test_fewer_components_than_probes_pad_with_the_mean(planted):
    """Samples over k=3 coefficients still get probe scores (the rest at the mean), with a note."""
    _, labels, space = planted
    fitted = Sampling(n_samples=50, n_components=3).fit(_ctx(planted, probes=_probes(space, labels)))
    assert fitted.k_ == 3
    assert fitted.models_["diagonal"].n_components == 3
    assert len(fitted.attributes_) == 4  # two binary rates, mean and std of the continuous score
    assert any("sit at the mean" in n for n in fitted.notes_)


@pytest.mark.parametrize("target", ["codes", "names"])
def test_label_rates_use_the_probes_encoding_of_string_labels(planted, target):
    """'yes'/'no' and category labels are matched to probe classes whether probes train on codes or names."""
    x, labels, space = planted
    text = pd.DataFrame(
        {
            "smile": np.where(labels["attr_0"], "yes", "no"),
            "hair": np.select([labels["score_2"] > 0.5, labels["score_2"] < -0.5], ["blond", "black"], "brown"),
        },
        index=labels.index,
    )
    infos = describe_attributes(text)
    zk = np.asarray(space.coefficients, dtype=np.float64)[:, :PROBE_K]
    y = {a: infos[a].encode(text[a]) for a in text}
    if target == "names":  # booleans for binary, category names for categorical (as the probes analyzer does)
        y = {"smile": y["smile"] == 1, "hair": text["hair"].to_numpy()}
    models = {a: LogisticRegression(C=10.0, max_iter=2000).fit(zk, y[a]) for a in text}
    probes = {"k": PROBE_K, "kinds": {"smile": "binary", "hair": "categorical"}, "models": models}
    ctx = AnalysisContext(store=_Store(x, tuple(space.ids)), space=space, labels=text, progress=False)
    ctx.artifacts["probes"] = probes
    frame = Sampling(n_samples=300, kinds=("diagonal",)).fit(ctx).attributes_.set_index("statistic")
    assert frame.loc["rate of yes", "labels"] == pytest.approx(np.mean(text["smile"] == "yes"))
    for cls in ("black", "blond", "brown"):
        assert frame.loc[f"rate of {cls}", "labels"] == pytest.approx(np.mean(text["hair"] == cls))
        assert abs(frame.loc[f"rate of {cls}", "samples_diagonal"] - frame.loc[f"rate of {cls}", "labels"]) < 0.12


def test_probe_scores_are_log_odds_for_binary(planted):
    """Binary scores are the logistic decision function, so sigmoid(score) is predict_proba."""
    _, labels, space = planted
    probes = _probes(space, labels)
    z = np.asarray(space.coefficients[:20], dtype=np.float64)
    scores = probe_scores(probes, z)
    p = probes["models"]["attr_0"].predict_proba(z[:, :PROBE_K])[:, 1]
    np.testing.assert_allclose(1 / (1 + np.exp(-scores["attr_0"])), p, rtol=1e-6)
    with pytest.raises(ValueError, match="coefficients"):
        probe_scores(probes, z[:, :3])


# ------------------------------------------------------------------------------------- both, no labels


@pytest.mark.parametrize("name", ["interpolation", "sampling"])
def test_analyzers_run_without_labels_or_probes(planted, name):
    """No labels, no probes artifact: the analyzer still runs, says what it skipped, and serialises."""
    cls = get_analyzer(name)
    params = {"n_samples": 30} if name == "sampling" else {"n_pairs": 2, "steps": 5}
    analyzer = cls(**params)
    with pytest.raises(NotFittedError):
        analyzer.result()
    res = analyzer.fit(_ctx(planted, with_labels=False)).result()
    assert any("No probes artifact" in n for n in res.notes)
    assert analyzer.get_params() == cls(**params).get_params()
    json.dumps(res.to_json())


@pytest.mark.parametrize(
    ("cls", "bad"),
    [(Sampling, {"kinds": ("gaussian",)}), (Sampling, {"temperature": -1.0}), (Interpolation, {"pairs": [("a",)]})],
)
def test_bad_parameters_fail_with_the_parameter_named(planted, cls, bad):
    """Invalid parameters fail in fit with the sklearn-style message naming the parameter."""
    with pytest.raises(ConfigError, match=next(iter(bad))):
        cls(**bad).fit(_ctx(planted))
