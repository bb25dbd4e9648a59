"""Summaries for ``wsa info``: of a store, of one adapter, or of a folder of adapters not yet ingested.

Why a core module: the CLI prints these and scripts get the same dict (``wsa info --json``).
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from wsa.adapter import Adapter
from wsa.errors import WsaError
from wsa.formats import load_adapter
from wsa.store.builder import describe_signature, signature
from wsa.store.discover import discover
from wsa.store.store import MANIFEST, Store
from wsa.training_metadata import parse_training_metadata


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {
        "min": float(arr.min()),
        "median": float(np.median(arr)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


def store_summary(store: Store) -> dict[str, Any]:
    rows = store.rows
    layout = store.layout
    blocks: dict[str, int] = Counter(m.name.split(".")[0] for m in layout.modules)
    return {
        "kind": "store",
        "path": str(store.path),
        "n_rows": len(store),
        "n_features": store.n_features,
        "repr": store.repr,
        "dtype": store.manifest["dtype"],
        "size_bytes": store.matrix_path.stat().st_size,
        "formats": dict(Counter(r["format"] for r in rows)),
        "kinds": dict(Counter("/".join(r["kinds"]) for r in rows)),
        "modules": {
            "count": len(layout.modules),
            "by_component": dict(blocks),
            "ranks": dict(Counter(str(m.rank) for m in layout.modules)),
            "scales": dict(Counter(f"{m.scale:g}" for m in layout.modules)),
        },
        "delta_norm": _stats([r["delta_norm"] for r in rows if r.get("delta_norm") is not None]),
        "family": store.manifest.get("family", "unknown"),
        "families": dict(Counter(r.get("family") or "unknown" for r in rows)),
        "problems": store.manifest.get("problems", []),
        "left_out": store.manifest.get("left_out", []),
        "config": store.manifest.get("config", {}),
    }


def adapter_summary(adapter: Adapter, *, values: bool = True) -> dict[str, Any]:
    """One adapter: family, trainer format, ranks, training metadata and every module.

    ``values=False`` for an adapter read from its header alone (no ΔW norm then).
    """
    from wsa.store.representations import delta_norm

    dora = any(m.is_dora for m in adapter.modules.values())
    ranks = sorted({m.rank for m in adapter.modules.values() if m.rank})
    return {
        "kind": "adapter",
        "path": adapter.path,
        "family": adapter.family or "unknown",
        "family_source": adapter.family_source,
        "format": adapter.format,
        "algorithms": adapter.kinds,
        "n_modules": len(adapter.modules),
        "n_params": adapter.n_params,
        "ranks": ranks,
        "delta_norm": None if dora or not values else delta_norm(adapter),
        "training": parse_training_metadata(adapter.metadata),
        "notes": list(adapter.notes),
        "modules": [
            {
                "name": n,
                "kind": m.kind,
                "dora": m.is_dora,
                "shape": list(m.shape),
                "rank": m.rank,
                "alpha": m.alpha,
                "scale": m.scale,
            }
            for n, m in adapter.modules.items()
        ],
        "metadata_keys": sorted(adapter.metadata),
    }


def _tensor_bytes_hash(path: Path) -> str | None:
    """sha256 of a safetensors file's bytes after the header: equal for re-uploads with an edited header."""
    import hashlib
    import struct

    if path.suffix != ".safetensors":
        return None
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    except (OSError, struct.error):
        return None
    return h.hexdigest()


def _data_size(path: Path) -> int | None:
    import struct

    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        return path.stat().st_size - 8 - n
    except (OSError, struct.error):
        return None


def duplicate_groups(files: list[tuple[str, Path]]) -> list[list[str]]:
    """Groups of adapters whose tensors are byte-identical (``(id, file)`` each), whatever their headers say.

    The hash is sd-scripts' ``sshs_model_hash`` rule (sha256 of the bytes after the header), computed here
    rather than trusted from the header (which anyone can edit); a file is hashed only when another has
    exactly as many tensor bytes, so a folder of distinct large files costs nothing.
    """
    by_key: dict[str, list[str]] = defaultdict(list)
    sizes: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for sid, path in files:
        size = _data_size(path) if path.suffix == ".safetensors" else None
        if size is not None:
            sizes[size].append((sid, path))
    for same in sizes.values():
        if len(same) < 2:
            continue
        for sid, path in same:
            digest = _tensor_bytes_hash(path)
            if digest is not None:
                by_key[digest].append(sid)
    return [sorted(ids) for ids in by_key.values() if len(ids) > 1]


def collection_summary(path: Path, progress: bool = True) -> dict[str, Any]:
    """Every adapter under ``path`` from its header: family, format, ranks, metadata; grouped by family.

    Headers only (no tensors are read, except to find byte-identical duplicates), so a folder of
    DiT-sized LoRAs is summarised in seconds.
    """
    from wsa.formats._tensorfile import header_only

    sources = discover([path])
    families: dict[str, list[str]] = defaultdict(list)
    formats: Counter[str] = Counter()
    files: list[dict[str, Any]] = []
    problems = []
    hashable: list[tuple[str, Path]] = []
    groups: dict[tuple, list[str]] = defaultdict(list)
    for src in tqdm(sources, desc="scan", unit="adapter", disable=None if progress else True, file=sys.stderr):
        try:
            with header_only():
                adapter = src.load()
        except WsaError as exc:
            problems.append({"source": str(src.path), "reason": str(exc).removeprefix(f"{src.path}: ")})
            continue
        one = adapter_summary(adapter, values=False)
        family = one["family"]
        formats[adapter.format] += 1
        families[family].append(src.id)
        groups[signature(adapter)].append(src.id)
        files.append(
            {
                "id": src.id,
                "path": str(src.path),
                "family": family,
                "family_source": one["family_source"],
                "format": one["format"],
                "algorithms": one["algorithms"],
                "n_modules": one["n_modules"],
                "n_params": one["n_params"],
                "ranks": one["ranks"],
                "training": one["training"],
                "notes": one["notes"],
            }
        )
        if src.path.is_file():
            hashable.append((src.id, src.path))
    ordered = sorted(families.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {
        "kind": "collection",
        "path": str(path),
        "n_adapters": len(sources),
        "n_readable": len(files),
        "formats": dict(formats),
        "families": [{"family": f, "count": len(ids), "examples": ids[:5]} for f, ids in ordered],
        "groups": [
            {"description": describe_signature(sig), "count": len(ids), "examples": ids[:5], "modules": len(sig)}
            for sig, ids in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ],
        "files": files,
        "duplicates": duplicate_groups(hashable),
        "problems": problems,
    }


def summarize(path: str | Path, progress: bool = True) -> dict[str, Any]:
    path = Path(path)
    if (path / MANIFEST).is_file():
        return store_summary(Store(path))
    if path.is_file():
        return adapter_summary(load_adapter(path))
    try:
        return adapter_summary(load_adapter(path))
    except WsaError:
        return collection_summary(path, progress)
