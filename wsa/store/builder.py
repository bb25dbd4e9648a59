"""Build or update a store from adapter files: parallel, bounded-memory, resumable, incremental.

How it stays bounded: rows are encoded one adapter at a time by a small thread pool (at most
``4 × workers`` in flight) and written straight into a preallocated ``.npy`` with ``os.pwrite``
(no memory map, so written pages never count against the process).

How it resumes: the build happens in ``<out>/.partial/`` with ``plan.json`` (options, layout,
ids), the matrix, ``rows.jsonl`` (per-row facts) and ``done.npy`` (0 todo, 1 done, 2 problem),
checkpointed every few seconds after an fsync. Re-running the same command continues there.

How it is incremental: rows of an existing store whose source files are unchanged (size and
mtime, or content hash with ``rehash=True``) are copied, new files are read, removed ones dropped.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import wsa
from wsa.adapter import Adapter
from wsa.atomic import write_json
from wsa.errors import CollectionError, ConfigError, StoreError, WsaError
from wsa.families.resolve import forced_family
from wsa.store.discover import Source, discover
from wsa.store.layout import REPRESENTATIONS, Layout
from wsa.store.representations import Mismatch, delta_norm, encode, layout_for
from wsa.store.scan import Scanned, describe_groups, family_groups, max_ranks, scan, scan_one
from wsa.store.store import FORMAT_VERSION, MANIFEST, Store, is_matrix_name
from wsa.training_metadata import parse_training_metadata

MODULE_MODES = ("exact", "intersect", "union")
DTYPES = ("float32", "float16")
CHECKPOINT_SECONDS = 5.0


@dataclass(frozen=True)
class IngestOptions:
    """Everything that decides the matrix's contents (echoed into the manifest)."""

    repr: str = "raw"
    dtype: str = "float32"
    modules: str = "exact"
    family: str | None = None  # None: the collection's one family (several: an error listing them)

    def validate(self) -> None:
        if self.repr not in REPRESENTATIONS:
            raise ConfigError(f"--repr must be one of {', '.join(REPRESENTATIONS)}; got {self.repr!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.modules not in MODULE_MODES:
            raise ConfigError(f"--modules must be one of {', '.join(MODULE_MODES)}; got {self.modules!r}")
        if self.family is not None and self.family != "unknown":
            from wsa.families import FAMILIES

            FAMILIES.get(self.family)  # an unknown name fails with the choices
        if self.modules == "union" and self.repr != "delta":
            raise ConfigError("--modules union needs --repr delta (a missing module is ΔW = 0 only there)")


def signature(adapter: Adapter, repr: str = "raw") -> tuple:
    """What must agree for two adapters to share a layout.

    ``raw`` needs the same ranks (factors are stored as they are); ``canonical`` and ``delta`` pad or densify
    every LoRA module, so a plain LoRA's rank does not count there.
    """

    def padded(m) -> bool:
        return repr != "raw" and m.kind == "lora" and "mid" not in m.tensors and not m.is_dora

    return tuple(
        (
            name,
            m.kind,
            m.shape,
            0 if padded(m) else m.rank,
            m.is_dora,
            () if padded(m) else tuple(sorted((k, tuple(t.shape)) for k, t in m.tensors.items())),
        )
        for name, m in adapter.modules.items()
    )


def describe_signature(sig: tuple) -> str:
    kinds = sorted({f"{kind}{'+dora' if dora else ''}" for _, kind, _, _, dora, _ in sig})
    ranks = sorted({rank for _, _, _, rank, _, _ in sig})
    return f"{len(sig)} modules, {'/'.join(kinds)}, rank {'/'.join(map(str, ranks))}"


def _hash_files(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _npy_data_offset(path: Path) -> int:
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        reader(fh)
        return fh.tell()


def _allocate(path: Path, n_rows: int, n_features: int, dtype: str) -> int:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n_rows, n_features))
    del mm
    return _npy_data_offset(path)


