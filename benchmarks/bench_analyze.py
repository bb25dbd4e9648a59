#!/usr/bin/env python
"""``wsa analyze`` benchmark (issue 3): wall time per stage and peak memory, in a subprocess.

Two cases the issue names:

* a few thousand adapters with labels and every analyzer (``--n 3000``; generated with
  ``wsa.synthetic`` into ``bench-data/adapters-<n>`` with planted attributes) — "finishes in minutes";
* an existing large store, e.g. the 65,000-adapter store the ingest benchmark keeps with ``--keep``
  (``--store bench-data/store-raw-65000 --analyzers pca``) — "bounded memory".

Peak RSS is the analyze process's own (``wait4``), with sampled anonymous / file-backed RSS (file
pages of the memory-mapped matrix are reclaimable; anonymous memory is what the run holds). The
per-stage times come from the report's ``results.json``. Results go to the "Analyze (issue 3)"
section of ``docs/benchmarks.md``.

Reproduce::

    .venv/bin/python benchmarks/bench_analyze.py --n 3000
    .venv/bin/python benchmarks/bench_analyze.py --store bench-data/store-raw-65000 --analyzers pca --n-components 1000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import code_version, drop_caches, machine, run_measured, wsa_exe

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Analyze (issue 3)"


def write_section(path: Path, block_title: str, block: str) -> None:
    """Replace (or add) one ``### block_title`` block inside the analyze section of ``path``."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\nProduced by `benchmarks/bench_analyze.py`.\n"
    head, _, rest = text.partition(SECTION)
    nxt = rest.find("\n## ")
    section, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
    marker = f"\n### {block_title}\n"
    if marker in section:
        before, _, after = section.partition(marker)
        later = after.find("\n### ")
        section = before + marker + block + ("" if later < 0 else after[later:])
    else:
        section = section.rstrip() + "\n" + marker + block
    path.write_text(head + SECTION + section.rstrip() + "\n" + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="synthetic adapters to generate and analyse")
    parser.add_argument("--store", type=Path, help="analyse this existing store instead of generating")
    parser.add_argument("--labels", type=Path, help="labels table (default: the synthetic attributes.csv)")
    parser.add_argument("--analyzers", default=None, help="comma list (default: all)")
    parser.add_argument("--n-components", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--out-md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--extra", nargs="*", default=[], help="extra arguments passed to wsa analyze")
    args = parser.parse_args()

    if args.store is None:
        from wsa.synthetic import synth_collection

        coll = args.data / f"analyze-adapters-{args.n}"
        if not (coll / "attributes.csv").is_file():
            synth_collection(coll, args.n, seed=1, progress=True)
        inputs, labels = coll, args.labels or coll / "attributes.csv"
        title = (
            f"{args.n:,} adapters, every analyzer" if not args.analyzers else f"{args.n:,} adapters, {args.analyzers}"
        )
    else:
        inputs, labels = args.store, args.labels
        n = json.loads((args.store / "wsa_store.json").read_text())["n_rows"]
        title = f"store of {n:,} adapters, {args.analyzers or 'every analyzer'}"
    out = args.data / f"report-{Path(inputs).name}"
    cmd = [wsa_exe(), "analyze", str(inputs), "--out", str(out), "--n-components", str(args.n_components), "-q"]
    if labels:
        cmd += ["--labels", str(labels)]
    if args.analyzers:
        cmd += ["--analyzers", args.analyzers]
    cmd += args.extra
    cold = drop_caches()
    print("running:", " ".join(cmd), flush=True)
    run = run_measured(cmd, 0, None, log_every=60)
    results = json.loads((out / "results.json").read_text())
    timings = results["run"]["timings_s"]
    mach = machine()
    rows = [
        ("machine", f"{mach['cpu']}, {mach['nproc']} CPUs, {mach['ram_gb']:.1f} GiB RAM"),
        (
            "input",
            f"`{inputs}` ({results['run']['headline']['adapters']:,} × {results['run']['headline']['features']:,})",
        ),
        ("components", str(results["run"]["config"]["n_components_used"])),
        ("PCA solver", "?"),
        ("wall time", f"{run['wall']:.0f} s (user {run['user']:.0f} s, sys {run['sys']:.0f} s)"),
        ("stages (s)", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())),
        (
            "peak RSS",
            f"{run['maxrss_gb']:.2f} GiB (sampled: anonymous {run['peak_anon_gb']:.2f}, "
            f"file-backed {run['peak_file_gb']:.2f})",
        ),
        ("page cache", "dropped before the run" if cold else "warm"),
        ("commit", code_version()),
        ("reproduce", f"`.venv/bin/python benchmarks/bench_analyze.py {' '.join(sys.argv[1:])}`"),
    ]
    space = json.loads((out / "space" / "space.json").read_text())
    solver = space.get("config", {}).get("solver")
    rows[3] = ("PCA solver", str(solver))
    block = "\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    write_section(args.out_md, title, block)
    print(block)


if __name__ == "__main__":
    main()
