"""Probes plant-and-recover: attributes planted as linear functions of the factors behind the weights
must be read back (AUC, R²), beat shuffled labels, and give back the planted directions; a pure-noise
attribute must stay at chance; debiasing must remove exactly the projected-out directions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsa.analyses import get_analyzer
from wsa.analyses.base import AnalysisContext
from wsa.analyses.probes import Probes, _debias
from wsa.directions import Directions
from wsa.errors import ConfigError, StoreError
from wsa.space import fit_space

N, F, D, K = 400, 6, 60, 8
A1 = np.eye(F)[0]
A2 = 0.6 * np.eye(F)[0] + 0.8 * np.eye(F)[1]  # cos(A1, A2) = 0.6: entangled with bin_a
A3 = np.eye(F)[2]
COLOURS = np.array(["blue", "green", "red"])


@pytest.fixture(scope="module")
def planted():
    """X = Z W + noise with orthogonal W rows; labels are functions of Z; 40 ids have no bin_a label."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((N, F))
    w = np.linalg.qr(rng.standard_normal((D, F)))[0].T * 3.0  # (F, D), W Wᵀ = 9 I
    x = (z @ w + rng.standard_normal((N, D))).astype(np.float32)
    space = fit_space(x, K, progress=False)
    ids = list(space.ids)
    labels = pd.DataFrame(
        {
            "bin_a": np.where(z @ A1 > 0, "yes", "no").astype(object),
            "bin_b": np.where(z @ A2 > 0, 1.0, -1.0),  # w2w / CelebA ±1 labels
            "cont": z @ A3 + 0.1 * rng.standard_normal(N),
            "colour": COLOURS[np.argmax(z[:, 3:6], axis=1)].astype(object),
            "noise": rng.integers(0, 2, N).astype(float),  # negative control: unrelated to the weights
        },
        index=pd.Index(ids, name="id"),
    )
    labels.loc[ids[:40], "bin_a"] = np.nan
    # Planted weight-space directions: y = Z a = X Wᵀ (W Wᵀ)⁻¹ a, so the direction is Wᵀ a (W Wᵀ ∝ I).
    truth_weight = {"bin_a": w.T @ A1, "bin_b": w.T @ A2, "cont": w.T @ A3}
    comps = space.components.astype(np.float64)
    truth_pc = {a: unit(comps @ v) for a, v in truth_weight.items()}
    return {"space": space, "labels": labels, "truth_pc": truth_pc, "truth_weight": truth_weight, "w": w}


def unit(v):
    return v / np.linalg.norm(v)


