"""Measure the w2w applications on an embedded world with its attribute oracle: edits, identity
persistence, inversion (in and out of family, against direct fine-tuning) and sampling.

``python benchmarks/measure_apps.py --space REPORT --labels zoo/attributes.csv --out apps.json``
(GPU recommended; the numbers docs/applications.md quotes). Definitions are in that page.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsa.atomic import write_json
from wsa.editing import edit_direction, edited_points
from wsa.worlds.family import IDENTITY_TOKEN


def _majority(values: np.ndarray, seeds: int) -> np.ndarray:
    table = values.reshape(-1, seeds)
    return np.array([pd.Series(r).value_counts().index[0] for r in table])


def edits(ws, decoder, oracle, labels: pd.DataFrame, strengths, n_ids: int, seeds: list[int]) -> dict[str, Any]:
    """Per attribute: share of identities whose oracle reading moves the intended way, and leakage."""
    family = oracle.family
    out: dict[str, Any] = {}
    names = [a.name for a in family.attributes]
    attrs = [a for a in family.attributes if a.kind != "categorical"]
    for spec in attrs:
        if spec.kind == "binary":
            pool = [i for i in ws.ids if labels.loc[i, spec.name] == 0][:n_ids]
        else:
            pool = list(ws.ids[:n_ids])
        others = [a.name for a in family.attributes if a.name != spec.name]
        per: dict[str, Any] = {}
        for debias in ([], others):
            direction = edit_direction(ws, spec.name, debias)
            rows = np.vstack([edited_points(ws, ws.member(i)[0], direction, [0.0, *strengths]) for i in pool])
            n_levels = len(strengths) + 1
            assignment = np.repeat(np.arange(len(rows)), len(seeds)).tolist()
            images = decoder.images(rows, assignment, np.tile(seeds, len(rows)).tolist())
            reads = oracle.predict(images)
            key = "debiased" if debias else "plain"
            per[key] = {"sigma": direction.sigma, "retained": direction.retained, "by_strength": {}}
            for level, strength in enumerate(strengths, start=1):
                sel = np.array([r * n_levels + level for r in range(len(pool))])
                base = np.array([r * n_levels for r in range(len(pool))])
                entry: dict[str, Any] = {}
                for name in names:
                    kind = next(a.kind for a in family.attributes if a.name == name)
                    after = reads[name].to_numpy().reshape(len(rows), len(seeds))
                    if kind == "categorical":
                        changed = np.mean(
                            _majority(after[sel].reshape(-1), len(seeds))
                            != _majority(after[base].reshape(-1), len(seeds))
                        )
                        entry[name] = {"changed_fraction": float(changed)}
                    else:
                        a = after[sel].astype(float).mean(1)
                        b = after[base].astype(float).mean(1)
                        spread = float(labels[name].astype(float).std())
                        entry[name] = {
                            "mean_change_in_sd": float((a - b).mean() / spread) if spread else 0.0,
                            "moved_up_fraction": float(np.mean(a > b + 1e-9)),
                        }
                if spec.kind == "binary":
                    after = reads[spec.name].to_numpy().reshape(len(rows), len(seeds)).astype(float)
                    entry["success"] = float(np.mean(after[sel].mean(1) > 0.5))
                else:
                    entry["success"] = entry[spec.name]["moved_up_fraction"]
                per[key]["by_strength"][str(strength)] = entry
        out[spec.name] = {"identities": len(pool), **per}
    return out


def _gaussian_draw(z_all: np.ndarray, kind: str, n: int, temperature: float, seed: int) -> np.ndarray:
    """w2w's per-PC Gaussian (diagonal) or the full-covariance one, numpy only (runs where sklearn is absent)."""
    rng = np.random.default_rng(seed)
    mean = z_all.mean(0)
    if kind == "diagonal":
        return mean + temperature * z_all.std(0, ddof=1) * rng.standard_normal((n, z_all.shape[1]))
    values, vectors = np.linalg.eigh(np.cov(z_all, rowvar=False))
    factor = vectors * np.sqrt(np.clip(values, 0, None))
    return mean + temperature * rng.standard_normal((n, z_all.shape[1])) @ factor.T


