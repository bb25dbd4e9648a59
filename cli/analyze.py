"""``wsa analyze``: adapters or a store -> HTML report, results.json, CSVs and the fitted space."""

from __future__ import annotations

import click

from wsa.cli import command_line, main


def _list_analyzers(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from wsa.analyses import available_analyzers, get_analyzer
    from wsa.text import terminal_safe

    for name in available_analyzers():  # plug-ins name themselves: their text is escaped like any input's
        click.echo(f"{terminal_safe(name, 60):<14} {terminal_safe(get_analyzer(name).title)}")
    ctx.exit()


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Report folder to write.")
@click.option(
    "--labels",
    help="Attribute table (CSV/Parquet/JSON) joined on adapter id; or `metadata` (the adapters' training "
    "metadata fields that vary) or `metadata:ss_network_dim,ss_base_model_version` (those fields).",
)
@click.option("--analyzers", help="Comma-separated analyzers to run [default: all]; see `wsa analyze --list`.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML config ([analyze] + one table per analyzer).",
)
@click.option("--n-components", type=click.IntRange(1), help="PCs to keep [default: 1000, capped at N-1].")
@click.option(
    "--standardize/--no-standardize", default=None, help="z-score each parameter before PCA (w2w does) [default: no]."
)
@click.option(
    "--space",
    "geometry",
    type=click.Choice(["explicit", "delta"]),
    help="The geometry. explicit: PCA of the stored rows (w2w: raw factors); delta: the gauge-invariant PCA of "
    "ΔW = B·A, the one space that means the same across ranks, initialisations and trainers, taken from the "
    "factors' Gram products so ΔW is never formed (coefficient-based analyzers only) [default: explicit].",
)
@click.option(
    "--repr",
    "representation",
    type=click.Choice(["raw", "canonical", "delta"]),
    help="The storage. raw: factors as stored (w2w); canonical: gauge-fixed factors; delta: dense ΔW (large: "
    "~280x the factors at SD scale) [default: raw, or canonical with --space delta].",
)
@click.option(
    "--solver",
    type=click.Choice(["auto", "exact", "randomized", "streaming"]),
    help="PCA solver [default: auto, by size].",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where PCA runs [default: auto].")
@click.option("--family", help="Analyse only this model family's adapters (flux1, sdxl, …).")
@click.option(
    "--skip-bad",
    is_flag=True,
    default=None,
    help="Leave out unreadable files (listed in the report) instead of failing.",
)
@click.option(
    "--modules",
    type=click.Choice(["exact", "intersect", "union"]),
    help="Adapters with different module sets: exact (refuse), intersect (keep the shared ones), "
    "union (missing = 0; --space delta) [default: exact].",
)
@click.option(
    "--families",
    type=click.Choice(["split", "refuse"]),
    help="Inputs of several model families: one space and report each under OUT/<family>/ (split), "
    "or an error listing the groups (refuse) [default: split].",
)
@click.option(
    "--color-by",
    help="Colour the maps by these label columns only (comma-separated), e.g. ss_base_model_version "
    "with --labels metadata.",
)
@click.option("--seed", type=int, help="Random seed for splits, solvers and maps [default: 0].")
@click.option(
    "--cache", type=click.Path(file_okay=False), help="Where adapter folders are ingested [default: OUT/store]."
)
@click.option(
    "--list",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_list_analyzers,
    help="List the available analyzers and exit.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "dask"]),
    help="dask: ingest and PCA on a Dask cluster (workers must see the files) [default: local].",
)
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://head:8786 [default: a local cluster].")
@click.option(
    "--decode/--no-decode",
    default=None,
    help="Decode members, sampled models and interpolation paths into image galleries (the gallery analyzer).",
)
@click.option(
    "--base",
    help="Base model for --decode: builtin:faces, builtin:dogs or a base folder [default: read from zoo.json "
    "or adapter_config.json].",
)
@click.option("--decode-steps", type=click.IntRange(1, 1000), help="DDIM steps per decoded image [default: 25].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def analyze(
    inputs,
    out,
    labels,
    analyzers,
    config_path,
    n_components,
    standardize,
    geometry,
    representation,
    solver,
    device,
    family,
    skip_bad,
    modules,
    families,
    color_by,
    seed,
    cache,
    engine,
    scheduler,
    decode,
    base,
    decode_steps,
    quiet,
) -> None:
    """Analyse a collection and write a self-contained HTML report to --out.

    \b
    INPUTS are adapter files/folders (ingested on the fly, cached) or one store.
    The report folder holds index.html (opens from disk), results.json (every
    number), CSVs, and the fitted space (space/) for sample/edit/invert.

    \b
    Examples:
      wsa analyze ./loras --labels attributes.csv --out reports/identities
      wsa analyze ./mixed_rank_loras --space delta --labels a.csv --out reports/dw
      wsa analyze ./space --analyzers pca,probes,manifold --config analysis.toml --out reports/x
      wsa world unpack faces --out zoo && wsa analyze zoo --labels zoo/attributes.csv --decode --out reports/faces
      wsa analyze /shared/loras --engine dask --scheduler tcp://head:8786 --out /shared/reports/x
    """
    from wsa.pipeline import AnalyzeConfig, load_config, run_analysis

    config = load_config(config_path) if config_path else AnalyzeConfig()
    overrides = {
        "labels": labels,
        "n_components": n_components,
        "standardize": standardize,
        "space": geometry,
        "repr": representation,
        "solver": solver,
        "device": device,
        "seed": seed,
        "engine": engine,
        "scheduler": scheduler,
        "decode": decode,
        "base": base,
        "decode_steps": decode_steps,
        "family": family,
        "families": families,
        "skip_bad": skip_bad,
        "modules": modules,
        "analyzers": [a.strip() for a in analyzers.split(",") if a.strip()] if analyzers else None,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if color_by:
        config.analyzer_params.setdefault("manifold", {})["color_by"] = [
            c.strip() for c in color_by.split(",") if c.strip()
        ]
    index = run_analysis(
        list(inputs), out, config, cache=cache, argv=command_line(click.get_current_context()), progress=not quiet
    )
    from wsa.text import terminal_safe

    click.echo(terminal_safe(index, 10_000))
