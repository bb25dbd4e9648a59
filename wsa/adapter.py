"""The in-memory form of one adapter file or folder, independent of the format it came from.

Every reader produces an :class:`Adapter`: per target module (canonical diffusers module path)
its tensors under wsa's own names, its rank, alpha and the *scale* that the source format's rule
gives. Everything downstream (store, representations, export) reads only this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from wsa import deltas
from wsa.errors import FormatError

ModuleKind = Literal["lora", "loha", "lokr", "full"]

#: The tensor names each kind may hold (wsa's names, not the file's), in flattening order.
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "lora": ("down", "up", "mid"),
    "loha": ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"),
    "lokr": ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"),
    "full": ("diff",),
}
#: Extra parts any kind may carry: a bias delta and a DoRA magnitude.
EXTRA_PARTS: tuple[str, ...] = ("bias", "magnitude")


@dataclass(frozen=True)
class ModuleWeights:
    """One adapted layer.

    Attributes
    ----------
    kind : ``"lora" | "loha" | "lokr" | "full"``
    tensors : mapping from part name (see ``KIND_PARTS``) to the tensor as stored (dtype kept).
    shape : the base layer's weight shape, ``(out, in)`` or ``(out, in, kh, kw)``.
    rank : inner dimension of the factors (0 for ``full``).
    alpha : the stored or configured alpha (``None`` where the format has none).
    scale : multiplier of the factor product, from the source format's rule (alpha/r, alpha/√r, 1, ...).
    dora_axis : ``"out"`` or ``"in"`` when ``tensors`` holds a DoRA ``magnitude``, else ``None``.
    """

    kind: ModuleKind
    tensors: Mapping[str, Tensor]
    shape: tuple[int, ...]
    rank: int
    alpha: float | None
    scale: float
    dora_axis: Literal["out", "in"] | None = None

    @property
    def is_dora(self) -> bool:
        return "magnitude" in self.tensors

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def direction_delta(self) -> Tensor:
        """ΔW of the factors alone (for DoRA: the direction update before magnitude rescaling)."""
        if self.kind == "lora":
            return deltas.reshape_to(deltas.lora_delta(self.tensors, self.scale), self.shape)
        if self.kind == "loha":
            return deltas.loha_delta(self.tensors, self.scale, self.shape)
        if self.kind == "lokr":
            return deltas.lokr_delta(self.tensors, self.scale, self.shape)
        return deltas.full_delta(self.tensors, self.shape)


@dataclass(frozen=True)
class Adapter:
    """One adapter: ``format``, ``modules`` (name -> :class:`ModuleWeights`, sorted), ``metadata``.

    ``metadata`` holds the file's string metadata (safetensors header, PEFT config fields) so
    ``wsa info`` and exports can show where an adapter came from. ``family`` is the base model's
    family, decided from the module names (checked against the metadata), see :mod:`wsa.families`.
    """

    path: str
    format: str
    modules: Mapping[str, ModuleWeights]
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Base-model family (``sd15``, ``sdxl``, ``flux1``, …; see :mod:`wsa.families`), "" when unknown.
    family: str = ""
    #: How the family was decided: ``keys``, ``keys+metadata``, ``keys+shapes``, ``keys (also fit: …)``, ``forced``.
    family_source: str = ""
    #: What the reader did beyond renaming (fused layers split, rows reordered, metadata disagreeing).
    notes: tuple[str, ...] = ()
    #: Other families whose names and shapes this adapter also fits (``--family`` may pick one of them).
    family_candidates: tuple[str, ...] = ()

    def delta(self, module: str, base_weight: Tensor | None = None) -> Tensor:
        """The dense ΔW of ``module`` as float32, scale applied, in the base layer's weight shape.

        DoRA modules need ``base_weight`` (their ΔW depends on it) and raise without it.
        """
        try:
            weights = self.modules[module]
        except KeyError:
            raise FormatError(f"no module {module!r} in this adapter", self.path) from None
        direction = weights.direction_delta()
        if not weights.is_dora:
            return direction
        if base_weight is None:
            raise FormatError(
                f"module {module!r} is DoRA: its ΔW depends on the base weight; pass base_weight=",
                self.path,
            )
        assert weights.dora_axis is not None
        return deltas.dora_delta(direction, weights.tensors["magnitude"], base_weight, weights.dora_axis)

    def factors(self, module: str) -> tuple[Tensor, Tensor]:
        """Exact factors ``(B·s (out, r), A (r, in))`` of ``module``'s ΔW (2-D weight shape), float64.

        A plain LoRA gives its own factors (scale folded into B); any other kind (LoHa, LoKr, full, conv,
        Tucker) the SVD of its dense ΔW, keeping singular values above 1e-7 of the largest — so inner
        products of ΔW between adapters of any kind and rank come from factors (``Σ (B_xᵀB_y) ⊙ (A_xA_yᵀ)``).
        DoRA modules raise as in :meth:`delta` (their ΔW depends on the base weight).
        """
        weights = self.modules.get(module)
        if weights is None:
            raise FormatError(f"no module {module!r} in this adapter", self.path)
        plain = weights.kind == "lora" and not weights.is_dora and "mid" not in weights.tensors
        if plain and weights.tensors["down"].dim() == 2:
            return weights.tensors["up"].double() * weights.scale, weights.tensors["down"].double()
        delta = self.delta(module).double()
        u, s, vt = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        keep = s > s.max() * 1e-7 if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
        return u[:, keep] * s[keep], vt[keep]

    def bias_delta(self, module: str) -> Tensor | None:
        """The bias change of ``module`` as float32, or ``None``.

        A PEFT ``lora_B.bias`` is scaled like the factor product (PEFT ``Linear.merge`` adds
        ``bias * scaling``); a LyCORIS ``diff_b`` belongs to a ``full`` module, whose scale is 1.
        """
        try:
            weights = self.modules[module]
        except KeyError:
            raise FormatError(f"no module {module!r} in this adapter", self.path) from None
        bias = weights.tensors.get("bias")
        return None if bias is None else bias.to(torch.float32) * weights.scale

    @property
    def kinds(self) -> list[str]:
        """The algorithms present, e.g. ``["lora"]`` or ``["lora+dora"]``."""
        return sorted({m.kind + ("+dora" if m.is_dora else "") for m in self.modules.values()})

    @property
    def n_params(self) -> int:
        return sum(m.n_params for m in self.modules.values())


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """The one place the alpha/rank rule lives: missing alpha means alpha = rank (scale 1).

    kohya, ComfyUI, A1111 and diffusers all read a missing (or zero) alpha as alpha = rank;
    PEFT's rsLoRA divides by √r instead of r.
    """
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)
