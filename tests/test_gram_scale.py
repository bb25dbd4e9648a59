"""The out-of-core ΔW route (Gram tiles on disk + randomized eigensolver) equals the exact in-memory one.

Why: past ~27 k adapters the N × N Gram does not fit in memory, so ``fit_delta_gram`` writes it once to
disk as float32 tiles (an hour of compute at 65 k: the pass must resume after an interruption) and
solves by subspace iteration over them. These tests force that route on a 300-adapter store with tiles
of 64 rows (5 tile rows, a ragged last one) and compare it with the exact route: spectrum, coefficients
up to sign, norms and means, the held-out test, a resumed tile pass, and the choice by memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import wsa
import wsa.gram as G
from wsa.errors import ConfigError, StoreError
from wsa.synthetic import synth_collection

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 12, 10),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 7, 10),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 9, 14),
]
N, FACTORS = 300, 8  # planted: 8 strong directions above a noise floor


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Stores by rank, made on first use (rank 1 and rank 2 take different products in ``gram_block``)."""
    made: dict[int, wsa.Store] = {}

    def get(rank: int):
        if rank not in made:
            root: Path = tmp_path_factory.mktemp(f"scale{rank}")
            synth_collection(
                root / "loras", N, rank=rank, modules=MODULES, n_factors=FACTORS, a_jitter=0.3, progress=False
            )
            made[rank] = wsa.ingest([root / "loras"], root / "raw", progress=False)
        return made[rank]

    return get


@pytest.fixture
def store(stores):
    return stores(1)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(G, "TILE", 64)


def _same_up_to_sign(a: np.ndarray, b: np.ndarray) -> float:
    return float(min(np.abs(a - b).max(), np.abs(a + b).max()) / np.abs(b).max())


@pytest.mark.parametrize("rank", [1, 2])
def test_randomized_route_equals_exact(stores, rank, tmp_path):
    store = stores(rank)
    k = FACTORS
    exact = G.fit_delta_gram(store, k, solver="exact", progress=False)
    rand = G.fit_delta_gram(store, k, solver="randomized", progress=False, work_dir=tmp_path / "g")
    assert rand.config["solver"] == "randomized" and rand.config["gram_tiles"] == 15  # 5 tile rows
    assert (tmp_path / "g" / "tiles.f32").stat().st_size == 4 * N * (N + 64) // 2 - 4 * 44 * 20 // 2  # upper half
    # The planted directions: eigenvalues to 1e-5 (a centring off by one member's mean fails this), the
    # members' coordinates up to sign.
    np.testing.assert_allclose(rand.explained_variance, exact.explained_variance, rtol=1e-5)
    for j in range(k):
        assert _same_up_to_sign(rand.coefficients[:, j], exact.coefficients[:, j]) < 1e-3, j
    np.testing.assert_allclose(rand.total_variance, exact.total_variance, rtol=1e-7)
    np.testing.assert_allclose(rand.row_sq_norms, exact.row_sq_norms, rtol=1e-6)
    np.testing.assert_allclose(rand.gram_row_means, exact.gram_row_means, rtol=1e-6, atol=1e-9)
    # Dual weights are U/√λ, coefficients U·√λ.
    np.testing.assert_allclose(rand.dual_weights * rand.singular_values**2, rand.coefficients, rtol=1e-5, atol=1e-7)


def test_randomized_heldout_equals_exact(store, tmp_path):
    ks = [1, 4, FACTORS]
    exact = G.heldout_reconstruction_gram(store, ks, random_state=3, solver="exact", progress=False)
    rand = G.heldout_reconstruction_gram(
        store, ks, random_state=3, solver="randomized", progress=False, work_dir=tmp_path / "g"
    )
    assert rand["heldout_ids"] == exact["heldout_ids"] and rand["n_train"] == exact["n_train"]
    np.testing.assert_allclose(rand["train_error"], exact["train_error"], atol=1e-6)
    np.testing.assert_allclose(rand["heldout_error"], exact["heldout_error"], atol=1e-6)


