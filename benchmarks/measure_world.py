"""Measurements of the embedded world with the attribute oracle: is the base model's output recognisable,
does each zoo LoRA reproduce its identity, and how far above chance.

``python benchmarks/measure_world.py --family faces --zoo ZOO [--identities 100 --seeds 8] --out m.json``
prints and writes the numbers docs/world.md quotes.

Definitions
-----------
* **Render confidence / sample confidence**: the oracle's mean confidence (:meth:`Oracle.confidence`) on
  fresh renders and on base-model samples under random prompts. Samples far less confident than renders
  would mean the base draws things the family does not contain.
* **Identity fidelity**: for each identity, its LoRA samples ``seeds`` images under the identity prompt
  with random views; the oracle reads the attributes of each image, compared with the identity's true
  attributes (accuracy per binary/categorical attribute; R² and MAE per continuous one, over all
  images). **Chance** is the same comparison for the base model's samples under the same prompts and
  seeds (no LoRA): what agreement one gets from the family's distribution alone.
* **Consistency**: per identity and binary/categorical attribute, the share of seeds agreeing with the
  majority reading (1.0: the LoRA draws the same attribute every time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsa.atomic import write_json
from wsa.decoding import BatchedLoRA
from wsa.decoding.stacks import stacks_from_adapters
from wsa.worlds.family import IDENTITY_TOKEN, Family
from wsa.worlds.model import BaseModel
from wsa.worlds.oracle import Oracle, agreement, render_pool


def sample_confidence(
    model: BaseModel, oracle: Oracle, family: Family, n: int = 256, seed: int = 0, device: str = "cpu", steps: int = 25
) -> dict[str, float]:
    """Oracle confidence on ``n`` base samples (random prompts) beside ``n`` fresh renders."""
    prompts = family.prompts(family.sample_nuisance(n, seed=seed + 3))
    images = _batched_sample(model, prompts, list(range(seed, seed + n)), device, steps)
    renders, _ = render_pool(family, n, seed=seed + 5)
    return {
        "samples": n,
        "sample_confidence": float(oracle.confidence(images).mean()),
        "render_confidence": float(oracle.confidence(renders).mean()),
    }


def identity_fidelity(
    model: BaseModel,
    oracle: Oracle,
    family: Family,
    zoo: str | Path,
    identities: int = 100,
    seeds: int = 8,
    device: str = "cpu",
    steps: int = 25,
    batch: int = 512,
) -> dict[str, Any]:
    """Oracle agreement of each LoRA's samples with its identity, against the base model's (chance)."""
    from wsa import load_adapter

    zoo = Path(zoo)
    table = pd.read_csv(zoo / "attributes.csv").iloc[:identities].reset_index(drop=True)
    adapters = [load_adapter(zoo / i) for i in table.id]
    lora = BatchedLoRA(model.unet, stacks_from_adapters(adapters))
    n = len(table)
    assignment = np.repeat(np.arange(n), seeds)
    views = family.sample_nuisance(n * seeds, seed=77)
    prompts = family.prompts(views, token=IDENTITY_TOKEN)
    seed_list = [int(s) for s in np.tile(np.arange(seeds), n) + 10_000]
    truth = table.iloc[assignment].reset_index(drop=True)
    tuned = _batched_sample(model, prompts, seed_list, device, steps, lora, assignment.tolist(), batch)
    base = _batched_sample(model, prompts, seed_list, device, steps, None, None, batch)
    read_tuned, read_base = oracle.predict(tuned), oracle.predict(base)
    result = {
        "identities": n,
        "seeds": seeds,
        "lora": agreement(read_tuned, truth, family),
        "chance_base_model": agreement(read_base, truth, family),
        "consistency": _consistency(read_tuned, family, n, seeds),
        "consistency_base_model": _consistency(read_base, family, n, seeds),
    }
    result["summary"] = _summary(result["lora"], result["chance_base_model"])
    return result


def _consistency(read: pd.DataFrame, family: Family, n: int, seeds: int) -> dict[str, float]:
    out = {}
    for spec in family.attributes:
        if spec.kind == "continuous":
            continue
        values = read[spec.name].astype(str).to_numpy().reshape(n, seeds)
        share = [pd.Series(row).value_counts().iloc[0] / seeds for row in values]
        out[spec.name] = float(np.mean(share))
    return out


def _summary(lora: dict, chance: dict) -> dict[str, float]:
    acc = [v["accuracy"] for v in lora.values() if "accuracy" in v]
    acc0 = [v["accuracy"] for v in chance.values() if "accuracy" in v]
    r2 = [v["r2"] for v in lora.values() if "r2" in v]
    r20 = [v["r2"] for v in chance.values() if "r2" in v]
    return {
        "mean_accuracy": float(np.mean(acc)),
        "mean_accuracy_chance": float(np.mean(acc0)),
        "mean_r2": float(np.mean(r2)),
        "mean_r2_chance": float(np.mean(r20)),
    }


def _batched_sample(
    model: BaseModel,
    prompts: list[str],
    seeds: list[int],
    device: str,
    steps: int,
    lora: BatchedLoRA | None = None,
    assignment: list[int] | None = None,
    batch: int = 512,
) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), batch):
        part = None if assignment is None else assignment[s : s + batch]
        out.append(
            model.sample(
                prompts[s : s + batch], seeds[s : s + batch], steps=steps, device=device, lora=lora, assignment=part
            )
        )
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    from wsa.worlds import builtin_base, get_family
    from wsa.worlds.oracle import builtin_oracle

    p = argparse.ArgumentParser(prog="python benchmarks/measure_world.py", description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--base", default=None)
    p.add_argument("--oracle", default=None)
    p.add_argument("--identities", type=int, default=100)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    family = get_family(args.family)
    model = BaseModel.load(args.base or builtin_base(args.family), device=args.device)
    oracle = Oracle.load(args.oracle, args.device) if args.oracle else builtin_oracle(args.family, args.device)
    record = {
        "family": args.family,
        "command": "python benchmarks/measure_world.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "oracle_held_out": oracle.info.get("held_out"),
        "base_samples": sample_confidence(model, oracle, family, args.samples, device=args.device, steps=args.steps),
        "identity_fidelity": identity_fidelity(
            model, oracle, family, args.zoo, args.identities, args.seeds, args.device, args.steps
        ),
    }
    print(
        json.dumps(
            {"base_samples": record["base_samples"], "fidelity": record["identity_fidelity"]["summary"]}, indent=1
        )
    )
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
