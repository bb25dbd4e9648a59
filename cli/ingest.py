"""``wsa ingest``: adapter files -> store."""

from __future__ import annotations

import click

from wsa.cli import main
from wsa.text import terminal_safe


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Store folder to create or update.")
@click.option(
    "--repr",
    "representation",
    type=click.Choice(["raw", "canonical", "delta"]),
    default="raw",
    show_default=True,
    help="raw: factors as stored (w2w); canonical: gauge-fixed factors (same size); delta: dense ΔW (large).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage precision of the matrix.",
)
@click.option(
    "--modules",
    type=click.Choice(["exact", "intersect", "union"]),
    default="exact",
    show_default=True,
    help="exact: all adapters must share modules; intersect: keep the shared ones; union: missing = 0 (delta only).",
)
@click.option(
    "--family",
    default=None,
    help="Keep only this model family's adapters (flux1, sdxl, sd15, wan21, …; `wsa info --families` lists them); "
    "the others are listed as left out [default: the folder must hold one family].",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Leave out unreadable or non-matching files (each reported) instead of failing.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Reader threads [default: CPUs, at most 8].")
@click.option("--rehash", is_flag=True, help="Decide which rows to reuse by content hash, not size+mtime.")
@click.option(
    "--layout",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Read PATH as a w2w-style dataset matrix (.pt/.npy/.safetensors) with this layout file "
    "(w2w's weight_dimensions.pt, or JSON {key: shape} in flattening order).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="LoRA alpha of a dataset [default: adapter_config.json beside the layout, else rank].",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "dask"]),
    default="local",
    show_default=True,
    help="dask: workers of a Dask cluster read and encode the files (they must see them: shared file system).",
)
@click.option("--scheduler", help="Dask scheduler address (tcp://host:8786) [default: a local cluster of processes].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def ingest(
    paths,
    out,
    representation,
    dtype,
    modules,
    family,
    skip_bad,
    workers,
    rehash,
    layout,
    alpha,
    engine,
    scheduler,
    quiet,
) -> None:
    """Flatten every adapter under PATHS (recursive) into one N × D matrix at --out.

    \b
    Reads PEFT folders, diffusers, kohya/A1111 and LyCORIS files (auto-detected).
    Re-running updates the store: unchanged files are reused, new ones added,
    removed ones dropped; an interrupted run resumes where it stopped.

    \b
    Examples:
      wsa ingest ./loras --out ./space
      wsa ingest ./loras --out ./space-c --repr canonical --skip-bad
      wsa ingest a/ b/ c.safetensors --out ./space --modules intersect
      wsa ingest all_weights.pt --layout files/weight_dimensions.pt --out ./w2w   # w2w release
      wsa ingest /shared/loras --out /shared/space --engine dask --scheduler tcp://head:8786
    """
    from wsa.store import ingest as run_ingest

    sources = None
    if layout is not None:
        from wsa.store.dataset import dataset_sources

        if len(paths) != 1:
            raise click.UsageError("--layout takes exactly one matrix file")
        sources = dataset_sources(paths[0], layout, alpha=alpha)
    elif alpha is not None:
        raise click.UsageError("--alpha applies to datasets read with --layout")

    if scheduler and engine != "dask":
        raise click.UsageError("--scheduler needs --engine dask")
    options = dict(
        repr=representation,
        dtype=dtype,
        modules=modules,
        family=family,
        skip_bad=skip_bad,
        workers=workers,
        rehash=rehash,
        progress=not quiet,
        sources=sources,
    )
    if engine == "dask":
        from wsa.dask_engine import ChunkedExecutor, dask_client

        with dask_client(scheduler) as client:
            store = run_ingest(list(paths), out, executor=ChunkedExecutor(client), **options)
    else:
        store = run_ingest(list(paths), out, **options)
    skipped = store.manifest.get("problems", [])
    click.echo(
        f"{store.path}: {len(store)} adapters × {store.n_features} features ({store.repr}, {store.manifest['dtype']})"
    )
    for p in skipped:
        click.echo(f"skipped {terminal_safe(p['source'])}: {terminal_safe(p['reason'], 2000)}", err=True)
    for p in store.manifest.get("left_out", []):
        click.echo(f"left out {terminal_safe(p['source'])}: {terminal_safe(p['reason'], 2000)}", err=True)
