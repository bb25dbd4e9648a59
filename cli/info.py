"""``wsa info``: what a store, an adapter, or a folder of adapters holds."""

from __future__ import annotations

import json

import click

from wsa.cli import main


def _fmt_stats(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"min {stats['min']:.4g}  median {stats['median']:.4g}  max {stats['max']:.4g}"


def _print_store(s: dict) -> None:
    click.echo(f"store      {s['path']}")
    size_mb = s["size_bytes"] / 1e6
    click.echo(f"rows       {s['n_rows']} × {s['n_features']} features  ({s['repr']}, {s['dtype']}, {size_mb:.1f} MB)")
    click.echo(f"formats    {', '.join(f'{k}: {v}' for k, v in sorted(s['formats'].items()))}")
    click.echo(f"algorithms {', '.join(f'{k}: {v}' for k, v in sorted(s['kinds'].items()))}")
    m = s["modules"]
    click.echo(f"modules    {m['count']}  ({', '.join(f'{k}: {v}' for k, v in sorted(m['by_component'].items()))})")
    click.echo(f"ranks      {', '.join(f'r={k}: {v}' for k, v in sorted(m['ranks'].items()))}")
    click.echo(f"scales     {', '.join(f'{k}: {v}' for k, v in sorted(m['scales'].items()))}")
    click.echo(f"‖ΔW‖_F     {_fmt_stats(s['delta_norm'])}")
    click.echo(f"problems   {len(s['problems'])}")
    for p in s["problems"]:
        click.echo(f"  {p['source']}: {p['reason']}")


def _print_adapter(s: dict) -> None:
    click.echo(f"adapter    {s['path']}")
    click.echo(f"format     {s['format']}  ({', '.join(s['algorithms'])})")
    norm = "n/a (DoRA needs the base)" if s["delta_norm"] is None else format(s["delta_norm"], ".4g")
    click.echo(f"modules    {s['n_modules']}  ({s['n_params']} parameters, ‖ΔW‖_F {norm})")
    for m in s["modules"]:
        shape = "×".join(map(str, m["shape"]))
        dora = "+dora" if m["dora"] else ""
        click.echo(f"  {m['name']:<72} {m['kind']}{dora:<5} {shape:<14} r={m['rank']:<3} scale={m['scale']:.4g}")


def _print_collection(s: dict) -> None:
    click.echo(f"folder     {s['path']}")
    click.echo(f"adapters   {s['n_adapters']} found, {s['n_readable']} readable")
    click.echo(f"formats    {', '.join(f'{k}: {v}' for k, v in sorted(s['formats'].items()))}")
    click.echo(f"‖ΔW‖_F     {_fmt_stats(s['delta_norm'])}")
    click.echo(f"groups     {len(s['groups'])} (adapters in different groups cannot share a raw matrix)")
    for g in s["groups"]:
        click.echo(f"  {g['count']:>6} × {g['description']}   e.g. {', '.join(g['examples'][:3])}")
    click.echo(f"problems   {len(s['problems'])}")
    for p in s["problems"]:
        click.echo(f"  {p['source']}: {p['reason']}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def info(path: str, as_json: bool, quiet: bool) -> None:
    """Summarise PATH: a store, one adapter, or a folder of adapters.

    \b
    A store: counts, formats, algorithms, modules, ranks, ΔW norms, skipped files.
    An adapter: its format and every module's kind, shape, rank and scale.
    A folder: adapters grouped by module set/shape/rank, and unreadable files.

    \b
    Examples:
      wsa info ./space
      wsa info ./loras --json > loras.json
      wsa info my_lora.safetensors
    """
    from wsa.inspect import summarize

    summary = summarize(path, progress=not quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    {"store": _print_store, "adapter": _print_adapter, "collection": _print_collection}[summary["kind"]](summary)
