"""Weights from the ΔW space without dense ΔW: a point is a weighted sum of the members' ΔW.

The ΔW space (:class:`~wsa.delta_space.DeltaSpace`) has no component matrix: component j is
``Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW)``. So the point with PC coefficients ``z`` is

    ΔW(z) = mean + Σ_j z_j · component_j = Σ_i β_i · ΔW_i,   β = 1/N + W·z − mean(W·z)

(:func:`member_weights`), and per module ``Σ_i β_i · s_i B_i A_i`` is itself a LoRA of rank ``Σ_i r_i``:
the members' up factors, each times ``β_i s_i``, side by side, over their down factors stacked
(:func:`stacked_adapter`). That is exact and never forms ΔW; a decoder applies it as factors. To write it
as a standard LoRA of rank R, :func:`refactor` takes the truncated SVD of the low-rank sum (QR of both
stacks, SVD of the small core) and reports the share of ‖ΔW‖² each module keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import ConfigError


def member_weights(space: Any, z: np.ndarray) -> np.ndarray:
    """β (N,) with ``ΔW(z) = Σ_i β_i ΔW_i`` for PC coefficients ``z`` (k,) of a ΔW space (float64)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    k = space.dual_weights.shape[1]
    if z.shape[0] > k or not np.isfinite(z).all():
        raise ConfigError(f"coefficients must be at most {k} finite numbers; got {z.shape[0]}")
    w = space.dual_weights[:, : z.shape[0]] @ z
    return 1.0 / space.n_samples + w - w.mean()


def stacked_adapter(members: Sequence[Adapter], beta: np.ndarray, name: str = "point") -> Adapter:
    """The adapter ``Σ_i β_i · member_i``: per LoRA module, rank ``Σ r_i`` factors (exact, no dense ΔW).

    Modules that are not plain 2-D LoRA in some member (conv kernels, LoHa, LoKr, full ΔW, DoRA) are summed
    densely, as ``full`` modules. Members may lack a module (it counts as zero there).
    """
    beta = np.asarray(beta, dtype=np.float64)
    if len(members) != len(beta):
        raise ConfigError(f"{len(beta)} weights for {len(members)} members")
    names = sorted({n for m in members for n in m.modules})
    modules: dict[str, ModuleWeights] = {}
    for module in names:
        present = [(b, m) for b, m in zip(beta, members, strict=True) if module in m.modules]
        parts = [(b, m.modules[module]) for b, m in present]
        factored = all(
            mw.kind == "lora" and not mw.is_dora and "mid" not in mw.tensors and mw.tensors["down"].dim() == 2
            for _, mw in parts
        )
        shape = parts[0][1].shape
        if factored:
            ups = [mw.tensors["up"].double() * (b * mw.scale) for b, mw in parts]
            downs = [mw.tensors["down"].double() for _, mw in parts]
            up, down = torch.cat(ups, dim=1).float(), torch.cat(downs, dim=0).float()
            modules[module] = ModuleWeights("lora", {"up": up, "down": down}, shape, up.shape[1], None, 1.0)
        else:
            total = sum(b * m.delta(module).double() for b, m in present)
            modules[module] = ModuleWeights("full", {"diff": total.float()}, shape, 0, None, 1.0)
    return Adapter(name, "wsa-delta-point", modules, {})


def refactor(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, float]]:
    """Each LoRA module as the best rank-``rank`` LoRA of its ΔW (truncated SVD), and the energy each keeps.

    Exact arithmetic on the factors: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``, ``R_b R_aᵀ = U S Vᵀ``; the new factors
    are ``Q_b U_R S_R`` and ``V_Rᵀ Q_aᵀ``. Energy kept: ``Σ_{≤R} s² / Σ s²`` (1.0 where the rank already fits).
    Non-LoRA modules are kept as they are.
    """
    if rank < 1:
        raise ConfigError(f"rank must be at least 1; got {rank}")
    modules: dict[str, ModuleWeights] = {}
    kept: dict[str, float] = {}
    for name, mw in adapter.modules.items():
        if mw.kind != "lora" or mw.tensors["down"].dim() != 2:
            modules[name] = mw
            continue
        b = mw.tensors["up"].double() * mw.scale
        a = mw.tensors["down"].double()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vt = torch.linalg.svd(rb @ ra.T)
        r = min(rank, int(s.shape[0]))
        energy = float((s**2).sum())
        kept[name] = float((s[:r] ** 2).sum() / energy) if energy > 0 else 1.0
        up = (qb @ u[:, :r] * s[:r]).float()
        down = (vt[:r] @ qa.T).float()
        modules[name] = ModuleWeights("lora", {"up": up, "down": down}, mw.shape, r, float(r), 1.0)
    return Adapter(adapter.path, adapter.format, modules, dict(adapter.metadata)), kept
