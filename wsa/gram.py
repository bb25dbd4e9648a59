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
modules, in one of two ways, chosen by memory (``solver="auto"``):

* ``"exact"``: K in memory as N² float64, double-centred, LAPACK ``eigh`` for the top k. Up to ~27 k
  adapters on 24 GB (8·N² within a quarter of the machine's memory).
* ``"randomized"``: K computed once, upper-triangle tiles only, into a float32 file on disk
  (:class:`_DiskGram`, resumable: a tile that was written stays written), then a randomized subspace
  iteration whose products K̃·Ω stream the tiles, centring each tile on the fly. Memory O(N·l + rows of
  a few tiles); disk 2·N² bytes (8.5 GB at 65 k). Why not recompute K per product: one exact K is
  N²·Σ(out+in) multiply-adds (4·10¹⁴ at w2w's 65 k, about an hour on 2 cores); a product with the
  stored K is N²·l (a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
import torch

from wsa.atomic import write_bytes, write_with
from wsa.errors import ConfigError, StoreError
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
        if r == 1:  # in place: the element-wise work on (na, nb) was a third of the GEMMs' time at 2048²
            g = a[:, ucols] @ b[:, ucols].T
            g.mul_(a[:, dcols] @ b[:, dcols].T)
            out.add_(g, alpha=scale * scale)  # float32 g summed into float64, as before
            continue
        da, db = a[:, dcols].reshape(na, *dshape), b[:, dcols].reshape(nb, *dshape)  # (n, r, in)
        ua, ub = a[:, ucols].reshape(na, *ushape), b[:, ucols].reshape(nb, *ushape)  # (n, out, r)
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
            "more than half this machine's memory; use the out-of-core route (solver='auto' or 'randomized')"
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


# ------------------------------------------------------------------------------------------------ solvers

#: ``solver=`` values of :func:`fit_delta_gram` and :func:`heldout_reconstruction_gram`.
SOLVERS = ("auto", "exact", "randomized")
#: Rows (and columns) of one tile of the on-disk Gram: 16 MiB of float32 at 2048; smaller only for rows
#: so wide that a tile of them does not fit the memory budget.
TILE = 2048
#: Fewest rows in a tile: below this the tile pass would read the store thousands of times.
MIN_TILE = 256
#: Seconds between checkpoints of the tile pass (fsync of the tiles, then the done bitmap, atomically).
CHECKPOINT_SECONDS = 60.0
_GRAM_FORMAT = 1


def _exact_fits(n: int) -> bool:
    """Whether the in-memory route fits: K (8·N² bytes) within a quarter of the machine's memory.

    Why a quarter: ``eigh``'s workspace and the fit's other arrays come on top of K, and ``wsa analyze``
    runs its other analyzers in the same process; the target is 8 GB peak on a 24 GB machine (N ≤ ~27 k).
    """
    return 8 * n * n <= _physical_memory() // 4


def _choose_solver(solver: str, n: int) -> str:
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if solver == "auto":
        return "exact" if _exact_fits(n) else "randomized"
    return solver


def _sketch_columns(k: int, n_fit: int) -> int:
    """Subspace width l = k + max(10, k/10), rounded up to a multiple of 8 (GEMM kernels), at most N."""
    return min(-(-(k + max(10, k // 10)) // 8) * 8, n_fit)


def _flip_signs(U: np.ndarray, *others: np.ndarray) -> None:
    """Sign each column of ``U`` (and the same columns of ``others``) so its largest-|·| entry is positive."""
    flip = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    flip[flip == 0] = 1
    U *= flip
    for o in others:
        o *= flip


def _top_eigen(K: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of a symmetric matrix (LAPACK syevr, K overwritten), descending, λ clipped at 0,
    eigenvectors signed so the largest-|·| entry of each is positive (deterministic output)."""
    n = K.shape[0]
    values, vectors = scipy.linalg.eigh(K, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False)
    order = np.argsort(values)[::-1]
    lam = np.clip(values[order], 0.0, None)
    U = vectors[:, order]
    _flip_signs(U)
    return lam, U


# ------------------------------------------------------------------------------------ the Gram on disk


class _DiskGram:
    """The uncentred Gram K of a store as float32 tiles (upper triangle, row-tile-major) in one file.

    Files in ``folder``: ``gram.json`` (what K is of: the store's matrix file, size, mtime, manifest
    hash, tile size), ``tiles.f32`` (tile (a, b), a ≤ b, at its offset, rows × cols C-order),
    ``progress.npz`` (done bitmap + the float64 diagonal), ``lock``.

    Why float32: the per-module products that make K are float32 GEMMs already (:func:`gram_block`), so
    an entry is good to ~1e-7 of its size either way; float64 would double the disk (17 GB at 65 k) and
    every pass's reads. The diagonal (‖ΔW_i‖², from which the centred norms are differences) is kept in
    float64. Resumable: ``progress.npz`` is replaced atomically, and only after an fsync of the tiles it
    marks done, so an interrupted pass (Ctrl-C, a crash, a killed job) resumes at the first tile not
    marked. Reads and writes are ``pread``/``pwrite``, not a memory map: mapped pages would count as the
    process's RSS (a 8.5 GB file read per pass would look like 8.5 GB of memory).
    """

    def __init__(self, folder: Path, key: dict[str, Any], n: int, tile: int) -> None:
        self.folder, self.n, self.tile = folder, n, tile
        self.nt = -(-n // tile)
        self.pairs = [(a, b) for a in range(self.nt) for b in range(a, self.nt)]
        self.slot = {p: i for i, p in enumerate(self.pairs)}
        sizes = [self.rows(a).stop - self.rows(a).start for a in range(self.nt)]
        self.offsets = np.concatenate([[0], np.cumsum([sizes[a] * sizes[b] * 4 for a, b in self.pairs])])
        self.nbytes = int(self.offsets[-1])
        self.tiles_path = folder / "tiles.f32"
        self.state_path = folder / "progress.npz"
        self._fd = -1
        self._lock = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"{folder}: cannot write the Gram's work folder ({exc.strerror or exc}); "
                "pass work_dir= a writable folder"
            ) from None
        import fcntl

        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise ConfigError(f"{folder}: another process is computing this Gram; wait for it to finish") from None
        try:
            self._open(key)
        except BaseException:
            self.close()
            raise

    def _open(self, key: dict[str, Any]) -> None:
        meta_path = self.folder / "gram.json"
        try:
            same = json.loads(meta_path.read_text()) == key
        except (OSError, ValueError):
            same = False
        self.done = np.zeros(len(self.pairs), dtype=bool)
        self.diag = np.zeros(self.n, dtype=np.float64)
        if same and self.tiles_path.is_file() and self.tiles_path.stat().st_size == self.nbytes:
            try:
                with np.load(self.state_path) as state:
                    done, diag = state["done"], state["diag"]
                if done.shape == self.done.shape and diag.shape == self.diag.shape:
                    self.done, self.diag = done.astype(bool), diag.astype(np.float64)
            except (OSError, ValueError, KeyError):
                pass  # no checkpoint yet (or a foreign file): start the tiles again
        else:  # another store, or another version of it: what is here is not its Gram
            for p in (meta_path, self.state_path, self.tiles_path):
                p.unlink(missing_ok=True)
        allocated = self.tiles_path.stat().st_blocks * 512 if self.tiles_path.is_file() else 0
        free = shutil.disk_usage(self.folder).free
        if free + allocated < self.nbytes + (1 << 30):  # refused now, not at a full disk an hour in
            raise ConfigError(
                f"{self.folder}: the on-disk Gram of {self.n} adapters needs {self.nbytes / 1e9:.1f} GB "
                f"(+1 GB spare), {(free + allocated) / 1e9:.1f} GB free there; "
                "free space or pass work_dir= another disk"
            )
        if not same:
            write_bytes(meta_path, json.dumps(key, indent=1, sort_keys=True).encode())
        self._fd = os.open(self.tiles_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != self.nbytes:
            os.ftruncate(self._fd, self.nbytes)  # sparse until written

    def rows(self, a: int) -> slice:
        return slice(a * self.tile, min(self.n, (a + 1) * self.tile))

    def read(self, a: int, b: int) -> np.ndarray:
        ra, rb = self.rows(a), self.rows(b)
        out = np.empty((ra.stop - ra.start, rb.stop - rb.start), dtype=np.float32)
        view, offset = memoryview(out).cast("B"), int(self.offsets[self.slot[a, b]])
        got = 0
        while got < len(view):
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if k <= 0:
                raise StoreError("the on-disk Gram ends early; delete the folder to compute it again", self.tiles_path)
            got += k
        return out

    def write(self, a: int, b: int, tile: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(tile, dtype=np.float32)).cast("B")
        offset = int(self.offsets[self.slot[a, b]])
        put = 0
        while put < len(view):
            put += os.pwrite(self._fd, view[put:], offset + put)

    def checkpoint(self) -> None:
        """Make the tiles written so far durable, then mark them done (in that order)."""
        os.fsync(self._fd)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, done=self.done, diag=self.diag)

        write_with(self.state_path, save)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def __enter__(self) -> _DiskGram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tiles(self, device: str | torch.device) -> Iterator[tuple[slice, slice, bool, torch.Tensor]]:
        """Every stored tile in file order as ``(rows, cols, diagonal?, float32 tensor)``, one read ahead."""
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(self.read, *self.pairs[0])
            for i, (a, b) in enumerate(self.pairs):
                tile = nxt.result()
                if i + 1 < len(self.pairs):
                    nxt = pool.submit(self.read, *self.pairs[i + 1])
                yield self.rows(a), self.rows(b), a == b, torch.from_numpy(tile).to(device)


def _tile_rows(row_bytes: int, budget: int, where: Path) -> int:
    """Rows per tile: :data:`TILE`, or fewer when a tile of rows would not fit ``budget`` bytes."""
    if TILE * row_bytes <= budget:
        return TILE
    tile = budget // row_bytes // 64 * 64
    if tile < MIN_TILE:
        raise ConfigError(
            f"{where}: rows of {row_bytes / 1e6:.0f} MB are too wide for the out-of-core Gram ({MIN_TILE} rows "
            f"need {MIN_TILE * row_bytes / 1e9:.1f} GB, the budget is {budget / 1e9:.1f} GB); analyse at most "
            "as many adapters as the exact route holds in memory, or on a machine with more memory"
        )
    return tile


def _open_disk_gram(store, work_dir: str | Path | None, budget: int) -> _DiskGram:
    import hashlib

    n = len(store)
    tile = _tile_rows(4 * store.n_features, budget, store.path)
    st = store.matrix_path.stat()
    manifest = (store.path / "wsa_store.json").read_bytes() if (store.path / "wsa_store.json").is_file() else b""
    key = {
        "format": _GRAM_FORMAT,
        "matrix": str(store.matrix_path.resolve()),
        "matrix_size": st.st_size,
        "matrix_mtime_ns": st.st_mtime_ns,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "n": n,
        "n_features": store.n_features,
        "tile": tile,
        "dtype": "float32",
    }
    folder = Path(work_dir) if work_dir is not None else store.path / ".gram"
    return _DiskGram(folder, key, n, tile)


def _build_disk_gram(store, plan: _GramPlan, dg: _DiskGram, budget: int, device, progress: bool) -> int:
    """Compute and write every tile not yet done; return how many were computed.

    Rows of ``held`` consecutive tiles stay in memory while the tiles to their right stream past (one
    read ahead, in a thread: ``pread`` releases the GIL), so the store is read about N / (2·held·tile)
    times. Each tile is checked finite before it is written: a NaN or inf (a corrupt row, float32
    overflow) stops the pass with the rows named, never a Gram that silently holds it.
    """
    from tqdm.auto import tqdm

    todo = int((~dg.done).sum())
    if not todo:
        return 0
    held = max(1, min(dg.nt, budget // (dg.tile * 4 * store.n_features)))
    bar = tqdm(total=len(dg.pairs), initial=len(dg.pairs) - todo, desc="gram tiles", disable=None if progress else True)
    last = time.monotonic()

    def read(t0: int, t1: int) -> np.ndarray:
        return store.read_rows(range(dg.rows(t0).start, dg.rows(t1).stop))

    pool = ThreadPoolExecutor(1)
    try:
        for g0 in range(0, dg.nt, held):
            group = range(g0, min(dg.nt, g0 + held))
            need = {(a, b) for a in group for b in range(a, dg.nt) if not dg.done[dg.slot[a, b]]}
            if not need:
                continue
            a_lo, a_hi = min(a for a, _ in need), max(a for a, _ in need)
            base = dg.rows(a_lo).start
            A = read(a_lo, a_hi)
            outside = sorted({b for _, b in need if b > a_hi})
            ahead = pool.submit(read, outside[0], outside[0]) if outside else None
            for b in sorted({b for _, b in need}):
                if b > a_hi:
                    B = ahead.result()
                    j = outside.index(b)
                    ahead = pool.submit(read, outside[j + 1], outside[j + 1]) if j + 1 < len(outside) else None
                else:
                    B = A[dg.rows(b).start - base : dg.rows(b).stop - base]
                rows_a = [a for a in range(a_lo, min(b, a_hi) + 1) if (a, b) in need]
                lo, hi = dg.rows(rows_a[0]).start, dg.rows(rows_a[-1]).stop
                g = gram_block(A[lo - base : hi - base], B, plan, device)
                for a in rows_a:
                    ra = dg.rows(a)
                    sub = g[ra.start - lo : ra.stop - lo]
                    sub32 = sub.astype(np.float32)
                    if not np.isfinite(sub32).all():
                        i, j = np.argwhere(~np.isfinite(sub32))[0]
                        raise StoreError(
                            f"⟨ΔW_i, ΔW_j⟩ of rows {ra.start + i} and {dg.rows(b).start + j} is not a finite "
                            "float32 (inf/NaN in a row, or products beyond float32's range); nothing of it was "
                            "written — check those rows (wsa info) or rescale the collection",
                            store.path,
                        )
                    if a == b:
                        dg.diag[ra] = np.diagonal(sub)
                    dg.write(a, b, sub32)
                    dg.done[dg.slot[a, b]] = True
                    bar.update(1)
                del g
                if time.monotonic() - last >= CHECKPOINT_SECONDS:
                    dg.checkpoint()
                    last = time.monotonic()
            del A
    finally:
        pool.shutdown(wait=True)
        dg.checkpoint()  # what was written is kept, whatever stopped the pass
        bar.close()
    return todo


def _masked_means(dg: _DiskGram, w: np.ndarray, device, bar) -> np.ndarray:
    """``K·w / Σw`` in float64 for every row: the means that centre K on the rows marked in ``w``."""
    wt = torch.as_tensor(w, dtype=torch.float64, device=device)
    s = torch.zeros(dg.n, dtype=torch.float64, device=device)
    for ra, rb, diagonal, t in dg.tiles(device):
        t64 = t.double()
        s[ra] += t64 @ wt[rb]
        if not diagonal:
            s[rb] += t64.T @ wt[ra]
        bar.update(1)
    return (s / wt.sum()).cpu().numpy()


def _centred_product(dg: _DiskGram, X: np.ndarray, m: np.ndarray, mbar: float, device, bar) -> np.ndarray:
    """``K̃·X`` for every row (float64), X (N × c) zero outside the fitted rows, K̃_ij = K_ij − m_i − m_j + m̄.

    Each tile is centred in float64 and only then rounded to float32 for the GEMM: the product's
    rounding is then relative to K̃'s entries, not to K's (which are much larger when the members share
    a large mean ΔW — centring after a float32 product would lose the small eigenvalues).
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)
    mt = torch.as_tensor(m, dtype=torch.float64, device=device)
    rows_shift = mt - mbar  # K̃_ij = K_ij − (m_i − m̄) − m_j: two passes over the tile, not three
    Y = torch.zeros(X.shape, dtype=torch.float64, device=device)
    for ra, rb, diagonal, t in dg.tiles(device):
        c = t.double()
        c -= rows_shift[ra, None]
        c -= mt[None, rb]
        c32 = c.float()
        del c
        Y[ra] += c32 @ Xt[rb]
        if not diagonal:
            Y[rb] += c32.T @ Xt[ra]
        bar.update(1)
    return Y.cpu().numpy()


@dataclass
class _RandomizedEigen:
    lam: np.ndarray  # (k,) descending, clipped at 0
    U: np.ndarray  # (n_fit, k) eigenvectors of the centred Gram of the fitted rows
    KU: np.ndarray  # (N, k) K̃[:, fit]·U for every row (held-out rows: their centred products with U)
    means: np.ndarray  # (N,) m_i = mean over fitted j of K_ij
    mean: float  # m̄ = mean of m over the fitted rows
    sketch_columns: int
    passes: int


def _randomized_eigen(
    dg: _DiskGram, fit: np.ndarray, k: int, *, n_iter: int, random_state: int | None, device, progress: bool
) -> _RandomizedEigen:
    """Top-k eigenpairs of the centred Gram of rows ``fit`` by randomized subspace iteration over the tiles.

    Passes over the tiles: the means, Y = K̃Ω, ``n_iter`` power steps (QR, then K̃Q), and a last K̃Q for
    Rayleigh–Ritz (eigh of QᵀK̃Q, l × l). K̃ is PSD with eigenvalues σ² of the centred ΔW, so q power
    steps separate the spectrum like 2q + 1 steps on the data matrix. Products of the rows outside
    ``fit`` with the fitted ones come with the last pass (the held-out test needs them): X is zero there.
    """
    from tqdm.auto import tqdm

    n_fit = len(fit)
    width = _sketch_columns(k, n_fit)
    passes = 3 + int(n_iter)
    bar = tqdm(total=passes * len(dg.pairs), desc="gram eigen", disable=None if progress else True)
    try:
        w = np.zeros(dg.n)
        w[fit] = 1.0
        m = _masked_means(dg, w, device, bar)
        mbar = float(m[fit].mean())
        rows = slice(None) if n_fit == dg.n else fit  # a slice: no copies of (N, l) arrays in the plain fit
        X = np.zeros((dg.n, width), dtype=np.float32)
        X[rows] = np.random.default_rng(random_state).standard_normal((n_fit, width), dtype=np.float32)
        Y = _centred_product(dg, X, m, mbar, device, bar)
        for _ in range(int(n_iter)):
            X[rows] = np.linalg.qr(Y[rows])[0]
            Y = _centred_product(dg, X, m, mbar, device, bar)
        X[rows] = np.linalg.qr(Y[rows])[0]
        del Y
        Q = X[rows].astype(np.float64)  # the basis the last pass multiplies, rounded as it was: B = QᵀK̃Q
        Z = _centred_product(dg, X, m, mbar, device, bar)
    finally:
        bar.close()
    del X
    B = Q.T @ Z[rows]
    values, V = np.linalg.eigh((B + B.T) / 2)
    order = np.argsort(values)[::-1][:k]
    V = V[:, order]
    U = Q @ V
    KU = Z @ V
    if not (np.isfinite(values).all() and np.isfinite(U).all() and np.isfinite(KU).all()):
        raise ConfigError(
            f"{dg.folder}: the randomized eigensolver produced non-finite values; delete the folder and fit again"
        )
    _flip_signs(U, KU)
    return _RandomizedEigen(np.clip(values[order], 0.0, None), U, KU, m, mbar, width, passes)


def _gram_budget() -> int:
    """Bytes of store rows the tile pass holds at once: an eighth of the machine's memory."""
    return _physical_memory() // 8


def heldout_reconstruction_gram(
    store,
    ks: list[int],
    *,
    test_fraction: float = 0.2,
    random_state: int | None = 0,
    block_rows: int = 2048,
    device: str = "cpu",
    progress: bool = True,
    solver: str = "auto",
    n_iter: int = 3,
    work_dir: str | Path | None = None,
) -> dict[str, list]:
    """:func:`wsa.space.heldout_reconstruction` for ΔW from factor Grams (same split, same error).

    Kernel-PCA form: the space is fitted on the train rows' centred Gram; a held-out row's coordinates
    are its train-centred inner products with the members times the dual weights, and its relative
    error for k PCs is ``1 − Σ_{j≤k} c_j² / ‖ΔW − mean_train‖²``. ``solver`` as in :func:`fit_delta_gram`;
    the randomized route reuses the fit's on-disk Gram (same ``work_dir``) and takes the held-out rows'
    products with the train rows from the same passes over it.
    """
    train, test = heldout_split(len(store), test_fraction, random_state)
    n_train = len(train)
    k_list = sorted({int(k) for k in ks})
    if not k_list or k_list[0] < 0 or k_list[-1] > n_train - 1:
        raise ConfigError(f"ks must be integers in [0, {n_train - 1}] (train rows − 1); got {ks!r}")
    k_max = max(k_list[-1], 1)
    if _choose_solver(solver, len(store)) == "randomized":
        plan = _gram_plan(store.layout)
        budget = _gram_budget()
        with _open_disk_gram(store, work_dir, budget) as dg:
            _build_disk_gram(store, plan, dg, budget, device, progress)
            eig = _randomized_eigen(
                dg, train, k_max, n_iter=n_iter, random_state=random_state, device=device, progress=progress
            )
            diag = dg.diag.copy()
        lam, U = eig.lam, eig.U
        root = np.sqrt(lam)
        norm_t = diag[train] - 2.0 * eig.means[train] + eig.mean
        norm_s = diag[test] - 2.0 * eig.means[test] + eig.mean
        coef_s = np.divide(eig.KU[test], root, out=np.zeros((len(test), len(lam))), where=root > 0)
    else:
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
        lam, U = _top_eigen(k_tt, k_max)
        root = np.sqrt(lam)
        coef_s = k_st_centred @ np.divide(U, root, out=np.zeros_like(U), where=root > 0)
    coef_t = U * root

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
    solver: str = "auto",
    n_iter: int = 3,
    random_state: int | None = 0,
    work_dir: str | Path | None = None,
) -> DeltaSpace:
    """Centred PCA of the members' ΔW from their factors (dual form).

    ``solver``: ``"exact"`` (K in memory, LAPACK eigh), ``"randomized"`` (K once to float32 tiles in
    ``work_dir``, default ``<store>/.gram``, 2·N² bytes, kept so the held-out test and a re-run reuse
    it; then subspace iteration with ``n_iter`` power steps over the tiles), or ``"auto"``: exact while
    K fits in a quarter of the machine's memory (:func:`_exact_fits`). Both record what they did in
    ``config`` (``solver``, seconds of the Gram and of the eigensolver).
    """
    from wsa.delta_space import DeltaSpace  # here, not at the top: the value type may use this kernel

    n = len(store)
    k = int(n_components)
    if not 1 <= k <= n - 1:
        raise ConfigError(f"n_components must be in [1, {n - 1}] (N − 1 for centred data); got {k}")
    used = _choose_solver(solver, n)
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if used == "randomized":
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
            raise ConfigError(f"n_iter must be an integer >= 0; got {n_iter!r}")
        plan = _gram_plan(store.layout)
        budget = _gram_budget()
        with _open_disk_gram(store, work_dir, budget) as dg:
            computed = _build_disk_gram(store, plan, dg, budget, device, progress)
            t_gram = time.perf_counter() - t0
            t1 = time.perf_counter()
            eig = _randomized_eigen(
                dg, np.arange(n), k, n_iter=n_iter, random_state=random_state, device=device, progress=progress
            )
            diag = dg.diag.copy()
            extra = {
                "gram_file": str(dg.tiles_path),
                "gram_tile": dg.tile,
                "gram_tiles_computed": computed,
                "gram_tiles": len(dg.pairs),
                "n_iter": int(n_iter),
                "sketch_columns": eig.sketch_columns,
                "passes": eig.passes,
                "random_state": random_state,
            }
        lam, U = eig.lam, eig.U
        gram_row_means = eig.means
        row_sq_norms = diag - 2.0 * eig.means + eig.mean
    else:
        K = gram_matrix(store, block_rows=block_rows, device=device, progress=progress)
        t_gram = time.perf_counter() - t0
        # Double centring: K̃ = H K H with H = I − 11ᵀ/N (the Gram of ΔW_i − mean ΔW).
        row_mean = K.mean(axis=1, keepdims=True)
        gram_row_means = row_mean[:, 0].copy()
        K -= row_mean
        K -= K.mean(axis=0, keepdims=True)
        row_sq_norms = np.diagonal(K).copy()
        t1 = time.perf_counter()
        lam, U = _top_eigen(K, k)  # overwrites K: memory stays N² + N·k
        del K
    total = float(row_sq_norms.sum()) / (n - 1)
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
            "solver": used,
            "center": True,
            "standardize": False,
            "device": str(device),
            "n_components": k,
            "block_rows": block_rows,
            "gram_seconds": round(t_gram, 3),
            "eig_seconds": round(time.perf_counter() - t1, 3),
            "store_path": str(store.path),
            "repr": store.repr,
            **extra,
        },
    )
