"""Points of a fitted space as weights: one interface for both geometries, used by every application.

A *point* is an array with one row per model, linear like the space itself (``lerp`` and ``vstack`` are
plain array operations):

* :class:`RowPoints` — the explicit space (:class:`~wsa.space.Space`): a point is a row of the store's
  layout (LoRA factors, or dense ΔW for ``--repr delta``), ``row = mean + scale·(z @ components)``.
* :class:`MemberPoints` — the ΔW space (:class:`~wsa.delta_space.DeltaSpace`): a point is the weights of
  a linear combination of *sources* (the members, then any outside adapter placed in the space), its ΔW
  ``Σ_s w_s ΔW_s`` held as stacked factors (:class:`~wsa.delta_points.DeltaBasis`), never dense.

Both answer the same questions — a member's point, the point of coefficients ``z``, a step along a
PC-space direction, the coefficients of a point, its adapters (export), its decoder stacks and the
stacks of coefficients as a differentiable function (inversion) — so ``wsa sample / edit / invert /
interpolate / decode`` and the gallery have one code path. :func:`export_adapters` writes adapters as
files anyone can load, re-factored to ``--rank R`` by truncated SVD when asked (energy kept reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from wsa.adapter import Adapter, ModuleWeights
from wsa.decoding.batched_lora import DenseStack, LowRankStack, Stack
from wsa.decoding.stacks import stacks_from_adapters
from wsa.errors import ConfigError
from wsa.space.protocol import member_rows
from wsa.store.layout import Layout
from wsa.store.representations import decode, encode

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Points(Protocol):
    """What a geometry's points can do (see the module docstring)."""

    def member(self, model: str) -> tuple[np.ndarray, str]: ...
    def stack(self, points: Sequence[np.ndarray]) -> np.ndarray: ...
    def from_coefficients(self, z: np.ndarray) -> np.ndarray: ...
    def step(self, points: np.ndarray, dz: np.ndarray) -> np.ndarray: ...
    def coefficients(self, points: np.ndarray) -> np.ndarray: ...
    def adapters(self, points: np.ndarray, names: Sequence[str]) -> list[Adapter]: ...
    def stacks(self, points: np.ndarray) -> dict[str, Stack]: ...
    def torch_stacks(self, z: Tensor) -> dict[str, Stack]: ...


def _load(path: Path) -> Adapter:
    """An adapter file or folder outside the collection (one error line if it cannot be read)."""
    from wsa import load_adapter

    try:
        return load_adapter(path)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot be placed in this space ({exc})") from None


def _load_outside(path: Path, layout: Layout) -> np.ndarray:
    """An adapter file or folder outside the collection as a row of ``layout`` (one error line if it does not fit)."""
    try:
        return encode(_load(path), layout)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: cannot be placed in this space ({exc})") from None


def _not_found(model: str, ids: Sequence[str]) -> ConfigError:
    close = [i for i in ids if model in i][:3]
    hint = f"; similar ids: {close}" if close else ""
    return ConfigError(f"{model!r} is neither a member id of this space nor an adapter path{hint}")


