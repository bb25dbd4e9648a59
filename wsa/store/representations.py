"""The three row representations: ``raw``, ``canonical`` and ``delta``.

* ``raw`` — the factors as stored, flattened in layout order (w2w's choice). Each module's scale is
  folded into its output-side factor *relative to the collection's reference scale*, so rows of
  files with different alpha are comparable while a uniform collection (w2w: alpha 27 everywhere)
  keeps its stored numbers exactly. Meaningful only when adapters share rank and initialisation.
* ``canonical`` — each LoRA module in a gauge-fixed form: ``ΔW = B_c·A_c`` with ``B_c = Q_B·U·√S``,
  ``A_c = √S·Vᵀ·Q_Aᵀ`` from a thin SVD of the small ``r×r`` core (never the dense ΔW), singular
  values descending, and signs fixed so the largest-magnitude entry of each row of ``A_c`` is
  positive. Same size as ``raw``; invariant to ``(B·M, M⁻¹·A)``. Non-LoRA modules store their dense ΔW.
* ``delta`` — the dense ΔW of every module. Exact and gauge-free but large; computed per adapter.

Every representation maps back to an :class:`~wsa.adapter.Adapter` exactly (:func:`decode`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from wsa.adapter import EXTRA_PARTS, KIND_PARTS, Adapter, ModuleWeights
from wsa.errors import CollectionError
from wsa.store.layout import Layout, build_layout


class Mismatch(CollectionError):
    """An adapter that does not fit a layout; the message is the reason (shown per file)."""


def _raw_parts(mod: ModuleWeights) -> list[tuple[str, tuple[int, ...]]]:
    order = KIND_PARTS[mod.kind] + EXTRA_PARTS
    return [(p, tuple(mod.tensors[p].shape)) for p in order if p in mod.tensors]


def _is_plain_lora(mod: ModuleWeights) -> bool:
    return mod.kind == "lora" and "mid" not in mod.tensors and not mod.is_dora


def _factor_shapes(mod: ModuleWeights, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    down, up = mod.tensors["down"], mod.tensors["up"]
    return [("down", (rank, *down.shape[1:])), ("up", (up.shape[0], rank, *up.shape[2:]))]


def layout_for(
    reference: Adapter, repr: str, modules: list[str] | None = None, ranks: dict[str, int] | None = None
) -> Layout:
    """The layout a collection takes from one reference adapter (its modules, ranks and scales).

    ``ranks``: the collection's largest rank per module (``canonical``): every row is padded to it with zero
    components, which leaves ``B·A`` unchanged, so one layout holds any mix of ranks.
    """
    names = list(reference.modules) if modules is None else modules
    specs = []
    for name in names:
        mod = reference.modules[name]
        bias = [("bias", tuple(mod.tensors["bias"].shape))] if "bias" in mod.tensors else []
        if repr == "raw":
            specs.append((name, mod.kind, mod.shape, mod.rank, mod.scale, _raw_parts(mod), mod.dora_axis))
        elif repr == "canonical" and _is_plain_lora(mod):
            rank = max(mod.rank, (ranks or {}).get(name, 0))
            specs.append((name, "lora", mod.shape, rank, 1.0, _factor_shapes(mod, rank) + bias, None))
        else:
            if mod.is_dora:
                raise Mismatch(f"module {name!r} is DoRA: its ΔW needs base weights; use --repr raw")
            specs.append((name, "full", mod.shape, 0, 1.0, [("diff", mod.shape), *bias], None))
    return build_layout(repr, specs)


def canonical_factors(
    up: torch.Tensor, down: torch.Tensor, scale: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauge-fixed ``(B_c, A_c)`` with ``B_c @ A_c == scale · up @ down`` (2-D, float64 inside).

    Cost is O((out + in)·r²), never the out×in ΔW: triangular factors ``R`` of each factor (``B = Q_B·R_B``),
    an SVD of the r×r core ``scale · R_B·R_Aᵀ = U·S·Vᵀ``, then ``B_c = B·(R_B⁻¹·U·√S)`` and
    ``A_c = (√S·Vᵀ·R_A⁻ᵀ)·A`` — two GEMMs with r×r matrices. ``R`` comes from the Cholesky factor of the
    r×r Gram matrix (CholeskyQR: a GEMM, where Householder QR of a tall factor cost 4–10× more on CPU),
    and from a Householder QR when the factor is rank-deficient or ill-conditioned (κ > 10⁴), where the
    Gram route would lose digits.
    """
    b = up.reshape(up.shape[0], -1).to(torch.float64)
    a = down.reshape(down.shape[0], -1).to(torch.float64)
    rb, rb_exact = _triangular_factor(b)
    ra, ra_exact = _triangular_factor(a.T)
    u, s, vh = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)  # rank > width: the core is not square
    root = s.sqrt()
    if rb_exact is None:
        bc = b @ torch.linalg.solve_triangular(rb, u * root, upper=True)
    else:
        bc = (rb_exact @ u) * root  # rb_exact is Q_B (the Householder route)
    if ra_exact is None:
        # A = R_Aᵀ·Q_Aᵀ, so Q_Aᵀ = R_A⁻ᵀ·A: solve X·R_Aᵀ = √S·Vᵀ for the r×r X, then X·A
        ac = torch.linalg.solve_triangular(ra.T, root[:, None] * vh, upper=False, left=False) @ a
    else:
        ac = root[:, None] * (vh @ ra_exact.T)
    # The sign that makes each row's largest-magnitude entry positive (two reductions, no |A_c| temporary).
    signs = torch.where(ac.amax(dim=1) >= -ac.amin(dim=1), 1.0, -1.0).to(ac.dtype)
    bc, ac = bc * signs, ac * signs[:, None]
    k = bc.shape[1]
    if k < rank:  # pad a lower-rank adapter with zero components (exact)
        bc = torch.cat([bc, bc.new_zeros(bc.shape[0], rank - k)], 1)
        ac = torch.cat([ac, ac.new_zeros(rank - k, ac.shape[1])], 0)
    return bc[:, :rank], ac[:rank]


