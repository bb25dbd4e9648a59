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
        "problems": store.manifest.get("problems", []),
        "config": store.manifest.get("config", {}),
    }


def adapter_summary(adapter: Adapter) -> dict[str, Any]:
    from wsa.store.representations import delta_norm

    return {
        "kind": "adapter",
        "path": adapter.path,
        "format": adapter.format,
        "algorithms": adapter.kinds,
        "n_modules": len(adapter.modules),
        "n_params": adapter.n_params,
        "delta_norm": None if any(m.is_dora for m in adapter.modules.values()) else delta_norm(adapter),
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


def collection_summary(path: Path, progress: bool = True) -> dict[str, Any]:
    """Read every adapter under ``path`` and group them by layout signature (what must agree to ingest)."""
    from wsa.store.representations import delta_norm

    sources = discover([path])
    groups: dict[tuple, list[str]] = defaultdict(list)
    formats: Counter[str] = Counter()
    norms: list[float] = []
    problems = []
    for src in tqdm(sources, desc="scan", unit="adapter", disable=None if progress else True, file=sys.stderr):
        try:
            adapter = src.load()
        except WsaError as exc:
            problems.append({"source": str(src.path), "reason": str(exc).removeprefix(f"{src.path}: ")})
            continue
        formats[adapter.format] += 1
        groups[signature(adapter)].append(src.id)
        if not any(m.is_dora for m in adapter.modules.values()):
            norms.append(delta_norm(adapter))
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return {
        "kind": "collection",
        "path": str(path),
        "n_adapters": len(sources),
        "n_readable": sum(len(v) for v in groups.values()),
        "formats": dict(formats),
        "groups": [
            {
                "description": describe_signature(sig),
                "count": len(ids),
                "examples": ids[:5],
                "modules": len(sig),
            }
            for sig, ids in ordered
        ],
        "delta_norm": _stats(norms),
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
