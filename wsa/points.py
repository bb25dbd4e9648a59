"""Points of a space written as adapters anyone can load (PEFT folder, diffusers file, kohya file).

Raw and canonical rows hold LoRA factors, so they export exactly. A ``delta`` row holds dense ΔW per
module; the LoRA formats need factors, so each module is re-factored by truncated SVD to ``rank``
(``up = U·√S``, ``down = √S·Vᵀ``) and the share of ΔW's energy kept (Σ_{i≤r} s_i² / Σ s_i²) is
reported per module and overall — the one lossy step, and it says how lossy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import ConfigError
from wsa.store.layout import Layout
from wsa.store.representations import decode

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def refactor_to_rank(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, float]]:
    """Every ``full`` 2-D module of ``adapter`` as a rank-``rank`` LoRA; returns (adapter, energy kept)."""
    if rank < 1:
        raise ConfigError(f"rank must be >= 1; got {rank}")
    modules: dict[str, ModuleWeights] = {}
    energy: dict[str, float] = {}
    for name, m in adapter.modules.items():
        if m.kind != "full":
            modules[name] = m
            continue
        delta = m.direction_delta().to(torch.float64)
        if delta.ndim != 2:
            delta = delta.reshape(delta.shape[0], -1)
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        total = float((s**2).sum())
        energy[name] = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
        root = s[:r].sqrt()
        tensors = {"up": (u[:, :r] * root).float().contiguous(), "down": (root[:, None] * vt[:r]).float().contiguous()}
        if len(m.shape) > 2:
            tensors["down"] = tensors["down"].reshape(r, *m.shape[1:])
            tensors["up"] = tensors["up"].reshape(m.shape[0], r, *([1] * (len(m.shape) - 2)))
        if "bias" in m.tensors:
            tensors["bias"] = m.tensors["bias"]
        modules[name] = ModuleWeights("lora", tensors, m.shape, r, float(r), 1.0)
    return Adapter(adapter.path, adapter.format, modules, adapter.metadata), energy


def export_rows(
    rows: np.ndarray,
    names: Sequence[str],
    layout: Layout,
    out: str | Path,
    *,
    format: str = "peft",
    dtype: str = "float32",
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """Write each row as an adapter ``out/<name>`` (kohya: ``out/<name>.safetensors``).

    Returns the paths written and a report: for delta layouts the energy kept by the rank-``rank``
    re-factoring (overall and the worst module).
    """
    from wsa.export import write_adapter

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    has_full = any(m.kind == "full" for m in layout.modules)
    if has_full and format != "kohya" and rank is None:
        raise ConfigError(
            f"this space holds dense ΔW (repr {layout.repr!r}); format {format!r} needs LoRA factors: "
            "pass --rank R to re-factor by SVD (the energy kept is reported), or --format kohya"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    energies: list[dict[str, float]] = []
    for row, name in zip(np.atleast_2d(rows), names, strict=True):
        adapter = decode(row, layout, path=name)
        if rank is not None and has_full:
            adapter, energy = refactor_to_rank(adapter, rank)
            energies.append(energy)
        target = out / (f"{name}.safetensors" if format == "kohya" else name)
        written.append(write_adapter(adapter, target, format, metadata=metadata, dtype=DTYPES[dtype]))
    report: dict[str, Any] = {"format": format, "dtype": dtype, "exact": not energies}
    if energies:
        per_module = {k: float(np.mean([e[k] for e in energies])) for k in energies[0]}
        report["rank"] = rank
        report["energy_kept_mean"] = float(np.mean([np.mean(list(e.values())) for e in energies]))
        worst = min(per_module, key=per_module.get)
        report["energy_kept_worst_module"] = {"module": worst, "energy_kept": per_module[worst]}
    return written, report