def _choose_layout(
    sources: list[Source], opts: IngestOptions, workers: int, progress: bool, ranks: dict[str, int] | None = None
) -> tuple[Layout, list[tuple[str, str]]]:
    """Layout of the collection: the most common signature among a spread sample (``exact``),
    or the module intersection/union over all adapters (a full pre-pass)."""
    problems: list[tuple[str, str]] = []
    if opts.modules == "exact":
        step = max(1, len(sources) // 16)
        first = sources[::step][:16]
        chosen = {id(s) for s in first}
        rest = [s for s in sources if id(s) not in chosen]
        # A spread sample first; when none of it reads, the others in growing batches until one does.
        batches = [first] + [rest[a : a + b] for a, b in _batches(len(rest), 16)]
    else:
        batches = [sources]
    loaded: list[Adapter] = []
    tried = 0
    for batch in batches:
        tried += len(batch)
        for src, result in _map_loads(batch, workers, progress and opts.modules != "exact", "scan", opts.family):
            if isinstance(result, Adapter):
                loaded.append(result)
            else:
                problems.append((str(src.path), result))
        if loaded:
            break
    if not loaded:
        first_problem = f"; first problem: {problems[0][0]}: {problems[0][1]}" if problems else ""
        raise CollectionError(f"no readable adapter among the {tried} files{first_problem}", problems)
    if opts.modules == "exact":
        counts = Counter(signature(a, opts.repr) for a in loaded)
        best = counts.most_common(1)[0][0]
        reference = next(a for a in loaded if signature(a, opts.repr) == best)
        return layout_for(reference, opts.repr, ranks=ranks), []
    sets = [set(a.modules) for a in loaded]
    names = set.intersection(*sets) if opts.modules == "intersect" else set.union(*sets)
    if not names:
        raise CollectionError("the adapters share no module (--modules intersect leaves nothing)", problems)
    merged: dict[str, Any] = {}
    for a in loaded:
        for n in a.modules:
            if n in names and n not in merged:
                merged[n] = a.modules[n]
    from wsa.families.names import natural_key

    ordered = sorted(merged, key=natural_key)
    reference = Adapter("<merged reference>", "mixed", {n: merged[n] for n in ordered})
    return layout_for(reference, opts.repr, ranks=ranks), problems


def _batches(n: int, first: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` covering ``range(n)`` with sizes doubling from ``first``."""
    start, size = 0, first
    while start < n:
        yield start, size
        start, size = start + size, size * 2


def _map_loads(
    sources: list[Source], workers: int, progress: bool, desc: str, family: str | None = None
) -> Iterator[tuple[Source, Adapter | str]]:
    def load(src: Source) -> Adapter | str:
        try:
            with forced_family(family):
                return src.load()
        except WsaError as exc:
            return str(exc).removeprefix(f"{src.path}: ")
        except OSError as exc:  # vanished, unreadable, a loop of symlinks: this file's problem, not the run's
            return f"cannot read ({exc.strerror or exc})"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        bar = tqdm(total=len(sources), desc=desc, unit="adapter", disable=None if progress else True, file=sys.stderr)
        yield from _bounded(pool, load, sources, workers * 4, bar)
        bar.close()


def _bounded(pool: ThreadPoolExecutor, fn, items: list, window: int, bar) -> Iterator[tuple[Any, Any]]:
    pending: list[tuple[Any, Future]] = []
    it = iter(items)
    for item in it:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            src, fut = pending.pop(0)
            bar.update(1)
            yield src, fut.result()
    for src, fut in pending:
        bar.update(1)
        yield src, fut.result()


def ingest(
    paths: str | Path | Iterable[str | Path],
    out: str | Path,
    *,
    repr: str = "raw",
    dtype: str = "float32",
    modules: str = "exact",
    family: str | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    rehash: bool = False,
    progress: bool = True,
    sources: list[Source] | None = None,
    executor: Any = None,
) -> Store:
    """Flatten a collection of adapters into a store at ``out`` and return it.

    Parameters
    ----------
    paths : adapter files or folders (searched recursively).
    out : store folder (created; an existing store there is updated incrementally).
    repr : ``"raw"``, ``"canonical"`` or ``"delta"`` (see :mod:`wsa.store.representations`).
    dtype : ``"float32"`` (default) or ``"float16"`` storage.
    modules : ``"exact"`` (every adapter must have the layout's modules), ``"intersect"``
        (keep the modules all adapters share) or ``"union"`` (``delta`` only; missing modules are 0).
    family : keep only this model family's adapters (``flux1``, ``sdxl``, …; ``unknown`` for files no family
        fits); the others are listed in the manifest's ``left_out``. Default: the collection must hold one.
    skip_bad : leave out files that cannot be read or do not fit, reporting each with its reason,
        instead of failing with the list.
    workers : reader threads (default: number of CPUs, at most 8).
    rehash : compare content hashes instead of size+mtime to decide which rows to reuse.
    sources : pre-discovered sources (used for datasets); ``paths`` is then only echoed.
    executor : where adapters are read and encoded instead of local threads, e.g. a
        :class:`wsa.dask_engine.ChunkedExecutor` on a Dask cluster (rows come back to this process,
        which writes the store as usual).
    """
    opts = IngestOptions(repr=repr, dtype=dtype, modules=modules, family=family)
    opts.validate()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    path_list = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if sources is None:
        sources = discover(path_list)
    if out.exists() and not out.is_dir():
        raise StoreError("output exists and is not a folder", out)
    with _os_errors_as_store_errors(out):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store folder ({exc.strerror or exc}); choose another --out", out
            ) from None
        with store_lock(out):
            return _ingest_locked(out, sources, opts, skip_bad, workers, rehash, progress, path_list, executor)


def _ingest_locked(out, sources, opts, skip_bad, workers, rehash, progress, path_list, executor) -> Store:
    partial = out / ".partial"
    old = Store(out) if (out / MANIFEST).is_file() else None
    sources, left_out, ranks = _select_family(sources, opts, workers, progress, old)
    config = asdict(opts)

    plan = _load_plan(partial, config, sources)
    if plan is None and old is not None and not rehash and _unchanged(old, config, sources):
        return old  # nothing to do: same options, same files (size and mtime)
    if plan is None:
        _remove_partial(partial)
        if old is not None and old.manifest.get("config") == config:
            layout, scan_problems = old.layout, []
        else:
            layout, scan_problems = _choose_layout(sources, opts, workers, progress, ranks)
        plan = {
            "config": config,
            "layout": layout.to_json(),
            "ids": [s.id for s in sources],
            "fingerprints": [s.fingerprint() for s in sources],
            "token": secrets.token_hex(4),
            "scan_problems": scan_problems,
            "left_out": left_out,
            "inputs": [str(p) for p in path_list],
            "skip_bad": bool(skip_bad),  # not part of the resume check; `wsa info` shows the command again
        }
        needed = len(sources) * layout.n_features * np.dtype(opts.dtype).itemsize
        check_free_space(out, needed, "the matrix")
        try:
            partial.mkdir(parents=True)
            _allocate(partial / f"matrix-{plan['token']}.npy", len(sources), layout.n_features, opts.dtype)
            np.save(partial / "done.npy", np.zeros(len(sources), dtype=np.uint8))
            write_json(partial / "plan.json", plan)
        except BaseException:
            _remove_partial(partial)  # nothing was done yet: nothing for a resume to keep
            raise
    layout = Layout.from_json(plan["layout"], partial / "plan.json")
    return _build(
        out, partial, plan, layout, sources, old, opts, skip_bad, workers, rehash, progress, path_list, executor
    )


LOCK_FILE = ".wsa.lock"


@contextlib.contextmanager
def store_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.wsa.lock`` (``flock``, exclusive, non-blocking) for a whole ingest.

    Why: two ingests into one folder would interleave their ``.partial/`` builds and manifests; the second
    one fails at once instead, saying so. The lock goes with the process (a ``kill -9`` releases it).
    """
    import fcntl

    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {LOCK_FILE} ({exc.strerror or exc})", out) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                "another `wsa ingest` is writing this store (it holds .wsa.lock); wait for it to finish", out
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot lock {LOCK_FILE} ({exc.strerror or exc})", out) from None
        yield
    finally:
        os.close(fd)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing ``needed`` bytes into ``folder`` when its file system has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no figure to check against: the write itself reports a full disk
    if needed > free:
        raise StoreError(
            f"not enough free disk space for {what}: needs {_size(needed)}, {_size(free)} free; "
            "free some space or choose another --out",
            folder,
        )


def _size(n: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


@contextlib.contextmanager
def _os_errors_as_store_errors(out: Path) -> Iterator[None]:
    """A write that fails (full disk, no permission, a path that vanished) becomes one line naming the path."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else out
        why = exc.strerror or str(exc) or type(exc).__name__
        hint = {
            errno.ENOSPC: "; free some space and run the same `wsa ingest` again to resume",
            errno.EDQUOT: "; free some space and run the same `wsa ingest` again to resume",
            errno.EACCES: "; check the permissions, or choose another --out",
            errno.EPERM: "; check the permissions, or choose another --out",
            errno.EROFS: "; choose another --out",
            errno.ENOENT: "; a file or folder vanished during the ingest: run it again",
        }.get(exc.errno or 0, "")
        raise StoreError(f"{why} (during ingest into {out}){hint}", where) from None


def _remove_partial(partial: Path) -> None:
    """Remove ``.partial/`` (only the link when it is a symlink: never what it points at)."""
    if partial.is_symlink() or partial.is_file():
        partial.unlink(missing_ok=True)
    else:
        shutil.rmtree(partial, ignore_errors=True)


def _select_family(
    sources: list[Source], opts: IngestOptions, workers: int, progress: bool, old: Store | None = None
) -> tuple[list[Source], list[list[str]], dict[str, int] | None]:
    """The sources of the store's one family, the others as ``[path, reason]``, and the largest rank per module.

    A folder of several families and no ``family`` chosen is an error that lists the groups: one store
    holds one family (``wsa analyze`` fits one space per family). Files whose header cannot be read stay
    in, so the ingest reports them with the reason as before.
    """
    if all(s.loader is not None for s in sources):
        return sources, [], None  # a dataset: one matrix, one layout
    scanned = _scan_reusing(old, sources, opts, workers, progress)
    groups = family_groups(scanned)
    if opts.family is None and len(groups) > 1:
        raise CollectionError(
            f"the adapters belong to {len(groups)} model families: {describe_groups(groups)}; "
            "a store holds one family: pass --family NAME (or use `wsa analyze`, which fits one space per family)"
        )
    chosen = opts.family if opts.family is not None else next(iter(groups), None)
    forced = opts.family is not None
    if forced and opts.family not in groups and not any(opts.family in s.candidates for s in scanned):
        raise CollectionError(
            f"no adapter of family {opts.family!r} here (found: {describe_groups(groups) or 'none readable'})"
        )
    # `--family` also takes files whose names fit it though the best guess was another family (read as it).
    keep = [
        i
        for i, s in enumerate(scanned)
        if s.problem is not None or s.family == chosen or (forced and chosen in s.candidates)
    ]
    kept = set(keep)
    for i in keep:
        if forced and scanned[i].problem is None and scanned[i].family != chosen:
            with forced_family(chosen):
                scanned[i] = scan_one(sources[i])
    left_out = [
        [str(sources[i].path), f"family {s.family}, not {chosen}"] for i, s in enumerate(scanned) if i not in kept
    ]
    ranks = max_ranks(scanned[i] for i in keep) if opts.repr == "canonical" else None
    return [sources[i] for i in keep], left_out, ranks


def _scan_reusing(old: Store | None, sources: list[Source], opts: IngestOptions, workers: int, progress: bool):
    """:func:`scan`, except for files the previous store already holds unchanged (their family and ranks known).

    Ranks of a reused row are the old layout's (its maximum per module, which bounds the row's own).
    """
    known: dict[str, Scanned] = {}
    if old is not None and old.manifest.get("config") == asdict(opts):
        ranks = {m.name: m.rank for m in old.layout.modules}
        for row in old.rows:
            if row.get("family"):
                known[row["id"]] = (row["source"], row["files"], Scanned(row["family"], ranks))  # type: ignore[assignment]
    todo = [i for i, s in enumerate(sources) if not _same(known.get(s.id), s)]
    fresh = dict(zip(todo, scan([sources[i] for i in todo], workers, progress and len(todo) > 0), strict=True))
    return [fresh[i] if i in fresh else known[s.id][2] for i, s in enumerate(sources)]  # type: ignore[index]


def _same(entry, src: Source) -> bool:
    return entry is not None and entry[0] == str(src.path) and entry[1] == src.fingerprint()


def _unchanged(old: Store, config: dict, sources: list[Source]) -> bool:
    if old.manifest.get("config") != config or old.ids != [s.id for s in sources]:
        return False
    return all(
        row["source"] == str(src.path) and row.get("row") == src.row and row["files"] == src.fingerprint()
        for row, src in zip(old.rows, sources, strict=True)
    )


def _load_plan(partial: Path, config: dict, sources: list[Source]) -> dict | None:
    """An unfinished build of the same options and inputs, if there is one to resume."""
    if partial.is_symlink() or not partial.is_dir():
        return None
    try:
        plan = json.loads((partial / "plan.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(plan, dict) or not isinstance(plan.get("token"), str) or not _TOKEN.fullmatch(plan["token"]):
        return None  # not a plan this wsa wrote: start over (the matrix name is built from the token)
    same = plan.get("config") == config and plan.get("ids") == [s.id for s in sources]
    same = same and plan.get("fingerprints") == [s.fingerprint() for s in sources]
    matrix = partial / f"matrix-{plan['token']}.npy"
    if not same or matrix.is_symlink() or not matrix.is_file():
        return None
    try:
        Layout.from_json(plan.get("layout"), partial / "plan.json")
        done = np.load(partial / "done.npy")
    except (WsaError, OSError, ValueError):
        return None
    if done.shape != (len(sources),) or done.dtype != np.uint8:
        return None
    return plan


_TOKEN = re.compile(r"[0-9a-f]{8,64}")


def _read_rows_journal(path: Path, done: np.ndarray) -> dict[int, dict]:
    facts: dict[int, dict] = {}
    if not path.is_file():
        return facts
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut by a crash
        i = entry.get("i") if isinstance(entry, dict) else None
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(done) and done[i]:
            facts[i] = entry
    return facts


def _build(
    out, partial, plan, layout, sources, old, opts, skip_bad, workers, rehash, progress, path_list, executor=None
) -> Store:
    matrix_path = partial / f"matrix-{plan['token']}.npy"
    offset = _npy_data_offset(matrix_path)
    itemsize = np.dtype(opts.dtype).itemsize
    row_bytes = layout.n_features * itemsize
    done = np.load(partial / "done.npy")
    facts = _read_rows_journal(partial / "rows.jsonl", done)
    done = np.array(
        [1 if i in facts and "problem" not in facts[i] else (2 if i in facts else 0) for i in range(len(sources))],
        dtype=np.uint8,
    )

    fd = os.open(matrix_path, os.O_RDWR)
    journal = (partial / "rows.jsonl").open("a")
    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        os.fsync(fd)
        journal.flush()
        os.fsync(journal.fileno())
        tmp = partial / "done.npy.tmp"
        with tmp.open("wb") as fh:
            np.save(fh, done)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, partial / "done.npy")

    def record(i: int, entry: dict, row: np.ndarray | None) -> None:
        nonlocal last_checkpoint
        if row is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                data = np.ascontiguousarray(row, dtype=opts.dtype)
            if not np.isfinite(data).all():  # never written: the file is a problem, named with its module
                entry = {k: entry[k] for k in ("id", "source", "files", "row") if k in entry}
                entry["problem"] = non_finite_reason(row, data, layout, opts.dtype)
            else:
                os.pwrite(fd, data.tobytes(), offset + i * row_bytes)
        entry["i"] = i
        journal.write(json.dumps(entry, sort_keys=True) + "\n")
        facts[i] = entry
        done[i] = 2 if "problem" in entry else 1
        if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
            checkpoint()
            last_checkpoint = time.monotonic()

    try:
        todo = [i for i in range(len(sources)) if not done[i]]
        todo = _reuse_old_rows(old, sources, plan, layout, todo, record, rehash)
        _encode_rows(sources, todo, layout, opts, workers, progress, record, executor)
        checkpoint()
    finally:
        journal.close()
        os.close(fd)

    problems = [(str(sources[i].path), facts[i]["problem"]) for i in sorted(facts) if "problem" in facts[i]]
    problems += [
        tuple(p) for p in plan.get("scan_problems", []) if opts.modules != "exact" and tuple(p) not in problems
    ]
    if problems and not skip_bad:
        lines = "; ".join(f"{p}: {r}" for p, r in problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CollectionError(
            f"{len(problems)} of {len(sources)} adapters cannot join the matrix ({lines}{more}); "
            "fix them, or re-run with --skip-bad to leave them out (or --modules intersect)",
            problems,
        )
    good = [i for i in range(len(sources)) if done[i] == 1]
    return _finalize(
        out,
        partial,
        plan,
        layout,
        sources,
        facts,
        good,
        problems,
        matrix_path,
        offset,
        row_bytes,
        opts,
        old,
        path_list,
    )


def non_finite_reason(row: np.ndarray, stored: np.ndarray, layout: Layout, dtype: str) -> str:
    """Why a row cannot be stored: the first module with a NaN/Inf value, and where it came from."""
    bad = int(np.flatnonzero(~np.isfinite(stored))[0])
    starts = [m.offset for m in layout.modules]
    module = layout.modules[max(0, bisect.bisect_right(starts, bad) - 1)]
    values = np.asarray(row[module.columns], dtype=np.float32)
    if np.isfinite(values).all():
        biggest = float(np.abs(values).max())
        return (
            f"module {module.name!r}: a value of magnitude {biggest:.4g} overflows {dtype} "
            f"(largest {float(np.finfo(dtype).max):.6g}); ingest with --dtype float32"
        )
    hint = " (the dense ΔW overflows float32)" if layout.repr == "delta" else ""
    return f"module {module.name!r}: its {layout.repr} values are not finite (NaN or Inf){hint}; not stored"


def _reuse_old_rows(
    old: Store | None, sources, plan, layout: Layout, todo: list[int], record, rehash: bool
) -> list[int]:
    """Copy rows of the previous store whose files did not change; return what is left to read."""
    if old is None or old.manifest.get("layout") != plan["layout"] or old.manifest.get("config") != plan["config"]:
        return todo
    previous = {r["id"]: (i, r) for i, r in enumerate(old.rows)}
    # Read old rows with pread, not through the memory map, so copied pages never count as resident.
    fd = os.open(old.matrix_path, os.O_RDONLY)
    offset = _npy_data_offset(old.matrix_path)
    row_bytes = old.n_features * np.dtype(old.manifest["dtype"]).itemsize
    left = []
    for i in todo:
        src = sources[i]
        hit = previous.get(src.id)
        unchanged = hit is not None and hit[1]["source"] == str(src.path) and hit[1].get("row") == src.row
        if unchanged:
            by_hash = rehash and src.row is None  # dataset rows: the matrix file's fingerprint decides
            unchanged = (
                (_hash_files(src.files) == hit[1]["sha256"]) if by_hash else (hit[1]["files"] == src.fingerprint())
            )
        if unchanged:
            entry = {k: v for k, v in hit[1].items() if k not in {"i"}}
            data = os.pread(fd, row_bytes, offset + hit[0] * row_bytes)
            record(i, entry, np.frombuffer(data, dtype=old.manifest["dtype"]))
        else:
            left.append(i)
    os.close(fd)
    return left


def _encode_source(
    src: Source, layout: Layout, family: str | None = None, strict: bool = True
) -> tuple[dict, np.ndarray | None]:
    """Read one adapter and encode it (a module-level function so Dask workers can run it).

    Files repeating a known PEFT header take the fast path (:mod:`wsa.store.fastpath`); the rest the
    general reader.
    """
    from wsa.store.fastpath import encode_fast

    got = encode_fast(src, layout, lambda s: _encode_source_general(s, layout, family, strict))
    return got if got is not None else _encode_source_general(src, layout, family, strict)


def _encode_source_general(
    src: Source, layout: Layout, family: str | None = None, strict: bool = True
) -> tuple[dict, np.ndarray | None]:
    """Read one adapter through its format's reader (as ``family`` when given) and encode it.

    ``strict`` (``--modules exact``): a module the layout lacks is a mismatch, never dropped silently.
    """
    base = {"id": src.id, "source": str(src.path), "files": [], "row": src.row}
    try:
        base["files"] = src.fingerprint()
        with forced_family(family):
            adapter = src.load()
        if strict:
            extra = sorted(set(adapter.modules) - set(layout.names))
            if extra:
                more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
                raise Mismatch(
                    f"module {extra[0]!r}{more} is not in the collection's layout: --modules exact keeps every "
                    "module, so files with extra modules do not fit; use --modules intersect to drop them "
                    "(or --modules union with --repr delta)"
                )
        row = encode(adapter, layout)
    except Mismatch as exc:
        return {**base, "problem": str(exc)}, None
    except WsaError as exc:
        return {**base, "problem": str(exc).removeprefix(f"{src.path}: ")}, None
    except OSError as exc:  # vanished or unreadable since discovery: this file's problem, not the run's
        return {**base, "problem": f"cannot read ({exc.strerror or exc})"}, None
    facts = {
        **base,
        "sha256": _hash_files(src.files) if src.row is None else f"row:{src.row}",
        "format": adapter.format,
        "family": adapter.family or "unknown",
        "training": parse_training_metadata(adapter.metadata),
        "kinds": adapter.kinds,
        "n_params": adapter.n_params,
        "delta_norm": round(delta_norm(adapter), 9) if not any(m.is_dora for m in adapter.modules.values()) else None,
    }
    return facts, row


def _encode_rows(
    sources,
    todo: list[int],
    layout: Layout,
    opts: IngestOptions,
    workers: int,
    progress: bool,
    record,
    executor: Any = None,
) -> None:
    if not todo:
        return
    bar = tqdm(total=len(todo), desc="ingest", unit="adapter", disable=None if progress else True, file=sys.stderr)
    if executor is not None:  # e.g. wsa.dask_engine.ChunkedExecutor: workers read and encode chunks of files
        from functools import partial

        items = [sources[i] for i in todo]
        for i, (_, (entry, row)) in zip(
            todo,
            executor.map_ordered(
                partial(_encode_source, layout=layout, family=opts.family, strict=opts.modules == "exact"), items
            ),
            strict=True,
        ):
            record(i, entry, row)
            bar.update(1)
        bar.close()
        return
    with one_torch_thread_per_worker(workers), ThreadPoolExecutor(max_workers=workers) as pool:
        strict = opts.modules == "exact"
        encode_one = lambda i: _encode_source(sources[i], layout, opts.family, strict)  # noqa: E731
        for i, (entry, row) in _bounded(pool, encode_one, todo, workers * 4, bar):
            record(i, entry, row)
    bar.close()


@contextlib.contextmanager
def one_torch_thread_per_worker(workers: int) -> Iterator[None]:
    """While ``workers`` reader threads run torch ops (QR, conversions), give torch one intra-op thread.

    Why: each worker already keeps a core busy; torch's own pool on top (``workers × cores`` threads)
    makes its ops spin and stall for milliseconds each (measured: canonical encoding of a Flux-sized
    file several times slower on 2 cores with the default pool).
    """
    import torch

    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _store_family(facts: dict, good: list[int]) -> str:
    found = Counter(facts[i].get("family") or "unknown" for i in good)
    return found.most_common(1)[0][0] if found else "unknown"


def _finalize(
    out: Path,
    partial: Path,
    plan,
    layout: Layout,
    sources,
    facts,
    good,
    problems,
    matrix_path,
    offset,
    row_bytes,
    opts,
    old,
    path_list,
) -> Store:
    token = plan["token"]
    final_matrix = out / f"matrix-{token}.npy"
    if len(good) == len(sources):
        os.replace(matrix_path, final_matrix)
    else:  # compact: stream the good rows into a matrix without the holes
        check_free_space(out, len(good) * row_bytes, "the compacted matrix")
        try:
            dst_offset = _allocate(final_matrix, len(good), layout.n_features, opts.dtype)
            with matrix_path.open("rb") as src_fh, final_matrix.open("r+b") as dst_fh:
                for k, i in enumerate(good):
                    src_fh.seek(offset + i * row_bytes)
                    dst_fh.seek(dst_offset + k * row_bytes)
                    dst_fh.write(src_fh.read(row_bytes))
                dst_fh.flush()
                os.fsync(dst_fh.fileno())
        except BaseException:
            final_matrix.unlink(missing_ok=True)  # half written; .partial/ keeps what a resume needs
            raise
    rows = [{k: v for k, v in facts[i].items() if k != "i"} for i in good]
    manifest = {
        "wsa_format_version": FORMAT_VERSION,
        "wsa_version": wsa.__version__,
        "repr": opts.repr,
        "dtype": opts.dtype,
        "n_rows": len(good),
        "n_features": layout.n_features,
        "matrix": final_matrix.name,
        "layout": plan["layout"],
        "rows": rows,
        "problems": [{"source": p, "reason": r} for p, r in problems],
        "left_out": [{"source": p, "reason": r} for p, r in plan.get("left_out", [])],
        "family": _store_family(facts, good),
        "config": plan["config"],
        "inputs": [str(p) for p in path_list],
    }
    write_json(out / MANIFEST, manifest)
    if old is not None and old.matrix_path != final_matrix:
        _remove_old_matrix(old.matrix_path, out)
    _remove_partial(partial)
    return Store(out)


def _remove_old_matrix(path: Path, out: Path) -> None:
    """Delete the previous build's matrix, only if it is a plain ``matrix-*.npy`` entry of the store folder.

    The name comes from the old manifest, which is input: whatever it says, nothing outside ``out`` goes.
    """
    try:
        st = os.lstat(path)
        inside = path.parent.resolve() == out.resolve() and is_matrix_name(path.name)
    except (OSError, RuntimeError):
        return
    if inside and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        path.unlink(missing_ok=True)  # a symlink: the link itself, inside out/, never its target
