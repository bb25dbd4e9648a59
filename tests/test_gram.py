"""ΔW-space PCA from the factors' small Gram products equals PCA of the materialised ΔW.

Why: the delta representation is the gauge-invariant geometry, but materialising ΔW is 280× the raw
size at SD scale; the factor route must give the same numbers (eigenvalues, total variance,
coefficients up to sign) and be invariant to ``(B·M, M⁻¹·A)`` by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import wsa
from wsa.errors import ConfigError
from wsa.gram import fit_delta_gram, gram_block
from wsa.space import fit_space
from wsa.synthetic import synth_collection

MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 12, 10),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 7, 10),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 9, 14),
]


@pytest.fixture(scope="module", params=[1, 2])
def stores(request, tmp_path_factory):
    root: Path = tmp_path_factory.mktemp(f"gram{request.param}")
    synth_collection(root / "loras", 24, rank=request.param, modules=MODULES, n_factors=4, a_jitter=0.3, progress=False)
    raw = wsa.ingest([root / "loras"], root / "raw", progress=False)
    delta = wsa.ingest([root / "loras"], root / "delta", repr="delta", progress=False)
    return raw, delta


def test_gram_route_equals_pca_of_materialised_delta(stores):
    raw, delta = stores
    dual = fit_delta_gram(raw, 6, block_rows=5, progress=False)
    ref = fit_space(delta, 6, solver="exact", progress=False)
    np.testing.assert_allclose(dual.explained_variance, ref.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(dual.total_variance, ref.total_variance, rtol=1e-5)
    for j in range(6):
        a, b = dual.coefficients[:, j], ref.coefficients[:, j]
        assert min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-3 * np.abs(b).max()


def test_gram_is_gauge_invariant(stores):
    raw, _ = stores
    layout = raw.layout
    rows = raw.read_rows([0, 1, 2])
    moved = rows.copy()
    rng = np.random.default_rng(0)
    for ml in layout.modules:
        parts = {p.name: p for p in ml.parts}
        r = ml.rank
        down = moved[0, parts["down"].offset : parts["down"].offset + parts["down"].size].reshape(r, -1)
        up = moved[0, parts["up"].offset : parts["up"].offset + parts["up"].size].reshape(-1, r)
        m = rng.standard_normal((r, r)) + 3 * np.eye(r)
        moved[0, parts["down"].offset : parts["down"].offset + parts["down"].size] = (np.linalg.inv(m) @ down).ravel()
        moved[0, parts["up"].offset : parts["up"].offset + parts["up"].size] = (up @ m).ravel()
    np.testing.assert_allclose(gram_block(moved, moved, layout), gram_block(rows, rows, layout), rtol=1e-4)


def test_gram_reads_dense_modules_of_a_delta_store(stores):
    raw, delta = stores
    from_factors = fit_delta_gram(raw, 4, progress=False)
    from_dense = fit_delta_gram(delta, 4, progress=False)
    np.testing.assert_allclose(from_dense.explained_variance, from_factors.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(from_dense.row_sq_norms, from_factors.row_sq_norms, rtol=1e-4)


def test_gram_refuses_factors_it_cannot_read():
    from wsa.store.layout import Layout, ModuleLayout, Part

    parts = (Part("hada_w1_a", (4, 2), 0), Part("hada_w1_b", (2, 4), 8), Part("hada_w2_a", (4, 2), 16))
    layout = Layout("raw", (ModuleLayout("m", "loha", (4, 4), 2, 1.0, parts),))
    rows = np.zeros((2, 24), np.float32)
    with pytest.raises(ConfigError, match="--repr canonical"):
        gram_block(rows, rows, layout)


def test_heldout_in_dual_form_equals_the_explicit_test(stores):
    from wsa.gram import heldout_reconstruction_gram
    from wsa.space import heldout_reconstruction

    raw, delta = stores
    ks = [1, 3, 6]
    dual = heldout_reconstruction_gram(raw, ks, test_fraction=0.25, random_state=3, block_rows=7, progress=False)
    ref = heldout_reconstruction(delta, ks, test_fraction=0.25, random_state=3, solver="exact", progress=False)
    assert dual["heldout_ids"] == ref["heldout_ids"] and dual["n_train"] == ref["n_train"]
    np.testing.assert_allclose(dual["train_error"], ref["train_error"], atol=1e-4)
    np.testing.assert_allclose(dual["heldout_error"], ref["heldout_error"], atol=1e-4)
    assert dual["heldout_error"][-1] < dual["heldout_error"][0]  # planted structure: error falls with k


def test_delta_space_saves_and_applications_refuse_it(stores, tmp_path):
    from wsa.errors import StoreError
    from wsa.space import Space

    raw, _ = stores
    dual = fit_delta_gram(raw, 4, progress=False)
    dual.save(tmp_path / "space")
    assert dual.n_components_for(0.5) is not None and dual.geometry == "delta"
    with pytest.raises(StoreError, match="no explicit components"):
        Space.load(tmp_path / "space")


@pytest.mark.gpu
def test_gram_route_on_cuda_equals_cpu(stores):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    raw, _ = stores
    cpu = fit_delta_gram(raw, 5, progress=False)
    gpu = fit_delta_gram(raw, 5, device="cuda", progress=False)
    np.testing.assert_allclose(gpu.explained_variance, cpu.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(np.abs(gpu.coefficients), np.abs(cpu.coefficients), atol=1e-4)


@pytest.mark.parametrize("budget", [4 * 24 * 150, 4 * 24 * 400])  # a run holds one module / a few modules
def test_wide_rows_summed_module_run_by_run_equal_row_blocks(stores, tmp_path, budget):
    """DiT-sized rows do not fit two row blocks in memory: the column-run route reads each module's columns of
    all rows at once and must give the same Gram matrix (with LoRA biases and dense modules too)."""
    from wsa.gram import _GRAM_CACHE, gram_matrix

    raw, delta = stores
    canonical = wsa.ingest([raw.path.parent / "loras"], tmp_path / "c", repr="canonical", progress=False)
    for store in (raw, canonical, delta):
        _GRAM_CACHE.clear()
        rows = gram_matrix(store, block_rows=7, progress=False, budget=10**9)
        _GRAM_CACHE.clear()
        cols = gram_matrix(store, block_rows=2048, progress=False, budget=budget)
        np.testing.assert_allclose(cols, rows, rtol=1e-5, atol=1e-6 * np.abs(rows).max())  # float32 sums


def test_the_fit_and_the_heldout_test_read_the_store_once(stores, monkeypatch):
    """At DiT scale one Gram is a full read of the store: the held-out test reuses the fit's (a copy)."""
    from wsa.gram import _GRAM_CACHE, gram_matrix

    raw, _ = stores
    _GRAM_CACHE.clear()
    first = gram_matrix(raw, progress=False)
    first[0, 0] = -1.0  # callers centre K in place: the cache must not see it

    def no_reads(*args, **kwargs):
        raise AssertionError("the store was read again")

    monkeypatch.setattr(type(raw), "read_rows", no_reads)
    again = gram_matrix(raw, progress=False)
    assert again[0, 0] > 0