def _triangular_factor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R, None)`` with ``xᵀx = RᵀR`` (CholeskyQR) when ``x`` is well conditioned, else ``(R, Q)`` from QR."""
    if x.shape[1] <= x.shape[0]:
        r, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
        if int(info) == 0:
            d = r.diagonal().abs()
            if bool(d.min() > 1e-4 * d.max()):
                return r, None
    q, r = torch.linalg.qr(x)
    return r, q


def encode(adapter: Adapter, layout: Layout, out: np.ndarray | None = None) -> np.ndarray:
    """One row (``n_features`` float32) for ``adapter`` in ``layout``; :class:`Mismatch` if it does not fit."""
    row = np.empty(layout.n_features, dtype=np.float32) if out is None else out
    for ml in layout.modules:
        mod = adapter.modules.get(ml.name)
        if mod is None:
            if layout.repr == "delta":  # formats.md pitfall 7: a missing module is ΔW = 0
                row[ml.columns] = 0
                continue
            raise Mismatch(f"module {ml.name!r} is missing")
        values = _module_values(ml, mod, layout.repr)
        for part in ml.parts:
            t = values.get(part.name)
            if t is None or tuple(t.shape) != part.shape:
                got = None if t is None else tuple(t.shape)
                raise Mismatch(f"module {ml.name!r} part {part.name!r} has shape {got}, layout expects {part.shape}")
            # numpy casts on assignment: no float32 temporary of the part (bf16 has no numpy dtype: convert)
            flat = t.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found (and named) before writing
                row[part.offset : part.offset + part.size] = (
                    flat if flat.dtype != torch.bfloat16 else flat.float()
                ).numpy()
    return row


def _module_values(ml, mod: ModuleWeights, repr: str) -> dict[str, torch.Tensor]:
    if repr == "raw":
        if mod.kind != ml.kind or mod.is_dora != (ml.dora_axis is not None):
            raise Mismatch(
                f"module {ml.name!r} is {mod.kind}{'+dora' if mod.is_dora else ''}, layout expects {ml.kind}"
            )
        if mod.rank != ml.rank:
            raise Mismatch(
                f"module {ml.name!r} has rank {mod.rank}, the collection's is {ml.rank}: raw keeps w2w's factor "
                "geometry, which needs one rank per module; use --repr canonical (pads every module to the "
                "largest rank, exact)"
            )
        values = dict(mod.tensors)
        ratio = mod.scale / ml.scale if ml.scale else 1.0
        if not math.isclose(ratio, 1.0, rel_tol=1e-7):
            target = {"lora": "up", "loha": "w1_a", "lokr": "w1" if "w1" in values else "w1_a"}.get(mod.kind)
            if target is None:
                raise Mismatch(f"module {ml.name!r} has scale {mod.scale}, layout {ml.scale}")
            values[target] = values[target].to(torch.float32) * ratio
        return values
    bias = {"bias": mod.tensors["bias"]} if "bias" in mod.tensors else {}
    if ml.kind == "lora":
        if not _is_plain_lora(mod):
            raise Mismatch(f"module {ml.name!r} is not a plain LoRA here")
        if mod.rank > ml.rank:
            raise Mismatch(f"module {ml.name!r} has rank {mod.rank}, layout rank {ml.rank}")
        bc, ac = canonical_factors(mod.tensors["up"], mod.tensors["down"], mod.scale, ml.rank)
        down_shape = (ml.rank, *mod.tensors["down"].shape[1:])
        up_shape = (mod.tensors["up"].shape[0], ml.rank, *mod.tensors["up"].shape[2:])
        return {"down": ac.reshape(down_shape), "up": bc.reshape(up_shape), **bias}
    if mod.is_dora:
        raise Mismatch(f"module {ml.name!r} is DoRA: its ΔW needs base weights; use --repr raw")
    if tuple(mod.shape) != ml.shape:
        raise Mismatch(f"module {ml.name!r} has shape {mod.shape}, layout expects {ml.shape}")
    return {"diff": mod.direction_delta(), **bias}


def decode(row: np.ndarray, layout: Layout, path: str = "<store row>", fmt: str = "wsa-store") -> Adapter:
    """The adapter a row stands for (tensors are float32 copies)."""
    modules = {}
    for ml in layout.modules:
        tensors = {
            p.name: torch.from_numpy(np.array(row[p.offset : p.offset + p.size], dtype=np.float32).reshape(p.shape))
            for p in ml.parts
        }
        alpha = ml.alpha if ml.rank else None
        modules[ml.name] = ModuleWeights(ml.kind, tensors, ml.shape, ml.rank, alpha, ml.scale, ml.dora_axis)  # type: ignore[arg-type]
    return Adapter(path, fmt, modules, {})


def delta_norm(adapter: Adapter) -> float:
    """Frobenius norm of the whole adapter's ΔW (DoRA modules: of their direction update).

    Plain LoRA uses ``‖s·B·A‖² = s²·Σ (BᵀB) ⊙ (AAᵀ)`` (r × r Gram matrices, numpy float64), so no
    dense ΔW is formed; at rank 1 that is ``s²·‖b‖²·‖a‖²`` with the sums of squares taken by
    :func:`sum_of_squares`, the arithmetic the ingest fast path repeats for a whole row at once.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _delta_norm(adapter)


def _delta_norm(adapter: Adapter) -> float:
    total = 0.0
    for mod in adapter.modules.values():
        if mod.kind == "lora" and "mid" not in mod.tensors:
            b = _np64(mod.tensors["up"]).reshape(mod.tensors["up"].shape[0], -1)
            a = _np64(mod.tensors["down"]).reshape(mod.tensors["down"].shape[0], -1)
            if a.shape[0] == 1:
                total += mod.scale**2 * (sum_of_squares(b.ravel()) * sum_of_squares(a.ravel()))
            else:
                total += mod.scale**2 * float(np.sum((b.T @ b) * (a @ a.T)))
        else:
            total += float(mod.direction_delta().double().square().sum())
    return math.sqrt(max(total, 0.0))


def sum_of_squares(x: np.ndarray) -> float:
    """Σ x² of a float64 vector, summed left to right.

    Why this form: ``np.add.reduceat`` over the segments of a whole row gives bit-identical sums
    (``np.sum`` is pairwise and would not), so the fast path's vectorised norms equal these exactly.
    """
    return float(np.add.reduceat(np.square(x), [0])[0]) if x.size else 0.0


def _np64(t: torch.Tensor) -> np.ndarray:
    return (t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()).astype(np.float64)
