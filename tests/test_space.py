"""The fitted space: planted structure is recovered, solvers agree with each other and with scikit-learn,
streaming over a real store equals the exact fit, held-out reconstruction separates structure from noise,
and the saved form round-trips and refuses what it cannot trust."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import wsa
from wsa.errors import ConfigError, StoreError
from wsa.space import Space, fit_space, heldout_reconstruction, principal_angles
from wsa.synthetic import synth_collection

SOLVERS = ["exact", "randomized", "streaming"]
SMALL_MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 12, 8),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", 16, 16),
]
PLANTED_S = np.array([100.0, 80.0, 60.0, 40.0, 30.0])


def planted(n: int = 300, d: int = 2000, noise: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``X = offset + U·diag(PLANTED_S)·W + noise`` with centered orthonormal U and orthonormal W (5, d)."""
    rng = np.random.default_rng(seed)
    w = np.linalg.qr(rng.standard_normal((d, 5)))[0].T
    u = rng.standard_normal((n, 5))
    u = np.linalg.qr(u - u.mean(axis=0))[0]
    offset = rng.uniform(-1, 1, d)
    x = offset + (u * PLANTED_S) @ w + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), w


def flip(components: np.ndarray) -> np.ndarray:
    """The documented sign rule, applied to reference components."""
    idx = np.abs(components).argmax(axis=1)
    return components * np.sign(components[np.arange(len(components)), idx])[:, None]