def _nearest(query: np.ndarray, train: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    q, t = torch.as_tensor(query, dtype=torch.float64), torch.as_tensor(train, dtype=torch.float64)
    d = torch.cdist(q, t)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values.numpy()


def persistence(ws, decoder, oracle, n_models: int, seeds: int, kind: str = "diagonal") -> dict[str, Any]:
    """Consistency across seeds and prompts of sampled models' and members' oracle readings."""
    family = oracle.family
    z_all = np.asarray(ws.space.coefficients, dtype=np.float64)
    sampled = _gaussian_draw(z_all, kind, n_models, 1.0, 0)
    rows = {
        "sampled": ws.space.inverse_transform(sampled.astype(np.float32)),
        "members": np.vstack([ws.member(i)[0] for i in ws.ids[:n_models]]),
    }
    views = family.sample_nuisance(n_models * seeds, seed=99)
    prompts = family.prompts(views, token=IDENTITY_TOKEN)
    out: dict[str, Any] = {}
    for name, r in rows.items():
        assignment = np.repeat(np.arange(n_models), seeds).tolist()
        images = decoder.images(r, assignment, list(range(n_models * seeds)), prompts)
        reads = oracle.predict(images)
        cons = {}
        for spec in family.attributes:
            if spec.kind == "continuous":
                values = reads[spec.name].to_numpy(dtype=float).reshape(n_models, seeds)
                cons[spec.name] = {"within_sd": float(values.std(1).mean()), "between_sd": float(values.mean(1).std())}
            else:
                values = reads[spec.name].astype(str).to_numpy().reshape(n_models, seeds)
                share = [pd.Series(v).value_counts().iloc[0] / seeds for v in values]
                cons[spec.name] = {"agreement": float(np.mean(share))}
        out[name] = {
            "models": n_models,
            "seeds": seeds,
            "confidence": float(oracle.confidence(images).mean()),
            "per_attribute": cons,
        }
    return out


def out_of_family(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Deterministic out-of-family versions of renders: colour-shifted, sketch, painting."""
    import torch.nn.functional as F

    if kind == "render":
        return images
    if kind == "colour_shift":
        return images[:, [2, 0, 1]]  # RGB → BRG: every hue moves
    grey = images.mean(1, keepdim=True)
    if kind == "sketch":
        kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float32).view(1, 1, 3, 3)
        gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx)
        gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
        edges = (gx.pow(2) + gy.pow(2)).sqrt()
        return (1 - (edges * 2).clamp(0, 1)).expand(-1, 3, -1, -1).contiguous()
    if kind == "painting":
        blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        posterised = (blurred * 5).round() / 5
        g = torch.Generator().manual_seed(0)
        canvas = 0.06 * (torch.rand(images.shape[0], 1, *images.shape[2:], generator=g) - 0.5)
        return (posterised + canvas).clamp(0, 1)
    raise ValueError(kind)


def inversion(ws, decoder, oracle, n_ids: int, steps: int, seeds: list[int]) -> dict[str, Any]:
    """Attributes recovered from one held-out image, by inversion and by direct fine-tuning."""
    from wsa.inversion import finetune_on_image, invert
    from wsa.worlds.oracle import agreement

    family = oracle.family
    held_out = family.sample_identities(n_ids, seed=4242)  # identities of neither the base nor the zoo
    views = family.sample_nuisance(n_ids, seed=4243)
    renders = family.render(held_out, views, size=decoder.model.config.image_size)
    truth = held_out.iloc[np.repeat(np.arange(n_ids), len(seeds))].reset_index(drop=True)
    out: dict[str, Any] = {"identities": n_ids, "steps": steps, "seeds": seeds}
    for kind in ("render", "colour_shift", "sketch", "painting"):
        images = out_of_family(renders, kind)
        entry: dict[str, Any] = {"input_oracle": _summ(agreement(oracle.predict(images), held_out, family))}
        for method in ("inversion", "finetune"):
            t0 = time.time()
            if method == "inversion":
                rows = invert(ws, decoder, images, steps=steps, progress=False).point
            else:
                rows = finetune_on_image(decoder, images, ws.layout, steps=steps, progress=False)
            seconds = time.time() - t0
            assignment = np.repeat(np.arange(n_ids), len(seeds)).tolist()
            decoded = decoder.images(rows, assignment, np.tile(seeds, n_ids).tolist())
            scores = agreement(oracle.predict(decoded), truth, family)
            entry[method] = {"seconds": round(seconds, 1), "per_attribute": scores, **_summ(scores)}
        out[kind] = entry
    return out


def _summ(scores: dict) -> dict[str, float]:
    acc = [v["accuracy"] for v in scores.values() if "accuracy" in v]
    r2 = [v["r2"] for v in scores.values() if "r2" in v]
    return {"mean_accuracy": float(np.mean(acc)), "mean_r2": float(np.mean(r2))}


def sampling(ws, decoder, oracle, n: int) -> dict[str, Any]:
    """Novelty (nearest member in PC space vs members' own nearest-neighbour distances) and plausibility."""
    z_all = np.asarray(ws.space.coefficients, dtype=np.float64)
    out: dict[str, Any] = {}
    members = np.vstack([ws.member(i)[0] for i in ws.ids[:n]])
    member_images = decoder.images(members, list(range(n)), [0] * n)
    out["members_confidence"] = float(oracle.confidence(member_images).mean())
    train_nn = _nearest(z_all, z_all, exclude_self=True)
    out["members_nn_median"] = float(np.median(train_nn))
    for kind in ("diagonal", "full"):
        for temperature in (1.0, 0.7):
            z = _gaussian_draw(z_all, kind, n, temperature, 1)
            rows = ws.space.inverse_transform(z.astype(np.float32))
            images = decoder.images(rows, list(range(n)), [0] * n)
            d = _nearest(z, z_all)
            out[f"{kind}@{temperature}"] = {
                "confidence": float(oracle.confidence(images).mean()),
                "novelty_ratio": float(np.median(d) / np.median(train_nn)),
                "memorised_fraction": float(np.mean(d < np.percentile(train_nn, 5))),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    from wsa.labels import load_labels
    from wsa.workspace import Workspace
    from wsa.worlds.oracle import builtin_oracle

    p = argparse.ArgumentParser(prog="python benchmarks/measure_apps.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--edit-identities", type=int, default=100)
    p.add_argument("--strengths", default="1,2,3,4")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--persistence-models", type=int, default=64)
    p.add_argument("--invert-identities", type=int, default=64)
    p.add_argument("--invert-steps", type=int, default=400)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--only", default="edits,persistence,inversion,sampling")
    args = p.parse_args(argv)
    ws = Workspace.open(args.space)
    decoder = ws.decoder(device=args.device)
    decoder.batch_size = 1024
    oracle = builtin_oracle(decoder.family, args.device)
    labels = load_labels(args.labels, ws.ids)
    seeds = list(range(args.seeds))
    record: dict[str, Any] = {
        "command": "python benchmarks/measure_apps.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    only = args.only.split(",")
    timings = {}
    for name, fn in (
        (
            "edits",
            lambda: edits(
                ws, decoder, oracle, labels, [float(s) for s in args.strengths.split(",")], args.edit_identities, seeds
            ),
        ),
        ("persistence", lambda: persistence(ws, decoder, oracle, args.persistence_models, 8)),
        ("inversion", lambda: inversion(ws, decoder, oracle, args.invert_identities, args.invert_steps, seeds)),
        ("sampling", lambda: sampling(ws, decoder, oracle, args.samples)),
    ):
        if name in only:
            t0 = time.time()
            record[name] = fn()
            timings[name] = round(time.time() - t0, 1)
            print(f"{name}: {timings[name]} s", file=sys.stderr)
            write_json(args.out, {**record, "timings_s": timings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
