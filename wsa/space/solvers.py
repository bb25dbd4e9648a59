"""The linear algebra the PCA solvers share: exact SVD, the randomized range finder, Rayleigh–Ritz, one sign rule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from wsa.space.value import (
    _BLOCK_BYTES,
    _SKETCH_ROWS,
)

# --------------------------------------------------------------------------------------------- solvers


class _Clock:
    """Seconds (and, on CUDA, the running peak of allocated GPU memory) at the end of each phase of a fit.

    Why: a fit's total time says little about where to look; the phases go into ``config["phases"]``.
    The peak is read, never reset, so callers measuring around ``fit_space`` still see the whole fit.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.phases: dict[str, dict[str, float]] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        entry: dict[str, float] = {}
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / 2**30, 3)
        now = time.perf_counter()
        self.phases[name] = {"seconds": round(now - self._last, 3), **entry}
        self._last = now


def _orth(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a, mode="reduced").Q


def _sketch(n: int, n_columns: int, seed: int) -> torch.Tensor:
    """Gaussian Ω (n × l, float32) drawn on the CPU from ``seed`` in fixed 4096-row chunks.

    Why fixed chunks: every device and solver path starts from the same Ω whatever its block size.
    """
    chunks = []
    for c, start in enumerate(range(0, n, _SKETCH_ROWS)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chunks.append(torch.randn(min(_SKETCH_ROWS, n - start), n_columns, generator=g, dtype=torch.float32))
    return torch.cat(chunks)


def _randomized_range(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    rmatmul: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    n_columns: int,
    n_iter: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """An orthonormal basis Q (D × l, float32) of the top right singular subspace of X̃.

    Halko et al. 2011, Alg. 4.4 (subspace iteration), run on the parameter side: Q = orth(X̃ᵀΩ), then
    ``n_iter`` times Q = orth(X̃ᵀ·orth(X̃·Q)). Why that side: the components are then chosen inside
    span(Q) by :func:`_rayleigh_ritz`, and their coefficients come with the last product X̃·Q — one pass
    fewer than projecting QᵀX̃ and then the rows, at the same accuracy (measured at w2w's shape), and
    on a GPU the copy of the rows can be freed before the small decompositions. On CUDA these products
    run in TF32: they only choose the subspace.
    """
    with _tf32(device):
        q = _orth(rmatmul(_sketch(n, n_columns, seed).to(device)))
        for _ in range(n_iter):
            q = _orth(rmatmul(_orth(matmul(q))))
    return q


def _rayleigh_ritz(q: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Components (k × D, float64), singular values and coefficients (n × k) from Q and B = X̃·Q.

    ``B = U·S·Wᵀ`` (through QR of B and an SVD of the small R, in float64) gives the best k directions
    within span(Q): components ``(Q·W)ᵀ``; their coefficients ``X̃·Q·W = U·S`` come with B, so no
    further pass over the data is needed. Signs follow scikit-learn's ``svd_flip(u_based_decision=False)``.
    """
    qb, r = torch.linalg.qr(b.to(torch.float64), mode="reduced")
    u_r, s, wt = torch.linalg.svd(r, full_matrices=False)
    vt = (q.to(torch.float64) @ wt[:k].T).T
    sign = _component_signs(vt)
    coefficients = (qb @ u_r[:, :k]) * (s[:k] * sign)
    return vt * sign[:, None], s[:k], coefficients


@contextmanager
def _tf32(device: torch.device) -> Iterator[None]:
    """TF32 float32 matmuls inside the block (CUDA only), the caller's setting restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _exact_svd(X: np.ndarray, k: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` right singular vectors (float64, (k, D)) and values of the in-memory X̃ (n, D)."""
    n, d = X.shape
    if n > d:
        _, s, vt = torch.linalg.svd(torch.from_numpy(X).to(device, torch.float64), full_matrices=False)
        return vt[:k], s[:k]
    # n <= D: eigh of the n × n Gram matrix in float64, built from column chunks so no n × D float64 copy exists.
    step = max(1, _BLOCK_BYTES // (8 * n))
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    for j in range(0, d, step):
        xc = torch.from_numpy(X[:, j : j + step]).to(device, torch.float64)
        gram.addmm_(xc, xc.T)
    evals, evecs = torch.linalg.eigh(gram)
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :k]
    v = torch.empty(k, d, dtype=torch.float64, device=device)
    for j in range(0, d, step):
        v[:, j : j + step] = u.T @ torch.from_numpy(X[:, j : j + step]).to(device, torch.float64)
    # Eigenvalues of the float64 Gram are good to ~n·eps·λ₀, so singular values to s₀·√(n·eps): below
    # (10× that) a direction cannot be recovered from the Gram; complete the basis with seeded random rows.
    # (A float32-style cut, s₀·max(n, D)·eps32 = 1.2 % of s₀ at w2w's width, discarded real components.)
    tol = float(s[0]) * 10.0 * math.sqrt(n * float(np.finfo(np.float64).eps))
    small = s <= tol
    v[~small] /= s[~small, None]
    if bool(small.any()):
        g = torch.Generator().manual_seed(seed)
        v[small] = torch.randn(int(small.sum()), d, generator=g, dtype=torch.float64).to(device)
    # The Gram route squares the condition number; one QR restores exact orthonormality (and orthogonalises
    # the completion against the real directions, which come first).
    q, r = torch.linalg.qr(v.T, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    return (q * sign).T, s


def _component_signs(vt: torch.Tensor) -> torch.Tensor:
    """±1 per row making its largest-|·| entry positive (scikit-learn ``svd_flip(u_based_decision=False)``)."""
    idx = vt.abs().argmax(dim=1)
    sign = torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), idx])
    sign[sign == 0] = 1
    return sign


def _flip_signs(vt: torch.Tensor) -> torch.Tensor:
    return vt * _component_signs(vt)[:, None]
