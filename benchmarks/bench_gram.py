"""ΔW-space PCA from the factors' Gram products beside raw-factor PCA, on the same store.

    .venv/bin/python benchmarks/bench_gram.py --store bench-data/peers/n5000/store --k 100

Both fits read the same raw store of rank-1 q/v LoRAs (SD 1.5 shape). The ΔW route never forms ΔW
(28 M numbers per adapter at SD 1.5 size, 280× the factors); its cost is the N × N Gram matrix (N² pairs
× Σ(out+in) per pair — the same arithmetic as the raw Gram for rank 1) plus one N × N eigendecomposition.
Writes the section "ΔW-space PCA (factor Grams)" of docs/benchmarks.md. ``--solver`` forces the ΔW
eigensolver (default: by memory, as ``wsa analyze``); at 65 k see ``bench_gram_65k.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_analyze import write_section as _write_block
from bench_ingest import code_version, machine

SECTION = "## ΔW-space PCA (factor Grams)"


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--doc", default="docs/benchmarks.md")
    p.add_argument(
        "--solver", default="auto", choices=["auto", "exact", "randomized"], help="ΔW eigensolver (fit_delta_gram)"
    )
    args = p.parse_args()

    import numpy as np
    import torch

    import wsa
    from wsa.gram import fit_delta_gram
    from wsa.space import fit_space

    torch.set_num_threads(os.cpu_count() or 1)
    store = wsa.open_store(args.store)
    t0 = time.perf_counter()
    raw = fit_space(store, args.k, solver="exact", progress=False)
    t_raw = time.perf_counter() - t0
    peak_raw = _peak_gb()
    t0 = time.perf_counter()
    delta = fit_delta_gram(store, args.k, progress=False, solver=args.solver)
    t_delta = time.perf_counter() - t0
    peak_delta = _peak_gb()
    n, d = len(store), store.n_features
    delta_features = sum(int(np.prod(m.shape)) for m in store.layout.modules)
    mach = machine()
    lines = [
        f"{n:,} adapters, {d:,} factor parameters each ({delta_features:,} ΔW entries each: "
        f"{delta_features / d:.0f}×, {n * delta_features * 4 / 1e12:.2f} TB for the collection if materialised). "
        f"k = {args.k}. {mach['cpu']}, {mach['nproc']} CPUs; wsa {code_version()}.",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_gram.py --store STORE --k {args.k}"
        + (f" --solver {args.solver}" if args.solver != "auto" else "")
        + "`",
        "",
        "| PCA of | route | time (s) | peak RSS so far (GiB) | top-k variance share |",
        "|---|---|---|---|---|",
        f"| raw factors | exact (Gram of rows, eigh) | {t_raw:.1f} | {peak_raw:.2f} | "
        f"{raw.explained_variance.sum() / raw.total_variance:.4f} |",
        f"| ΔW | factor Grams, {delta.config['solver']} (Gram {delta.config['gram_seconds']:.1f} s + eigen "
        f"{delta.config['eig_seconds']:.1f} s) | {t_delta:.1f} | {peak_delta:.2f} | "
        f"{delta.explained_variance.sum() / delta.total_variance:.4f} |",
        "",
        f"ΔW route / raw route: {t_delta / t_raw:.2f}× the time.",
    ]
    block = "\n".join(lines) + "\n"
    path = Path(args.doc)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        path.write_text(text.rstrip() + f"\n\n{SECTION}\n\nProduced by `benchmarks/bench_gram.py`.\n")
    import bench_analyze

    old = bench_analyze.SECTION
    bench_analyze.SECTION = SECTION
    try:
        _write_block(path, f"{n:,} adapters, k = {args.k}", block)
    finally:
        bench_analyze.SECTION = old
    print(block)


if __name__ == "__main__":
    main()
