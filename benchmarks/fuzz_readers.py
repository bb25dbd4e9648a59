"""Fuzz the readers: N generated hostile files per strategy, each read as wsa reads it (scan, then full).

    .venv/bin/python benchmarks/fuzz_readers.py --n 4000

Strategies (``tests/hostile.py``): safetensors headers (replaced by any JSON, fields altered or dropped,
nested up to 10⁵ deep, cut short, bad length, bad offsets, other dtypes), PEFT ``adapter_config.json``
(any JSON in any field, hostile regexes in rank/alpha patterns) and kohya factors (any dtype, any shape,
any alpha). Counts each outcome (``ok``, ``FormatError``, or the name of any other exception, a bug) and
the slowest read, and writes ``docs/measurements/fuzz-readers.json``. Exits 1 if anything but ``ok`` and
``FormatError`` happened or a read took longer than ``--bound`` seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from safetensors.torch import save  # noqa: E402

from tests.hostile import kohya_tensors, outcome, peft_configs, safetensors_files, write_peft  # noqa: E402

OUT = ROOT / "docs" / "measurements" / "fuzz-readers.json"


def run(strategy, write, n: int, tally: dict) -> None:
    """Draw ``n`` examples of ``strategy``; ``write(tmp, value)`` makes the file, its result is tallied."""

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(value=strategy)
    def one(value) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = write(Path(tmp), value)
            result, seconds, message = outcome(path)
        tally["outcomes"][result] += 1
        tally["n"] += 1
        if seconds > tally["slowest_s"]:
            tally["slowest_s"], tally["slowest"] = seconds, message[:200]
        if result not in ("ok", "FormatError") and len(tally["bugs"]) < 20:
            tally["bugs"].append(message)

    one()


def _safetensors(tmp: Path, blob: bytes) -> Path:
    (tmp / "x.safetensors").write_bytes(blob)
    return tmp / "x.safetensors"


def _kohya(tmp: Path, tensors) -> Path:
    (tmp / "k.safetensors").write_bytes(save(tensors))
    return tmp / "k.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="examples per strategy (three strategies)")
    parser.add_argument("--bound", type=float, default=5.0, help="seconds one read may take")
    args = parser.parse_args()
    strategies = {
        "safetensors_headers": (safetensors_files(), _safetensors),
        "peft_configs": (peft_configs(), lambda tmp, cfg: write_peft(tmp / "adapter", cfg)),
        "kohya_factors": (kohya_tensors(), _kohya),
    }
    report: dict = {"command": f"python benchmarks/fuzz_readers.py --n {args.n}", "bound_s": args.bound}
    report["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    start = time.time()
    total = Counter()
    for name, (strategy, write) in strategies.items():
        tally = {"n": 0, "outcomes": Counter(), "slowest_s": 0.0, "slowest": "", "bugs": []}
        run(strategy, write, args.n, tally)
        tally["outcomes"] = dict(tally["outcomes"])
        tally["slowest_s"] = round(tally["slowest_s"], 4)
        report[name] = tally
        total.update(tally["outcomes"])
        print(f"{name}: {tally['n']} files, {tally['outcomes']}, slowest {tally['slowest_s']} s", flush=True)
    report["total"] = {"n": sum(total.values()), "outcomes": dict(total), "seconds": round(time.time() - start, 1)}
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"total: {report['total']} -> {OUT.relative_to(ROOT)}")
    bad = set(total) - {"ok", "FormatError"}
    slow = max(report[k]["slowest_s"] for k in strategies) > args.bound
    return 1 if bad or slow else 0


if __name__ == "__main__":
    sys.exit(main())
