#!/usr/bin/env python
"""Ingest benchmark on synthetic adapters of w2w's shape (issue 2).

What it measures, for a collection of ``--n`` PEFT folders (rank-1 LoRA on attn1/attn2 to_q/to_v of
the 16 SD 1.5 attention blocks: 99,648 float32 parameters, ~410 KB per adapter):

1. generation of the collection (once; reused by later runs with the same ``--n``),
2. a plain sequential read of every adapter file (read, discard) after dropping the page cache:
   the disk's rate, the ceiling for anything that has to read the files,
3. ``wsa ingest`` in a subprocess after dropping the page cache: wall time, rows/s, MB/s of input,
   peak RSS of the ingest process itself (``wait4`` rusage; plus sampled anonymous/file-backed RSS),
4. a re-ingest of the unchanged collection (the incremental no-op).

Results go to stdout and to the "Ingest (issue 2)" section of ``--out-md`` (other sections kept).

Reproduce::

    .venv/bin/python benchmarks/bench_ingest.py              # 65,000 adapters: ~27 GB in, ~26 GB out
    .venv/bin/python benchmarks/bench_ingest.py --n 2000     # quick check

Dropping the page cache needs root (``/proc/sys/vm/drop_caches``); otherwise the numbers are marked
"warm cache". Disk: the collection (~0.42 MB × n) stays in ``--data`` for reuse; each store
(~0.4 MB × n for raw/canonical float32) is deleted after its run unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Ingest (issue 2)"
CHUNK = 1000  # adapters per generation task
MB = 1e6
GB = 1e9


# --------------------------------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "ram_gb": mem / 2**30, "python": platform.python_version()}


def disk_of(path: Path) -> str:
    """The block device under ``path`` and whether it is rotational (for the table)."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", str(path)], capture_output=True, text=True
        ).stdout.split()
        if not out:
            return "unknown"
        dev, fstype = out[0], out[1] if len(out) > 1 else "?"
        name = Path(dev).name
        rot = Path(f"/sys/block/{name}/queue/rotational")
        kind = ""
        if rot.is_file():
            kind = ", rotational" if rot.read_text().strip() == "1" else ", non-rotational"
        return f"{dev} ({fstype}{kind})"
    except (OSError, IndexError):
        return "unknown"


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not permitted (numbers are then warm)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def code_version() -> str:
    """``<commit>`` of the checkout, ``+dirty`` when wsa/ or cli/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "wsa", "cli"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------------------ generation


def _gen_chunk(coll: str, start: int, count: int, seed: int, width: int) -> int:
    """Write adapters ``start .. start+count-1`` with the library's own writer (``synth_collection``)
    into a scratch folder, then move them to their global ids."""
    from wsa.synthetic import synth_collection

    coll_path = Path(coll)
    tmp = coll_path / f".tmp-{start}"
    shutil.rmtree(tmp, ignore_errors=True)
    synth_collection(tmp, count, seed=seed + start, progress=False)
    local_width = len(str(count - 1))
    for j in range(count):
        dst = coll_path / f"id_{start + j:0{width}d}"
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp / f"id_{j:0{local_width}d}", dst)
    shutil.rmtree(tmp)
    (coll_path / ".chunks" / str(start)).write_text("")
    return count


def generate(coll: Path, n: int, seed: int, procs: int) -> tuple[float, int, bool]:
    """Create the collection unless complete; return (generation seconds, processes, reused)."""
    marker = coll / ".complete.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("n") == n:
            print(f"reusing {coll} ({n} adapters, generated in {info['seconds']:.0f} s)", flush=True)
            return info["seconds"], info.get("procs", 0), True
    (coll / ".chunks").mkdir(parents=True, exist_ok=True)
    width = len(str(n - 1))
    starts = [s for s in range(0, n, CHUNK) if not (coll / ".chunks" / str(s)).is_file()]
    print(f"generating {n} adapters in {coll} ({len(starts)} chunks of {CHUNK}, {procs} processes)", flush=True)
    t0 = time.perf_counter()
    done = (n + CHUNK - 1) // CHUNK - len(starts)
    with ProcessPoolExecutor(max_workers=procs) as pool:
        futures = [pool.submit(_gen_chunk, str(coll), s, min(CHUNK, n - s), seed, width) for s in starts]
        for fut in as_completed(futures):
            fut.result()
            done += 1
            el = time.perf_counter() - t0
            print(f"  synth: {min(done * CHUNK, n)}/{n} adapters, {el:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps({"n": n, "seed": seed, "seconds": seconds, "procs": procs}))
    return seconds, procs, False


def adapter_files(coll: Path) -> list[Path]:
    """Every file ingest reads, in ingest's order (sorted ids)."""
    files = []
    for d in sorted(e.name for e in os.scandir(coll) if e.name.startswith("id_")):
        unet = coll / d / "unet"
        files.append(unet / "adapter_config.json")
        files.append(unet / "adapter_model.safetensors")
    return files


