"""``wsa info``: what a store, an adapter, or a folder of adapters holds."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from wsa.cli import main
from wsa.text import terminal_safe


def _fmt_stats(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    return f"min {stats['min']:.4g}  median {stats['median']:.4g}  max {stats['max']:.4g}"


def _line(label: str, value: object) -> None:
    click.echo(f"{label:<10} {terminal_safe(value, 2000)}")


def _print_store(s: dict) -> None:
    _line("store", s["path"])
    size_mb = s["size_bytes"] / 1e6
    _line("rows", f"{s['n_rows']} × {s['n_features']} features  ({s['repr']}, {s['dtype']}, {size_mb:.1f} MB)")
    _line("family", s.get("family", "unknown"))
    _line("formats", ", ".join(f"{k}: {v}" for k, v in sorted(s["formats"].items())))
    _line("algorithms", ", ".join(f"{k}: {v}" for k, v in sorted(s["kinds"].items())))
    m = s["modules"]
    _line("modules", f"{m['count']}  ({', '.join(f'{k}: {v}' for k, v in sorted(m['by_component'].items()))})")
    _line("ranks", ", ".join(f"r={k}: {v}" for k, v in sorted(m["ranks"].items())))
    _line("scales", ", ".join(f"{k}: {v}" for k, v in sorted(m["scales"].items())))
    _line("‖ΔW‖_F", _fmt_stats(s["delta_norm"]))
    _line("problems", len(s["problems"]))
    for p in s["problems"]:
        click.echo(f"  {terminal_safe(p['source'])}: {terminal_safe(p['reason'])}")
    if s.get("left_out"):
        _line("left out", f"{len(s['left_out'])} (other families)")
        for p in s["left_out"]:
            click.echo(f"  {terminal_safe(p['source'])}: {terminal_safe(p['reason'])}")


def _training_line(training: dict) -> str:
    keys = (
        "ss_base_model_version",
        "modelspec.architecture",
        "modelspec.title",
        "ss_output_name",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "trigger_words",
        "sshs_model_hash",
        "software",
    )
    shown = [f"{k}={training[k]}" for k in keys if k in training]
    more = len(training) - len(shown)
    if not shown:
        return f"{more} metadata field(s) (--json)"
    return "; ".join(shown) + (f"; +{more} more fields (--json)" if more > 0 else "")


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "-"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (mixed)"


def _print_adapter(s: dict) -> None:
    _line("adapter", s["path"])
    _line("family", f"{s['family']}  ({s['family_source']})")
    _line("format", f"{s['format']}  ({', '.join(s['algorithms'])})")
    norm = "n/a (DoRA needs the base)" if s["delta_norm"] is None else format(s["delta_norm"], ".4g")
    _line("modules", f"{s['n_modules']}  ({s['n_params']} parameters, ‖ΔW‖_F {norm}, rank {_ranks(s['ranks'])})")
    if s["training"]:
        _line("training", _training_line(s["training"]))
    for note in s["notes"][:20]:
        _line("note", note)
    for m in s["modules"]:
        shape = "×".join(map(str, m["shape"]))
        dora = "+dora" if m["dora"] else ""
        name = terminal_safe(m["name"])
        click.echo(f"  {name:<72} {m['kind']}{dora:<5} {shape:<14} r={m['rank']:<3} scale={m['scale']:.4g}")


def _print_collection(s: dict) -> None:
    _line("folder", s["path"])
    _line("adapters", f"{s['n_adapters']} found, {s['n_readable']} readable")
    _line("formats", ", ".join(f"{k}: {v}" for k, v in sorted(s["formats"].items())))
    _line("families", ", ".join(f"{g['family']}: {g['count']}" for g in s["families"]) or "none")
    if len(s["families"]) > 1:
        click.echo("           (several families: `wsa analyze` fits one space each; `--family NAME` picks one)")
    for f in s["files"]:
        click.echo(
            f"  {terminal_safe(f['id'], 60):<40} {f['family']:<13} {terminal_safe(f['format']):<11} "
            f"r={_ranks(f['ranks']):<14} {f['n_modules']:>5} modules"
        )
        if f["training"]:
            click.echo(f"      {terminal_safe(_training_line(f['training']), 400)}")
        if "also fit" in f["family_source"]:
            click.echo(f"      family from {terminal_safe(f['family_source'])}")
        notes = [n for n in f["notes"] if not n.startswith(("split ", "reordered "))]  # `wsa info FILE` lists all
        for note in notes[:3]:
            click.echo(f"      note: {terminal_safe(note, 400)}")
    _line("groups", f"{len(s['groups'])} (adapters in different groups cannot share a raw matrix)")
    for g in s["groups"][:10]:
        examples = terminal_safe(", ".join(g["examples"][:3]))
        click.echo(f"  {g['count']:>6} × {terminal_safe(g['description'])}   e.g. {examples}")
    if s["duplicates"]:
        _line("duplicates", f"{len(s['duplicates'])} group(s) of byte-identical tensors")
        for group in s["duplicates"]:
            click.echo(f"  {terminal_safe(' = '.join(group), 400)}")
    _line("problems", len(s["problems"]))
    for p in s["problems"]:
        click.echo(f"  {terminal_safe(p['source'])}: {terminal_safe(p['reason'])}")


def _families_table() -> list[dict]:
    from wsa.families import families

    return [
        {
            "family": f.name,
            "title": f.title,
            "denoiser": f.denoiser,
            "metadata_names": list(f.metadata_names + f.variants),
            "native_examples": [r.native for r in f.natives[:3]],
            "fused": [f"{r.native} -> {', '.join(r.targets)}" for r in f.natives if len(r.targets) > 1][:3],
        }
        for f in families()
    ]


@main.command()
@click.argument("path", type=click.Path(exists=True), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option("--families", "list_families", is_flag=True, help="List the model families wsa knows, and exit.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def info(path: str | None, as_json: bool, list_families: bool, quiet: bool) -> None:
    """Summarise PATH: a store, one adapter, or a folder of adapters.

    \b
    A store: family, counts, formats, algorithms, modules, ranks, ΔW norms, skipped files.
    An adapter: family, trainer format, training metadata, every module's kind, shape, rank, scale.
    A folder (headers only): per file family, trainer format, ranks and training metadata;
    families, byte-identical duplicates, unreadable files.

    \b
    Examples:
      wsa info ./space
      wsa info ./loras --json > loras.json
      wsa info my_lora.safetensors
      wsa info --families
    """
    from wsa.inspect import summarize

    if list_families:
        table = _families_table()
        if as_json:
            click.echo(json.dumps(table, indent=2))
            return
        for f in table:
            click.echo(f"{f['family']:<14} {f['title']}")
            if f["metadata_names"]:
                click.echo(f"{'':<14} metadata: {', '.join(f['metadata_names'])}")
            for fused in f["fused"]:
                click.echo(f"{'':<14} fused: {fused}")
        return
    if path is None:
        raise click.UsageError("give a PATH (a store, an adapter or a folder), or --families")
    interrupted = interrupted_summary(Path(path))
    summary = interrupted if interrupted is not None else summarize(path, progress=not quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    printers = {
        "store": _print_store,
        "adapter": _print_adapter,
        "collection": _print_collection,
        "interrupted-store": _print_interrupted,
    }
    printers[summary["kind"]](summary)


def interrupted_summary(path: Path) -> dict | None:
    """An ingest that stopped before writing its manifest (only ``.partial/``): progress and how to resume."""
    from wsa.store.store import MANIFEST

    partial = path / ".partial"
    if not path.is_dir() or (path / MANIFEST).is_file() or not partial.is_dir():
        return None
    plan: dict = {}
    try:
        loaded = json.loads((partial / "plan.json").read_text())
        plan = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError, RecursionError):
        pass
    done = None
    try:
        import numpy as np

        marks = np.load(partial / "done.npy")
        done = {"rows": int(marks.size), "done": int((marks == 1).sum()), "problems": int((marks == 2).sum())}
    except (OSError, ValueError):
        pass
    config = plan.get("config") if isinstance(plan.get("config"), dict) else {}
    inputs = plan.get("inputs") if isinstance(plan.get("inputs"), list) else None
    defaults = {"repr": "raw", "dtype": "float32", "modules": "exact", "family": None}
    args = ["wsa", "ingest", *(str(i) for i in inputs or ["PATHS"]), "--out", str(path)]
    for key, default in defaults.items():
        value = config.get(key, default)
        if value != default and isinstance(value, str):
            args += [f"--{key}", value]
    if plan.get("skip_bad"):
        args.append("--skip-bad")
    return {
        "kind": "interrupted-store",
        "path": str(path),
        "progress": done,
        "config": config,
        "resume": shlex.join(args),
        "inputs_known": inputs is not None,
    }


def _print_interrupted(s: dict) -> None:
    _line("store", f"{s['path']} (unfinished ingest: .partial/ only, no wsa_store.json yet)")
    p = s["progress"]
    if p is not None:
        _line("progress", f"{p['done']} of {p['rows']} rows written, {p['problems']} problem(s)")
    _line("resume", s["resume"])
    if not s["inputs_known"]:
        click.echo("           (run the same `wsa ingest` command as before: PATHS are the folders it read)")
