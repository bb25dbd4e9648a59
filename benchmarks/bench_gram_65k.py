"""ΔW-space PCA of 65,000 w2w-shaped adapters beside raw streaming PCA of the same store, in bounded memory.

    .venv/bin/python benchmarks/bench_gram_65k.py all          # everything below, in order (hours)
    .venv/bin/python benchmarks/bench_gram_65k.py prepare      # adapters → bench-data/store-raw-65000 (26 GB)
    .venv/bin/python benchmarks/bench_gram_65k.py raw          # fit_space(solver="streaming"), k = 1000
    .venv/bin/python benchmarks/bench_gram_65k.py delta        # fit_delta_gram (out of core), k = 1000
    .venv/bin/python benchmarks/bench_gram_65k.py heldout      # heldout_reconstruction_gram on the same Gram
    .venv/bin/python benchmarks/bench_gram_65k.py accuracy     # randomized vs exact on the first 5,000 rows
    .venv/bin/python benchmarks/bench_gram_65k.py residuals    # ‖K̃u − λu‖ / λ of the 65k fit (one more pass)
    .venv/bin/python benchmarks/bench_gram_65k.py report       # docs/benchmarks.md section from the JSON

Data: the same w2w-shaped collection as the issue-6 run (``benchmarks/bench_ingest.py``'s generator: rank-1
LoRA on q/v of SD 1.5's 16 attention blocks, 99,648 float32 factors each, chunks of 1,000 with seed
0 + chunk start), ingested ``--repr raw`` (float32); the adapter files are deleted once the store exists.
The accuracy store is the first 5,000 adapters of the same generator (identical rows), small enough
for the exact solver.

Each measuring step runs in its own process (``all`` starts them as children), so peak RSS
(``ru_maxrss``, which counts file-backed pages a process maps) is that fit's own; the page cache is
dropped before each when permitted. Results go to ``docs/measurements/delta-gram-65k.json`` (one key per
step, merged), and ``report`` writes the block "65,000 adapters, k = 1000, out of core" into the
section "ΔW-space PCA (factor Grams)". The ΔW step resumes an interrupted tile pass (its on-disk Gram
is ``bench-data/gram-65000``); its JSON then says how many tiles that process computed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import code_version, drop_caches, generate, machine, wsa_exe  # noqa: E402

SECTION = "## ΔW-space PCA (factor Grams)"
JSON = ROOT / "docs" / "measurements" / "delta-gram-65k.json"
STEPS = ("accuracy", "delta", "heldout", "raw", "residuals")  # the long ΔW fit early: it resumes


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _save(step: str, result: dict) -> None:
    """Merge one step's result into the JSON (atomically: an interrupted write leaves the old file)."""
    from wsa.atomic import write_bytes

    data = json.loads(JSON.read_text()) if JSON.is_file() else {}
    data[step] = result
    write_bytes(JSON, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def prepare(n: int, data: Path, seed: int, keep_adapters: bool) -> Path:
    """The raw float32 store of ``n`` synthetic adapters, generated and ingested as bench_ingest.py does."""
    store = data / f"store-raw-{n}"
    if (store / "wsa_store.json").is_file():
        print(f"reusing {store}", flush=True)
        return store
    coll = data / f"adapters-{n}"
    generate(coll, n, seed, os.cpu_count() or 1)
    t0 = time.perf_counter()
    subprocess.run([wsa_exe(), "ingest", str(coll), "--out", str(store), "--repr", "raw", "--quiet"], check=True)
    print(f"ingest: {time.perf_counter() - t0:.0f} s", flush=True)
    if not keep_adapters:  # the adapters (27 GB at 65k) are not needed once the store exists
        shutil.rmtree(coll)
    return store


def _common(store) -> dict:
    return {
        "n": len(store),
        "d": store.n_features,
        "store": str(store.path),
        "code": code_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
    }


def step_raw(store, k: int) -> dict:
    from wsa.space import fit_space

    cold = drop_caches()
    t0 = time.perf_counter()
    space = fit_space(store, k, solver="streaming", n_iter=4, device="cpu", progress=True)
    wall = time.perf_counter() - t0
    return {
        **_common(store),
        "k": k,
        "route": "fit_space(solver='streaming', n_iter=4)",
        "wall_s": wall,
        "peak_rss_gib": _peak_gib(),
        "cold_cache": cold,
        "captured": float(space.explained_variance.sum() / space.total_variance),
        "total_variance": float(space.total_variance),
        "config": space.config,
    }


def step_delta(store, k: int, work: Path, n_iter: int) -> dict:
    from wsa.gram import fit_delta_gram

    cold = drop_caches()
    t0 = time.perf_counter()
    space = fit_delta_gram(store, k, solver="auto", n_iter=n_iter, work_dir=work, progress=True)
    wall = time.perf_counter() - t0
    cfg = space.config
    return {
        **_common(store),
        "k": k,
        "route": f"fit_delta_gram(solver='auto' → {cfg['solver']}, n_iter={n_iter})",
        "wall_s": wall,
        "peak_rss_gib": _peak_gib(),
        "cold_cache": cold,
        "captured": float(space.explained_variance_ratio.sum()),
        "total_variance": float(space.total_variance),
        "gram_bytes": (work / "tiles.f32").stat().st_size,
        "explained_variance_head": [float(v) for v in space.explained_variance[:10]],
        "config": cfg,
    }


def step_residuals(store, k: int, work: Path, n_iter: int) -> dict:
    """A posteriori accuracy where exact eigh is out of reach: the Ritz pairs' residuals r = K̃u − λu.

    For a unit vector u and symmetric K̃, some eigenvalue lies within ‖r‖ of λ (and within ‖r‖²/gap when
    the gap to the rest of the spectrum is known), so ‖r‖/λ bounds each eigenvalue's relative error
    without the exact solver. Refits on the stored tiles (eigensolver only), then one more pass for K̃U.
    """
    import numpy as np
    from tqdm import tqdm

    from wsa.gram import _centred_product, _gram_budget, _open_disk_gram, fit_delta_gram

    t0 = time.perf_counter()
    space = fit_delta_gram(store, k, solver="randomized", n_iter=n_iter, work_dir=work, progress=False)
    t_fit = time.perf_counter() - t0
    lam = space.explained_variance * (space.n_samples - 1)
    U = space.dual_weights * np.sqrt(lam)
    m = space.gram_row_means
    t0 = time.perf_counter()
    with _open_disk_gram(store, work, _gram_budget()) as dg:
        KU = _centred_product(dg, U.astype(np.float32), m, float(m.mean()), "cpu", tqdm(disable=True))
    rel = np.linalg.norm(KU - U * lam, axis=0) / lam
    return {
        **_common(store),
        "k": k,
        "n_iter": n_iter,
        "refit_s": t_fit,
        "refit_config": space.config,
        "residual_pass_s": time.perf_counter() - t0,
        "rel_residual_max": float(rel.max()),
        "rel_residual_median": float(np.median(rel)),
        "rel_residual_top10_max": float(rel[:10].max()),
        "rel_residual_last10_max": float(rel[-10:].max()),
        "eigenvalue_ratio_first_last": float(lam[0] / lam[-1]),
    }


def step_heldout(store, k: int, work: Path, n_iter: int) -> dict:
    import numpy as np

    from wsa.gram import heldout_reconstruction_gram

    ks = sorted({int(v) for v in np.unique(np.geomspace(1, k, num=12).round())})
    t0 = time.perf_counter()
    out = heldout_reconstruction_gram(store, ks, n_iter=n_iter, work_dir=work, progress=True)
    wall = time.perf_counter() - t0
    return {
        **_common(store),
        "k": ks,
        "wall_s": wall,
        "peak_rss_gib": _peak_gib(),
        "n_train": out["n_train"],
        "train_error": out["train_error"],
        "heldout_error": out["heldout_error"],
    }


def step_accuracy(store, ks: list[int], work: Path, iters: list[int]) -> dict:
    """Randomized (out of core, each n_iter) against exact eigh on one store: eigenvalues, captured variance."""
    import numpy as np

    from wsa.gram import fit_delta_gram

    out: dict = {**_common(store), "runs": []}
    for k in ks:
        t0 = time.perf_counter()
        exact = fit_delta_gram(store, k, solver="exact", progress=False)
        t_exact = time.perf_counter() - t0
        ev = exact.explained_variance
        for q in iters:
            t0 = time.perf_counter()
            rand = fit_delta_gram(store, k, solver="randomized", n_iter=q, work_dir=work, progress=False)
            t_rand = time.perf_counter() - t0
            rel = np.abs(rand.explained_variance / ev - 1)
            # Coordinates of the top-10 members' PCs up to sign, relative to each PC's largest coordinate.
            coef = [
                float(
                    min(
                        np.abs(rand.coefficients[:, j] - exact.coefficients[:, j]).max(),
                        np.abs(rand.coefficients[:, j] + exact.coefficients[:, j]).max(),
                    )
                    / np.abs(exact.coefficients[:, j]).max()
                )
                for j in range(min(10, k))
            ]
            run = {
                "k": k,
                "n_iter": q,
                "exact_s": t_exact,
                "randomized_s": t_rand,
                "randomized_gram_s": rand.config["gram_seconds"],
                "randomized_eig_s": rand.config["eig_seconds"],
                "exact_gram_s": exact.config["gram_seconds"],
                "exact_eig_s": exact.config["eig_seconds"],
                "captured_exact": float(exact.explained_variance_ratio.sum()),
                "captured_randomized": float(rand.explained_variance_ratio.sum()),
                "captured_ratio": float(rand.explained_variance.sum() / ev.sum()),
                "eig_rel_err_max": float(rel.max()),
                "eig_rel_err_median": float(np.median(rel)),
                "eig_rel_err_top10_max": float(rel[:10].max()),
                "coef_top10_max_err": max(coef),
            }
            print(json.dumps(run), flush=True)
            out["runs"].append(run)
    return out


def _run_child(step: str, args: argparse.Namespace, log: Path | None) -> None:
    cmd = [sys.executable, __file__, step, "--n", str(args.n), "--k", str(args.k), "--n-iter", str(args.n_iter)]
    cmd += ["--data", str(args.data)]
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def _table_block() -> str:
    data = json.loads(JSON.read_text())
    raw, delta = data.get("raw"), data.get("delta")
    held, acc, res = data.get("heldout"), data.get("accuracy"), data.get("residuals")
    if not (raw and delta):
        raise SystemExit(f"{JSON}: needs the raw and delta steps first")
    mach = delta["machine"]
    cfg = delta["config"]
    lines = [
        f"{delta['n']:,} adapters × {delta['d']:,} factor numbers (float32 raw store, 26 GB; w2w's shape, the "
        f"issue-6 collection), k = {delta['k']}. {mach['cpu']}, {mach['nproc']} CPUs, {mach['ram_gb']:.1f} GiB; "
        f"wsa {delta['code']}, {delta['date']}. Each fit in its own process, page cache dropped first "
        f"({'yes' if raw['cold_cache'] and delta['cold_cache'] else 'not permitted: warm'}); other jobs shared the 2 "
        "cores during the runs, so times are upper bounds.",
        "",
        "Command: `.venv/bin/python benchmarks/bench_gram_65k.py all` (steps `prepare`, `raw`, `delta`, "
        "`heldout`, `accuracy`, `residuals`, `report`); raw numbers in `docs/measurements/delta-gram-65k.json`.",
        "",
        "| PCA of | route | time (s) | peak RSS (GiB) | top-k variance share |",
        "|---|---|---|---|---|",
        f"| raw factors | `{raw['route']}`, sketch width {raw['config'].get('n_columns', '?')} | "
        f"{raw['wall_s']:.0f} | {raw['peak_rss_gib']:.2f} | {raw['captured']:.4f} |",
        f"| ΔW | Gram tiles to disk ({cfg['gram_seconds']:.0f} s, {cfg['gram_tiles_computed']} of "
        f"{cfg['gram_tiles']} tiles in this process, {delta['gram_bytes'] / 1e9:.1f} GB float32) + randomized "
        f"eigensolver over them ({cfg['eig_seconds']:.0f} s: {cfg['passes']} passes, l = {cfg['sketch_columns']}, "
        f"n_iter {cfg['n_iter']}) | {delta['wall_s']:.0f} | {delta['peak_rss_gib']:.2f} | {delta['captured']:.4f} |",
    ]
    if held:
        lines.append(
            f"| ΔW held-out test (80/20, ks up to {held['k'][-1]}) | train block eigensolve on the same tiles | "
            f"{held['wall_s']:.0f} | {held['peak_rss_gib']:.2f} | held-out error at k = {held['k'][-1]}: "
            f"{held['heldout_error'][-1]:.4f} (train {held['train_error'][-1]:.4f}) |"
        )
    lines += ["", f"ΔW route / raw route: {delta['wall_s'] / raw['wall_s']:.2f}× the time."]
    if res:
        lines += [
            "",
            f"Accuracy at {res['n']:,} without an exact reference (`bench_gram_65k.py residuals`: the Ritz pairs' "
            f"residuals ‖K̃u − λu‖ / λ, one more pass over the tiles; some eigenvalue lies within ‖r‖ of each λ): "
            f"max {res['rel_residual_max']:.1e}, median {res['rel_residual_median']:.1e}, top 10 ≤ "
            f"{res['rel_residual_top10_max']:.1e}, last 10 ≤ {res['rel_residual_last10_max']:.1e} "
            f"(λ₁/λ_k = {res['eigenvalue_ratio_first_last']:.2f}). The refit on the stored tiles took "
            f"{res['refit_s']:.0f} s (eigensolver only). The residuals' floor is the float32 products (the same "
            "~2.4e-7 appears at 5,000 adapters, `residuals --n 5000 --k 100`, where the eigenvalues' actual errors "
            "against exact are ~1e-8), so "
            "this bounds, rather than measures, the error.",
        ]
    if acc:
        lines += [
            "",
            f"Accuracy of the randomized eigensolver against exact `eigh`, on the first {acc['n']:,} adapters of "
            "the same collection (`bench_gram_65k.py accuracy`; the same out-of-core code, forced):",
            "",
            "| k | n_iter | eigenvalue rel. error: max / median / max of top 10 | top-k variance share: "
            "randomized / exact | share of the exact top-k variance missed | top-10 coefficients, max error "
            "| eigensolver randomized / exact (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in acc["runs"]:
            lines.append(
                f"| {r['k']} | {r['n_iter']} | {r['eig_rel_err_max']:.1e} / {r['eig_rel_err_median']:.1e} / "
                f"{r['eig_rel_err_top10_max']:.1e} | {r['captured_randomized']:.6f} / {r['captured_exact']:.6f} "
                f"| {1 - r['captured_ratio']:.1e} | {r['coef_top10_max_err']:.1e} | "
                f"{r['randomized_eig_s']:.1f} / {r['exact_eig_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def report(doc: Path) -> str:
    import bench_analyze

    block = _table_block()
    n = json.loads(JSON.read_text())["delta"]["n"]
    k = json.loads(JSON.read_text())["delta"]["k"]
    old = bench_analyze.SECTION
    bench_analyze.SECTION = SECTION
    try:
        bench_analyze.write_section(doc, f"{n:,} adapters, k = {k}, out of core", block)
    finally:
        bench_analyze.SECTION = old
    return block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["all", "prepare", *STEPS, "report"])
    p.add_argument("--n", type=int, default=65000)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--n-iter", type=int, default=3, help="power steps of the ΔW eigensolver")
    p.add_argument("--accuracy-n", type=int, default=5000)
    p.add_argument("--data", type=Path, default=ROOT / "bench-data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-adapters", action="store_true")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--rerun", action="store_true", help="redo steps already in the JSON")
    args = p.parse_args()
    args.data = args.data.resolve()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.step == "prepare":
        prepare(args.n, args.data, args.seed, args.keep_adapters)
        return
    if args.step == "report":
        print(report(args.doc))
        return
    if args.step == "all":
        prepare(args.n, args.data, args.seed, args.keep_adapters)
        prepare(args.accuracy_n, args.data, args.seed, args.keep_adapters)
        done = json.loads(JSON.read_text()) if JSON.is_file() else {}
        for step in STEPS:
            if step in done and not args.rerun:
                print(f"{step}: in {JSON} already (--rerun to redo)", flush=True)
                continue
            _run_child(step, args, None)
        print(report(args.doc))
        return

    import wsa

    work = args.data / f"gram-{args.n}"
    if args.step == "accuracy":
        store = wsa.open_store(prepare(args.accuracy_n, args.data, args.seed, args.keep_adapters))
        result = step_accuracy(store, [100, args.k], args.data / f"gram-{args.accuracy_n}", [1, 2, 3, 4])
    else:
        store = wsa.open_store(args.data / f"store-raw-{args.n}")
        if args.step == "raw":
            result = step_raw(store, args.k)
        elif args.step == "delta":
            result = step_delta(store, args.k, work, args.n_iter)
        elif args.step == "residuals":
            result = step_residuals(store, args.k, work, args.n_iter)
        else:
            result = step_heldout(store, args.k, work, args.n_iter)
    extra = "" if args.n == 65000 else f" --n {args.n} --k {args.k}"
    result["command"] = f".venv/bin/python benchmarks/bench_gram_65k.py {args.step}{extra}"
    _save(args.step + ("" if args.n == 65000 or args.step == "accuracy" else f"-{args.n}"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
