"""w2w's all-in-GPU PCA recipe beside wsa's streaming PCA with the matrix in host memory (one GPU).

    python benchmarks/bench_gpu_pca.py --n 64974 --d 99648 --ks 1000,10000 --out results.json

The matrix (w2w's shape by default: 64,974 × 99,648 float32, 25.9 GB) is generated in host memory
(planted rank-``--rank`` structure plus noise, on the GPU in blocks, copied out). w2w's recipe: copy it
to the GPU, z-score there, ``torch.svd_lowrank(q=1000, niter=2)``. wsa: ``fit_space(..., solver=
"streaming", standardize=True, n_iter=2, device="cuda")`` reading 64 MB blocks from host memory.
Reported: seconds (with wsa's phases), peak GPU memory (``torch.cuda.max_memory_allocated``), and
accuracy as the variance each method's k components capture *on the exact z-scored float32 data*
(``Σ‖X̃·vᵢ‖²``, one more pass per method, not timed): a method's own singular values would hide what
wsa's fp16 GPU copy costs. ``--no-cache`` adds wsa streaming every pass from host memory instead.
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
        _, s, v = torch.svd_lowrank(x, q=q, niter=2)
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
        "components": v.T.cpu(),
    }
    del x, v
    torch.cuda.empty_cache()
    return out


def exact_stats(host: torch.Tensor, step: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and std (ddof = 1) of the host matrix in float64, on the GPU block by block."""
    n = host.shape[0]
    total = torch.zeros(host.shape[1], dtype=torch.float64, device="cuda")
    for a in range(0, n, step):
        total += host[a : a + step].to("cuda").double().sum(0)
    mean = total / n
    m2 = torch.zeros_like(mean)
    for a in range(0, n, step):
        m2 += (host[a : a + step].to("cuda").double() - mean).square().sum(0)
    return mean, (m2 / (n - 1)).sqrt()


def captured_on_data(host: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, components, step: int = 1024) -> float:
    """‖X̃·V‖² over the exact z-scored rows, V an orthonormal basis of the components' span (float64 QR).

    Why the QR: float32 components are not exactly orthonormal (``torch.svd_lowrank``'s at this
    shape), and norms above 1 inflate ``Σ‖X̃·vᵢ‖²`` by more than the methods differ.
    """
    v = torch.as_tensor(np.asarray(components), dtype=torch.float64).to("cuda").T
    v = torch.linalg.qr(v, mode="reduced").Q.float().contiguous()
    mean32, std32 = mean.float(), std.float()
    total = 0.0
    for a in range(0, host.shape[0], step):
        z = (host[a : a + step].to("cuda") - mean32) / std32
        total += float((z @ v).double().square().sum())
    return total


def wsa_streaming(host: torch.Tensor, k: int, n_iter: int = 2, cache: bool = True) -> dict:
    from wsa.space import fit_space

    name = f"wsa streaming k={k}" + ("" if cache else " (no GPU copy)")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        space = fit_space(
            host.numpy(),
            k,
            standardize=True,
            solver="streaming",
            n_iter=n_iter,
            device="cuda",
            progress=False,
            gpu_cache_bytes=None if cache else 0,
        )
    except torch.OutOfMemoryError as exc:
        return {"method": name, "error": f"out of GPU memory ({str(exc).splitlines()[0][:120]})"}
    return {
        "method": name,
        "components": space.components,
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
    p.add_argument("--no-cache", action="store_true", help="also run wsa without its fp16 GPU copy (first k)")
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
    mean, std = exact_stats(host)

    def record(run: dict) -> None:
        components = run.pop("components", None)
        if components is not None and len(components) <= 1000:
            run["captured_on_data"] = captured_on_data(host, mean, std, components)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)

    if not args.skip_w2w:
        record(w2w_recipe(host, 1000))
    for k in ks:
        record(wsa_streaming(host, k))
    if args.no_cache:
        record(wsa_streaming(host, ks[0], cache=False))


if __name__ == "__main__":
    main()