class RowPoints:
    """Points of an explicit space: rows of the store's layout."""

    def __init__(self, space: Any, layout: Layout, store: Any | None, notes: list[str] | None = None) -> None:
        self.space, self.layout, self.store = space, layout, store
        self.notes = notes if notes is not None else []
        self._torch: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def member(self, model: str) -> tuple[np.ndarray, str]:
        """(1, D) row of ``model`` — a member id (its exact store row) or an adapter path — and how it was found."""
        ids = [str(i) for i in self.space.ids]
        if model in ids:
            if self.store is not None and model in self.store.ids:
                return self.store.read_rows([self.store.index(model)]), "store row"
            self.notes.append(f"{model}: the store was not found; rebuilt from its k coefficients")
            z = np.asarray(self.space.coefficients[ids.index(model)], dtype=np.float32)
            return self.space.inverse_transform(z[None]), "rebuilt from coefficients"
        if Path(model).exists():
            return _load_outside(Path(model), self.layout)[None], "adapter file"
        raise _not_found(model, ids)

    def stack(self, points: Sequence[np.ndarray]) -> np.ndarray:
        """Points as one array (one row each)."""
        return np.vstack([np.atleast_2d(p) for p in points]).astype(np.float32)

    def from_coefficients(self, z: np.ndarray) -> np.ndarray:
        return self.space.inverse_transform(np.atleast_2d(np.asarray(z, dtype=np.float32)))

    def step(self, points: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """Rows moved by PC-space steps ``dz`` (n, m): ``row + scale ⊙ (dz @ components[:m])``."""
        dz = np.atleast_2d(np.asarray(dz, dtype=np.float32))
        delta = (dz @ np.asarray(self.space.components[: dz.shape[1]], dtype=np.float32)) * self.space.scale
        return np.atleast_2d(points).astype(np.float32) + delta

    def coefficients(self, points: np.ndarray) -> np.ndarray:
        return self.space.transform(np.atleast_2d(points))

    def adapters(self, points: np.ndarray, names: Sequence[str]) -> list[Adapter]:
        return [decode(row, self.layout, path=name) for row, name in zip(np.atleast_2d(points), names, strict=True)]

    def stacks(self, points: np.ndarray) -> dict[str, Stack]:
        rows = np.atleast_2d(points)
        return stacks_from_adapters(self.adapters(rows, [f"point_{i}" for i in range(len(rows))]))

    def torch_stacks(self, z: Tensor) -> dict[str, Stack]:
        """Differentiable stacks of the rows ``mean + scale·(z @ components[:k])`` for coefficients z (M, k)."""
        key = str(z.device)
        if key not in self._torch:
            sp = self.space
            self._torch[key] = tuple(
                torch.as_tensor(np.array(a, dtype=np.float32), device=z.device)
                for a in (sp.components, sp.mean, sp.scale)
            )
        components, mean, scale = self._torch[key]
        rows = mean + scale * (z.float() @ components[: z.shape[1]])
        return _row_stacks(rows, self.layout)


def _row_stacks(rows: Tensor, layout: Layout) -> dict[str, Stack]:
    """Differentiable stacks from rows (M, D): LoRA parts stay factored, full ΔW dense."""
    m = rows.shape[0]
    stacks: dict[str, Stack] = {}
    for ml in layout.modules:
        parts = {p.name: rows[:, p.offset : p.offset + p.size].reshape(m, *p.shape) for p in ml.parts}
        if ml.kind == "lora" and set(parts) <= {"down", "up"} and len(ml.shape) == 2:
            stacks[ml.name] = LowRankStack(parts["down"], parts["up"], torch.full((m,), ml.scale, device=rows.device))
        elif ml.kind == "full" and set(parts) <= {"diff"} and len(ml.shape) == 2:
            stacks[ml.name] = DenseStack(parts["diff"])
        else:
            raise ConfigError(
                f"module {ml.name!r} ({ml.kind} with parts {sorted(parts)}) cannot be optimised; inversion supports "
                "plain LoRA (raw, canonical) and dense ΔW (delta) layouts of linear layers"
            )
    return stacks


class MemberPoints:
    """Points of a ΔW space: weights (M, S) over its members (store order of ``space.ids``) and outside adapters.

    Needs the store the space was fitted on (the members' factors are the basis of every point).
    """

    def __init__(self, space: Any, layout: Layout, store: Any) -> None:
        from wsa.errors import StoreError

        if store is None:
            raise StoreError(
                "the ΔW space's points are combinations of its members' factors, and the store it was fitted on "
                "was not found (moved or deleted); re-run wsa analyze"
            )
        self.space, self.layout, self.store = space, layout, store
        self.ids = [str(i) for i in space.ids]
        self._store_rows = member_rows(store, self.ids)
        self._outside: list[Adapter] = []  # adapters placed in the space from files, any rank or kind
        self._outside_names: dict[str, int] = {}
        self._basis = None
        dual = np.asarray(space.dual_weights, dtype=np.float64)
        m = np.asarray(space.gram_row_means, dtype=np.float64)
        self._dual = dual
        self._lin_mean = (m - m.mean()) @ dual  # ⟨mean ΔW, component_j⟩
        self._lin_members = np.asarray(space.coefficients, dtype=np.float64) + self._lin_mean
        self._lin_outside: list[np.ndarray] = []

    @property
    def n_sources(self) -> int:
        return len(self.ids) + len(self._outside)

    @property
    def basis(self):
        from wsa.delta_points import DeltaBasis

        if self._basis is None or self._basis.n_sources != self.n_sources:
            self._basis = DeltaBasis(self.store.read_rows(self._store_rows), self.layout, self._outside)
        return self._basis

    def _pad(self, points: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(points, dtype=np.float64))
        if w.shape[1] > self.n_sources:
            raise ConfigError(f"points have {w.shape[1]} source weights; this space has {self.n_sources} sources")
        return np.pad(w, ((0, 0), (0, self.n_sources - w.shape[1])))

    def _one_hot(self, i: int) -> np.ndarray:
        w = np.zeros((1, self.n_sources))
        w[0, i] = 1.0
        return w

    def member(self, model: str) -> tuple[np.ndarray, str]:
        """(1, S) weights of ``model``: a member id (exactly its ΔW) or an adapter path (added as a source).

        An outside adapter may have any rank or kind (the ΔW space is rank-agnostic); its modules must be
        modules of the space, with the same shapes.
        """
        if model in self.ids:
            return self._one_hot(self.ids.index(model)), "member"
        path = Path(model)
        if path.exists():
            key = str(path.resolve())
            if key not in self._outside_names:
                adapter = _load(path)
                z = self.space.transform_adapters([adapter], self.store)[0]  # checks modules and shapes
                self._lin_outside.append(np.asarray(z, dtype=np.float64) + self._lin_mean)
                self._outside.append(adapter)
                self._outside_names[key] = self.n_sources - 1
            return self._one_hot(self._outside_names[key]), "adapter file"
        raise _not_found(model, self.ids)

    def stack(self, points: Sequence[np.ndarray]) -> np.ndarray:
        """Points as one array, all weighing the current sources (an outside adapter added later weighs 0)."""
        return np.vstack([self._pad(p) for p in points])

    def from_coefficients(self, z: np.ndarray) -> np.ndarray:
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        w = z @ self._dual[:, : z.shape[1]].T  # (M, N)
        w = 1.0 / len(self.ids) + w - w.mean(axis=1, keepdims=True)
        return self._pad(w)

    def step(self, points: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """Points moved by PC-space steps ``dz`` (n, m): ``+ Σ_i (W dz)_i (ΔW_i − mean)`` as member weights."""
        dz = np.atleast_2d(np.asarray(dz, dtype=np.float64))
        w = dz @ self._dual[:, : dz.shape[1]].T
        return self._pad(points) + self._pad(w - w.mean(axis=1, keepdims=True))

    def coefficients(self, points: np.ndarray) -> np.ndarray:
        w = self._pad(points)
        n = len(self.ids)
        lin = w[:, :n] @ self._lin_members
        if self._outside:
            lin = lin + w[:, n:] @ np.stack(self._lin_outside)
        return (lin - self._lin_mean).astype(np.float32)

    def adapters(self, points: np.ndarray, names: Sequence[str]) -> list[Adapter]:
        return self.basis.adapters(self._pad(points), names)

    def stacks(self, points: np.ndarray) -> dict[str, Stack]:
        with torch.no_grad():
            return _basis_stacks(self.basis.factors(torch.as_tensor(self._pad(points))))

    def torch_stacks(self, z: Tensor) -> dict[str, Stack]:
        """Differentiable stacks of the points of coefficients z (M, k): weights ``1/N + W z − mean``, stacked."""
        dual = torch.as_tensor(self._dual[:, : z.shape[1]], device=z.device)
        w = z.double() @ dual.T
        w = 1.0 / len(self.ids) + w - w.mean(dim=1, keepdim=True)
        w = torch.cat([w, w.new_zeros(w.shape[0], self.n_sources - w.shape[1])], dim=1)
        return _basis_stacks(self.basis.factors(w))


def _basis_stacks(factors: dict[str, Any]) -> dict[str, Stack]:
    stacks: dict[str, Stack] = {}
    for name, value in factors.items():
        if isinstance(value, tuple):
            down, up = value
            stacks[name] = LowRankStack(down, up, torch.ones(down.shape[0], device=down.device))
        else:
            stacks[name] = DenseStack(value.reshape(value.shape[0], value.shape[1], -1))
    return stacks


def points_for(space: Any, layout: Layout, store: Any | None, notes: list[str] | None = None) -> Points:
    """The points of ``space``, whichever its geometry."""
    if space.geometry == "delta":
        return MemberPoints(space, layout, store)
    return RowPoints(space, layout, store, notes)


# ------------------------------------------------------------------------------------------------ export
def refactor_dense(adapter: Adapter, rank: int) -> tuple[Adapter, dict[str, float]]:
    """Every ``full`` 2-D module of ``adapter`` as a rank-``rank`` LoRA; returns (adapter, energy kept)."""
    modules: dict[str, ModuleWeights] = {}
    energy: dict[str, float] = {}
    for name, m in adapter.modules.items():
        if m.kind != "full":
            modules[name] = m
            continue
        delta = m.direction_delta().to(torch.float64)
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


def export_adapters(
    adapters: Sequence[Adapter],
    out: str | Path,
    *,
    format: str = "peft",
    dtype: str = "float32",
    rank: int | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Path], dict[str, Any]]:
    """Write each adapter as ``out/<adapter.path>`` (kohya: ``.safetensors``); return the paths and a report.

    ``rank``: every module re-factored to at most that rank by truncated SVD (LoRA modules from their factors,
    dense ΔW directly); the report gives the energy kept, mean and worst module. Without it the factors are
    written as they are (exact); dense ΔW then needs ``--format kohya`` or a rank.
    """
    from wsa.delta_points import refactor
    from wsa.export import write_adapter

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1; got {rank}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    energies: list[dict[str, float]] = []
    for adapter in adapters:
        has_full = any(m.kind == "full" for m in adapter.modules.values())
        if has_full and format != "kohya" and rank is None:
            raise ConfigError(
                f"these models hold dense ΔW; format {format!r} needs LoRA factors: pass --rank R to re-factor by SVD "
                "(the energy kept is reported), or --format kohya"
            )
        if rank is not None:
            adapter, kept_lora = refactor(adapter, rank)
            adapter, kept_dense = refactor_dense(adapter, rank)
            energies.append({**kept_lora, **kept_dense})
        target = out / (f"{adapter.path}.safetensors" if format == "kohya" else adapter.path)
        written.append(write_adapter(adapter, target, format, metadata=metadata, dtype=DTYPES[dtype]))
    report: dict[str, Any] = {"format": format, "dtype": dtype, "exact": rank is None}
    if energies and energies[0]:
        per_module = {k: float(np.mean([e[k] for e in energies])) for k in energies[0]}
        report["rank"] = rank
        report["energy_kept_mean"] = float(np.mean([np.mean(list(e.values())) for e in energies]))
        worst = min(per_module, key=per_module.get)
        report["energy_kept_worst_module"] = {"module": worst, "energy_kept": per_module[worst]}
        report["exact"] = all(v >= 1 - 1e-9 for e in energies for v in e.values())
    return written, report
