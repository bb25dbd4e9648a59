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
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
import torch

from wsa.errors import ConfigError
from wsa.space import heldout_split
from wsa.space.fit import _physical_memory

if TYPE_CHECKING:
    from wsa.delta_space import DeltaSpace


@dataclass(frozen=True)
class _GramPlan:
    """How ⟨ΔW_i, ΔW_j⟩ is summed from a row layout: LoRA factor pairs, plus plain dot products of the
    columns that already hold dense values (``full`` modules of a canonical store, LoRA biases)."""

    lora: tuple[tuple[slice, slice, tuple[int, int], tuple[int, int], float], ...]  # down, up, shapes, scale
    dense: np.ndarray  # column indices summed as a plain dot product


def _gram_plan(layout) -> _GramPlan:
    lora, dense = [], []
    for ml in layout.modules:
        names = {p.name: p for p in ml.parts}
        if ml.kind == "full":
            dense.extend(range(ml.offset, ml.offset + ml.size))
            continue
        if ml.kind != "lora" or not {"down", "up"} <= set(names) or set(names) - {"down", "up", "bias"}:
            raise ConfigError(
                f"module {ml.name!r} is {ml.kind} with parts {sorted(names)}: the Gram route reads plain LoRA "
                "factors and dense ΔW; ingest the collection with --repr canonical"
            )
        down, up = names["down"], names["up"]
        r = ml.rank
        if "bias" in names:
            dense.extend(range(names["bias"].offset, names["bias"].offset + names["bias"].size))
        lora.append(
            (
                slice(down.offset, down.offset + down.size),
                slice(up.offset, up.offset + up.size),
                (r, int(np.prod(down.shape)) // r),
                (int(np.prod(up.shape)) // r, r),
                float(ml.scale),
            )
        )
    return _GramPlan(tuple(lora), np.asarray(dense, dtype=np.int64))


def gram_block(rows_a: np.ndarray, rows_b: np.ndarray, layout, device: str | torch.device = "cpu") -> np.ndarray:
    """⟨ΔW_i, ΔW_j⟩ for rows ``a`` × rows ``b`` of a raw or canonical layout, float64 (na, nb)."""
    plan = layout if isinstance(layout, _GramPlan) else _gram_plan(layout)
    a = torch.as_tensor(np.asarray(rows_a, dtype=np.float32), device=device)
    b = torch.as_tensor(np.asarray(rows_b, dtype=np.float32), device=device)
    na, nb = a.shape[0], b.shape[0]
    out = torch.zeros(na, nb, dtype=torch.float64, device=device)
    for dcols, ucols, dshape, ushape, scale in plan.lora:
        r = dshape[0]
        da, db = a[:, dcols].reshape(na, *dshape), b[:, dcols].reshape(nb, *dshape)  # (n, r, in)
        ua, ub = a[:, ucols].reshape(na, *ushape), b[:, ucols].reshape(nb, *ushape)  # (n, out, r)
        if r == 1:
            g = (ua[:, :, 0] @ ub[:, :, 0].T) * (da[:, 0] @ db[:, 0].T)
        else:
            # Two GEMMs over all pairs at once (einsum on the strided slices ran at a tenth of BLAS speed):
            # gu[a,p,b,q] = (B_aᵀ·B_b)_pq, gd[a,p,b,q] = (A_a·A_bᵀ)_pq.
            n_out = ushape[0]
            xa = ua.permute(1, 0, 2).reshape(n_out, na * r)
            ya = da.reshape(na * r, -1)
            gu = xa.T @ (xa if rows_b is rows_a else ub.permute(1, 0, 2).reshape(n_out, nb * r))
            gd = ya @ (ya if rows_b is rows_a else db.reshape(nb * r, -1)).T
            g = (gu * gd).reshape(na, r, nb, r).sum(dim=(1, 3))
        out += (scale * scale) * g.double()
    if plan.dense.size:
        cols = torch.as_tensor(plan.dense, device=device)
        out += a[:, cols].double() @ b[:, cols].double().T
    return out.cpu().numpy()


def gram_matrix(
    store, *, block_rows: int = 2048, device: str = "cpu", progress: bool = True, budget: int | None = None
) -> np.ndarray:
    """The uncentred N × N float64 matrix ⟨ΔW_i, ΔW_j⟩ of a store, two row blocks in memory at a time.

    Rows too wide for two blocks within ``budget`` bytes (default: an eighth of the machine's memory) are
    summed module run by module run instead (:func:`_gram_by_columns`).
    """
    from tqdm.auto import tqdm

    n = len(store)
    plan = _gram_plan(store.layout)  # fails early on layouts it cannot read
    key = _cache_key(store)
    if key in _GRAM_CACHE:
        return _GRAM_CACHE[key].copy()  # callers centre K in place
    need = 8 * n * n
    if need > _physical_memory() // 2:
        raise ConfigError(
            f"{store.path}: the Gram route holds an N × N float64 matrix, {need / 1e9:.1f} GB for {n} adapters — "
            "more than half this machine's memory; analyse a subset, a machine with more memory, or (uniform-rank "
            "collections only) --space explicit on raw factors"
        )
    budget = budget or _physical_memory() // 8
    row_bytes = 4 * store.n_features
    if 2 * min(n, block_rows) * row_bytes > budget:
        return _remember(key, _gram_by_columns(store, plan, budget, device, progress))
    K = np.empty((n, n), dtype=np.float64)
    starts = list(range(0, n, block_rows))
    bar = tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="gram", disable=None if progress else True)
    for bi, a in enumerate(starts):
        rows_a = store.read_rows(range(a, min(n, a + block_rows)))
        for b in starts[bi:]:
            rows_b = rows_a if b == a else store.read_rows(range(b, min(n, b + block_rows)))
            g = gram_block(rows_a, rows_b, plan, device)
            K[a : a + len(rows_a), b : b + len(rows_b)] = g
            K[b : b + len(rows_b), a : a + len(rows_a)] = g.T
            bar.update(1)
    bar.close()
    return _remember(key, K)


#: Gram matrices already computed in this process (the fit and the held-out test need the same one: at DiT
#: scale each costs a full read of the store and N²·r²·Σ(out+in) multiply-adds). Only small ones are kept.
_GRAM_CACHE: dict[tuple, np.ndarray] = {}
_CACHE_BYTES = 256 << 20


def _cache_key(store) -> tuple:
    st = store.matrix_path.stat()
    return (str(store.matrix_path.resolve()), st.st_size, st.st_mtime_ns, len(store))


def _remember(key: tuple, K: np.ndarray) -> np.ndarray:
    if K.nbytes <= _CACHE_BYTES:
        _GRAM_CACHE.clear()  # one store at a time
        _GRAM_CACHE[key] = K.copy()
    return K


def _gram_by_columns(store, plan: _GramPlan, budget: int, device, progress: bool) -> np.ndarray:
    """The Gram matrix of wide rows (DiT-sized LoRAs: ~80 M factors each) one run of modules at a time.

    Why: two blocks of such rows do not fit in memory (a row is ~0.3 GB as float32), and small row
    blocks would read the store N / block times. Every pair's inner product is a sum over modules, so
    the store is read once, in column runs holding all N rows of a few modules (``budget`` bytes), and
    each run's contribution is added to K.
    """
    from tqdm.auto import tqdm

    n = len(store)
    per_column = 4 * n
    runs: list[tuple[int, int, list, np.ndarray]] = []
    start, end, entries = None, None, []
    dense = np.asarray(plan.dense, dtype=np.int64)

    def close() -> None:
        if start is not None:
            inside = dense[(dense >= start) & (dense < end)] - start
            runs.append((start, end, entries, inside))

    for entry in sorted(plan.lora, key=lambda e: min(e[0].start, e[1].start)):
        lo = min(entry[0].start, entry[1].start)
        hi = max(entry[0].stop, entry[1].stop)
        if start is not None and (max(end, hi) - start) * per_column > budget:
            close()
            start, entries = None, []
        if start is None:
            start, end = lo, hi
        else:
            end = max(end, hi)
        entries.append(entry)
    close()
    covered = np.zeros(0, dtype=np.int64)
    if runs:
        covered = np.concatenate([np.arange(s, e) for s, e, _, _ in runs])
    rest = np.setdiff1d(dense, covered)  # dense columns outside every LoRA run (full modules)
    K = np.zeros((n, n), dtype=np.float64)
    bar = tqdm(total=len(runs) + (1 if rest.size else 0), desc="gram", disable=None if progress else True)
    for s, e, items, inside in runs:
        cols = _read_columns(store, s, e)
        shifted = tuple(
            (slice(d.start - s, d.stop - s), slice(u.start - s, u.stop - s), ds, us, sc) for d, u, ds, us, sc in items
        )
        K += gram_block(cols, cols, _GramPlan(shifted, inside), device)
        del cols  # before the next run is read: one run in memory, not two
        bar.update(1)
    for lo in range(0, rest.size, max(1, budget // per_column)):
        chunk = rest[lo : lo + max(1, budget // per_column)]
        cols = _read_columns(store, int(chunk.min()), int(chunk.max()) + 1)[:, chunk - chunk.min()]
        c = torch.as_tensor(cols, dtype=torch.float64, device=device)
        K += (c @ c.T).cpu().numpy()
    if rest.size:
        bar.update(1)
    bar.close()
    return K


def _read_columns(store, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of every row as float32 (one ``pread`` per row: no memory map, bounded RSS)."""
    import os

    dtype = np.dtype(store.manifest["dtype"])
    row_bytes = store.n_features * dtype.itemsize
    out = np.empty((len(store), stop - start), dtype=np.float32)
    fd = os.open(store.matrix_path, os.O_RDONLY)
    try:
        base = store._data_offset + start * dtype.itemsize
        size = (stop - start) * dtype.itemsize
        for i in range(len(store)):
            data = os.pread(fd, size, base + i * row_bytes)
            out[i] = np.frombuffer(data, dtype=dtype)
    finally:
        os.close(fd)
    return out


def _top_eigen(K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of a symmetric matrix (LAPACK syevr, K overwritten), descending, λ clipped at 0,
    eigenvectors signed so the largest-|·| entry of each is positive (deterministic output)."""
    n = K.shape[0]
    values, vectors = scipy.linalg.eigh(K, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False)
    order = np.argsort(values)[::-1]
    lam = np.clip(values[order], 0.0, None)
    U = vectors[:, order]
    flip = np.sign(U[np.abs(U).argmax(axis=0), np.arange(k)])
    flip[flip == 0] = 1
    return lam, U * flip


def heldout_reconstruction_gram(
    store,
    ks: list[int],
    *,
    test_fraction: float = 0.2,
    random_state: int | None = 0,
    block_rows: int = 2048,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, list]:
    """:func:`wsa.space.heldout_reconstruction` for ΔW from factor Grams (same split, same error).

    Kernel-PCA form: the space is fitted on the train rows' centred Gram; a held-out row's coordinates
    are its train-centred inner products with the members times the dual weights, and its relative
    error for k PCs is ``1 − Σ_{j≤k} c_j² / ‖ΔW − mean_train‖²``.
    """
    train, test = heldout_split(len(store), test_fraction, random_state)
    n_train = len(train)
    k_list = sorted({int(k) for k in ks})
    if not k_list or k_list[0] < 0 or k_list[-1] > n_train - 1:
        raise ConfigError(f"ks must be integers in [0, {n_train - 1}] (train rows − 1); got {ks!r}")
    K = gram_matrix(store, block_rows=block_rows, device=device, progress=progress)
    k_tt = K[np.ix_(train, train)]
    k_st = K[np.ix_(test, train)]
    k_ss = np.diagonal(K)[test].copy()
    del K
    col_mean = k_tt.mean(axis=0)
    all_mean = float(col_mean.mean())
    k_st_centred = k_st - k_st.mean(axis=1, keepdims=True) - col_mean[None, :] + all_mean
    norm_s = k_ss - 2.0 * k_st.mean(axis=1) + all_mean
    k_tt -= col_mean[None, :]
    k_tt -= col_mean[:, None]
    k_tt += all_mean
    norm_t = np.diagonal(k_tt).copy()
    k_max = max(k_list[-1], 1)
    lam, U = _top_eigen(k_tt, k_max)
    root = np.sqrt(lam)
    coef_t = U * root
    coef_s = k_st_centred @ np.divide(U, root, out=np.zeros_like(U), where=root > 0)

    def errors(coef: np.ndarray, norm: np.ndarray) -> list[float]:
        captured = np.cumsum(coef**2, axis=1)
        out = []
        for k in k_list:
            kept = captured[:, k - 1] if k > 0 else np.zeros(len(norm))
            rel = np.divide(norm - kept, norm, out=np.zeros_like(norm), where=norm > 0)
            out.append(float(np.clip(rel, 0.0, 1.0).mean()))
        return out

    return {
        "k": k_list,
        "train_error": errors(coef_t, norm_t),
        "heldout_error": errors(coef_s, norm_s),
        "heldout_ids": [store.ids[i] for i in test],
        "n_train": int(n_train),
    }


def fit_delta_gram(
    store,
    n_components: int,
    *,
    block_rows: int = 2048,
    device: str = "cpu",
    progress: bool = True,
) -> DeltaSpace:
    """Centred PCA of the members' ΔW from their factors (dual form, exact eigendecomposition)."""
    from wsa.delta_space import DeltaSpace  # here, not at the top: the value type may use this kernel

    n = len(store)
    k = int(n_components)
    if not 1 <= k <= n - 1:
        raise ConfigError(f"n_components must be in [1, {n - 1}] (N − 1 for centred data); got {k}")
    t0 = time.perf_counter()
    K = gram_matrix(store, block_rows=block_rows, device=device, progress=progress)
    t_gram = time.perf_counter() - t0
    # Double centring: K̃ = H K H with H = I − 11ᵀ/N (the Gram of ΔW_i − mean ΔW).
    row_mean = K.mean(axis=1, keepdims=True)
    gram_row_means = row_mean[:, 0].copy()
    K -= row_mean
    K -= K.mean(axis=0, keepdims=True)
    row_sq_norms = np.diagonal(K).copy()
    total = float(row_sq_norms.sum()) / (n - 1)
    t1 = time.perf_counter()
    lam, U = _top_eigen(K, k)  # overwrites K: memory stays N² + N·k
    del K
    root = np.sqrt(lam)
    coefficients = (U * root).astype(np.float32)
    dual = np.divide(U, root, out=np.zeros_like(U), where=root > 0)
    return DeltaSpace(
        coefficients=coefficients,
        explained_variance=lam / (n - 1),
        total_variance=total,
        dual_weights=dual,
        row_sq_norms=row_sq_norms,
        gram_row_means=gram_row_means,
        ids=tuple(store.ids),
        config={
            "method": "factor-gram",
            "center": True,
            "standardize": False,
            "device": str(device),
            "n_components": k,
            "block_rows": block_rows,
            "gram_seconds": round(t_gram, 3),
            "eig_seconds": round(time.perf_counter() - t1, 3),
            "store_path": str(store.path),
            "repr": store.repr,
        },
    )
