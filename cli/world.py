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
    from wsa.worlds import get_family, save_grid

    fam = get_family(family)
    identities = fam.sample_identities(n, seed)
    nuisance = fam.sample_nuisance(n, seed)
    images = fam.render(identities, nuisance, size=size)
    png = save_grid(images, Path(out), columns)
    table = pd.concat([identities, nuisance], axis=1).assign(prompt=fam.prompts(nuisance))
    csv = write_with(png.with_suffix(".csv"), lambda tmp: table.to_csv(tmp, index=False))
    click.echo(f"{png}: {n} {fam.name} at {size}x{size}; attributes and views in {csv}")


@world.command(
    "train-base",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
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
    from wsa.worlds.train_base import main as train_main

    if family is None or family in ("-h", "--help") or "--help" in ctx.args or "-h" in ctx.args:
        click.echo(ctx.get_help())
        click.echo("\nTraining options:")
        click.echo(_train_help())
        return
    raise SystemExit(train_main(["--family", family, *ctx.args]))


def _train_help() -> str:
    from wsa.worlds.train_base import _parser

    return _parser().format_help()
