"""Weights from the ΔW space (wsa.delta_points): exact stacked factors (DeltaBasis), checked against dense ΔW."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import wsa
from wsa.delta_points import DeltaBasis, member_weights, refactor
from wsa.gram import fit_delta_gram
from wsa.synthetic import synth_collection

N = 12
#: Small modules (name, out, in): the checks form dense ΔW and SVDs, which the code under test never does.
MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 12, 16),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 24, 24),
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dw")
    synth_collection(root / "loras", N, seed=4, rank=2, modules=MODULES, n_factors=3, progress=False)
    store = wsa.ingest([root / "loras"], root / "canonical", repr="canonical", progress=False)
    space = fit_delta_gram(store, N - 1, progress=False)
    members = [store.to_adapter(i) for i in range(len(store))]
    basis = DeltaBasis(store.read_rows(range(len(store))), store.layout)
    return store, space, members, basis


def stacked(basis, beta):
    return basis.adapters(np.asarray(beta)[None], ["point"])[0]


def dense(adapter, name: str) -> torch.Tensor:
    return adapter.delta(name).double()


def test_a_members_coefficients_give_back_its_delta(fitted) -> None:
    """With all N − 1 components, the point at member i's coefficients is member i's ΔW, exactly."""
    _, space, members, basis = fitted
    for i in (0, 5):
        point = stacked(basis, member_weights(space, space.coefficients[i]))
        for name in members[i].modules:
            want = dense(members[i], name)
            assert torch.allclose(dense(point, name), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_zero_is_the_mean_and_weights_sum_to_one(fitted) -> None:
    _, space, members, basis = fitted
    beta = member_weights(space, np.zeros(3))
    assert beta.sum() == pytest.approx(1.0) and np.allclose(beta, 1 / N)
    point = stacked(basis, beta)
    name = next(iter(members[0].modules))
    mean = sum(dense(m, name) for m in members) / N
    assert torch.allclose(dense(point, name), mean, atol=1e-6 * float(mean.abs().max()) + 1e-9)
    # factors, not dense: rank min(in, Σ r_i) after the exact QR reduction of the stack
    assert point.modules[name].kind == "lora"
    assert point.modules[name].rank == min(point.modules[name].shape[1], sum(m.modules[name].rank for m in members))


def test_refactor_is_the_truncated_svd_and_reports_energy(fitted) -> None:
    _, space, _, basis = fitted
    point = stacked(basis, member_weights(space, space.coefficients[2, :4]))
    full, kept_full = refactor(point, 10_000)
    short, kept = refactor(point, 2)
    for name in point.modules:
        want = dense(point, name)
        assert torch.allclose(dense(full, name), want, atol=1e-5 * float(want.abs().max()))
        assert kept_full[name] == pytest.approx(1.0)
        u, s, vt = torch.linalg.svd(want)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        assert torch.allclose(dense(short, name), best, atol=1e-5 * float(want.abs().max()))
        assert kept[name] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
        assert short.modules[name].rank == 2
    with pytest.raises(wsa.errors.ConfigError):
        refactor(point, 0)


def test_the_basis_is_differentiable_and_places_outside_adapters(fitted) -> None:
    """Gradients reach the weights (inversion's path), and an outside adapter of another rank is placed at
    the coefficients its dense ΔW inner products with the members give (``transform_adapters``, from factors)."""
    _, _, members, basis = fitted
    w = torch.full((2, N), 1.0 / N, dtype=torch.float64, requires_grad=True)
    loss = 0.0
    for value in basis.factors(w).values():  # (down, up) of LoRA modules; dense ΔW otherwise
        loss = loss + ((value[1] @ value[0]) if isinstance(value, tuple) else value).pow(2).sum()
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and float(w.grad.abs().max()) > 0
    outside = stacked(basis, np.linspace(-1, 1, N))  # rank min(in, Σ r) ≠ the members' rank 2
    store, space = fitted[0], fitted[1]
    g = np.array([sum(float((dense(outside, n) * dense(m, n)).sum()) for n in m.modules) for m in members])
    m = space.gram_row_means
    want = (g - g.mean()) @ space.dual_weights - (m - m.mean()) @ space.dual_weights
    got = space.transform_adapters([outside], store, block_rows=5)[0]  # blocks smaller than N
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
