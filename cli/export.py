"""``wsa export``: rows of a store back to standard adapter files."""

from __future__ import annotations

from pathlib import Path

import click

from wsa.cli import main


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
    out_dir.mkdir(parents=True, exist_ok=True)
    for key in keys:
        index = opened.index(key)
        row_id = opened.ids[index]
        adapter = opened.to_adapter(index)
        safe = row_id.replace("/", "__")
        target = out_dir / (f"{safe}.safetensors" if fmt == "kohya" else safe)
        meta = {"store": str(opened.path), "row_id": row_id, "repr": opened.repr}
        written = write_adapter(adapter, target, fmt, metadata=meta, dtype=getattr(torch, dtype))
        click.echo(str(written))