# ---------------------------------------------------------------------------------------------- reading


def plain_read(files: list[Path]) -> tuple[float, int]:
    """Read every file start to end in one thread (1 MiB reads), discard; return (seconds, bytes)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(view):
                total += k
    return time.perf_counter() - t0, total


# ------------------------------------------------------------------------------------------------ ingest


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], n: int, partial_journal: Path | None, log_every: float = 30.0, abort_if=None) -> dict:
    """Run ``cmd``; return wall time, ``wait4`` peak RSS and sampled peaks of anonymous / file RSS.

    ``abort_if()`` is polled while it runs: a message ends the run (killed) and is returned as ``aborted``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    output: list[str] = []
    stop = threading.Event()
    aborted: list[str] = []

    def sample() -> None:
        last_log = time.perf_counter()
        while not stop.wait(0.2):
            why = abort_if() if abort_if is not None else None
            if why:
                aborted.append(why)
                proc.kill()
                return
            st = _status_kb(proc.pid)
            for k in peaks:
                peaks[k] = max(peaks[k], st.get(k, 0))
            if time.perf_counter() - last_log > log_every:
                last_log = time.perf_counter()
                rows = "?"
                if partial_journal is not None and partial_journal.is_file():
                    with partial_journal.open("rb") as fh:
                        rows = sum(1 for _ in fh)
                print(
                    f"  ... {time.perf_counter() - t0:.0f} s, rows journalled {rows}/{n}, "
                    f"RSS {st.get('VmRSS', 0) / 2**20:.2f} GiB (anon {st.get('RssAnon', 0) / 2**20:.2f})",
                    flush=True,
                )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    reader.join()
    text = "".join(output)
    if aborted:
        return {"wall": wall, "aborted": aborted[0], "output": text.strip()}
    if proc.returncode != 0:
        print(text, file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return {
        "wall": wall,
        "maxrss_gb": usage.ru_maxrss * 1024 / 2**30,  # KiB on Linux
        "peak_anon_gb": peaks["RssAnon"] / 2**20,
        "peak_file_gb": peaks["RssFile"] / 2**20,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "output": text.strip(),
    }


def wsa_exe() -> str:
    exe = Path(sys.executable).parent / "wsa"
    return str(exe) if exe.is_file() else "wsa"


# ---------------------------------------------------------------------------------------------- report


def fmt_cmd(args: argparse.Namespace, repr_: str) -> str:
    parts = [".venv/bin/python", "benchmarks/bench_ingest.py", "--n", str(args.n), "--repr", repr_]
    if args.workers:
        parts += ["--workers", str(args.workers)]
    return shlex.join(parts)


INTRO = (
    "Synthetic adapters of w2w's shape (`wsa.synthetic`: PEFT folders `id_<k>/unet/`, rank-1 LoRA on "
    "attn1/attn2 `to_q`/`to_v` of the 16 SD 1.5 attention blocks, 99,648 float32 parameters each), "
    "ingested by `wsa ingest` in a subprocess. Produced by `benchmarks/bench_ingest.py` "
    "(see `benchmarks/README.md`); each run replaces only its own `### <N> adapters, --repr <R>` block."
)
NOTES = (
    "Notes: MB = 10^6 bytes, GB = 10^9 bytes, GiB = 2^30 bytes. Input MB/s counts the adapter files "
    "ingest reads (safetensors + adapter_config.json). Peak RSS is the ingest process's own "
    "(`wait4` `ru_maxrss`), which includes file-backed pages it has mapped; anonymous/file-backed "
    "peaks are sampled from `/proc/<pid>/status` every 0.2 s. The plain read is one thread, "
    "1 MiB `readinto` per call, files in ingest's order. Generation runs `wsa.synthetic.synth_collection` "
    "in chunks of 1,000 (seed + chunk start) in parallel processes, so the planted structure differs "
    "per chunk; only the shapes matter here."
)


def subsection(r: dict, mach: dict) -> str:
    cache = "page cache dropped before each read" if r["cold"] else "**warm page cache** (could not drop)"
    gen = f"{r['gen_s']:.0f} s ({r['gen_procs']} processes{', in an earlier run' if r['gen_reused'] else ''})"
    reingest = (
        f"{r['re_wall']:.1f} s (peak RSS {r['re_maxrss_gb']:.2f} GiB: anonymous {r['re_peak_anon_gb']:.2f} GiB, "
        f"file-backed {r['re_peak_file_gb']:.2f} GiB; "
        f"{'rebuilt the matrix' if r.get('re_rebuilt') else 'matrix left as it was'})"
        if r.get("re_wall") is not None
        else f"not run ({r.get('re_skip', 'skipped')})"
    )
    rows = [
        ("machine", f"{mach['cpu']}, {mach['nproc']} CPUs, {mach['ram_gb']:.1f} GiB RAM, disk {mach['disk']}"),
        ("adapters (N)", f"{r['n']:,}"),
        ("features (D)", f"{r['d']:,}"),
        ("representation / dtype", f"{r['repr']} / float32"),
        ("input on disk", f"{r['input_bytes'] / GB:.2f} GB ({r['n_files']:,} files)"),
        ("matrix on disk", f"{r['matrix_bytes'] / GB:.2f} GB"),
        ("generation (`wsa.synthetic`)", gen),
        ("plain sequential read", f"{r['read_s']:.1f} s = {r['read_mbs']:.0f} MB/s ({cache})"),
        ("ingest wall time", f"{r['wall']:.1f} s (CPU: user {r['user']:.0f} s, sys {r['sys']:.0f} s)"),
        ("ingest rows/s", f"{r['n'] / r['wall']:,.0f}"),
        ("ingest input MB/s", f"{r['input_bytes'] / MB / r['wall']:.0f}"),
        ("ingest rate / plain read rate", f"{(r['input_bytes'] / r['wall']) / (r['read_bytes'] / r['read_s']):.2f}"),
        (
            "ingest peak RSS",
            f"{r['maxrss_gb']:.2f} GiB (sampled peaks: anonymous {r['peak_anon_gb']:.2f} GiB, "
            f"file-backed {r['peak_file_gb']:.2f} GiB)",
        ),
        ("peak RSS / matrix size", f"{r['maxrss_gb'] * 2**30 / r['matrix_bytes']:.1%}"),
        ("re-ingest, nothing changed", reingest),
        ("ingest workers", str(r["workers"])),
        ("reproduce", f"`{r['command']}`"),
    ]
    return "\n".join(
        [
            f"### {r['n']:,} adapters, --repr {r['repr']}",
            "",
            f"Run {r['date']} on commit `{r.get('code', 'unknown')}`.",
            "",
            "| | |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows],
            "",
        ]
    )


def write_section(path: Path, results: list[dict], mach: dict) -> None:
    """Update the ``SECTION`` block of ``path`` (up to the next ``## `` heading): replace the subsections of
    these (n, repr), keep the others (ordered by n), keep every other section of the file."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    subs: dict[str, str] = {}
    found = pattern.search(text)
    if found:
        for block in re.split(r"^(?=### )", found.group(0), flags=re.M)[1:]:
            head = block.splitlines()[0]
            if not head.startswith("### ") or "adapters, --repr" not in head:
                continue
            subs[head] = block.split("\nNotes: ")[0].rstrip() + "\n"
    for r in results:
        block = subsection(r, mach)
        subs[block.splitlines()[0]] = block

    def key(head: str) -> tuple[int, str]:
        m = re.match(r"### ([\d,]+) adapters, --repr (\w+)", head)
        return (int(m.group(1).replace(",", "")), m.group(2)) if m else (0, head)

    body = "\n".join([SECTION, "", INTRO, "", *[subs[h].rstrip() + "\n" for h in sorted(subs, key=key)], NOTES])
    if found:
        text = text[: found.start()] + body + "\n\n" + text[found.end() :]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=65000, help="adapters (default 65000: w2w's 64,974 rounded up)")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-data", help="scratch folder (git-ignored)")
    ap.add_argument("--repr", default="raw", help="representation(s), comma-separated: raw,canonical,delta")
    ap.add_argument("--workers", type=int, default=None, help="ingest reader threads (default: wsa's)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: delete after measuring)")
    ap.add_argument("--out-md", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown to update")
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    ap.add_argument("--gen-procs", type=int, default=os.cpu_count() or 1, help="generation processes")
    ap.add_argument("--no-reingest", action="store_true", help="skip the incremental re-ingest")
    ap.add_argument("--no-md", action="store_true", help="print only, do not touch --out-md")
    args = ap.parse_args(argv)

    reprs = [r.strip() for r in args.repr.split(",") if r.strip()]
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    coll = data / f"adapters-{args.n}"
    mach = {**machine(), "disk": disk_of(data)}
    code = code_version()
    print(f"machine: {mach}", flush=True)

    gen_s, gen_procs, gen_reused = generate(coll, args.n, args.seed, args.gen_procs)
    files = adapter_files(coll)
    if len(files) != 2 * args.n:
        raise SystemExit(f"{coll}: expected {args.n} adapters, found {len(files) // 2}; delete it and re-run")
    input_bytes = sum(f.stat().st_size for f in files)
    print(f"collection: {args.n} adapters, {len(files)} files, {input_bytes / GB:.2f} GB", flush=True)

    results = []
    for repr_ in reprs:
        cold = drop_caches()
        read_s, read_bytes = plain_read(files)
        print(
            f"plain read: {read_bytes / GB:.2f} GB in {read_s:.1f} s = {read_bytes / MB / read_s:.0f} MB/s "
            f"({'cold' if cold else 'WARM'} cache)",
            flush=True,
        )

        store = data / f"store-{repr_}-{args.n}"
        shutil.rmtree(store, ignore_errors=True)
        cmd = [wsa_exe(), "ingest", str(coll), "--out", str(store), "--repr", repr_, "--quiet"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        cold = drop_caches() and cold
        print(f"ingest: {shlex.join(cmd)}", flush=True)
        r = run_measured(cmd, args.n, store / ".partial" / "rows.jsonl")
        manifest = json.loads((store / "wsa_store.json").read_text())
        d = manifest["n_features"]
        matrix_bytes = (store / manifest["matrix"]).stat().st_size
        print(
            f"ingest: {r['wall']:.1f} s, {args.n / r['wall']:.0f} rows/s, "
            f"{input_bytes / MB / r['wall']:.0f} MB/s, peak RSS {r['maxrss_gb']:.2f} GiB "
            f"(anon {r['peak_anon_gb']:.2f}, file {r['peak_file_gb']:.2f}); {r['output']}",
            flush=True,
        )
        res = {
            "n": args.n,
            "d": d,
            "repr": repr_,
            "n_files": len(files),
            "input_bytes": input_bytes,
            "matrix_bytes": matrix_bytes,
            "gen_s": gen_s,
            "gen_procs": gen_procs,
            "gen_reused": gen_reused,
            "read_s": read_s,
            "read_bytes": read_bytes,
            "read_mbs": read_bytes / MB / read_s,
            "cold": cold,
            "workers": args.workers or min(8, os.cpu_count() or 1),
            "command": fmt_cmd(args, repr_),
            "date": time.strftime("%Y-%m-%d"),
            "code": code,
            **{k: v for k, v in r.items() if k != "output"},
        }

        if args.no_reingest:
            res["re_skip"] = "--no-reingest"
        else:
            # Nothing changed, so this should be a no-op. If it rebuilds instead, the new matrix is written
            # beside the old one: allowed only while the disk has room for it.
            room = free_bytes(data) > matrix_bytes * 1.05 + 2 * GB
            partial = store / ".partial"

            def no_room(room=room, partial=partial, matrix_bytes=matrix_bytes) -> str | None:
                if not room and partial.exists():
                    return (
                        f"it rebuilds the matrix (not a no-op), which needs ~{matrix_bytes / GB:.0f} GB free "
                        f"beside the old one; {free_bytes(data) / GB:.0f} GB free, so it was stopped"
                    )
                return None

            drop_caches()
            r2 = run_measured(cmd, args.n, partial / "rows.jsonl", abort_if=no_room)
            if "aborted" in r2:
                res["re_skip"] = r2["aborted"]
                shutil.rmtree(partial, ignore_errors=True)
                print(f"re-ingest: {r2['aborted']}", flush=True)
            else:
                res["re_wall"] = r2["wall"]
                res["re_maxrss_gb"] = r2["maxrss_gb"]
                res["re_peak_anon_gb"] = r2["peak_anon_gb"]
                res["re_peak_file_gb"] = r2["peak_file_gb"]
                after = json.loads((store / "wsa_store.json").read_text())["matrix"]
                res["re_rebuilt"] = after != manifest["matrix"]
                print(
                    f"re-ingest (no change): {r2['wall']:.1f} s, peak RSS {r2['maxrss_gb']:.2f} GiB "
                    f"(anon {r2['peak_anon_gb']:.2f}, file {r2['peak_file_gb']:.2f})",
                    flush=True,
                )
        results.append(res)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)

    print(json.dumps(results, indent=1))
    if code_version() != code:
        print(f"WARNING: the code changed during the run ({code} -> {code_version()})", flush=True)
        for r in results:
            r["code"] = f"{code} (changed during the run to {code_version()})"
    if not args.no_md:
        write_section(args.out_md, results, mach)
        print(f"wrote {args.out_md}")


if __name__ == "__main__":
    main()
