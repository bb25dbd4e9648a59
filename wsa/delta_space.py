"""The ΔW space as a value: :class:`DeltaSpace`, the PCA of ΔW held in dual form, and its save/load.

Why a value of its own: the ΔW space has no component matrix (a component is a weighted sum of the
members' ΔW, which are never formed), so it holds what the dual form needs instead — the members'
coefficients, the dual weights ``U/√λ`` and the Gram statistics that centre any inner product. It is
fitted by :func:`wsa.gram.fit_delta_gram` and turned back into weights by :mod:`wsa.delta_points`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from wsa.errors import ConfigError, StoreError
from wsa.space import SPACE_JSON, WeightDirections, components_for
from wsa.space.files import read_space_tensors, write_space_files
from wsa.space.protocol import (
    gram_spectrum,
    member_positions,
    member_rows,
    module_columns,
    pair_chunks,
    read_rows,
)
from wsa.store.layout import Layout, ModuleLayout

DELTA_SPACE_TENSORS = "delta_space.safetensors"
DELTA_KIND = "delta-gram"
_TENSORS = ("coefficients", "explained_variance", "dual_weights", "row_sq_norms", "gram_row_means")


@dataclass(frozen=True, eq=False)
class DeltaSpace:
    """PCA of ΔW in dual form: what ``wsa analyze --space delta`` fits, with no component matrix.

    It answers every question of :class:`wsa.space.FittedSpace`, as :class:`~wsa.space.Space` does
    (spectrum, PCs for x %, member norms, inner products and residuals, the held-out test, per-module
    statistics, directions as weights), in the ΔW geometry and from the factors, so the analyzers run
    on it with the code they run on an explicit space.

    Attributes
    ----------
    coefficients : (N, k) float32 — PC coordinates of the members (``U·√λ``).
    explained_variance : (k,) float64 — λ / (N − 1).
    total_variance : float — trace of the centred Gram / (N − 1): Σ of ΔW's column variances.
    dual_weights : (N, k) float64 — component j = Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW).
    row_sq_norms : (N,) float64 — ‖ΔW_i − mean ΔW‖², the diagonal of the centred Gram.
    gram_row_means : (N,) float64 — ⟨ΔW_i, mean ΔW⟩, so any pair's centred inner product is
        ``⟨ΔW_i, ΔW_j⟩ − m_i − m_j + mean(m)`` (:meth:`member_inner`).
    ids : member ids.
    config : how it was fitted (seconds for the Gram and for the eigendecomposition).
    """

    coefficients: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    dual_weights: np.ndarray
    row_sq_norms: np.ndarray
    gram_row_means: np.ndarray
    ids: tuple[str, ...]
    config: dict

    geometry: ClassVar[str] = "delta"  # the geometry's name, as ``--space`` spells it (``Space``: "explicit")

    @property
    def n_samples(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.coefficients.shape[1])

    @property
    def singular_values(self) -> np.ndarray:
        return np.sqrt(self.explained_variance * (self.n_samples - 1))

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        if self.total_variance <= 0:
            return np.full(self.n_components, np.nan)
        return self.explained_variance / self.total_variance

    def n_components_for(self, fraction: float) -> int | None:
        """As :meth:`wsa.space.Space.n_components_for`."""
        return components_for(self.explained_variance_ratio, fraction)

    def member_sq_norms(self, store: Any = None, block_rows: int = 2048) -> np.ndarray:
        """``‖ΔW_i − mean ΔW‖²`` of each member: the centred Gram's diagonal (``Space.member_sq_norms``'s twin)."""
        return np.asarray(self.row_sq_norms, dtype=np.float64)

    def transform_adapters(self, adapters: Sequence[Any], store: Any, block_rows: int = 2048) -> np.ndarray:
        """PC coefficients (n, k) of adapters of any rank or kind, from their inner products with the members.

        ``z_j = ⟨ΔW_x − mean, v_j⟩ = Σ_i dual_ij (g_i − ḡ) − ⟨mean, v_j⟩`` with ``g_i = ⟨ΔW_x, ΔW_i⟩``, taken from
        factors (:meth:`wsa.adapter.Adapter.factors`: ``Σ (B_xᵀB_i) ⊙ (A_xA_iᵀ)``) while the members' rows
        stream by in blocks; the adapter's modules must be modules of the space, with the same shapes.
        """
        layout = store.layout
        shapes = {m.name: tuple(m.shape) for m in layout.modules}
        factors: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
        for adapter in adapters:
            unknown = sorted(set(adapter.modules) - set(shapes))
            wrong = [n for n, m in adapter.modules.items() if n in shapes and tuple(m.shape) != shapes[n]]
            if unknown or wrong or not adapter.modules:
                what = (
                    f"module {unknown[0]!r} is not one of the space's modules"
                    if unknown
                    else f"module {wrong[0]!r} has shape {tuple(adapter.modules[wrong[0]].shape)}, the space's "
                    f"{shapes[wrong[0]]}"
                    if wrong
                    else "it has no modules"
                )
                raise ConfigError(f"{adapter.path}: cannot be placed in this space ({what})")
            factors.append({n: tuple(t.numpy() for t in adapter.factors(n)) for n in adapter.modules})
        g = np.zeros((len(adapters), self.n_samples))
        for start, block in store.iter_blocks(block_rows, rows=member_rows(store, self.ids)):
            g[:, start : start + len(block)] = _adapter_inner(factors, block, layout)
        m = np.asarray(self.gram_row_means, dtype=np.float64)
        dual = np.asarray(self.dual_weights, dtype=np.float64)
        return ((g - g.mean(axis=1, keepdims=True)) @ dual - (m - m.mean()) @ dual).astype(np.float32)

    def mean_sq_norm(self) -> float:
        """``‖mean ΔW‖²``, the mean of :attr:`gram_row_means` (``⟨ΔW_i, mean ΔW⟩`` averaged over i).

        The twin of :meth:`wsa.space.Space.mean_sq_norm`: the size the "no variance" test compares the total
        variance against (identical adapters leave float rounding of it).
        """
        return float(np.mean(self.gram_row_means))

    def member_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        """``⟨ΔW_a − mean, ΔW_b − mean⟩`` for each pair of member positions ``a[p]``, ``b[p]``, float64.

        Each pair's uncentred inner product from its factors (the r × r
        factor Grams of :mod:`wsa.gram`, pair by pair — never ΔW), centred with :attr:`gram_row_means`.
        The rows are read once per distinct member of each chunk of pairs (bounded memory).
        """
        from wsa.gram import _gram_plan

        plan = _gram_plan(store.layout)
        rows = member_rows(store, self.ids)
        m = np.asarray(self.gram_row_means, dtype=np.float64)
        out = np.empty(len(a), dtype=np.float64)
        for where, members, ia, ib in pair_chunks(a, b, self.n_samples, store.layout.n_features):
            x = read_rows(store, rows[members])
            out[where] = _paired_inner(x[ia], x[ib], plan) - m[members[ia]] - m[members[ib]] + m.mean()
        return out

    def member_residual_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        """``⟨r_a, r_b⟩`` of the pairs' residuals off the space: ``member_inner − c_a·c_b``.

        The dual formula (the components are orthonormal in ΔW, and the space has no component matrix to
        project with); :meth:`wsa.space.Space.member_residual_inner` projects the rows instead.
        """
        pa, pb = member_positions(a, self.n_samples), member_positions(b, self.n_samples)
        c = np.asarray(self.coefficients, dtype=np.float64)
        return self.member_inner(store, pa, pb) - np.einsum("ij,ij->i", c[pa], c[pb])

    def member_residual_sq(self, store: Any = None, block_rows: int = 2048) -> np.ndarray:
        """``‖r_i‖² = ‖ΔW_i − mean‖² − ‖c_i‖²`` (clipped at 0) of every member, from the fit alone (no read)."""
        c = np.asarray(self.coefficients, dtype=np.float64)
        return np.clip(np.asarray(self.row_sq_norms, dtype=np.float64) - np.einsum("ij,ij->i", c, c), 0.0, None)

    def heldout(
        self,
        store: Any,
        ks: Sequence[int],
        *,
        test_fraction: float = 0.2,
        random_state: int | None = 0,
        progress: bool = True,
    ) -> dict[str, list]:
        """The held-out reconstruction test in dual form (:func:`wsa.gram.heldout_reconstruction_gram`).

        Kernel PCA on the train members' centred Gram, the same split and error as
        :meth:`wsa.space.Space.heldout`; on the device the space was fitted on.
        """
        from wsa.gram import heldout_reconstruction_gram

        return heldout_reconstruction_gram(
            store,
            list(ks),
            test_fraction=test_fraction,
            random_state=random_state,
            device=str(self.config.get("device", "cpu")),
            progress=progress,
        )

    def module_grams(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> Iterator[np.ndarray]:
        """Per module, in order: the (s, s) float64 uncentred ``⟨ΔW_i, ΔW_j⟩`` of that module for ``members``.

        From the module's factors (:func:`wsa.gram.gram_block` on a one-module layout), read in column groups
        of whole modules (:func:`wsa.space.protocol.module_columns`), as :meth:`wsa.space.Space.module_grams`.
        """
        from wsa.gram import gram_block

        pos = member_positions(members, self.n_samples)
        rows = member_rows(store, self.ids)[pos]
        for i, x in module_columns(store, modules, rows, block_rows):
            yield gram_block(x, x, Layout(store.layout.repr, (_at_column_zero(modules[i]),)))

    def module_spectra(
        self,
        store: Any,
        modules: Sequence[Any],
        members: Sequence[int] | None = None,
        k: int = 16,
        block_rows: int = 512,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per module, in order: the centred spectrum of ``members``' ΔW there and their top-``k`` PC scores.

        The PCA of :meth:`module_grams` in dual form (:func:`~wsa.space.protocol.gram_spectrum`): ΔW has no
        narrower side to decompose, so each module costs ``s³`` for ``s`` members.
        """
        for gram in self.module_grams(store, modules, members, block_rows):
            yield gram_spectrum(gram, k)

    def module_stats(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per module: the variance of the members' ΔW and their ``‖ΔW_i‖²`` (uncentred), streamed from the factors.

        ``Σ‖ΔW_i − mean‖² = Σ‖ΔW_i‖² − ‖Σ ΔW_i‖² / n``: the first term from each row's r × r factor Grams, the
        second from one dense out × in running sum per module (the size of one adapter's ΔW). Returns
        ``(variance (n_modules,), sq_norms (n, n_modules))``, as :meth:`wsa.space.Space.module_stats`.
        """
        from wsa.gram import _gram_plan

        pos = member_positions(members, self.n_samples)
        rows = member_rows(store, self.ids)[pos]
        n = len(rows)
        plans = [_gram_plan(Layout(store.layout.repr, (m,))) for m in modules]
        sums: list[list[np.ndarray]] = [[] for _ in modules]  # running Σ ΔW_i per module, by part
        sq_norms = np.zeros((n, len(modules)))
        for start, block in store.iter_blocks(block_rows, rows=rows):
            for j, plan in enumerate(plans):
                sq_norms[start : start + len(block), j] = _paired_inner(block, block, plan)
                parts = _delta_sums(block, plan)
                sums[j] = parts if not sums[j] else [s + p for s, p in zip(sums[j], parts, strict=True)]
        variance = np.array(
            [
                (sq_norms[:, j].sum() - sum(float(np.square(p).sum()) for p in sums[j]) / max(n, 1)) / max(n - 1, 1)
                for j in range(len(modules))
            ]
        )
        return np.clip(variance, 0, None), sq_norms

    def directions_in_weights(self, directions: np.ndarray) -> WeightDirections:
        """PC-space directions (m, k'), k' ≤ n_components, as weights over the members' ΔW (basis ``"members"``).

        A ΔW space has no component matrix to map through; its exact weight-space direction for ``d`` is
        ``Σ_i w_i · ΔW_i`` with ``w = dual_weights[:, :k'] @ d`` centred over the members (the weights sum to 0,
        so the mean ΔW drops out), never formed. The space does not scale, so ``raw`` equals ``standardized``;
        ``raw_norms`` is ``‖Σ_i w_i ΔW_i‖``, i.e. ``‖d‖`` over the components with variance (they are
        orthonormal in ΔW).
        """
        d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        if d.ndim != 2 or d.shape[1] > self.n_components:
            raise ConfigError(f"directions must be (m, k) with k <= {self.n_components}; got {d.shape}")
        k = d.shape[1]
        w = self.dual_weights[:, :k] @ d.T  # (N, m)
        w -= w.mean(axis=0, keepdims=True)
        alive = np.asarray(self.explained_variance[:k]) > 0
        norms = np.sqrt((d[:, alive] ** 2).sum(axis=1))
        weights = np.ascontiguousarray(w.T, dtype=np.float32)
        return WeightDirections("members", weights, weights.copy(), norms)

    def save(self, folder: str | Path) -> None:
        """``space.json`` (``"kind": DELTA_KIND``) + ``delta_space.safetensors``, written atomically."""
        write_space_files(
            folder,
            DELTA_SPACE_TENSORS,
            {name: getattr(self, name) for name in _TENSORS},
            {
                "kind": DELTA_KIND,
                "tensors": DELTA_SPACE_TENSORS,
                "n_components": self.n_components,
                "n_samples": self.n_samples,
                "total_variance": self.total_variance,
                "ids": list(self.ids),
                "config": self.config,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> DeltaSpace:
        """Read a folder written by :meth:`save`; every inconsistency is one :class:`~wsa.errors.StoreError`."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / SPACE_JSON).read_bytes().decode("utf-8"))
        except OSError as exc:
            raise StoreError(f"cannot read {SPACE_JSON} ({exc.strerror or exc})", folder) from None
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"{SPACE_JSON} is not valid JSON ({exc}); save the space again", folder) from None
        if not isinstance(meta, dict) or meta.get("kind") != DELTA_KIND:
            raise StoreError(f"{SPACE_JSON} is not a ΔW space (kind {DELTA_KIND!r}); fit one again", folder)
        tensors = read_space_tensors(folder, DELTA_SPACE_TENSORS, meta, _TENSORS)
        ids, config, total = meta.get("ids"), meta.get("config"), meta.get("total_variance")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise StoreError(f"{SPACE_JSON} field 'ids' is not a list of distinct strings", folder)
        if not isinstance(config, dict):
            raise StoreError(f"{SPACE_JSON} field 'config' is not an object", folder)
        if isinstance(total, bool) or not isinstance(total, (int, float)) or not np.isfinite(total) or total < 0:
            raise StoreError(f"{SPACE_JSON} field 'total_variance' is not a finite number >= 0", folder)
        n = len(ids)
        coef = tensors["coefficients"]
        k = coef.shape[1] if coef.ndim == 2 else -1
        shapes = {
            "coefficients": (n, k),
            "explained_variance": (k,),
            "dual_weights": (n, k),
            "row_sq_norms": (n,),
            "gram_row_means": (n,),
        }
        bad = [f"{name} {tensors[name].shape} != {s}" for name, s in shapes.items() if tensors[name].shape != s]
        if bad or k < 1:
            raise StoreError(f"inconsistent shapes ({'; '.join(bad) or 'no components'}); save the space again", folder)
        for name in _TENSORS:
            t = tensors[name]
            if not np.issubdtype(t.dtype, np.floating) or not np.isfinite(t).all():
                raise StoreError(f"{DELTA_SPACE_TENSORS}: {name} is not all finite floats; refit the space", folder)
        return cls(
            coefficients=tensors["coefficients"].astype(np.float32),
            explained_variance=tensors["explained_variance"].astype(np.float64),
            total_variance=float(total),
            dual_weights=tensors["dual_weights"].astype(np.float64),
            row_sq_norms=tensors["row_sq_norms"].astype(np.float64),
            gram_row_means=tensors["gram_row_means"].astype(np.float64),
            ids=tuple(ids),
            config=dict(config),
        )


def _adapter_inner(
    factors: list[dict[str, tuple[np.ndarray, np.ndarray]]], block: np.ndarray, layout: Layout
) -> np.ndarray:
    """``⟨ΔW_x, ΔW_i⟩`` (n_adapters, n_rows) of adapters given by their factors with a block of member rows."""
    from wsa.store.representations import decode

    out = np.zeros((len(factors), block.shape[0]))
    for ml in layout.modules:
        users = [(x, f[ml.name]) for x, f in enumerate(factors) if ml.name in f]
        if not users:
            continue
        parts = {p.name: p for p in ml.parts}
        if ml.kind == "lora" and set(parts) == {"down", "up"} and len(ml.shape) == 2:
            n, r = block.shape[0], ml.rank
            d = block[:, parts["down"].offset : parts["down"].offset + parts["down"].size].astype(np.float64)
            u = block[:, parts["up"].offset : parts["up"].offset + parts["up"].size].astype(np.float64)
            d, u = d.reshape(n, r, -1), u.reshape(n, -1, r) * ml.scale
            for x, (b, a) in users:
                gb = np.einsum("op,nor->npr", b, u)  # B_xᵀ · s_i B_i
                ga = np.einsum("pi,nri->npr", a, d)  # A_x · A_iᵀ
                out[x] += (gb * ga).sum(axis=(1, 2))
            continue
        one = Layout(layout.repr, (_at_column_zero(ml),))
        dense = np.stack([decode(row[ml.columns], one).delta(ml.name).double().numpy() for row in block])
        for x, (b, a) in users:
            out[x] += np.einsum("nij,ij->n", dense.reshape(len(block), ml.shape[0], -1), b @ a)
    return out


def _paired_inner(xa: np.ndarray, xb: np.ndarray, plan: Any) -> np.ndarray:
    """``⟨ΔW(xa[p]), ΔW(xb[p])⟩`` of matched rows, float64 (P,): the diagonal of ``gram_block``, pair by pair.

    Why not ``gram_block``: it forms every pair of its two row sets (na × nb), while a list of pairs needs
    only P of them. Same sum: per LoRA entry of the plan ``s² · Σ_{pq} (B_aᵀ B_b)_{pq} (A_a A_bᵀ)_{pq}``,
    plus plain dot products of the dense columns.
    """
    p = xa.shape[0]
    out = np.zeros(p, dtype=np.float64)
    for dcols, ucols, dshape, ushape, scale in plan.lora:
        da = xa[:, dcols].astype(np.float64).reshape(p, *dshape)  # (p, r, in)
        db = xb[:, dcols].astype(np.float64).reshape(p, *dshape)
        ua = xa[:, ucols].astype(np.float64).reshape(p, *ushape)  # (p, out, r)
        ub = xb[:, ucols].astype(np.float64).reshape(p, *ushape)
        gu = np.matmul(ua.transpose(0, 2, 1), ub)  # (p, r, r): B_aᵀ B_b
        gd = np.matmul(da, db.transpose(0, 2, 1))  # (p, r, r): A_a A_bᵀ
        out += scale * scale * (gu * gd).sum(axis=(1, 2))
    if plan.dense.size:
        out += np.einsum("ij,ij->i", xa[:, plan.dense].astype(np.float64), xb[:, plan.dense].astype(np.float64))
    return out


def _delta_sums(block: np.ndarray, plan: Any) -> list[np.ndarray]:
    """``Σ_rows ΔW`` of a block, per entry of the plan: dense (out, in) per LoRA entry, then the dense columns."""
    n = block.shape[0]
    parts = []
    for dcols, ucols, dshape, ushape, scale in plan.lora:
        down = block[:, dcols].astype(np.float64).reshape(n, *dshape)  # (n, r, in)
        up = block[:, ucols].astype(np.float64).reshape(n, *ushape)  # (n, out, r)
        parts.append(scale * np.einsum("nor,nri->oi", up, down))
    if plan.dense.size:
        parts.append(block[:, plan.dense].astype(np.float64).sum(axis=0))
    return parts


def _at_column_zero(module: ModuleLayout) -> ModuleLayout:
    """``module`` with its parts' offsets moved so that its first column is 0: the layout of its columns alone."""
    shift = module.offset
    return replace(module, parts=tuple(replace(p, offset=p.offset - shift) for p in module.parts))


def load_space(folder: str | Path) -> Any:
    """The saved space in ``folder``, whichever geometry: :class:`~wsa.space.Space` or :class:`DeltaSpace`."""
    from wsa.space import Space

    folder = Path(folder)
    try:
        kind = json.loads((folder / SPACE_JSON).read_bytes().decode("utf-8")).get("kind")
    except (OSError, ValueError, RecursionError, AttributeError):
        kind = None  # Space.load names the problem
    return DeltaSpace.load(folder) if kind == DELTA_KIND else Space.load(folder)
