"""The default zoos shipped inside the package: packed compactly, unpacked into standard adapter files.

Why packed: 1,000 PEFT folders cost ~16 kB each on disk (safetensors header, config, reference PNG)
for 9 kB of fp16 factors; the package ships instead one ``adapters.safetensors`` per family, every
module's factors stacked over identities (``<module>.down`` (N, r, in), ``<module>.up`` (N, out, r)),
beside the zoo's own ``zoo.json`` and ``attributes.csv``. ``wsa world unpack FAMILY --out DIR`` writes
them back as the PEFT folders (or diffusers / kohya files) that ``wsa world zoo`` wrote — the same
tensors bit for bit — with reference images re-rendered (the renderer is deterministic).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wsa.adapter import Adapter, ModuleWeights
from wsa.atomic import write_json, write_with
from wsa.errors import ConfigError, StoreError
from wsa.worlds.zoo import ATTRIBUTES_FILE, REFERENCE_FILE, ZOO_FILE

PACKED_FILE = "adapters.safetensors"


def shipped_zoo(family: str) -> Path:
    """Folder of the packed zoo shipped for ``family`` (``wsa/worlds/assets/<family>/zoo``)."""
    from wsa.worlds import ASSETS

    folder = ASSETS / family / "zoo"
    if not (folder / PACKED_FILE).is_file():
        shipped = sorted(p.parent.name for p in ASSETS.glob(f"*/zoo/{PACKED_FILE}"))
        raise ConfigError(f"no shipped zoo for family {family!r}; shipped: {shipped}")
    return folder


def pack_zoo(zoo: str | Path, out: str | Path) -> Path:
    """Pack a zoo folder written by ``wsa world zoo`` (every adapter read through :func:`wsa.load_adapter`)."""
    from safetensors.torch import save_file

    from wsa import load_adapter

    zoo, out = Path(zoo), Path(out)
    table = pd.read_csv(zoo / ATTRIBUTES_FILE)
    record = json.loads((zoo / ZOO_FILE).read_text())
    adapters = [load_adapter(zoo / identity) for identity in table.id]
    names = sorted(adapters[0].modules)
    first = adapters[0].modules[names[0]]
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        mods = [a.modules[name] for a in adapters]
        if any(m.kind != "lora" or set(m.tensors) != {"down", "up"} or m.scale != first.scale for m in mods):
            raise StoreError(f"module {name!r}: only plain LoRA zoos of one scale can be packed", zoo)
        tensors[f"{name}.down"] = torch.stack([m.tensors["down"] for m in mods]).to(torch.float16).contiguous()
        tensors[f"{name}.up"] = torch.stack([m.tensors["up"] for m in mods]).to(torch.float16).contiguous()
    meta = {"ids": json.dumps(list(table.id)), "alpha": str(first.alpha), "rank": str(first.rank)}
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / PACKED_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    write_with(out / ATTRIBUTES_FILE, lambda tmp: table.to_csv(tmp, index=False))
    write_json(out / ZOO_FILE, record)
    return out


def packed_adapters(folder: str | Path) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """``(ids, {module: (down (N, r, in), up (N, out, r))}, alpha, rank)`` of a packed zoo."""
    from safetensors import safe_open

    path = Path(folder) / PACKED_FILE
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "ids" not in meta:
            raise StoreError("not a packed zoo (no 'ids' in the header)", path)
        stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
            name, part = key.rsplit(".", 1)
            down, up = stacks.get(name, (None, None))
            tensor = fh.get_tensor(key)
            stacks[name] = (tensor, up) if part == "down" else (down, tensor)  # type: ignore[assignment]
    return json.loads(meta["ids"]), stacks, float(meta["alpha"]), int(meta["rank"])


def unpack_zoo(
    family: str,
    out: str | Path,
    *,
    n: int | None = None,
    format: str = "peft",
    dtype: torch.dtype = torch.float16,
    source: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the shipped zoo of ``family`` (or the packed zoo ``source``) as adapter files under ``out``.

    ``n`` keeps the first n identities. Returns ``out``; it then reads like a folder from ``wsa world zoo``.
    """
    from tqdm.auto import tqdm

    from wsa.export import write_adapter
    from wsa.images import save_grid
    from wsa.worlds import get_family

    folder = Path(source) if source is not None else shipped_zoo(family)
    ids, stacks, alpha, rank = packed_adapters(folder)
    table = pd.read_csv(folder / ATTRIBUTES_FILE)
    record = json.loads((folder / ZOO_FILE).read_text())
    if n is not None:
        if n < 1:
            raise ConfigError(f"n must be >= 1; got {n}")
        ids, table = ids[:n], table.iloc[:n]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fam = get_family(record["family"])
    references = fam.render(table, fam.neutral_nuisance(len(table)), size=64)
    suffix = ".safetensors" if format == "kohya" else ""
    for i, identity in enumerate(
        tqdm(ids, desc=f"unpack {record['family']}", disable=None if progress else True, file=sys.stderr)
    ):
        modules = {
            name: ModuleWeights(
                kind="lora",
                tensors={"down": down[i], "up": up[i]},
                shape=(up.shape[1], down.shape[2]),
                rank=rank,
                alpha=alpha,
                scale=alpha / rank,
            )
            for name, (down, up) in stacks.items()
        }
        adapter = Adapter(path=f"{folder}#{identity}", format="wsa-zoo", modules=modules)
        target = out / identity
        meta = {"base": record["base"]["path"], "family": record["family"], "identity": identity}
        write_adapter(
            adapter, target.with_name(identity + suffix) if suffix else target, format, metadata=meta, dtype=dtype
        )
        save_grid(references[i : i + 1], (out / f"{identity}.png") if suffix else target / REFERENCE_FILE)
    write_with(out / ATTRIBUTES_FILE, lambda tmp: table.to_csv(tmp, index=False))
    write_json(out / ZOO_FILE, {**record, "unpacked_from": str(folder), "identities_unpacked": len(ids)})
    return out


def describe(folder: str | Path) -> dict[str, Any]:
    """Summary of a packed zoo: family, identities, modules, parameters per adapter, options."""
    ids, stacks, alpha, rank = packed_adapters(folder)
    record = json.loads((Path(folder) / ZOO_FILE).read_text())
    params = sum(d.shape[1] * d.shape[2] + u.shape[1] * u.shape[2] for d, u in stacks.values())
    return {
        "family": record["family"],
        "identities": len(ids),
        "modules": len(stacks),
        "parameters": params,
        "rank": rank,
        "alpha": alpha,
        "options": record.get("options", {}),
    }
