#!/usr/bin/env python
"""Rendering benchmark (issue 4): images per second of each embedded-world family on the CPU.

The issue asks for at least 1,000 images/s at 64×64 on 2 cores. Each case times the public call
``family.render(identities, nuisance, size)`` (table validation included) on a batch of 256 random
identities and views, after one warm-up call, ``--repeats`` times; the table gives the best and the
median rate. ``torch.set_num_threads(2)`` is the issue's setting (``render`` then draws blocks of
images on 2 Python threads); the 1-thread row shows what the second core adds. On a shared machine
other work takes CPU time, so CPU pressure is reported with the numbers (``/proc/pressure/cpu``
"some avg10": the share of time runnable tasks waited for a CPU).

Writes the "## Rendering (issue 4)" section of ``docs/benchmarks.md`` and leaves the other sections
as they are.

Reproduce::

    .venv/bin/python benchmarks/bench_render.py
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import code_version, machine

from wsa.worlds import available_families, get_family

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Rendering (issue 4)"


def cpu_pressure() -> float | None:
    """``some avg10`` of ``/proc/pressure/cpu`` in percent, or None where the kernel has no PSI."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in first.split()[1:])
    return float(fields["avg10"])


def measure(name: str, size: int, threads: int, batch: int, repeats: int) -> dict:
    """Best and median images/s of one family at one size and thread count."""
    torch.set_num_threads(threads)
    family = get_family(name)
    identities, nuisance = family.sample_identities(batch, seed=0), family.sample_nuisance(batch, seed=0)
    family.render(identities, nuisance, size)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        family.render(identities, nuisance, size)
        seconds.append(time.perf_counter() - start)
    return {
        "family": name,
        "size": size,
        "threads": threads,
        "best": batch / min(seconds),
        "median": batch / statistics.median(seconds),
    }


def replace_section(path: Path, body: str) -> None:
    """Put ``SECTION`` + ``body`` in ``path``, replacing only an earlier version of this section."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body.strip()}\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        tail = "" if nxt < 0 else rest[nxt:]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def report(rows: list[dict], args: argparse.Namespace, pressure: tuple[float | None, float | None]) -> str:
    mach = machine()
    lines = [
        "Produced by `benchmarks/bench_render.py`: `family.render` on a batch of "
        f"{args.batch} random identities and views (tables validated inside the call), best and median "
        f"of {args.repeats} timed calls after a warm-up. Goal of the issue: ≥ 1,000 images/s at 64×64 with "
        "`torch.set_num_threads(2)`.",
        "",
        f"Run {datetime.date.today().isoformat()} on commit `{code_version()}`; {mach['cpu']}, "
        f"{mach['nproc']} CPUs, {mach['ram_gb']:.1f} GiB RAM, torch {torch.__version__}.",
        "",
        "| family | size | threads | images/s (best) | images/s (median) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['size']}×{r['size']} | {r['threads']} | {r['best']:,.0f} | {r['median']:,.0f} |"
        )
    before, after = pressure
    if before is not None and after is not None:
        lines += [
            "",
            f"CPU pressure (`/proc/pressure/cpu` some avg10) {before:.0f}% before and {after:.0f}% after the run: "
            "other work on the machine takes CPU time, so medians on a busy machine are lower than best rates.",
        ]
    lines += ["", f"Reproduce: `.venv/bin/python benchmarks/bench_render.py --repeats {args.repeats}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per render call")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case")
    parser.add_argument("--sizes", default="64,32", help="comma list of image sizes")
    parser.add_argument("--threads", default="2,1", help="comma list of torch thread counts")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    before = cpu_pressure()
    rows = []
    for name in available_families():
        for size in (int(s) for s in args.sizes.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                row = measure(name, size, threads, args.batch, args.repeats)
                rate = f"best {row['best']:7,.0f}  median {row['median']:7,.0f} img/s"
                print(f"{name:6s} {size:3d}px {threads} thread(s): {rate}")
                rows.append(row)
    replace_section(args.out, report(rows, args, (before, cpu_pressure())))
    print(f"wrote the {SECTION!r} section of {args.out}")


if __name__ == "__main__":
    main()
