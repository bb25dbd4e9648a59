"""``wsa synth``: write a synthetic collection of w2w-shaped PEFT adapters with planted attributes."""

from __future__ import annotations

import click

from wsa.cli import main


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", type=click.IntRange(1), default=100, show_default=True, help="Number of adapters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same files).")
@click.option("--rank", type=click.IntRange(1), default=1, show_default=True, help="LoRA rank.")
@click.option("--factors", type=click.IntRange(2), default=16, show_default=True, help="Planted latent factors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def synth(out: str, n: int, seed: int, rank: int, factors: int, quiet: bool) -> None:
    """Write N rank-1 q/v LoRAs of SD 1.5 shape (99,648 raw parameters) to OUT.

    \b
    Each is a PEFT folder OUT/id_<k>/unet; OUT/attributes.csv holds the planted
    attributes (attr_* binary, score_* continuous). For demos, tests and benchmarks.

    \b
    Example:
      wsa synth ./loras --n 500 && wsa ingest ./loras --out ./space
    """
    from wsa.synthetic import synth_collection

    synth_collection(out, n, seed=seed, rank=rank, n_factors=factors, progress=not quiet)
    click.echo(f"{out}: {n} adapters, attributes in {out}/attributes.csv")
