"""Weights from the ΔW space without dense ΔW for the collection: a point is a weighted sum of member ΔWs.

The ΔW space (:class:`~wsa.delta_space.DeltaSpace`) has no component matrix: component j is
``Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW)``. So the point with PC coefficients ``z`` is

    ΔW(z) = mean + Σ_j z_j · component_j = Σ_i β_i · ΔW_i,   β = 1/N + W·z − mean(W·z)

(:func:`member_weights`), and per module ``Σ_i β_i · s_i B_i A_i`` is itself a LoRA of rank ``R = Σ_i r_i``:
the members' up factors, each times ``β_i s_i``, side by side, over their down factors stacked. That is
exact and never forms ΔW.

:class:`DeltaBasis` holds those stacks once per module, reduced exactly by two thin QRs
(``[s_i B_i] = Q_b R_b``, ``[A_i]ᵀ = Q_a R_a``): a point with source weights ``w`` is then

    ΔW(w) = Q_b · core(w) · Q_aᵀ,   core(w) = R_b · diag(w) · R_aᵀ     (p × q, p ≤ min(out, R), q ≤ min(in, R))

i.e. the LoRA ``up = Q_b·core``, ``down = Q_aᵀ`` of rank q. Linear in ``w``, so it is differentiable
(inversion optimises coefficients through it), batched (M points share Q_a) and the same for decoding
and export. The QR changes nothing but the basis: when the stacked rank R is below a module's width the
factors stay rank R; above it they are rank min(in, R) — never larger than ΔW's own rank bound.
:func:`refactor` writes a point as a standard LoRA of rank ``--rank R`` (truncated SVD of the low-rank
sum) and reports the share of ‖ΔW‖² each module keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import ConfigError
from wsa.store.layout import Layout
from wsa.store.representations import decode

#: Source factors held in memory by a :class:`DeltaBasis` at most (float32 bytes): above it the basis
#: refuses with the reason instead of swapping.
BASIS_BYTES = 4 * 2**30


def member_weights(space: Any, z: np.ndarray) -> np.ndarray:
    """β (N,) with ``ΔW(z) = Σ_i β_i ΔW_i`` for PC coefficients ``z`` (k,) of a ΔW space (float64)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    k = space.dual_weights.shape[1]
    if z.shape[0] > k or not np.isfinite(z).all():
        raise ConfigError(f"coefficients must be at most {k} finite numbers; got {z.shape[0]}")
    w = space.dual_weights[:, : z.shape[0]] @ z
    return 1.0 / space.n_samples + w - w.mean()


def _plain(ml) -> bool:
    """A module whose sources are plain 2-D LoRA factors (``down``/``up``), which the basis keeps factored."""
    return ml.kind == "lora" and {p.name for p in ml.parts} == {"down", "up"} and len(ml.shape) == 2


@dataclass
class _ModuleBasis:
    """One module's reduced stacks: ``ΔW(w) = q_b · (r_b · diag(w[source]) · r_aᵀ) · q_aᵀ``."""

    q_b: Tensor  # (out, p)
    r_b: Tensor  # (p, R)
    r_a: Tensor  # (q, R)
    q_a: Tensor  # (in, q)
    source: Tensor  # (R,) which source each stacked column belongs to


