"""``wsa export``: rows of a store back to standard adapter files."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np

from wsa.cli import main
from wsa.errors import ConfigError
from wsa.text import terminal_safe


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--ids", required=True, help="Comma-separated row ids (or positions) to export, or 'all'.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["kohya", "peft", "diffusers"]),
    default="kohya",
    show_default=True,
    help="kohya: one .safetensors that diffusers, ComfyUI and A1111 load; peft: an adapter folder; "
    "diffusers: pytorch_lora_weights.safetensors.",
)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
def export(store: str, ids: str, fmt: str, dtype: str, out: str) -> None:
    """Write rows of STORE as adapter files (exact ΔW for raw and canonical rows).

    \b
    A `delta` store exports full-rank `.diff` modules (kohya/LyCORIS "full"),
    which only the kohya format holds.

    \b
    Examples:
      wsa export ./space --ids id_0042 --out ./exported
      wsa export ./space --ids id_1,id_2 --format peft --out ./exported
    """
    import torch

    from wsa.export import write_adapter
    from wsa.store import open_store

    opened = open_store(store)
    keys: list[int | str] = list(opened.ids) if ids == "all" else [k.strip() for k in ids.split(",") if k.strip()]
    keys = [int(k) if isinstance(k, str) and k.isdigit() and k not in opened.ids else k for k in keys]
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the --out folder ({exc.strerror or exc})", out_dir) from None
    used: set[str] = set()
    for key in keys:
        index = opened.index(key)
        row_id = opened.ids[index]
        row = opened.row(index)
        check_exportable(row, opened, row_id, dtype)
        adapter = opened.to_adapter(index)
        safe = unique_name(safe_file_name(row_id), used)
        target = out_dir / (f"{safe}.safetensors" if fmt == "kohya" else safe)
        if not inside(target, out_dir):
            raise ConfigError(
                f"row {terminal_safe(row_id)!r} would be written outside --out ({target}); refused", out_dir
            )
        meta = {"store": str(opened.path), "row_id": row_id, "repr": opened.repr}
        try:
            written = write_adapter(adapter, target, fmt, metadata=meta, dtype=getattr(torch, dtype))
        except OSError as exc:
            raise ConfigError(f"cannot write ({exc.strerror or exc})", exc.filename or target) from None
        click.echo(terminal_safe(str(written), 4096))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_file_name(row_id: str) -> str:
    """A file name from a row id: ``/`` becomes ``__``, anything outside ``[A-Za-z0-9._-]`` ``_``.

    Never empty, ``.``, ``..`` or hidden (a leading dot becomes ``_``), at most 200 characters.
    """
    name = _UNSAFE.sub("_", row_id.replace("/", "__"))[:200]
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``… when another exported row took it (case-insensitively)."""
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate.lower())
    return candidate


def inside(target: Path, folder: Path) -> bool:
    """Whether ``target`` (symlinks resolved) is directly inside ``folder``."""
    try:
        return target.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        return False


def check_exportable(row: np.ndarray, store, row_id: str, dtype: str) -> None:
    """Refuse a row with values that are not finite, or that ``dtype`` cannot hold, naming the module."""
    import torch

    limit = float(torch.finfo(getattr(torch, dtype)).max)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(row) | (np.abs(row) > limit)
    if not bad.any():
        return
    column = int(np.flatnonzero(bad)[0])
    module = next(m for m in store.layout.modules if m.offset <= column < m.offset + m.size)
    value = float(row[column])
    what = "is not finite" if not np.isfinite(value) else f"has a value {value:.4g} beyond {dtype}'s range"
    fix = "the store is damaged (rebuild it)" if not np.isfinite(value) else "export with --dtype float32"
    raise ConfigError(f"row {terminal_safe(row_id)!r} module {terminal_safe(module.name)!r} {what}; {fix}", store.path)
