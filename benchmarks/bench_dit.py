"""DiT-sized LoRAs: a folder of Flux.1-shaped files through ingest and the gauge-invariant ΔW PCA.

    .venv/bin/python benchmarks/bench_dit.py --n 200 --data bench-data/flux

Generates ``--n`` LoRA files shaped like what ai-toolkit writes for FLUX.1-dev (diffusers keys
``transformer.<module>.lora_A/B.weight``, bf16, every Linear of the 19 double and 38 single blocks),
rank 16 for three files in four and rank 8 for the rest, so the store must pad (mixed ranks): ~77 M
parameters (154 MB) per rank-16 file. Each file is a planted low-rank structure plus noise so the
spectrum has something to find. Then measures, in separate processes (peak RSS from /proc):

* a one-thread plain read of the files (the disk's rate, same cache state);
* ``wsa ingest --repr canonical --dtype float16`` (gauge-fixed factors, padded to rank 16; ΔW is never
  formed: 77 M factor numbers per adapter instead of 9.7 G ΔW entries);
* ``wsa analyze --space delta --analyzers pca`` on that store: the PCA of ΔW from factor Gram products.

Writes the section "DiT-sized LoRAs (Flux.1 shape)" of docs/benchmarks.md. Disk: ~0.14 GB × n of files
(kept in ``--data`` for reuse) and ~0.15 GB × n of store (deleted after unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import code_version, drop_caches, machine, plain_read, run_measured, wsa_exe

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## DiT-sized LoRAs (Flux.1 shape)"
HIDDEN = 3072
MLP = 4 * HIDDEN


def flux_modules() -> list[tuple[str, int, int]]:
    """``(diffusers module, out, in)`` of every Linear a full Flux.1-dev LoRA targets."""
    d, out = HIDDEN, []
    for i in range(19):
        b = f"transformer_blocks.{i}"
        for leaf in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            out.append((f"{b}.attn.{leaf}", d, d))
        out += [(f"{b}.attn.to_out.0", d, d), (f"{b}.attn.to_add_out", d, d)]
        for ff in ("ff", "ff_context"):
            out += [(f"{b}.{ff}.net.0.proj", MLP, d), (f"{b}.{ff}.net.2", d, MLP)]
        out += [(f"{b}.norm1.linear", 6 * d, d), (f"{b}.norm1_context.linear", 6 * d, d)]
    for i in range(38):
        b = f"single_transformer_blocks.{i}"
        out += [(f"{b}.attn.{leaf}", d, d) for leaf in ("to_q", "to_k", "to_v")]
        out += [(f"{b}.proj_mlp", MLP, d), (f"{b}.proj_out", d, d + MLP), (f"{b}.norm.linear", 3 * d, d)]
    return out


def _generate_one(path: str, rank: int, seed: int, basis_seed: int) -> int:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(basis_seed)
    tensors = {}
    for name, o, i in flux_modules():
        # a planted component shared by all files (its coefficient varies) + per-file noise
        a0 = torch.randn(1, i, generator=shared) / i**0.5
        b0 = torch.randn(o, 1, generator=shared) * 0.01
        c = float(torch.randn(1, generator=g))
        down = torch.randn(rank, i, generator=g) / i**0.5
        up = torch.randn(o, rank, generator=g) * 0.002
        down[0] = a0[0]
        up[:, 0] = b0[:, 0] * (1 + c)
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    meta = {"ss_base_model_version": "flux1", "ss_network_dim": str(rank), "software": "bench_dit"}
    save_file(tensors, path, metadata=meta)
    return os.path.getsize(path)


def generate(folder: Path, n: int, procs: int) -> tuple[float, int]:
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder / f"lora_{k:04d}.safetensors"), 8 if k % 4 == 3 else 16, k, 12345) for k in range(n)]
    todo = [t for t in todo if not Path(t[0]).is_file()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_generate_one, *zip(*todo, strict=True))) if todo else None
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return time.perf_counter() - t0, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--data", default="bench-data/flux")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--stages",
        default="read,ingest,analyze",
        help="stages to (re)measure; the others keep their result from the last run's JSON (resumable)",
    )
    p.add_argument("--keep", action="store_true", help="keep the store after the last stage")
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    args = p.parse_args()
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}

    folder = Path(args.data) / f"n{args.n}"
    t_gen, total = generate(folder, args.n, args.procs)
    files = sorted(folder.glob("*.safetensors"))[: args.n]
    print(f"generated {len(files)} files, {total / 1e9:.1f} GB in {t_gen:.0f} s", file=sys.stderr)
    out_json = ROOT / "docs" / "measurements" / f"dit-flux-n{len(files)}.json"
    record = json.loads(out_json.read_text()) if out_json.is_file() else {}
    store = Path(args.data) / f"store-n{args.n}"
    report = Path(args.data) / f"report-n{args.n}"

    if "read" in stages or "plain_read_s" not in record:
        cold = drop_caches()
        t_read, n_bytes = plain_read(files)
        record.update(plain_read_s=round(t_read, 2), bytes=n_bytes, cold_cache=cold, n=len(files))
        _save(out_json, record)
    if "ingest" in stages or not (store / "wsa_store.json").is_file():
        shutil.rmtree(store, ignore_errors=True)
        drop_caches()
        cmd = [wsa_exe(), "ingest", str(folder), "--out", str(store), "--repr", "canonical", "--dtype", "float16", "-q"]
        record["ingest"] = run_measured(cmd, len(files), store / ".partial" / "rows.jsonl")
        record["ingest_commit"] = code_version()
        _save(out_json, record)
    manifest = json.loads((store / "wsa_store.json").read_text())
    if "analyze" in stages:
        shutil.rmtree(report, ignore_errors=True)
        drop_caches()
        cmd = [wsa_exe(), "analyze", str(store), "--out", str(report), "--space", "delta", "--analyzers", "pca"]
        cmd += ["--n-components", str(args.k), "--quiet"]
        record["analyze"] = run_measured(cmd, len(files), None)
        results = json.loads((report / "results.json").read_text())
        pca = next(r for r in results["results"] if r["analyzer"] == "pca")
        record["pca_summary"] = pca["summary"]
        record["timings_s"] = results["run"]["timings_s"]
        record["analyze_commit"] = code_version()
        _save(out_json, record)
    mods = flux_modules()
    record.update(
        n_features=manifest["n_features"],
        layout_ranks=sorted({m["rank"] for m in manifest["layout"]["modules"]}),
        delta_entries_per_adapter=sum(o * i for _, o, i in mods),
        machine=machine(),
    )
    _save(out_json, record)
    if "ingest" not in record or "analyze" not in record:
        print("measured so far (run the missing stages to write the doc section):", record, file=sys.stderr)
        return
    block = _block(record, args, out_json.name, len(mods))
    _write(Path(args.doc), block)
    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
    print(block)


#: What the numbers above mean (measured on the 2-core machine; see docs/benchmarks.md).
WHERE_THE_TIME_GOES = (
    "Where the time goes. Ingest is CPU-bound, not disk-bound: each 150 MB file costs 3.2 s of CPU (2.3 s"
    " user, 0.9 s system; ingest user+sys over 200 files in the JSON) (bf16 → float64 conversion of 86 M "
    "numbers, the gauge-fixing CholeskyQR and small SVDs of 494 modules, the ΔW norm, sha256), so two "
    'reader threads reach 75 MB/s where the disk gives 874 MB/s — the "at the disk\'s rate" target is not '
    "met for DiT-sized files (it is for w2w's 0.4 MB files). The ΔW Gram itself needs no gauge fixing "
    "(⟨ΔW_i, ΔW_j⟩ is the same for any factors), so storing the factors padded but not canonicalised "
    "would make this ingest a copy; that is a storage choice left to the storage/geometry split of issue "
    "13. The analysis is the exact ΔW Gram: N²·r²·Σ(out+in) = 5.5·10¹³ multiply-adds (1.1·10¹⁴ flop) for "
    "these 200 files, two GEMMs per module per run of columns (~110 GFLOP/s on the 2 cores); one read of "
    "the store, memory bounded by the column runs (6.5 GiB peak, a quarter of RAM). The held-out test "
    "reuses the fit's Gram (2 s). On a GPU the same Gram is two batched GEMMs per module."
)


def _save(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _block(r: dict, args: argparse.Namespace, json_name: str, n_modules: int) -> str:
    mach, ing, ana = r["machine"], r["ingest"], r["analyze"]
    n_bytes, t_read = r["bytes"], r["plain_read_s"]
    cache = "cold cache (page cache dropped)" if r.get("cold_cache") else "warm cache (could not drop the page cache)"
    ratio = r["delta_entries_per_adapter"] / r["n_features"]
    timings = r.get("timings_s", {})
    return "\n".join(
        [
            "",
            f"Produced by `benchmarks/bench_dit.py --n {r['n']}` (ingest on commit {r['ingest_commit']}, analyze on "
            f"{r['analyze_commit']}), {mach['cpu']}, {mach['nproc']} cores, {mach['ram_gb']:.0f} GiB RAM, {cache}; "
            f"raw numbers in `docs/measurements/{json_name}`.",
            "",
            f"{r['n']} Flux.1-shaped LoRA files (ai-toolkit/diffusers keys, bf16, {n_modules} modules, rank 16 for "
            f"three in four and 8 for the rest), {n_bytes / 1e9:.1f} GB. The store pads every module to rank "
            f"{r['layout_ranks'][-1]}: {r['n_features']:,} gauge-fixed factor numbers per adapter (float16), where "
            f"dense ΔW would be {r['delta_entries_per_adapter']:,} ({ratio:.0f}×); ΔW is never formed.",
            "",
            "| step | seconds | rate | peak RSS |",
            "|---|---|---|---|",
            f"| plain read of the files (one thread) | {t_read:.1f} | {n_bytes / t_read / 1e6:.0f} MB/s | - |",
            f"| `wsa ingest --repr canonical --dtype float16` | {ing['wall']:.1f} | "
            f"{n_bytes / ing['wall'] / 1e6:.0f} MB/s ({t_read / ing['wall']:.2f}× the plain read's rate) | "
            f"{ing['maxrss_gb']:.2f} GiB |",
            f"| `wsa analyze --space delta --analyzers pca --n-components {args.k}` (ΔW PCA from factor Grams, "
            f"held-out test included) | {ana['wall']:.1f} | - | {ana['maxrss_gb']:.2f} GiB |",
            "",
            f"Inside analyze (seconds): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}.",
            f"PCA: {r['pca_summary']}",
            "",
            WHERE_THE_TIME_GOES,
            "",
        ]
    )


def _write(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        tail = "" if nxt < 0 else rest[nxt:]
        text = head + SECTION + "\n" + block + tail
    else:
        text = text.rstrip() + "\n\n" + SECTION + "\n" + block
    path.write_text(text)


if __name__ == "__main__":
    main()