class DeltaBasis:
    """The stacked factors of S sources — the members, then any outside adapters — per module.

    Parameters
    ----------
    rows : (N, n_features) rows of a raw or canonical layout (the store's rows of the members).
    layout : their layout.
    outside : adapters placed in the space from files (any rank, any kind: the ΔW space does not care how
        a ΔW is factored; one that is not plain LoRA on a module enters by the exact SVD of its ΔW there).

    Modules that are not plain 2-D LoRA in the layout (conv kernels, LoHa/LoKr, dense ``full`` ΔW of a
    canonical store) are held as each source's dense ΔW (S × out × in) and combined densely; bias parts too.
    """

    def __init__(self, rows: np.ndarray, layout: Layout, outside: Sequence[Adapter] = ()) -> None:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        if rows.shape[1] != layout.n_features:
            raise ConfigError(f"rows have {rows.shape[1]} columns; the layout has {layout.n_features}")
        need = rows.nbytes * 2
        if need > BASIS_BYTES:
            raise ConfigError(
                f"ΔW-space points combine the factors of all {len(rows)} members: {need / 2**30:.1f} GiB here, over "
                f"the {BASIS_BYTES / 2**30:.0f} GiB this process holds for them; analyse a subset for the applications"
            )
        self.layout = layout
        self.n_members = len(rows)
        self.n_sources = len(rows) + len(outside)
        self.modules: dict[str, _ModuleBasis] = {}
        self.dense: dict[str, Tensor] = {}  # module → (S, *shape) dense ΔW of each source
        self.bias: dict[str, Tensor] = {}  # module → (S, out) bias parts
        with torch.no_grad():
            for ml in layout.modules:
                if _plain(ml):
                    self.modules[ml.name] = self._reduce(rows, ml, outside)
                    continue
                sources = [decode(row, Layout(layout.repr, (ml,))) for row in rows] + list(outside)
                stacked, biases = [], []
                for adapter in sources:
                    present = ml.name in adapter.modules
                    stacked.append(
                        adapter.delta(ml.name).double().reshape(ml.shape)
                        if present
                        else torch.zeros(ml.shape, dtype=torch.float64)
                    )
                    biases.append(adapter.bias_delta(ml.name) if present else None)
                self.dense[ml.name] = torch.stack(stacked)
                if any(b is not None for b in biases):
                    size = next(b for b in biases if b is not None).shape
                    self.bias[ml.name] = torch.stack([torch.zeros(size) if b is None else b for b in biases]).double()

    @staticmethod
    def _reduce(rows: np.ndarray, ml, outside: Sequence[Adapter]) -> _ModuleBasis:
        parts = {p.name: p for p in ml.parts}
        down, up = parts["down"], parts["up"]
        n, r = len(rows), ml.rank
        out_f, in_f = ml.shape
        d = torch.from_numpy(rows[:, down.offset : down.offset + down.size].astype(np.float64)).reshape(n, r, in_f)
        u = torch.from_numpy(rows[:, up.offset : up.offset + up.size].astype(np.float64)).reshape(n, out_f, r)
        ups = [(u * ml.scale).permute(1, 0, 2).reshape(out_f, n * r)]  # [s_i B_i], column i·r + p
        downs = [d.reshape(n * r, in_f)]  # [A_i] stacked, row i·r + p
        source = [torch.arange(n).repeat_interleave(r)]
        for j, adapter in enumerate(outside):
            b, a = _factors(adapter, ml.name, ml.shape)
            ups.append(b)
            downs.append(a)
            source.append(torch.full((b.shape[1],), n + j))
        q_b, r_b = torch.linalg.qr(torch.cat(ups, dim=1))  # thin: (out, p), (p, R)
        q_a, r_a = torch.linalg.qr(torch.cat(downs).T)  # (in, q), (q, R)
        return _ModuleBasis(q_b, r_b, r_a, q_a, torch.cat(source))

    # ---------------------------------------------------------------------------------------------
    def _weights(self, weights: Tensor | np.ndarray) -> Tensor:
        w = torch.as_tensor(weights, dtype=torch.float64)
        w = w[None] if w.ndim == 1 else w
        if w.ndim != 2 or w.shape[1] > self.n_sources:
            raise ConfigError(f"point weights must be (M, ≤ {self.n_sources}); got {tuple(w.shape)}")
        if w.shape[1] < self.n_sources:  # points made before an outside adapter was added weigh it 0
            w = torch.cat([w, w.new_zeros(w.shape[0], self.n_sources - w.shape[1])], dim=1)
        return w

    def factors(self, weights: Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Per module of the M points ``Σ_s w_s · source_s``: ``(down (M, q, in), up (M, out, q))`` for LoRA
        modules, ``(M, *shape)`` dense ΔW for the rest. Differentiable in ``weights`` (a float64 tensor)."""
        w = self._weights(weights)
        out: dict[str, Any] = {}
        for name, mb in self.modules.items():
            cw = w[:, mb.source.to(w.device)]  # (M, R)
            core = torch.einsum("pr,mr,qr->mpq", mb.r_b.to(w.device), cw, mb.r_a.to(w.device))
            up = mb.q_b.to(w.device) @ core  # (M, out, q)
            down = mb.q_a.T.to(w.device).expand(w.shape[0], -1, -1)  # (M, q, in)
            out[name] = (down.to(dtype), up.to(dtype))
        for name, stacked in self.dense.items():
            out[name] = torch.einsum("ms,s...->m...", w, stacked.to(w.device)).to(dtype)
        return out

    def adapters(self, weights: np.ndarray, names: Sequence[str] | None = None) -> list[Adapter]:
        """The M points as adapters: exact LoRA factors (rank q per module, see the module docstring)."""
        with torch.no_grad():
            w = self._weights(weights)
            per = self.factors(w)
            bias = {name: torch.einsum("ms,so->mo", w, b) for name, b in self.bias.items()}
        names = list(names) if names is not None else [f"point_{i}" for i in range(w.shape[0])]
        result = []
        for i, name in enumerate(names):
            modules: dict[str, ModuleWeights] = {}
            for ml in self.layout.modules:
                value = per[ml.name]
                if isinstance(value, tuple):
                    down, up = value[0][i].contiguous(), value[1][i].contiguous()
                    modules[ml.name] = ModuleWeights(
                        "lora", {"down": down, "up": up}, ml.shape, down.shape[0], float(down.shape[0]), 1.0
                    )
                else:
                    tensors = {"diff": value[i].float().contiguous()}
                    if ml.name in bias:
                        tensors["bias"] = bias[ml.name][i].float()
                    modules[ml.name] = ModuleWeights("full", tensors, ml.shape, 0, None, 1.0)
            result.append(Adapter(name, "wsa-delta-point", modules, {}))
        return result


def _factors(adapter: Adapter, name: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``adapter.factors(name)``, or rank-0 factors where the adapter lacks the module (its ΔW is 0 there)."""
    if name not in adapter.modules:
        return torch.zeros(shape[0], 0, dtype=torch.float64), torch.zeros(0, shape[1], dtype=torch.float64)
    return adapter.factors(name)


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
        tensors = {"up": up, "down": down}
        if "bias" in mw.tensors:  # a LoRA bias change is scaled like the product (PEFT): fold the scale in
            tensors["bias"] = mw.tensors["bias"] * mw.scale
        modules[name] = ModuleWeights("lora", tensors, mw.shape, r, float(r), 1.0)
    return Adapter(adapter.path, adapter.format, modules, dict(adapter.metadata)), kept
