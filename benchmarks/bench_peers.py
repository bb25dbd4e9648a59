"""PCA of one adapter matrix by wsa and by the tools people would use instead, side by side, in one run.

Peers (same data, same machine, each in its own process so peak memory is its own):

* ``torch.svd_lowrank(q=k, niter=2)`` on the matrix in memory — w2w's recipe;
* ``torch.linalg.svd`` (full, exact; stopped after ``--timeout`` seconds);
* scikit-learn ``PCA(svd_solver="randomized")`` and ``IncrementalPCA``;
* ``dask.array.linalg.svd_compressed`` (threads scheduler, the array read from the ``.npy`` memmap);
* wsa ``fit_space`` (randomized, in memory; streaming, out of core) and wsa's Dask engine.

All on the centred matrix (no z-scoring), k components. Accuracy: captured variance of the top k
(``‖X̃ Vᵀ‖² / ‖X̃ V_exactᵀ‖²``, V orthonormalised in float64) and the largest principal angle over the
top 10 components, against the exact decomposition (wsa's exact solver: float64 eigendecomposition of the Gram matrix).
Results go to ``docs/benchmarks.md`` (section "PCA against peers").

    .venv/bin/python benchmarks/bench_peers.py --adapters bench-data/adapters-65000 --n 5000 --k 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_analyze import write_section as _write_block
from bench_ingest import code_version, machine

SECTION = "## PCA against peers"
METHODS = (
    "wsa-exact",
    "wsa-randomized",
    "wsa-randomized-it1",
    "wsa-randomized-it4",
    "wsa-streaming",
    "wsa-dask",
    "torch-svd_lowrank",
    "torch-linalg-svd",
    "sklearn-pca-randomized",
    "sklearn-incremental",
    "dask-svd_compressed",
)


def _centred(store) -> np.ndarray:
    x = np.array(store.matrix, dtype=np.float32)
    x -= x.mean(0, keepdims=True)
    return x


def run_method(method: str, store_path: str, k: int, out: str) -> None:
    """Child process: fit with ``method``, save the (k, D) components and the wall time."""
    import torch

    import wsa

    torch.set_num_threads(os.cpu_count() or 1)
    store = wsa.open_store(store_path)
    t0 = time.perf_counter()
    if method == "wsa-exact":
        from wsa.space import fit_space

        v = fit_space(store, k, solver="exact", progress=False).components
    elif method == "wsa-randomized":
        from wsa.space import fit_space

        v = fit_space(store, k, solver="randomized", n_iter=2, progress=False).components
    elif method == "wsa-randomized-it1":  # one power iteration: the accuracy of w2w's recipe at fewer passes
        from wsa.space import fit_space

        v = fit_space(store, k, solver="randomized", n_iter=1, progress=False).components
    elif method == "wsa-randomized-it4":  # wsa's default: four power iterations
        from wsa.space import fit_space

        v = fit_space(store, k, solver="randomized", n_iter=4, progress=False).components
    elif method == "wsa-streaming":
        from wsa.space import fit_space

        v = fit_space(store, k, solver="streaming", n_iter=2, progress=False).components
    elif method == "wsa-dask":
        from wsa.dask_engine import dask_client, fit_space_dask

        with dask_client(n_workers=os.cpu_count()) as client:
            v = fit_space_dask(store, k, client=client).components
    elif method == "torch-svd_lowrank":
        x = torch.from_numpy(_centred(store))
        _, _, vv = torch.svd_lowrank(x, q=k, niter=2)
        v = vv.T.numpy()
    elif method == "torch-linalg-svd":
        x = torch.from_numpy(_centred(store))
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[:k].numpy()
    elif method == "sklearn-pca-randomized":
        from sklearn.decomposition import PCA

        v = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(np.asarray(store.matrix)).components_
    elif method == "sklearn-incremental":
        from sklearn.decomposition import IncrementalPCA

        ipca = IncrementalPCA(n_components=k, batch_size=max(5 * k, 1000))
        for a in range(0, len(store), ipca.batch_size):
            ipca.partial_fit(np.asarray(store.matrix[a : a + ipca.batch_size]))
        v = ipca.components_
    elif method == "dask-svd_compressed":
        import dask
        import dask.array as da

        with dask.config.set(scheduler="threads"):
            x = da.from_array(store.matrix, chunks=(max(1, (64 << 20) // (4 * store.n_features)), -1))
            x = x.astype(np.float32)
            xc = x - x.mean(axis=0)
            _, _, vv = da.linalg.svd_compressed(xc, k, n_power_iter=2, seed=0)  # dask's defaults
            v = vv.compute()
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    np.save(out, np.asarray(v, dtype=np.float32))
    Path(out + ".json").write_text(json.dumps({"seconds": seconds}))


def measure_exact_rss(method: str, store_path: str, k: int, work: Path, timeout: float = 600.0) -> dict:
    """Run one method with os.wait4 so its own peak RSS is known; stop it after ``timeout`` seconds."""
    import signal
    import threading

    out = str(work / f"{method}.npy")
    t0 = time.perf_counter()
    log = open(work / f"{method}.log", "w")  # noqa: SIM115 (closed below; a pipe could fill and block)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--_run", method, "--store", store_path, "--k", str(k), "--_out", out],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    timer = threading.Timer(timeout, lambda: proc.send_signal(signal.SIGKILL))
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    log.close()
    wall = time.perf_counter() - t0
    if wall >= timeout:
        return {"method": method, "error": f"stopped after {timeout:.0f} s"}
    err = (work / f"{method}.log").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"method": method, "error": (err.strip().splitlines() or ["failed"])[-1][:200]}
    info = json.loads(Path(out + ".json").read_text())
    return {
        "method": method,
        "fit_s": info["seconds"],
        "wall_s": wall,
        "peak_gb": usage.ru_maxrss * 1024 / 2**30,
        "components": out,
    }


def accuracy(store, k: int, ref: np.ndarray, v: np.ndarray) -> dict:
    from wsa.space import principal_angles

    x = np.array(store.matrix, dtype=np.float64)
    x -= x.mean(axis=0)  # in float64: a float32 column mean is off by ~1e-7 of LoRA factors' large means

    # An orthonormal basis of each span first (float32 components are not exactly orthonormal, and
    # norms above 1 would inflate the captured variance by more than the methods differ); all in float64,
    # since the methods differ by ~1e-6 of the variance, float32's rounding level.
    def captured_by(components: np.ndarray) -> float:
        basis = np.linalg.qr(components[:k].T.astype(np.float64))[0]
        return float(np.square(x @ basis).sum())

    captured, exact = captured_by(v), captured_by(ref)
    top = min(10, k)
    q, _ = np.linalg.qr(v[:top].T.astype(np.float64))
    angles = principal_angles(q.T, ref[:top])  # degrees
    return {"captured_variance_ratio": captured / exact, "max_angle_top10_deg": float(np.max(angles))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="bench-data/adapters-65000", help="folder of adapter folders (bench_ingest)")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--work", default="bench-data/peers")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a method is stopped")
    p.add_argument("--rerun", default="", help="re-measure only these methods, keep the others' results")
    p.add_argument("--store")
    p.add_argument("--_run")
    p.add_argument("--_out")
    args = p.parse_args(argv)
    if args._run:
        run_method(args._run, args.store, args.k, args._out)
        return

    import wsa

    work = Path(args.work) / f"n{args.n}"
    work.mkdir(parents=True, exist_ok=True)
    folders = sorted(Path(args.adapters).iterdir())
    folders = [f for f in folders if f.is_dir()][: args.n]
    t0 = time.perf_counter()
    store = wsa.ingest(folders, work / "store", progress=True)
    print(f"store: {len(store)} × {store.n_features} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results = []
    previous = {}
    if args.rerun and (work / "results.json").is_file():
        previous = {r["method"]: r for r in json.loads((work / "results.json").read_text())}
    rerun = set(args.rerun.split(",")) if args.rerun else None
    for method in args.methods.split(","):
        if rerun is not None and method not in rerun and method in previous:
            results.append(previous[method])
            continue
        r = measure_exact_rss(method, str(store.path), args.k, work, args.timeout)
        print(json.dumps({k: v for k, v in r.items() if k != "components"}), file=sys.stderr)
        results.append(r)
    ref_row = next((r for r in results if r["method"] == "wsa-exact" and "error" not in r), None)
    if ref_row is None:
        ref_row = measure_exact_rss("wsa-exact", str(store.path), args.k, work, args.timeout)
    ref = np.load(ref_row["components"])
    for r in results:
        if "error" not in r:
            r.update(accuracy(store, args.k, ref, np.load(r["components"])))
    base = next(r for r in results if r["method"] == "wsa-randomized")
    mach = machine()
    gigabytes = store.n_features * len(store) * 4 / 1e9
    lines = [
        f"{len(store):,} adapters × {store.n_features:,} parameters (float32, {gigabytes:.1f} GB; "
        f"rank-1 q/v LoRAs of SD 1.5's shape, planted low-rank structure + noise: `benchmarks/bench_ingest.py`), "
        f"k = {args.k} components, centred. {mach['cpu']}, {mach['nproc']} CPUs, {mach['ram_gb']:.1f} GiB; "
        f"wsa {code_version()}. Each method in its own process (peak RSS from `wait4`). Accuracy against "
        "the exact decomposition (wsa's exact solver) of the same centred matrix: the share of the exact top-k "
        "variance the span of the k components misses (both orthonormalised in float64; 0 = exact) and the "
        "largest principal angle among the top 10 components. Fit time includes reading the matrix (page cache "
        "warm for every method).",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_peers.py --n {args.n} --k {args.k} --timeout {args.timeout:g}`",
        "",
        "| method | fit time (s) | × wsa | peak RSS (GiB) | × wsa | variance missed vs exact | max angle top-10 (°) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['fit_s']:.1f} | {r['fit_s'] / base['fit_s']:.2f} | {r['peak_gb']:.2f} | "
            f"{r['peak_gb'] / base['peak_gb']:.2f} | {1 - r['captured_variance_ratio']:.1e} | "
            f"{r['max_angle_top10_deg']:.3f} |"
        )
    block = "\n".join(lines) + "\n"
    _write_section(Path(args.doc), f"{len(store):,} × {store.n_features:,}, k = {args.k}", block)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(block)


def _write_section(path: Path, title: str, block: str) -> None:
    """Replace (or add) the ``### title`` block of the "PCA against peers" section of ``path``."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\nProduced by `benchmarks/bench_peers.py`.\n"
        path.write_text(text)
    import bench_analyze

    old = bench_analyze.SECTION
    bench_analyze.SECTION = SECTION
    try:
        _write_block(path, title, block)
    finally:
        bench_analyze.SECTION = old


if __name__ == "__main__":
    main()
