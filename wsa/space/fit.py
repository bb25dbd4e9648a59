"""Fitting a :class:`~wsa.space.value.Space`: solver choice, the exact / randomized / streaming paths, CPU or GPU."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from wsa.devices import resolve_device
from wsa.errors import ConfigError
from wsa.space.solvers import (
    _Clock,
    _exact_svd,
    _flip_signs,
    _randomized_range,
    _rayleigh_ritz,
)
from wsa.space.sources import _centre_in_memory, _make_source, _Moments, _Source, _Standardization, _standardization
from wsa.space.value import (
    _GPU_BLOCK_BYTES,
    EXACT_MAX_DIM,
    SOLVERS,
    Space,
    _default_block_rows,
)
from wsa.store import Store

# --------------------------------------------------------------------------------------------- fitting


def _gpu_cache_bytes(dev: torch.device, requested: int | None) -> int:
    if dev.type != "cuda":
        return 0
    if requested is not None:
        return int(requested)
    free, _ = torch.cuda.mem_get_info(dev)
    return int(min(14 * 2**30, free // 2))


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a small machine


def _check_int(name: str, value: Any, low: int, high: int | None = None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be an integer {bound}{' or None' if allow_none else ''}; got {value!r}")


def _choose_solver(solver: str, n: int, d: int, k: int, budget: int, dev: torch.device) -> str:
    """Resolve ``auto``; on a GPU the in-memory solvers must also fit in half its free memory."""
    if solver != "auto":
        return solver
    in_memory = 4 * n * d
    exact_extra = 16 * n * d if n > d else 8 * (n * n + k * d)  # float64 copy + U, or Gram + components
    gpu_room = torch.cuda.mem_get_info(dev)[0] // 2 if dev.type == "cuda" else math.inf
    exact_on_gpu = exact_extra if n > d else 8 * (n * n + k * d + n * _default_block_rows(d))
    if min(n, d) <= EXACT_MAX_DIM and in_memory + exact_extra <= budget and exact_on_gpu <= gpu_room:
        return "exact"
    return "randomized" if in_memory <= min(budget, gpu_room) else "streaming"


def fit_space(
    store_or_matrix: Store | np.ndarray,
    n_components: int = 100,
    *,
    center: bool = True,
    standardize: bool = False,
    solver: str = "auto",
    rows: Sequence[int] | np.ndarray | None = None,
    n_oversamples: int = 10,
    n_iter: int = 4,
    block_rows: int | None = None,
    device: str = "auto",
    random_state: int | None = 0,
    memory_budget_bytes: int | None = None,
    gpu_cache_bytes: int | None = None,
    progress: bool = True,
) -> Space:
    """Fit the w2w space: PCA of the rows of a store (or matrix), exactly or out of core.

    Parameters
    ----------
    store_or_matrix : Store or ndarray of shape (n_rows, n_features)
        A :class:`wsa.Store` (float32 or float16, memory-mapped; ids from the store) or a float array
        (ids ``"0"…``). Never modified.
    n_components : int, default=100
        Components kept, ``1 <= n_components <= min(n_samples, n_features)``.
    center : bool, default=True
        Subtract the column means (PCA). ``False`` gives an uncentered SVD; ``mean`` is then zeros.
    standardize : bool, default=False
        Divide by the column standard deviation with ``ddof=1`` (w2w z-scores with ``torch.std``, whose
        default is ``ddof=1``; scikit-learn's ``StandardScaler`` uses ``ddof=0``, which scales every column by
        the same extra ``sqrt(n / (n - 1))`` and so leaves the components unchanged). Zero-variance columns
        keep scale 1.
    solver : {"auto", "exact", "randomized", "streaming"}, default="auto"
        ``auto``: exact when ``min(n, D) <= 4000`` and it fits the memory budget, else randomized when the
        float32 data fit, else streaming. The choice is recorded in ``config["solver"]``.
    rows : sequence of int, optional
        Strictly increasing row indices to fit on (train/held-out splits); default all rows.
    n_oversamples : int, default=10
        Extra sketch columns for the randomized and streaming solvers (``l = n_components + n_oversamples``
        rounded up to a multiple of 8, capped at ``min(n, D)``; recorded as ``config["n_columns"]``).
    n_iter : int, default=4
        Power iterations for the randomized and streaming solvers (each is two passes over the data when
        streaming). More iterations sharpen components whose singular values are close to the cut.
    block_rows : int, optional
        Rows per block when reading the data; default about 64 MB of float32 per block.
    device : str, default="auto"
        ``"auto"`` (cuda if available, else cpu), ``"cpu"`` or ``"cuda[:N]"``. Matmuls on blocks run in
        float32 there; the small final decompositions in float64.
    random_state : int or None, default=0
        Seed of the random sketch (and of the basis completion of the exact solver beyond the data's rank).
        ``None`` draws a seed, recorded in ``config["random_state"]``.
    memory_budget_bytes : int, optional
        Memory ``auto`` may use for in-memory solvers; default a quarter of physical RAM.
    gpu_cache_bytes : int, optional
        Streaming on CUDA: GPU memory for an fp16 copy of the standardized rows, so passes after the
        first read the GPU, not the host (default 14 GiB, at most half the free memory; 0 turns it off).
        A matrix that does not fit is streamed from the host on every pass.
    progress : bool, default=True
        Show a tqdm bar on stderr over blocks read (``disable=None``: hidden when stderr is not a TTY).

    Returns
    -------
    Space

    Raises
    ------
    ConfigError
        A parameter value that is not allowed, or data containing NaN/Inf.
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {list(SOLVERS)}; got {solver!r}")
    for name, flag in (("center", center), ("standardize", standardize), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False; got {flag!r}")
    source = _make_source(store_or_matrix, rows)
    n, d = source.n, source.d
    if n < 2:
        raise ConfigError(f"rows must select at least 2 rows (variance needs n - 1 > 0); got {n}")
    _check_int("n_components", n_components, 1, min(n, d))
    _check_int("n_oversamples", n_oversamples, 0)
    _check_int("n_iter", n_iter, 0)
    _check_int("block_rows", block_rows, 1, allow_none=True)
    _check_int("random_state", random_state, 0, allow_none=True)
    _check_int("memory_budget_bytes", memory_budget_bytes, 1, allow_none=True)
    _check_int("gpu_cache_bytes", gpu_cache_bytes, 0, allow_none=True)
    if not isinstance(device, str):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}")
    dev = resolve_device(device)
    k = int(n_components)
    step = int(block_rows) if block_rows is not None else _default_block_rows(d)
    budget = int(memory_budget_bytes) if memory_budget_bytes is not None else _physical_memory() // 4
    used = _choose_solver(solver, n, d, k, budget, dev)
    seed = int(random_state) if random_state is not None else int(np.random.SeedSequence().entropy % 2**31)
    # Rounded up to a multiple of 8: float32 GEMM kernels ran up to 1.4× faster at l = 112 than at 110.
    n_columns = min(-(-(k + int(n_oversamples)) // 8) * 8, n, d)
    where = str(source.store.path) if source.store is not None else "matrix"

    clock = _Clock(dev)
    n_blocks = math.ceil(n / step)
    passes = 3 + 2 * int(n_iter) if used == "streaming" else 1
    bar = tqdm(
        total=passes * n_blocks,
        desc=f"fit_space ({used})",
        unit="block",
        disable=None if progress else True,
        file=sys.stderr,
    )
    with bar:
        if used == "streaming":
            std, vt, s, coefficients = _fit_streaming(
                source,
                k,
                n_columns,
                int(n_iter),
                seed,
                dev,
                step,
                center,
                standardize,
                bar,
                where,
                _gpu_cache_bytes(dev, gpu_cache_bytes),
                clock,
            )
        else:
            X = np.empty((n, d), dtype=np.float32)
            mom = _Moments(d)
            if source.store is not None and source.rows is None and center:  # read straight into X
                for start in range(0, n, step):
                    source.store.read_rows(range(start, min(n, start + step)), out=X[start : start + step])
                    bar.update()
            else:
                for start, block in source.blocks(step):
                    X[start : start + len(block)] = block
                    if not center:
                        mom.update(block)
                    bar.update()
            if center:
                std = _centre_in_memory(X, step, standardize, where)
            else:
                std = _standardization(mom, center, standardize, where)
                for start in range(0, n, step):
                    std.apply_(X[start : start + step])
            clock.lap("load")
            if used == "exact":
                vt, s = _exact_svd(X, k, dev, seed)
                vt = _flip_signs(vt)
                components = vt.to(torch.float32).cpu().numpy()
                coefficients = X @ components.T
            else:
                xt = torch.from_numpy(X).to(dev)
                q = _randomized_range(lambda w: xt @ w, lambda u: xt.T @ u, n, n_columns, int(n_iter), seed, dev)
                clock.lap("range")
                b = xt @ q
                del xt
                vt, s, coef = _rayleigh_ritz(q, b, k)
                components = vt.to(torch.float32).cpu().numpy()
                coefficients = coef.to(torch.float32).cpu().numpy()
            del X
            clock.lap("components")
    if used == "streaming":
        components = vt.to(torch.float32).cpu().numpy()
    s64 = s.to(torch.float64).cpu().numpy()

    from wsa import __version__

    store = source.store
    config = {
        "solver": used,
        "solver_requested": solver,
        "center": center,
        "standardize": standardize,
        "n_components": k,
        "n_oversamples": int(n_oversamples),
        "n_columns": n_columns if used != "exact" else None,
        "n_iter": int(n_iter),
        "random_state": seed,
        "random_state_requested": None if random_state is None else int(random_state),
        "block_rows": step,
        "device": str(dev),
        "memory_budget_bytes": budget,
        "gpu_cache_bytes": _gpu_cache_bytes(dev, gpu_cache_bytes) if used == "streaming" else 0,
        "source": "store" if store is not None else "array",
        "store_path": str(store.path) if store is not None else None,
        "store_fingerprint": store.fingerprint if store is not None else None,
        "repr": store.repr if store is not None else None,
        "dtype": str(source.matrix.dtype),
        "n_features": d,
        "rows_subset": rows is not None,
        "versions": {"wsa": __version__, "numpy": np.__version__, "torch": torch.__version__},
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "phases": clock.phases,
    }
    return Space(
        mean=std.mean,
        scale=std.scale,
        components=components,
        singular_values=s64,
        explained_variance=s64**2 / (n - 1),
        total_variance=std.total_variance,
        n_samples=n,
        ids=source.ids,
        coefficients=np.ascontiguousarray(coefficients, dtype=np.float32),
        config=config,
    )


def _fit_streaming(
    source: _Source,
    k: int,
    n_columns: int,
    n_iter: int,
    seed: int,
    dev: torch.device,
    step: int,
    center: bool,
    standardize: bool,
    bar: tqdm,
    where: str,
    gpu_cache_bytes: int = 0,
    clock: _Clock | None = None,
) -> tuple[_Standardization, torch.Tensor, torch.Tensor, np.ndarray]:
    """Out-of-core randomized SVD: every product with X̃ is a pass over blocks; X̃ is never held whole.

    On a GPU with room for it (``gpu_cache_bytes``), the first pass also keeps an fp16 copy of the rows
    on the device — shifted and scaled by the first block's column means and spreads, so fp16 holds the
    variation, not the offsets — and every later pass reads that copy at memory speed instead of
    crossing the host link again (exact centring and scaling are applied on the fly in float32).
    """
    n, d = source.n, source.d
    clock = clock or _Clock(dev)
    mom = _Moments(d)
    cache: torch.Tensor | None = None
    shift = spread = None
    if dev.type == "cuda" and gpu_cache_bytes > 0 and n * d * 2 <= gpu_cache_bytes:
        cache = torch.empty(n, d, dtype=torch.float16, device=dev)
    for start, block in source.blocks(step, owned=dev.type != "cuda"):
        xb = _to_device(block, dev) if dev.type == "cuda" else block
        mom.update(xb)
        if cache is not None:
            xf = xb.float()
            if shift is None:
                shift = xf.mean(dim=0)
                spread = xf.std(dim=0) if xf.shape[0] > 1 else torch.ones_like(shift)
                spread = torch.where(spread > 0, spread, torch.ones_like(spread))
            part = ((xf - shift) / spread).half()
            if not bool(torch.isfinite(part).all()):  # beyond fp16's range: stream from the host instead
                cache = None
            else:
                cache[start : start + xb.shape[0]] = part
        bar.update()
    std = _standardization(mom, center, standardize, where)
    clock.lap("first_pass")
    if cache is not None:
        mean_t = torch.as_tensor(std.mean, device=dev)
        scale_t = torch.as_tensor(std.scale, device=dev)
        offset = (shift - mean_t) / scale_t  # x̃ = (c·spread + shift − mean) / scale
        factor = spread / scale_t

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        if cache is not None:
            # Larger blocks than the host reads (~256 MB of float32): fewer, fuller GEMMs.
            rows = max(step, _GPU_BLOCK_BYTES // (4 * d))
            for start in range(0, n, rows):
                xb = cache[start : start + rows].float()
                yield start, xb.mul_(factor).add_(offset)
                bar.update(-(-min(n, start + rows) // step) - (-(-start // step)))
            return
        for start, block in source.blocks(step, owned=dev.type != "cuda"):
            xb = _to_device(block, dev)
            std.apply_(xb)
            yield start, xb
            bar.update()

    def matmul(w: torch.Tensor) -> torch.Tensor:  # X̃ @ w: (n, l)
        out = torch.empty(n, w.shape[1], dtype=torch.float32, device=dev)
        for start, xb in blocks():
            torch.mm(xb, w, out=out[start : start + xb.shape[0]])
        return out

    def rmatmul(u: torch.Tensor) -> torch.Tensor:  # X̃ᵀ @ u: (D, l)
        acc = torch.zeros(d, u.shape[1], dtype=torch.float32, device=dev)
        for start, xb in blocks():
            acc.addmm_(xb.T, u[start : start + xb.shape[0]])
        return acc

    q = _randomized_range(matmul, rmatmul, n, n_columns, n_iter, seed, dev)
    clock.lap("range")
    b = matmul(q)  # the last pass: with the GPU copy gone, the small decompositions have its memory
    cache = None
    clock.lap("projection")
    vt, s, coefficients = _rayleigh_ritz(q, b, k)
    clock.lap("components")
    return std, vt, s, coefficients.to(torch.float32).cpu().numpy()


def _to_device(block: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A host block on ``dev``, without an extra host copy of a read-only view (it is only read).

    ``non_blocking``: from page-locked memory (a pinned tensor's ``.numpy()``) the copy overlaps the
    next block's work; from ordinary memory CUDA copies synchronously either way.
    """
    if dev.type != "cuda":
        return torch.from_numpy(block)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(block).to(dev, non_blocking=True)
