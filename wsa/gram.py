"""Gauge-invariant (ΔW-space) PCA of LoRA collections without materialising ΔW.

Why: a LoRA's factors are defined only up to ``(B·M, M⁻¹·A)``, so PCA of the raw factors depends on a
gauge; PCA of ΔW = s·B·A does not. But ΔW is out×in per module — 28 M numbers per SD 1.5 adapter
against 100 k factors — so a 65 k collection of ΔW would be 7 TB. The inner product of two adapters'
ΔW needs only their factors:

    ⟨ΔW_i, ΔW_j⟩ = Σ_modules s_i s_j · Σ_{p,q} (B_iᵀ B_j)_{pq} (A_i A_jᵀ)_{pq}        (r × r per module)

which costs Σ (out + in)·r² per pair — the same as an inner product of raw rows at r = 1. So the PCA of
ΔW is taken in its dual form: the N × N Gram matrix K, double-centred, eigendecomposed;
the coefficients of the members are ``U·√λ`` and a component is a weighted sum of the members' ΔW
(weights ``U/√λ``), never formed. ``fit_delta_gram`` works on any raw or canonical store of plain LoRA
modules, blockwise (bounded memory: two row blocks at a time, K itself N² float64).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from wsa.errors import ConfigError


@dataclass(frozen=True)
class DeltaSpace:
    """PCA of ΔW in dual form.

    Attributes
    ----------
    coefficients : (N, k) float32 — PC coordinates of the members (``U·√λ``).
    explained_variance : (k,) float64 — λ / (N − 1).
    total_variance : float — trace of the centred Gram / (N − 1): Σ of ΔW's column variances.
    dual_weights : (N, k) float64 — component j = Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW).
    ids : member ids.
    config : how it was fitted (seconds for the Gram and for the eigendecomposition).
    """

    coefficients: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    dual_weights: np.ndarray
    ids: tuple[str, ...]
    config: dict

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self.explained_variance / self.total_variance


def _lora_parts(layout) -> list[tuple[slice, slice, tuple[int, int], tuple[int, int], float]]:
    """Per module: (down columns, up columns, down shape, up shape, scale) of a plain-LoRA layout."""
    parts = []
    for ml in layout.modules:
        names = {p.name: p for p in ml.parts}
        if ml.kind != "lora" or set(names) != {"down", "up"}:
            raise ConfigError(
                f"module {ml.name!r} is {ml.kind} with parts {sorted(names)}: the Gram route needs plain LoRA "
                "factors (a raw or canonical store); a delta store already holds ΔW — use fit_space on it"
            )
        down, up = names["down"], names["up"]
        r = ml.rank
        d_shape = (r, int(np.prod(down.shape)) // r)
        u_shape = (int(np.prod(up.shape)) // r, r)
        parts.append(
            (
                slice(down.offset, down.offset + down.size),
                slice(up.offset, up.offset + up.size),
                d_shape,
                u_shape,
                float(ml.scale),
            )
        )
    return parts


def gram_block(rows_a: np.ndarray, rows_b: np.ndarray, layout, device: str | torch.device = "cpu") -> np.ndarray:
    """⟨ΔW_i, ΔW_j⟩ for rows ``a`` × rows ``b`` of a plain-LoRA layout, float64 (na, nb)."""
    a = torch.as_tensor(np.asarray(rows_a, dtype=np.float32), device=device)
    b = torch.as_tensor(np.asarray(rows_b, dtype=np.float32), device=device)
    na, nb = a.shape[0], b.shape[0]
    out = torch.zeros(na, nb, dtype=torch.float64, device=device)
    for dcols, ucols, dshape, ushape, scale in _lora_parts(layout):
        r = dshape[0]
        da, db = a[:, dcols].reshape(na, *dshape), b[:, dcols].reshape(nb, *dshape)  # (n, r, in)
        ua, ub = a[:, ucols].reshape(na, *ushape), b[:, ucols].reshape(nb, *ushape)  # (n, out, r)
        if r == 1:
            g = (ua[:, :, 0] @ ub[:, :, 0].T) * (da[:, 0] @ db[:, 0].T)
        else:
            gu = torch.einsum("aop,boq->abpq", ua, ub)
            gd = torch.einsum("api,bqi->abpq", da, db)
            g = (gu * gd).sum(dim=(2, 3))
        out += (scale * scale) * g.double()
    return out.cpu().numpy()


def fit_delta_gram(
    store,
    n_components: int,
    *,
    block_rows: int = 2048,
    device: str = "cpu",
    progress: bool = True,
) -> DeltaSpace:
    """Centred PCA of the members' ΔW from their factors (dual form, exact eigendecomposition)."""
    from tqdm.auto import tqdm

    n = len(store)
    k = int(n_components)
    if not 1 <= k <= n - 1:
        raise ConfigError(f"n_components must be in [1, {n - 1}] (N − 1 for centred data); got {k}")
    layout = store.layout
    _lora_parts(layout)  # fail early on non-LoRA layouts
    t0 = time.perf_counter()
    K = np.empty((n, n), dtype=np.float64)
    starts = list(range(0, n, block_rows))
    bar = tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="gram", disable=None if progress else True)
    for bi, a in enumerate(starts):
        rows_a = store.read_rows(range(a, min(n, a + block_rows)))
        for b in starts[bi:]:
            rows_b = rows_a if b == a else store.read_rows(range(b, min(n, b + block_rows)))
            g = gram_block(rows_a, rows_b, layout, device)
            K[a : a + len(rows_a), b : b + len(rows_b)] = g
            K[b : b + len(rows_b), a : a + len(rows_a)] = g.T
            bar.update(1)
    bar.close()
    t_gram = time.perf_counter() - t0
    # Double centring: K̃ = H K H with H = I − 11ᵀ/N (the Gram of ΔW_i − mean ΔW).
    row_mean = K.mean(axis=1, keepdims=True)
    K -= row_mean
    K -= K.mean(axis=0, keepdims=True)
    total = float(np.trace(K)) / (n - 1)
    t1 = time.perf_counter()
    values, vectors = np.linalg.eigh(K)
    order = np.argsort(values)[::-1][:k]
    lam = np.clip(values[order], 0.0, None)
    U = vectors[:, order]
    # Sign rule: the largest-|·| coefficient of each component positive (deterministic output).
    flip = np.sign(U[np.abs(U).argmax(axis=0), np.arange(k)])
    flip[flip == 0] = 1
    U = U * flip
    root = np.sqrt(lam)
    coefficients = (U * root).astype(np.float32)
    dual = np.divide(U, root, out=np.zeros_like(U), where=root > 0)
    return DeltaSpace(
        coefficients=coefficients,
        explained_variance=lam / (n - 1),
        total_variance=total,
        dual_weights=dual,
        ids=tuple(store.ids),
        config={
            "method": "factor-gram",
            "n_components": k,
            "block_rows": block_rows,
            "gram_seconds": round(t_gram, 3),
            "eig_seconds": round(time.perf_counter() - t1, 3),
            "store_path": str(store.path),
            "repr": store.repr,
        },
    )