def fit(x, k: int, **kw) -> Space:
    kw.setdefault("progress", False)
    kw.setdefault("block_rows", 64)  # several blocks even on small data, so block seams are exercised
    return fit_space(x, k, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_plant_and_recover(solver: str) -> None:
    """Each solver finds the planted subspace and singular values; a random subspace is far (control)."""
    x, w = planted()
    space = fit(x, 5, solver=solver)
    assert space.config["solver"] == solver
    assert principal_angles(space.components, w).max() < 2.0
    np.testing.assert_allclose(space.singular_values, PLANTED_S, rtol=1e-2)
    np.testing.assert_allclose(space.explained_variance, space.singular_values**2 / 299)
    other = np.linalg.qr(np.random.default_rng(9).standard_normal((2000, 5)))[0].T
    assert principal_angles(other, w).min() > 60.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_match_sklearn(solver: str) -> None:
    """Same components (sign rule included), variances, totals and coordinates as sklearn's full PCA."""
    x, _ = planted(noise=0.05)
    ref = PCA(5, svd_solver="full").fit(x.astype(np.float64))
    space = fit(x, 5, solver=solver)
    np.testing.assert_allclose(space.explained_variance, ref.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(space.components, flip(ref.components_), atol=1e-5)
    np.testing.assert_allclose(space.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-5)
    ref_coords = ref.transform(x.astype(np.float64)) * np.sign(np.sum(ref.components_ * space.components, axis=1))
    np.testing.assert_allclose(space.coefficients, ref_coords, atol=2e-3)
    np.testing.assert_allclose(space.mean, ref.mean_, atol=1e-6)
    largest = space.components[np.arange(5), np.abs(space.components).argmax(axis=1)]
    assert (largest > 0).all()


def test_solvers_agree_and_are_deterministic() -> None:
    """All solvers give one answer; a refit with the same seed is bit-identical, another seed still agrees."""
    x, _ = planted(noise=0.05)
    before = x.copy()
    fits = {s: fit(x, 5, solver=s) for s in SOLVERS}
    np.testing.assert_array_equal(x, before)  # blocks are centered in place: never the caller's array
    for s in SOLVERS[1:]:
        np.testing.assert_allclose(fits[s].components, fits["exact"].components, atol=1e-5)
        np.testing.assert_allclose(fits[s].singular_values, fits["exact"].singular_values, rtol=1e-6)
        np.testing.assert_allclose(fits[s].coefficients, fits["exact"].coefficients, atol=1e-3)
    again = fit(x, 5, solver="randomized")
    np.testing.assert_array_equal(again.components, fits["randomized"].components)
    reseeded = fit(x, 5, solver="randomized", random_state=7)
    np.testing.assert_allclose(reseeded.components, fits["exact"].components, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_standardize_uses_ddof1(solver: str) -> None:
    """standardize=True is PCA of (x - mean) / std(ddof=1); against StandardScaler (ddof=0) only the
    variances differ, by n / (n - 1). Columns on wildly different scales make the control fail."""
    rng = np.random.default_rng(1)
    n, d = 200, 300
    latent = rng.standard_normal((n, 3)) @ rng.standard_normal((3, d)) + 0.3 * rng.standard_normal((n, d))
    x = (latent * np.geomspace(1e-3, 1e2, d)).astype(np.float32)
    x[:, 7] = 2.5  # zero variance: scale 1, contributes nothing
    x64 = x.astype(np.float64)
    space = fit(x, 4, standardize=True, solver=solver, n_iter=8)
    std1 = x64.std(axis=0, ddof=1)
    assert space.scale[7] == 1.0
    np.testing.assert_allclose(np.delete(space.scale, 7), np.delete(std1, 7), rtol=1e-5)
    z = (x64 - x64.mean(axis=0)) / np.where(std1 > 0, std1, 1.0)
    ref = PCA(4, svd_solver="full").fit(z)
    np.testing.assert_allclose(space.components, flip(ref.components_), atol=2e-4)
    np.testing.assert_allclose(space.explained_variance, ref.explained_variance_, rtol=1e-4)
    assert space.total_variance == pytest.approx(d - 1, rel=1e-5)  # every non-constant column has variance 1
    scaler = PCA(4, svd_solver="full").fit(StandardScaler().fit_transform(x64))
    np.testing.assert_allclose(space.explained_variance * n / (n - 1), scaler.explained_variance_, rtol=1e-4)
    unscaled = fit(x, 4, solver=solver)
    assert principal_angles(unscaled.components, space.components).max() > 45.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_round_trip_at_full_rank(solver: str) -> None:
    """With k = rank of the centered data, inverse_transform(transform(x)) == x, and the stored
    coefficients are transform(training rows); one component fewer leaves a visible residual (control)."""
    rng = np.random.default_rng(2)
    x = (rng.uniform(-1, 1, 120) + rng.standard_normal((40, 7)) @ rng.standard_normal((7, 120))).astype(np.float32)
    space = fit(x, 7, solver=solver, block_rows=16)
    np.testing.assert_allclose(space.coefficients, space.transform(x), atol=1e-4)
    np.testing.assert_allclose(space.inverse_transform(space.transform(x)), x, atol=2e-4)
    np.testing.assert_allclose(space.components @ space.components.T, np.eye(7), atol=1e-5)
    residual = space.inverse_transform(space.transform(x)[:, :6]) - x
    assert np.abs(residual).max() > 0.1
    assert space.n_components_for(1.0) == 7
    assert space.n_components_for(0.5) <= 7


def test_full_dimension_completes_an_orthonormal_basis() -> None:
    """n_components = n > rank (centering removes one): the extra component is still orthonormal."""
    x, _ = planted(n=30, d=100)
    space = fit(x, 30, solver="exact")
    np.testing.assert_allclose(space.components @ space.components.T, np.eye(30), atol=1e-5)
    assert space.singular_values[-1] < 1e-3 * space.singular_values[0]


def make_store(tmp_path: Path, dtype: str = "float32") -> wsa.Store:
    # a_jitter=0: lora_A is the shared init, so the 4 planted factors in lora_B dominate with a clear gap.
    synth_collection(tmp_path / "c", 40, modules=SMALL_MODULES, n_factors=4, a_jitter=0.0, progress=False)
    return wsa.ingest(tmp_path / "c", tmp_path / f"s-{dtype}", dtype=dtype, progress=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streaming_store_matches_exact(tmp_path: Path, dtype: str) -> None:
    """Streaming over a store (float32 or float16, whole or a row subset) equals exact on the loaded rows."""
    store = make_store(tmp_path, dtype)
    loaded = np.asarray(store.matrix, dtype=np.float32)
    for rows in (None, list(range(0, 40, 3))):
        stream = fit_space(store, 4, solver="streaming", rows=rows, block_rows=7, progress=False)
        exact = fit_space(loaded if rows is None else loaded[rows], 4, solver="exact", progress=False)
        np.testing.assert_allclose(stream.components, exact.components, atol=1e-4)
        np.testing.assert_allclose(stream.singular_values, exact.singular_values, rtol=1e-4)
        np.testing.assert_allclose(stream.mean, exact.mean, atol=1e-7)
        assert stream.ids == tuple(store.ids if rows is None else [store.ids[i] for i in rows])
    assert stream.config["store_fingerprint"] == fit_space(store, 2, progress=False).config["store_fingerprint"]
    assert stream.config["store_path"] == str(store.path)
    assert stream.config["dtype"] == dtype
    assert stream.config["repr"] == "raw"


def test_auto_solver_follows_memory_budget() -> None:
    """auto: exact when it fits, randomized when only the float32 data fit, streaming otherwise."""
    x, _ = planted(n=50, d=200)
    chosen = [
        fit(x, 3, memory_budget_bytes=budget).config["solver"] for budget in (2**30, 4 * x.size + 1, 4 * x.size - 1)
    ]
    assert chosen == ["exact", "randomized", "streaming"]


def test_heldout_reconstruction_finds_structure() -> None:
    """Planted rank 5 + noise: held-out error falls with k to the noise floor at k = 5 and no further;
    pure noise (negative control): held-out error stays near 1 while the train error drops."""
    x, w = planted(noise=0.1)
    res = heldout_reconstruction(x, [0, 1, 2, 3, 4, 5, 10], solver="exact", progress=False)
    assert res["k"] == [0, 1, 2, 3, 4, 5, 10]
    assert len(res["heldout_ids"]) == 60
    assert res["n_train"] == 240
    held = np.array(res["heldout_error"])
    assert held[0] == pytest.approx(1.0)
    assert (np.diff(held[:6]) < 0).all()
    # Noise floor: the same error with the true subspace W (and the train mean) instead of the fitted one.
    test = np.array([int(i) for i in res["heldout_ids"]])
    centered = x[test] - np.delete(x, test, axis=0).mean(axis=0)
    oracle = np.mean(((centered - centered @ w.T @ w) ** 2).sum(1) / (centered**2).sum(1))
    assert 0.1 < oracle < 0.5
    assert held[5] == pytest.approx(oracle, rel=0.03)
    assert held[6] > held[5] - 0.01
    noise = np.random.default_rng(3).standard_normal((300, 2000)).astype(np.float32)
    ctrl = heldout_reconstruction(noise, [5, 20], solver="exact", progress=False)
    assert min(ctrl["heldout_error"]) > 0.97
    assert ctrl["train_error"][1] < ctrl["heldout_error"][1] - 0.05


def test_save_load_round_trip(tmp_path: Path) -> None:
    """Saved and loaded spaces are identical; float16 input transforms like its float32 values."""
    x, _ = planted(n=60, d=150)
    space = fit(x, 4, standardize=True, solver="streaming")
    space.save(tmp_path / "sp")
    back = Space.load(tmp_path / "sp")
    for name in ("mean", "scale", "components", "singular_values", "explained_variance", "coefficients"):
        np.testing.assert_array_equal(getattr(back, name), getattr(space, name))
        assert getattr(back, name).dtype == getattr(space, name).dtype
    assert (back.ids, back.n_samples, back.total_variance) == (space.ids, space.n_samples, space.total_variance)
    assert back.config == space.config
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["space.json", "space.safetensors"]
    x16 = x.astype(np.float16)
    np.testing.assert_array_equal(back.transform(x16), back.transform(x16.astype(np.float32)))
    np.testing.assert_array_equal(back.transform(x[3]), back.transform(x[3:4])[0])
    with pytest.raises(ValueError, match="read-only"):
        back.components[0, 0] = 1.0


def test_load_refuses_bad_folders(tmp_path: Path) -> None:
    """Missing, corrupt, other-version and mismatched files each give a StoreError saying what to do."""
    x, _ = planted(n=20, d=30)
    fit(x, 2).save(tmp_path / "a")
    fit(x, 3).save(tmp_path / "b")
    with pytest.raises(StoreError, match=r"no space\.json"):
        Space.load(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "a" / "space.json").read_text())
    meta["wsa_space_version"] = 2
    (tmp_path / "a" / "space.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="space format version 2; this wsa reads version 1"):
        Space.load(tmp_path / "a")
    (tmp_path / "b" / "space.safetensors").write_bytes((tmp_path / "a" / "space.safetensors").read_bytes())
    with pytest.raises(StoreError, match="does not match"):
        Space.load(tmp_path / "b")
    (tmp_path / "b" / "space.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        Space.load(tmp_path / "b")


def test_n_components_for_is_nan_safe() -> None:
    """Cumulative fractions answer the smallest k, None when out of reach or when the data have no variance."""
    x, _ = planted(noise=0.01)
    space = fit(x, 3)
    cumulative = np.cumsum(space.explained_variance_ratio)
    assert space.n_components_for(float(cumulative[1])) == 2
    assert space.n_components_for(0.99) is None
    flat = fit(np.ones((10, 20), dtype=np.float32), 2, solver="exact")
    assert flat.total_variance == 0.0
    assert np.isnan(flat.explained_variance_ratio).all()
    assert flat.n_components_for(0.5) is None
    np.testing.assert_allclose(flat.components @ flat.components.T, np.eye(2), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_components": 0}, r"n_components must be an integer \[1, 40\]; got 0"),
        ({"n_components": 41}, r"n_components must be an integer \[1, 40\]; got 41"),
        ({"n_components": 2.5}, "n_components must be an integer"),
        ({"solver": "svd"}, r"solver must be one of \['auto', 'exact', 'randomized', 'streaming'\]; got 'svd'"),
        ({"rows": [3, 1, 2]}, "rows must be strictly increasing"),
        ({"rows": [0, 40]}, r"rows must be strictly increasing indices in \[0, 40\)"),
        ({"rows": [5]}, "at least 2 rows"),
        ({"device": "tpu"}, "device must be"),
        ({"n_iter": -1}, "n_iter must be an integer >= 0; got -1"),
        ({"block_rows": 0}, "block_rows must be"),
        ({"center": "yes"}, "center must be True or False"),
        ({"random_state": -3}, "random_state must be"),
    ],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    """Every bad value is refused up front with one message shape: '<name> must be …; got …'."""
    x = np.random.default_rng(0).standard_normal((40, 50)).astype(np.float32)
    k = kwargs.pop("n_components", 3)
    with pytest.raises(ConfigError, match=message):
        fit_space(x, k, progress=False, **kwargs)


def test_bad_inputs() -> None:
    """Non-matrices, NaN data, wrong widths and bad held-out options are ConfigErrors too."""
    x = np.random.default_rng(0).standard_normal((40, 50)).astype(np.float32)
    with pytest.raises(ConfigError, match="2-D float array"):
        fit_space(x[0], 2, progress=False)
    with pytest.raises(ConfigError, match=r"wsa\.Store or a 2-D numpy array"):
        fit_space(x.tolist(), 2, progress=False)
    bad = x.copy()
    bad[3, 4] = math.nan
    with pytest.raises(ConfigError, match="NaN or Inf"):
        fit_space(bad, 2, progress=False)
    space = fit(x, 2)
    with pytest.raises(ConfigError, match=r"X must have shape \(n, 50\)"):
        space.transform(x[:, :49])
    with pytest.raises(ConfigError, match="ks must be a non-empty list"):
        heldout_reconstruction(x, [], progress=False)
    with pytest.raises(ConfigError, match="test_fraction must be"):
        heldout_reconstruction(x, [2], test_fraction=1.5, progress=False)
    with pytest.raises(ConfigError, match="rows must not be passed"):
        heldout_reconstruction(x, [2], rows=[0, 1], progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_matches_cpu(solver: str) -> None:
    """On a GPU (float32 block matmuls there, float64 final decompositions) each solver gives the CPU answer."""
    x, _ = planted(noise=0.05)
    cpu = fit(x, 5, solver=solver, device="cpu")
    gpu = fit(x, 5, solver=solver, device="cuda")
    assert gpu.config["device"].startswith("cuda")
    np.testing.assert_allclose(gpu.components, cpu.components, atol=1e-4)
    # float32 block products summed in another order on the GPU: ~6e-5 relative, measured on an H100
    np.testing.assert_allclose(gpu.singular_values, cpu.singular_values, rtol=2e-4)
    np.testing.assert_allclose(gpu.coefficients, cpu.coefficients, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("standardize", [False, True])
def test_streaming_gpu_cache_matches_host_streaming(standardize: bool) -> None:
    """The fp16 device copy (shifted and scaled) gives the space that streaming from the host gives."""
    x, _ = planted(noise=0.05)
    x = x + 3.0  # a large offset: the cache must hold the variation, not the offset
    host = fit(x, 5, solver="streaming", device="cuda", standardize=standardize, gpu_cache_bytes=0)
    cached = fit(x, 5, solver="streaming", device="cuda", standardize=standardize)
    assert cached.config["gpu_cache_bytes"] > 0 and host.config["gpu_cache_bytes"] == 0
    assert np.degrees(principal_angles(cached.components, host.components)).max() < 0.5
    np.testing.assert_allclose(cached.singular_values, host.singular_values, rtol=2e-3)


def test_exact_keeps_components_four_decades_below_the_first() -> None:
    """Components whose singular value is 1e-4 of the first are real data, not rounding noise.

    (An earlier cut at s₀·max(n, D)·eps32 replaced every component below ~1 % of s₀ by a random one.)"""
    rng = np.random.default_rng(0)
    n, d, k = 60, 3000, 20
    u = np.linalg.qr(rng.standard_normal((n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((d, k)))[0]
    s = np.geomspace(1.0, 1e-4, k)
    x = ((u * s) @ v.T).astype(np.float32)
    space = fit(x, k, solver="exact")
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    ref = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(space.singular_values[: k - 1], ref.S[: k - 1], rtol=1e-3)
    angles = principal_angles(space.components[: k - 2], ref.Vh[: k - 2])
    assert angles.max() < 1.0
