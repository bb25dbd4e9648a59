"""``wsa sample / edit / invert / interpolate / decode``: points of a fitted space → adapters and pictures.

Each command opens the space ``wsa analyze`` wrote (``REPORT/space`` or the report folder itself),
writes its models as standard adapter files under ``OUT/adapters/``, a PNG grid of decoded images, and
``OUT/wsa_<command>.json`` (what was done: command, options, base, each model's coefficients and,
on an embedded-world base, what the attribute oracle reads in each image).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from wsa.cli import command_line, main
from wsa.text import terminal_safe


def parse_seeds(text: str) -> list[int]:
    """``"0-3"`` → [0, 1, 2, 3]; ``"0,5,9"`` → [0, 5, 9]; ranges and lists mix (``"0-2,7"``)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise click.BadParameter(f"{text!r}: use seeds like 0-3 or 0,5,9") from None
    if not seeds or any(s < 0 for s in seeds):
        raise click.BadParameter(f"{text!r}: give at least one non-negative seed")
    return seeds


def common(f: Callable) -> Callable:
    """Options every application command shares."""
    options = [
        click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write into."),
        click.option(
            "--base",
            help="Base model: builtin:faces, builtin:dogs, a world base folder, a diffusers Stable Diffusion folder, "
            "or a .safetensors checkpoint [default: the space's].",
        ),
        click.option("--base-config", help="For a single-file checkpoint: a diffusers folder of the same model type."),
        click.option("--prompt", help="Prompt of decoded images [default: the collection's identity prompt]."),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["peft", "diffusers", "kohya"]),
            default="peft",
            show_default=True,
            help="Adapter file format of the written models.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default="float32",
            show_default=True,
            help="Tensor dtype on disk.",
        ),
        click.option(
            "--rank",
            type=click.IntRange(1),
            help="Re-factor every module to at most this rank by truncated SVD of its ΔW (the energy kept is "
            "reported) [default: exact factors; a ΔW-space point's are its stacked members' factors].",
        ),
        click.option("--seeds", "seeds_text", default="0-3", show_default=True, help="Seeds of decoded images."),
        click.option(
            "--sample-steps",
            type=click.IntRange(1, 1000),
            default=25,
            show_default=True,
            help="DDIM steps per decoded image.",
        ),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--no-images", is_flag=True, help="Write adapters and JSON only (no decoding)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class Job:
    """Shared plumbing: open the space, build the decoder, write adapters, the grid and the record."""

    def __init__(self, command: str, space: str, opts: dict[str, Any]) -> None:
        from wsa.workspace import Workspace

        self.command, self.opts = command, opts
        self.ws = Workspace.open(space)
        self.out = Path(opts["out"])
        self.seeds = parse_seeds(opts["seeds_text"])
        self.record: dict[str, Any] = {
            "command": command_line(click.get_current_context()),
            "space": str(self.ws.folder),
            "options": {k: v for k, v in opts.items() if k not in ("quiet",)},
            "models": [],
        }
        self._decoder = None

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            self._decoder = self.ws.decoder(
                self.opts["base"],
                self.opts["device"],
                self.opts["sample_steps"],
                prompt=self.opts["prompt"],
                base_config=self.opts["base_config"],
            )
            self.record["decoder"] = self._decoder.describe()
        return self._decoder

    def write_models(self, points: np.ndarray, names: list[str], extra: list[dict] | None = None) -> list[Path]:
        """The models at ``points`` (of the space's geometry) as adapter files, and their record."""
        from wsa.atomic import own_folder
        from wsa.points import export_adapters

        meta = {"space": str(self.ws.folder), "command": self.command}
        if self.ws.info.get("base"):
            meta["base"] = str(self.ws.info["base"])
        paths, report = export_adapters(
            self.ws.points.adapters(points, names),
            own_folder(self.out, "adapters"),
            format=self.opts["fmt"],
            dtype=self.opts["dtype"],
            rank=self.opts["rank"],
            metadata=meta,
        )
        z = self.ws.points.coefficients(points)
        for i, (name, path) in enumerate(zip(names, paths, strict=True)):
            entry = {"name": name, "path": str(path), "coefficients_first_8": [round(float(v), 5) for v in z[i, :8]]}
            if extra:
                entry.update(extra[i])
            self.record["models"].append(entry)
        self.record["export"] = report
        return paths

    def images(self, points: np.ndarray, assignment: list[int], seeds: list[int], prompts=None, **kw) -> Any:
        return self.decoder.images(self.ws.points.stacks(points), assignment, seeds, prompts, **kw)

    def write_grid(self, images: Any, columns: int, labels: list[str] | None = None, name: str = "grid.png") -> Path:
        from wsa.images import save_grid

        path = save_grid(images, self.out / name, columns)
        self.record.setdefault("images", []).append({"file": str(path), "columns": columns, "rows": labels})
        oracle = self.decoder.oracle()
        if oracle is not None:
            reads = oracle.predict(images)
            self.record["images"][-1]["oracle"] = {
                "columns": list(reads.columns),
                "reads": [[_plain(v) for v in row] for row in reads.itertuples(index=False, name=None)],
                "confidence": [round(float(c), 4) for c in oracle.confidence(images)],
            }
        return path

    def finish(self) -> None:
        from wsa.atomic import write_json

        if self.ws.notes:
            self.record["notes"] = list(self.ws.notes)
            for note in self.ws.notes:
                click.echo(f"note: {terminal_safe(note, 2000)}", err=True)
        path = write_json(self.out / f"wsa_{self.command}.json", _jsonable(self.record))
        click.echo(str(path))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _jsonable(value: Any) -> Any:
    from wsa.results import json_safe

    return json_safe(value)


# ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("space", type=click.Path(exists=True, file_okay=False))
@click.option("--n", type=click.IntRange(1), default=16, show_default=True, help="Models to sample.")
@click.option(
    "--kind",
    type=click.Choice(["diagonal", "full"]),
    default="diagonal",
    show_default=True,
    help="diagonal: w2w's independent Gaussian per PC; full: the covariance (Ledoit-Wolf shrunk).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="Multiplies the standard deviations (< 1: more typical models).",
)
@click.option("--k", type=click.IntRange(1), help="PCs sampled [default: all of the space's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@common
def sample(space, n, kind, temperature, k, seed, **opts) -> None:
    """Draw new models from a Gaussian fitted to the space's coefficients; write them and their images.

    \b
    OUT/adapters/sample_000 ... (adapter files), OUT/grid.png (one row per model,
    one column per seed), OUT/wsa_sample.json.

    \b
    Examples:
      wsa sample reports/faces/space --n 16 --out out/samples
      wsa sample reports/faces --n 8 --kind full --temperature 0.8 --seeds 0-3 --out out/s
    """
    from wsa.sampling import fit_gaussian, novelty

    job = Job("sample", space, opts)
    z_all = np.asarray(job.ws.space.coefficients, dtype=np.float64)
    k = z_all.shape[1] if k is None else min(k, z_all.shape[1])
    gaussian = fit_gaussian(z_all[:, :k], kind)
    z = gaussian.sample(n, temperature=temperature, random_state=np.random.default_rng(seed))
    points = job.ws.points.from_coefficients(z)
    distance = novelty(z, z_all[:, :k])
    names = [f"sample_{i:03d}" for i in range(n)]
    job.write_models(points, names, [{"nearest_member_distance": float(d)} for d in distance])
    job.record["sampler"] = {"kind": kind, "temperature": temperature, "k": k, "seed": seed}
    if not opts["no_images"]:
        assignment = np.repeat(np.arange(n), len(job.seeds)).tolist()
        images = job.images(points, assignment, np.tile(job.seeds, n).tolist())
        job.write_grid(images, len(job.seeds), names)
    job.finish()


@main.command()
@click.argument("space", type=click.Path(exists=True, file_okay=False))
@click.option("--model", required=True, help="A member id of the space, or a path to an adapter file/folder.")
@click.option("--attr", required=True, help="Attribute direction: beard, skin_tone, hair_colour=red, ...")
@click.option(
    "--strength",
    type=float,
    default=2.0,
    show_default=True,
    help="Standard deviations of the attribute's score across the collection (negative: the other way).",
)
@click.option("--debias", default="", help="Comma-separated attributes projected out of the direction (jointly).")
@click.option(
    "--inject-after",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="w2w's delayed injection: the first T sampling steps use the unedited model.",
)
@click.option(
    "--strip",
    type=click.IntRange(2),
    default=None,
    help="Decode N strengths from -|strength| to +|strength| instead of just 0 and the strength.",
)
@common
def edit(space, model, attr, strength, debias, inject_after, strip, **opts) -> None:
    """Move a model along an attribute direction by STRENGTH standard deviations; write it and a strip.

    \b
    The direction is the probes' least-squares direction (w2w), with --debias
    attributes projected out jointly. OUT/adapters/<model>_<attr>_<strength>,
    OUT/grid.png (rows: strengths, columns: seeds), OUT/wsa_edit.json.

    \b
    Examples:
      wsa edit reports/faces --model id_00042 --attr beard --strength +2 --out out/beard
      wsa edit reports/faces --model id_00042 --attr skin_tone --strength -1.5 --debias beard,bald --strip 5 --out out/s
    """
    from wsa.editing import edit_direction, edited_points

    job = Job("edit", space, opts)
    debias_list = [a.strip() for a in debias.split(",") if a.strip()]
    direction = edit_direction(job.ws, attr, debias_list)
    point, how = job.ws.member(model)
    strengths = [0.0, float(strength)] if strip is None else np.linspace(-abs(strength), abs(strength), strip).tolist()
    points = edited_points(job.ws, point, direction, strengths)
    label = f"{Path(model).name}_{attr.replace('=', '-')}_{strength:+g}"
    job.write_models(edited_points(job.ws, point, direction, [float(strength)]), [label])
    job.record["edit"] = {
        "model": model,
        "model_row": how,
        "attribute": attr,
        "strength": strength,
        "sigma": direction.sigma,
        "debiased_against": list(direction.debiased_against),
        "retained_after_debias": direction.retained,
        "inject_after": inject_after,
        "strengths_decoded": strengths,
    }
    if not opts["no_images"]:
        n, s = len(strengths), len(job.seeds)
        assignment = np.repeat(np.arange(n), s).tolist()
        before = None
        if inject_after:  # the unedited model draws the first steps of every image
            points = job.ws.points.stack([points, point])
            before = [n] * (n * s)
        images = job.images(
            points, assignment, np.tile(job.seeds, n).tolist(), inject_after=inject_after, assignment_before=before
        )
        job.write_grid(images, s, [f"{v:+.2f}σ" for v in strengths])
    job.finish()


@main.command()
@click.argument("space", type=click.Path(exists=True, file_okay=False))
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), help="Grey-scale mask; white pixels count.")
@click.option("--k", type=click.IntRange(1), help="PC coefficients optimised [default: all of the space's].")
@click.option("--opt-steps", type=click.IntRange(1), default=400, show_default=True, help="Optimisation steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True, help="Noise draws per step.")
@click.option(
    "--prior-weight",
    type=click.FloatRange(0),
    default=1e-3,
    show_default=True,
    help="Weight of the Gaussian prior mean(u²) on whitened coefficients (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@common
def invert(space, image, mask, k, opt_steps, lr, batch, prior_weight, seed, **opts) -> None:
    """Find the model in the space that best explains one IMAGE (the diffusion loss on PC coefficients).

    \b
    Works for images outside the family too (a painting, a sketch): the result
    stays in the space. OUT/adapters/inverted, OUT/grid.png (input, then the
    inverted model under each seed), OUT/wsa_invert.json (loss curve).

    \b
    Examples:
      wsa invert reports/faces photo.png --out out/me
      wsa invert reports/faces painting.png --mask face_mask.png --k 200 --opt-steps 800 --out out/painting
    """
    import torch

    from wsa.inversion import invert as run_invert
    from wsa.inversion import load_image

    job = Job("invert", space, opts)
    size = job.decoder.model.config.image_size
    target = load_image(image, size)
    mask_t = load_image(mask, size, mask=True) if mask else None
    result = run_invert(
        job.ws,
        job.decoder,
        target,
        mask=mask_t,
        k=k,
        steps=opt_steps,
        lr=lr,
        batch=batch,
        prior_weight=prior_weight,
        seed=seed,
        progress=not opts["quiet"],
    )
    job.write_models(np.atleast_2d(result.point), ["inverted"])
    job.record["inversion"] = {
        "image": str(image),
        "mask": mask,
        "k": int(result.coefficients.shape[0]),
        "steps": opt_steps,
        "seconds": round(result.seconds, 2),
        "loss_first_20": float(np.mean(result.losses[:20])),
        "loss_last_20": float(np.mean(result.losses[-20:])),
        "losses": [round(v, 5) for v in result.losses],
    }
    if not opts["no_images"]:
        images = job.images(np.atleast_2d(result.point), [0] * len(job.seeds), job.seeds)
        job.write_grid(torch.cat([target[None], images]), len(job.seeds) + 1, ["input | inverted model"])
    job.finish()


@main.command()
@click.argument("space", type=click.Path(exists=True, file_okay=False))
@click.option("--from", "start", required=True, help="Member id or adapter path at t=0.")
@click.option("--to", "end", required=True, help="Member id or adapter path at t=1.")
@click.option("--steps", type=click.IntRange(2), default=7, show_default=True, help="Points on the path.")
@click.option(
    "--path",
    "kind",
    type=click.Choice(["weight", "pc"]),
    default="weight",
    show_default=True,
    help="weight: the straight line between the two rows; pc: between their k coefficients.",
)
@common
def interpolate(space, start, end, steps, kind, **opts) -> None:
    """Models on the straight line between two models; write them and the decoded strip.

    \b
    OUT/adapters/path_00 ... path_NN, OUT/grid.png (rows: seeds, columns: t),
    OUT/wsa_interpolate.json.

    \b
    Example:
      wsa interpolate reports/faces --from id_00001 --to id_00042 --steps 7 --out out/path
    """
    from wsa.sampling import interpolate_pc

    job = Job("interpolate", space, opts)
    a, _ = job.ws.member(start)
    b, _ = job.ws.member(end)
    a, b = job.ws.points.stack([a, b])  # one width: the second may have added an outside adapter
    t = np.linspace(0, 1, steps)
    if kind == "weight":
        points = a + t[:, None] * (b - a)
    else:
        za, zb = job.ws.points.coefficients(np.vstack([a, b]))
        points = job.ws.points.from_coefficients(interpolate_pc(za, zb, steps))
    names = [f"path_{i:02d}" for i in range(steps)]
    job.write_models(points, names, [{"t": float(x)} for x in t])
    job.record["path"] = {"from": start, "to": end, "kind": kind, "t": t.tolist()}
    if not opts["no_images"]:
        s = len(job.seeds)
        assignment = np.tile(np.arange(steps), s).tolist()
        seeds = np.repeat(job.seeds, steps).tolist()
        images = job.images(points, assignment, seeds)
        job.write_grid(images, steps, [f"seed {x}" for x in job.seeds])
    job.finish()


@main.command()
@click.argument("space", type=click.Path(exists=True, file_okay=False))
@click.option("--models", required=True, help="Comma-separated member ids and/or adapter paths.")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Text file, one prompt per line [default: the space's identity prompt].",
)
@common
def decode(space, models, prompts_file, **opts) -> None:
    """Draw models (members or adapter files) under prompts × seeds into one grid.

    \b
    OUT/grid.png: one row per model, columns prompt-major then seed;
    OUT/wsa_decode.json (with the oracle's reading of every image on a world base).
    No adapters are written (the models already exist).

    \b
    Examples:
      wsa decode reports/faces --models id_00001,out/me/adapters/inverted --seeds 0-3 --out out/dec
      wsa decode reports/faces --models id_00007 --prompts prompts.txt --seeds 0,1 --out out/dec
    """
    job = Job("decode", space, opts)
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise click.BadParameter("give at least one model", param_hint="--models")
    points = job.ws.points.stack([job.ws.member(m)[0] for m in names])
    prompts = [job.decoder.prompt]
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise click.BadParameter(f"{prompts_file} holds no prompts", param_hint="--prompts")
        for p in prompts:
            job.decoder.model.tokenizer([p])
    per_model = [(p, s) for p in prompts for s in job.seeds]
    assignment = np.repeat(np.arange(len(names)), len(per_model)).tolist()
    images = job.images(
        points, assignment, [s for _ in names for _, s in per_model], [p for _ in names for p, _ in per_model]
    )
    job.record["decode"] = {"models": names, "prompts": prompts, "seeds": job.seeds}
    job.write_grid(images, len(per_model), names)
    job.finish()
