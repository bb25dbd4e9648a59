"""The dense weight change ΔW of every adapter algorithm, computed in float32.

All format readers hand their factors to these functions, so each formula exists once.
Conventions (see ``../shared/research/formats.md`` §2–3.5 and docs/architecture.md):

* plain LoRA / LoCon: ``down`` is ``r × in [× kh × kw]``, ``up`` is ``out × r [× 1 × 1]``,
  optional Tucker ``mid`` ``r × r × kh × kw`` (then ``down`` is ``r × in × 1 × 1``);
  ``ΔW = s · up @ down``.
* LoHa: ``ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, or the Tucker form with ``t1``/``t2``.
* LoKr: ``ΔW = s · kron(W1, W2)`` with each of W1, W2 stored full or as an ``_a @ _b`` product.
* full: ``ΔW = diff``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(dtype=torch.float32, device="cpu")


def reshape_to(delta: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Give a 2-D product the base layer's weight shape (a conv stores ``out × (in·kh·kw)``)."""
    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != math.prod(shape):
        raise ValueError(f"cannot reshape delta of shape {tuple(delta.shape)} to {tuple(shape)}")
    return delta.reshape(shape)


def lora_delta(tensors: Mapping[str, Tensor], scale: float) -> Tensor:
    up, down = _f32(tensors["up"]), _f32(tensors["down"])
    out_features, rank = up.shape[0], up.shape[1]
    if "mid" in tensors:
        # Tucker/CP conv (LyCORIS lora_mid): ΔW[o,i,h,w] = Σ_ab up[o,a] mid[a,b,h,w] down[b,i]
        mid = _f32(tensors["mid"])
        delta = torch.einsum("oa,abhw,bi->oihw", up.reshape(out_features, rank), mid, down.flatten(1))
        return delta * scale
    delta = up.reshape(out_features, rank) @ down.reshape(rank, -1)
    if down.dim() > 2:  # conv (2-D or 3-D): the kernel lives in the down factor
        delta = delta.reshape(out_features, *down.shape[1:])
    return delta * scale


def _tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    # LyCORIS Tucker factor: M[o,i,h,w] = Σ_ab core[a,b,h,w] a[a,o] b[b,i]  (note: a is r × out)
    return torch.einsum("abhw,ao,bi->oihw", core, a, b)


def loha_delta(tensors: Mapping[str, Tensor], scale: float, shape: tuple[int, ...]) -> Tensor:
    t = {k: _f32(v) for k, v in tensors.items()}
    if "t1" in t:
        m1 = _tucker(t["t1"], t["w1_a"], t["w1_b"])
        m2 = _tucker(t["t2"], t["w2_a"], t["w2_b"])
    else:
        m1 = t["w1_a"] @ t["w1_b"]
        m2 = t["w2_a"] @ t["w2_b"]
    return reshape_to(m1 * m2 * scale, shape)


def lokr_factor(tensors: Mapping[str, Tensor], which: str) -> Tensor:
    """Rebuild W1 or W2 of a LoKr module from its full or decomposed (optionally Tucker) storage."""
    t = {k: _f32(v) for k, v in tensors.items()}
    if which in t:
        return t[which]
    a, b = t[f"{which}_a"], t[f"{which}_b"]
    if which == "w2" and "t2" in t:
        return _tucker(t["t2"], a, b)
    return a @ b


def lokr_delta(tensors: Mapping[str, Tensor], scale: float, shape: tuple[int, ...]) -> Tensor:
    # contiguous: a Tucker-rebuilt W2 is an einsum view, and torch.kron cannot take every view
    w1, w2 = lokr_factor(tensors, "w1").contiguous(), lokr_factor(tensors, "w2").contiguous()
    if len(shape) == 4:  # conv: W2 carries the kernel (LyCORIS make_kron), W1 is 1×1
        if w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if w1.dim() == 2:
            w1 = w1[:, :, None, None]
    return reshape_to(torch.kron(w1, w2) * scale, shape)


def full_delta(tensors: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    return reshape_to(_f32(tensors["diff"]), shape)


def dora_weight_norm(weight: Tensor, axis: str) -> Tensor:
    """Norm of ``weight`` per output row (``axis="out"``, PEFT and LyCORIS default) or per input column."""
    if axis == "out":
        return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *([1] * (weight.dim() - 1)))
    dims = [0, *range(2, weight.dim())]
    return weight.norm(dim=dims, keepdim=True)


def dora_delta(direction_delta: Tensor, magnitude: Tensor, base_weight: Tensor, axis: str) -> Tensor:
    """Effective ΔW of a DoRA module: ``m ⊙ (W + ΔW_dir) / ‖W + ΔW_dir‖ − W``.

    Why the base weight is needed: DoRA rescales the *merged* weight, so its ΔW is not a
    function of the adapter file alone (PEFT ``dora.py``; LyCORIS ``apply_weight_decompose``).
    """
    w = _f32(base_weight)
    merged = w + direction_delta
    mag = _f32(magnitude)
    mag = mag.reshape(-1, *([1] * (w.dim() - 1))) if axis == "out" else mag.reshape(dora_weight_norm(w, axis).shape)
    return mag * merged / dora_weight_norm(merged, axis) - w