def context(planted, labels=None, **kwargs):
    return AnalysisContext(
        store=None,
        space=planted["space"],
        labels=planted["labels"] if labels is None else labels,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def fitted(planted):
    """One full fit (shuffles and bootstrap on) shared by the read-only tests."""
    ctx = context(planted)
    probes = Probes(n_bootstrap=100, debias=["bin_b"]).fit(ctx)
    return probes, probes.result(), ctx


def scores(result) -> pd.DataFrame:
    table = next(t for t in result.tables if t.name == "scores")
    return pd.DataFrame(table.rows, columns=table.columns).set_index("attribute")


def test_planted_attributes_are_read_back(fitted):
    _, result, _ = fitted
    s = scores(result)
    for attr in ("bin_a", "bin_b"):
        assert s.loc[attr, "metric"] == "AUC"
        assert s.loc[attr, "score"] >= 0.9
        assert s.loc[attr, "accuracy"] >= 0.8
        assert abs(s.loc[attr, "shuffled_mean"] - 0.5) <= 0.08
        assert s.loc[attr, "ci_low"] > s.loc[attr, "shuffled_p95"]
        assert s.loc[attr, "p_value"] == pytest.approx(1 / 21)  # no shuffle reached the real score
        assert s.loc[attr, "ci_low"] <= s.loc[attr, "score"] <= s.loc[attr, "ci_high"]
    assert s.loc["cont", "metric"] == "R²"
    assert s.loc["cont", "score"] >= 0.8
    assert s.loc["cont", "shuffled_mean"] < 0.05
    assert s.loc["cont", "p_value"] <= 0.05
    assert s.loc["colour", "metric"] == "macro AUC"
    assert s.loc["colour", "score"] >= 0.8
    assert abs(s.loc["colour", "shuffled_mean"] - 0.5) <= 0.08


def test_noise_attribute_stays_at_chance(fitted):
    # Negative control: labels unrelated to the weights.
    s = scores(fitted[1])
    assert abs(s.loc["noise", "score"] - 0.5) <= 0.08
    assert s.loc["noise", "ci_low"] < 0.5 < s.loc["noise", "ci_high"]
    assert s.loc["noise", "p_value"] > 0.05


def test_missing_labels_are_left_out(fitted):
    _, result, _ = fitted
    s = scores(result)
    assert s.loc["bin_a", "n_labelled"] == N - 40
    assert s.loc["bin_b", "n_labelled"] == N
    assert result.data["attributes"]["bin_a"]["n_labelled"] == N - 40


def test_least_squares_direction_recovers_planted(fitted, planted):
    probes, _, ctx = fitted
    art = ctx.artifacts["probes"]
    for attr, truth in planted["truth_pc"].items():
        assert art["directions_pc"][attr] @ truth >= 0.95, attr
        assert art["probe_pc"][attr] @ truth >= 0.95, attr
    # Control: a direction is not similar to another attribute's planted direction.
    assert abs(art["directions_pc"]["cont"] @ planted["truth_pc"]["bin_a"]) < 0.2
    # Weight space (standardized; scale is 1 here): the same direction, mapped through the components.
    i = probes.direction_names_.index("bin_a")
    weight = probes.weight_directions_  # wsa.space.WeightDirections: over the store's columns for this space
    assert weight.basis == "features"
    assert unit(weight.standardized[i].astype(np.float64)) @ unit(planted["truth_weight"]["bin_a"]) >= 0.95
    np.testing.assert_allclose(weight.raw_norms[i], np.linalg.norm(weight.raw[i]), rtol=1e-6)


def test_debiasing_removes_projected_direction_and_keeps_the_rest(fitted, planted):
    _, result, ctx = fitted
    art = ctx.artifacts["probes"]
    before = art["directions_pc"]["bin_a"] @ art["directions_pc"]["bin_b"]
    after = art["debiased_pc"]["bin_a"] @ art["directions_pc"]["bin_b"]
    assert before > 0.4  # planted cos(A1, A2) = 0.6
    assert abs(after) < 1e-8
    # What is left is the part of A1 orthogonal to A2 (cos with A1 = 0.8 in truth).
    truth_a, truth_b = planted["truth_pc"]["bin_a"], planted["truth_pc"]["bin_b"]
    residual = unit(truth_a - (truth_a @ truth_b) * truth_b)
    assert art["debiased_pc"]["bin_a"] @ residual >= 0.95
    assert art["debiased_pc"]["bin_a"] @ truth_a >= 0.7
    # bin_b is only projected out, not debiased itself (nothing else in the list).
    np.testing.assert_allclose(art["debiased_pc"]["bin_b"], art["directions_pc"]["bin_b"])
    table = next(t for t in result.tables if t.name == "debiasing")
    frame = pd.DataFrame(table.rows, columns=table.columns)
    assert set(frame["projected_out"]) == {"bin_b"}
    assert np.all(np.abs(frame["cos_after"]) < 1e-8)


def test_debias_is_joint_not_sequential():
    # Two correlated "others": projecting them out one after the other leaves overlap with the first.
    rng = np.random.default_rng(1)
    o1 = unit(rng.standard_normal(10))
    o2 = unit(o1 + 0.5 * unit(rng.standard_normal(10)))
    d = unit(o1 + o2 + rng.standard_normal(10))
    dirs = np.vstack([d, o1, o2])
    debiased, retained = _debias(dirs, ["d", "o1", "o2"], {"o1", "o2"})
    assert abs(debiased[0] @ o1) < 1e-10
    assert abs(debiased[0] @ o2) < 1e-10
    assert np.linalg.norm(debiased[0]) == pytest.approx(1.0)
    assert 0 < retained[0] < 1
    sequential = d - (d @ o1) * o1
    sequential = sequential - (sequential @ o2) * o2
    assert abs(unit(sequential) @ o1) > 1e-3  # what the joint projection avoids


def test_artifacts_are_complete(fitted, planted):
    _, _, ctx = fitted
    art = ctx.artifacts["probes"]
    keys = {"k", "kinds", "models", "directions_pc", "debiased_pc", "score_std", "label_mapping"}
    assert keys <= set(art)
    assert art["k"] == K
    assert art["kinds"] == {
        "bin_a": "binary",
        "bin_b": "binary",
        "cont": "continuous",
        "colour": "categorical",
        "noise": "binary",
    }
    assert set(art["models"]) == set(art["kinds"])
    directions = {"bin_a", "bin_b", "cont", "noise", "colour=blue", "colour=green", "colour=red"}
    assert set(art["directions_pc"]) == set(art["debiased_pc"]) == set(art["score_std"]) == directions
    for name in directions:
        assert art["directions_pc"][name].shape == (K,)
        assert np.linalg.norm(art["directions_pc"][name]) == pytest.approx(1.0)
    assert art["label_mapping"]["bin_a"] == {"no": 0, "yes": 1}
    assert art["label_mapping"]["bin_b"] == {"-1": 0, "1": 1}
    assert art["label_mapping"]["colour"] == {"blue": 0, "green": 1, "red": 2}
    # score_std calibrates edit strength: the spread of the projection over the whole collection.
    z = planted["space"].coefficients.astype(np.float64)
    assert art["score_std"]["cont"] == pytest.approx(np.std(z @ art["directions_pc"]["cont"], ddof=1))
    # The models take raw PC coordinates and read the planted labels back.
    labels = planted["labels"]
    known = labels["bin_a"].notna().to_numpy()
    pred = art["models"]["bin_a"].predict(z)
    assert list(art["models"]["bin_a"].classes_) == [0, 1]  # binary probes predict the 0/1 codes of label_mapping
    yes = (labels["bin_a"] == "yes").to_numpy()
    assert np.mean(pred[known] == yes[known]) > 0.85
    colour = art["models"]["colour"].predict(z)
    assert np.mean(colour == labels["colour"].to_numpy()) > 0.7
    assert art["models"]["cont"].predict(z).shape == (N,)


def test_result_is_json_safe_with_figures(fitted):
    _, result, _ = fitted
    json.dumps(result.to_json())
    assert {t.name for t in result.tables} == {"scores", "directions_index", "debiasing"}
    assert {f.name for f in result.figures} == {"scores", "cosines", "debiasing"}
    assert all(f.png.startswith(b"\x89PNG") for f in result.figures)
    metric = next(m for m in result.metrics if m.name.startswith("bin_a"))
    assert metric.higher_is_better
    assert metric.chance == pytest.approx(result.data["attributes"]["bin_a"]["shuffled_mean"])
    cos = np.asarray(result.data["cos_ls"])
    np.testing.assert_allclose(np.diag(cos), 1.0)
    np.testing.assert_allclose(cos, cos.T)


def test_save_directions_round_trips(fitted, planted, tmp_path):
    probes, _, ctx = fitted
    probes.save_directions(tmp_path)
    loaded = Directions.load(tmp_path)
    meta, tensors = loaded.meta, loaded.vectors
    art = ctx.artifacts["probes"]
    assert meta["k"] == K
    assert meta["weight_basis"] == "features" and meta["n_features"] == D
    assert meta["kinds"] == art["kinds"]
    assert meta["label_mapping"] == art["label_mapping"]
    assert set(tensors) == set(art["directions_pc"])
    comps = planted["space"].components
    for name, parts in tensors.items():
        np.testing.assert_allclose(parts["pc"], art["directions_pc"][name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(parts["debiased_pc"], art["debiased_pc"][name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(parts["weight"], parts["pc"] @ comps, rtol=1e-4, atol=1e-6)
        assert parts["weight"].shape == (D,)
        assert meta["directions"][name]["score_std"] == pytest.approx(art["score_std"][name])
    # A tensors file that does not match its JSON is refused.
    (tmp_path / "directions.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="does not match"):
        Directions.load(tmp_path)


def test_fit_writes_nothing_the_pipeline_writes_directions(planted, tmp_path):
    ctx = context(planted, out=tmp_path)
    probes = Probes(attributes=["cont"], n_shuffles=0, n_bootstrap=0).fit(ctx)
    assert not (tmp_path / "space").exists()  # fit only sets attributes
    probes.write_artifacts(tmp_path)  # what the pipeline calls after fit
    loaded = Directions.load(tmp_path / "space")
    meta, tensors = loaded.meta, loaded.vectors
    assert set(tensors) == {"cont"}
    assert meta["kinds"] == {"cont": "continuous"}


def test_labels_in_another_order_are_realigned(planted, fitted):
    shuffled = planted["labels"].sample(frac=1.0, random_state=0)
    ctx = context(planted, labels=shuffled)
    probes = Probes(attributes=["cont"], n_shuffles=0, n_bootstrap=0, debias="none").fit(ctx)
    reference = fitted[2].artifacts["probes"]["directions_pc"]["cont"]
    np.testing.assert_allclose(ctx.artifacts["probes"]["directions_pc"]["cont"], reference, atol=1e-10)
    assert probes.fits_["cont"].score == pytest.approx(fitted[0].fits_["cont"].score)


def test_registered():
    assert get_analyzer("probes") is Probes
    assert Probes.requires_labels


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"cv": 1}, "'cv'"),
        ({"c": 0}, "'c'"),
        ({"debias": "some"}, "'debias'"),
        ({"n_components": 0}, "'n_components'"),
        ({"attributes": ["nope"]}, "not label columns"),
        ({"debias": ["nope"]}, "not label columns"),
    ],
)
def test_bad_parameters(planted, params, match):
    with pytest.raises(ConfigError, match=match):
        Probes(n_shuffles=0, n_bootstrap=0, **params).fit(context(planted))


def test_no_labels_is_an_error(planted):
    ctx = AnalysisContext(store=None, space=planted["space"], labels=None, progress=False)
    with pytest.raises(ConfigError, match="label"):
        Probes().fit(ctx)