def test_interrupted_tile_pass_resumes(store, tmp_path, monkeypatch):
    """An interrupted pass keeps the tiles it wrote (checkpointed on the way out) and computes only the rest."""
    work = tmp_path / "g"
    real = G.gram_block
    calls = []

    def stops_after_four(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "gram_block", stops_after_four)
    monkeypatch.setattr(G, "_gram_budget", lambda: 4 * store.n_features * 64)  # one tile row held: 15 products
    with pytest.raises(KeyboardInterrupt):
        G.fit_delta_gram(store, 4, solver="randomized", progress=False, work_dir=work)
    with np.load(work / "progress.npz") as state:
        assert 0 < state["done"].sum() < 15
    calls.clear()
    monkeypatch.setattr(G, "gram_block", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    resumed = G.fit_delta_gram(store, 4, solver="randomized", progress=False, work_dir=work)
    assert resumed.config["gram_tiles_computed"] == 15 - 4 and len(calls) == 11
    monkeypatch.setattr(G, "gram_block", real)
    fresh = G.fit_delta_gram(store, 4, solver="randomized", progress=False, work_dir=tmp_path / "fresh")
    np.testing.assert_allclose(resumed.explained_variance, fresh.explained_variance, rtol=1e-6)
    np.testing.assert_allclose(np.abs(resumed.coefficients), np.abs(fresh.coefficients), rtol=1e-4, atol=1e-6)
    # A re-run finds every tile done and computes nothing; the tiles are the exact Gram, upper half.
    again = G.fit_delta_gram(store, 4, solver="randomized", progress=False, work_dir=work)
    assert again.config["gram_tiles_computed"] == 0
    K = G.gram_matrix(store, progress=False)
    with G._open_disk_gram(store, work, G._gram_budget()) as dg:
        for a, b in dg.pairs:
            np.testing.assert_allclose(dg.read(a, b), K[dg.rows(a), dg.rows(b)], rtol=1e-6, atol=1e-6 * K.max())
        np.testing.assert_allclose(dg.diag, np.diagonal(K), rtol=1e-12)


def test_a_changed_store_is_not_read_from_a_stale_gram(store, tmp_path):
    work = tmp_path / "g"
    G.fit_delta_gram(store, 3, solver="randomized", progress=False, work_dir=work)
    other = wsa.ingest([store.path.parent / "loras"], tmp_path / "other", dtype="float16", progress=False)
    again = G.fit_delta_gram(other, 3, solver="randomized", progress=False, work_dir=work)
    assert again.config["gram_tiles_computed"] == 15  # another matrix file: recomputed, not reused
    exact = G.fit_delta_gram(other, 3, solver="exact", progress=False)
    np.testing.assert_allclose(again.explained_variance, exact.explained_variance, rtol=1e-5)


def test_the_solver_is_chosen_by_memory(store, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "_physical_memory", lambda: 4 * 8 * N * N)  # K takes a quarter: still exact
    assert G.fit_delta_gram(store, 3, progress=False, work_dir=tmp_path / "g").config["solver"] == "exact"
    monkeypatch.setattr(G, "_physical_memory", lambda: 4 * 8 * N * N - 1)
    small = G.fit_delta_gram(store, 3, progress=False, work_dir=tmp_path / "g")
    assert small.config["solver"] == "randomized" and (tmp_path / "g" / "tiles.f32").is_file()
    with pytest.raises(ConfigError, match="solver must be one of"):
        G.fit_delta_gram(store, 3, solver="svd", progress=False)


def test_non_finite_products_are_never_written(store, tmp_path, monkeypatch):
    real = G.gram_block

    def poisoned(*args, **kwargs):
        g = real(*args, **kwargs)
        g[0, 0] = np.inf
        return g

    monkeypatch.setattr(G, "gram_block", poisoned)
    with pytest.raises(StoreError, match="not a finite"):
        G.fit_delta_gram(store, 3, solver="randomized", progress=False, work_dir=tmp_path / "g")
    with np.load(tmp_path / "g" / "progress.npz") as state:
        assert not state["done"].any()


def test_one_process_at_a_time_and_rows_too_wide(store, tmp_path):
    with G._open_disk_gram(store, tmp_path / "g", G._gram_budget()), pytest.raises(ConfigError, match="another"):
        G.fit_delta_gram(store, 3, solver="randomized", progress=False, work_dir=tmp_path / "g")
    with pytest.raises(ConfigError, match="too wide"):
        G._open_disk_gram(store, tmp_path / "h", budget=4 * store.n_features * 50)


@pytest.mark.gpu
def test_randomized_route_on_cuda_equals_cpu(store, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = G.fit_delta_gram(store, 5, solver="randomized", progress=False, work_dir=tmp_path / "c")
    gpu = G.fit_delta_gram(store, 5, solver="randomized", device="cuda", progress=False, work_dir=tmp_path / "g")
    np.testing.assert_allclose(gpu.explained_variance, cpu.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(np.abs(gpu.coefficients), np.abs(cpu.coefficients), rtol=1e-3, atol=1e-5)
