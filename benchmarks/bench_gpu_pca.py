"""w2w's all-in-GPU PCA recipe beside wsa's streaming PCA with the matrix in host memory (one GPU).

    python benchmarks/bench_gpu_pca.py --n 64974 --d 99648 --ks 1000,10000 --out results.json

The matrix (w2w's shape by default: 64,974 × 99,648 float32, 25.9 GB) is generated in host memory
(planted rank-``--rank`` structure plus noise, on the GPU in blocks, copied out). w2w's recipe: copy it
to the GPU, z-score there, ``torch.svd_lowrank(q=1000, niter=2)``. wsa: ``fit_space(..., solver=
"streaming", standardize=True, n_iter=2, device="cuda")`` reading 64 MB blocks from host memory.
Reported: seconds, peak GPU memory (``torch.cuda.max_memory_allocated``), and the variance the k
components capture (Σ s²) relative to w2w's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def generate(n: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    basis = torch.randn(rank, d, device="cuda", generator=g) / np.sqrt(d)
    weights = torch.linspace(1.0, 0.05, rank, device="cuda")
    host = torch.empty(n, d, dtype=torch.float32).pin_memory()
    step = 4096
    for a in range(0, n, step):
        b = min(n, a + step)
        z = torch.randn(b - a, rank, device="cuda", generator=g) * weights
        block = z @ basis * 30 + 0.02 * torch.randn(b - a, d, device="cuda", generator=g)
        host[a:b].copy_(block)  # device → page-locked host, no pageable detour
    torch.cuda.synchronize()
    return host


def w2w_recipe(host: torch.Tensor, q: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        x = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        t_copy = time.perf_counter() - t0
        mean = x.mean(0)
        std = x.std(0)
        x.sub_(mean).div_(std)
        t1 = time.perf_counter()
        _, s, _ = torch.svd_lowrank(x, q=q, niter=2)
        torch.cuda.synchronize()
        t_svd = time.perf_counter() - t1
    except torch.OutOfMemoryError as exc:
        return {"method": f"w2w svd_lowrank q={q}", "error": f"out of GPU memory ({str(exc).splitlines()[0][:120]})"}
    out = {
        "method": f"w2w svd_lowrank q={q}",
        "seconds_total": time.perf_counter() - t0,
        "seconds_copy": t_copy,
        "seconds_zscore_svd": time.perf_counter() - t0 - t_copy,
        "seconds_svd": t_svd,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "captured": float((s.double() ** 2).sum()),
    }
    del x
    torch.cuda.empty_cache()
    return out


def wsa_streaming(host: torch.Tensor, k: int, n_iter: int = 2) -> dict:
    from wsa.space import fit_space

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        space = fit_space(
            host.numpy(), k, standardize=True, solver="streaming", n_iter=n_iter, device="cuda", progress=False
        )
    except torch.OutOfMemoryError as exc:
        return {"method": f"wsa streaming k={k}", "error": f"out of GPU memory ({str(exc).splitlines()[0][:120]})"}
    return {
        "method": f"wsa streaming k={k}",
        "seconds_total": time.perf_counter() - t0,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "captured": float((space.singular_values**2).sum()),
        "block_rows": space.config["block_rows"],
        "phases": space.config["phases"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64974)
    p.add_argument("--d", type=int, default=99648)
    p.add_argument("--rank", type=int, default=300)
    p.add_argument("--ks", default="1000,10000")
    p.add_argument("--skip-w2w", action="store_true")
    p.add_argument("--out", default="gpu_pca.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    host = generate(args.n, args.d, args.rank)
    results = {
        "gpu": torch.cuda.get_device_name(),
        "n": args.n,
        "d": args.d,
        "matrix_gb": args.n * args.d * 4 / 1e9,
        "generate_s": time.perf_counter() - t0,
        "runs": [],
    }
    ks = [int(k) for k in args.ks.split(",")]
    if not args.skip_w2w:
        results["runs"].append(w2w_recipe(host, 1000))
        print(json.dumps(results["runs"][-1]), flush=True)
    for k in ks:
        results["runs"].append(wsa_streaming(host, k))
        print(json.dumps(results["runs"][-1]), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
