"""``wsa world``: the embedded worlds (concept families with known attributes) from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from wsa.cli import main


@main.group()
def world() -> None:
    """Embedded worlds: families of identities with exactly known attributes, rendered to images.

    \b
    Families: faces (the weights2weights analogue), dogs.
    Example:
      wsa world render faces --n 16 --out faces.png   # grid PNG + faces.csv
    """


@world.command("render")
@click.argument("family")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Grid PNG to write (CSV beside it).")
@click.option("--n", type=click.IntRange(1), default=16, show_default=True, help="Number of identities (tiles).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the identity and nuisance tables.")
@click.option("--size", type=click.IntRange(8, 1024), default=64, show_default=True, help="Tile side in pixels.")
@click.option("--columns", type=click.IntRange(1), default=None, help="Tiles per row [default: ceil(sqrt(n))].")
def render(family: str, out: str, n: int, seed: int, size: int, columns: int | None) -> None:
    """Render N random identities of FAMILY (one random view each) as a grid PNG.

    \b
    Writes OUT and, beside it, OUT with suffix .csv: one row per tile, row-major,
    with the identity's attributes, the view's nuisance factors and its prompt.
    Same seed, same table and same pixels.

    \b
    Example:
      wsa world render faces --n 16 --out faces.png
      wsa world render dogs --n 64 --size 32 --seed 3 --out dogs.png
    """
    import pandas as pd

    from wsa.atomic import write_with
    from wsa.images import save_grid
    from wsa.worlds import get_family

    fam = get_family(family)
    identities = fam.sample_identities(n, seed)
    nuisance = fam.sample_nuisance(n, seed)
    images = fam.render(identities, nuisance, size=size)
    png = save_grid(images, Path(out), columns)
    table = pd.concat([identities, nuisance], axis=1).assign(prompt=fam.prompts(nuisance))
    csv = write_with(png.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    click.echo(f"{png}: {n} {fam.name} at {size}x{size}; attributes and views in {csv}")


def _passthrough(ctx: click.Context, family: str | None, module: str) -> None:
    """Run ``module.main(["--family", FAMILY, *args])``; help lists the module's own options."""
    import importlib

    target = importlib.import_module(module)
    if family is None or family in ("-h", "--help") or "--help" in ctx.args or "-h" in ctx.args:
        click.echo(ctx.get_help())
        click.echo("\nOptions:")
        click.echo(target.parser().format_help())
        return
    raise SystemExit(target.main(["--family", family, *ctx.args]))


_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@world.command("train-base", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("family", required=False)
@click.pass_context
def train_base(ctx: click.Context, family: str | None) -> None:
    """Train FAMILY's base diffusion model (GPU recommended): wsa world train-base FAMILY --out DIR [options].

    \b
    Every option of the training loop is passed through (one source of defaults:
    wsa.worlds.train_base.TrainConfig); `wsa world train-base --help` lists them.

    \b
    Example (the shipped faces base, on one H100):
      wsa world train-base faces --out wsa/worlds/assets/faces/base --max-minutes 8.5 --chunk-reuse 4
    """
    _passthrough(ctx, family, "wsa.worlds.train_base")


@world.command("zoo", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("family", required=False)
@click.pass_context
def zoo(ctx: click.Context, family: str | None) -> None:
    """Fine-tune one LoRA per identity of FAMILY: wsa world zoo FAMILY --n N --out DIR [--base DIR] [options].

    \b
    The w2w recipe: K renders per identity (views varied), rank-1 LoRA on attn1/attn2
    to_q/to_v, one shared initialisation seed, identity prompt "a sks face, ...".
    Many identities train at once (--group-size; GPU when present), progress bar,
    re-running the command completes an interrupted zoo. Writes DIR/<id>/ (PEFT folder or
    diffusers file + reference.png), DIR/attributes.csv, DIR/zoo.json.

    \b
    Examples:
      wsa world zoo faces --n 1000 --dtype float16 --out zoo/   # the shipped zoo (H100: 278 s)
      wsa world zoo dogs --n 16 --steps 50 --device cpu --out small/
      wsa world zoo faces --n 100 --rank 4 --targets to_q,to_k,to_v,to_out.0 --prior-weight 0.5 --out z/
    """
    _passthrough(ctx, family, "wsa.worlds.zoo")


@world.command("train-oracle", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("family", required=False)
@click.pass_context
def train_oracle(ctx: click.Context, family: str | None) -> None:
    """Train FAMILY's attribute oracle (a CNN reading every attribute from an image): --out DIR [options].

    \b
    Held-out accuracy (fresh renders) is printed and kept in DIR/oracle.json.
    Example (the shipped oracles, H100, ~2 min each):
      wsa world train-oracle faces --out wsa/worlds/assets/faces/oracle
    """
    _passthrough(ctx, family, "wsa.worlds.oracle")


@world.command("unpack")
@click.argument("family")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write the adapters into.")
@click.option("--n", type=click.IntRange(1), default=None, help="Only the first N identities [default: all].")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "diffusers", "kohya"]),
    default="peft",
    show_default=True,
    help="Adapter file format.",
)
def unpack(family: str, out: str, n: int | None, fmt: str) -> None:
    """Write FAMILY's shipped zoo (LoRAs fine-tuned on the shipped base) as standard adapter files.

    \b
    OUT then holds <id>/ adapters (+ reference.png), attributes.csv and zoo.json,
    exactly as `wsa world zoo` writes them, ready for `wsa analyze OUT --labels OUT/attributes.csv`.
    Example:
      wsa world unpack faces --out zoo/faces
    """
    from wsa.worlds.shipped import unpack_zoo

    folder = unpack_zoo(family, out, n=n, format=fmt)
    count = sum(1 for _ in folder.glob("id_*"))
    click.echo(f"{folder}: {count} {family} adapters ({fmt}), attributes.csv, zoo.json")
