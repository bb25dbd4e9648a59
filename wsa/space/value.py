"""The fitted space as a value: :class:`Space` (components, coefficients, save/load), nothing about fitting."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from wsa.errors import ConfigError, StoreError
from wsa.space.files import SPACE_JSON, read_space_tensors, write_space_files
from wsa.space.protocol import (
    WeightDirections,
    feature_spectrum,
    member_positions,
    member_rows,
    module_columns,
    pair_chunks,
    read_rows,
)

SPACE_VERSION = 1
SPACE_TENSORS = "space.safetensors"
SOLVERS = ("auto", "exact", "randomized", "streaming")
#: ``solver="auto"`` uses the exact solver up to this many rows or columns (whichever is smaller).
EXACT_MAX_DIM = 4000
#: Rows per block default to about this many bytes of float32 data.
_BLOCK_BYTES = 64 * 2**20
_GPU_BLOCK_BYTES = 256 * 2**20  # float32 blocks made from the GPU copy
_SKETCH_ROWS = 4096  # Ω is drawn in chunks of this many rows (same Ω for every block size)
_TENSOR_NAMES = ("mean", "scale", "components", "singular_values", "explained_variance", "coefficients")
#: ``n_components_for`` counts a fraction as reached within this much (float32 data cannot do better).
_FRACTION_TOL = 1e-6


# --------------------------------------------------------------------------------------------- the Space


def _default_block_rows(d: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(d, 1)))


def components_for(ratio: npt.NDArray[np.float64], fraction: float) -> int | None:
    """Smallest k whose cumulative ``ratio`` reaches ``fraction`` (within float32 rounding), else None."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be a number in (0, 1]; got {fraction!r}")
    hit = np.flatnonzero(np.cumsum(ratio) >= fraction - _FRACTION_TOL)  # NaN compares False
    return int(hit[0]) + 1 if hit.size else None


@dataclass(frozen=True, eq=False)
class Space:
    """A fitted PCA of adapter rows: the coordinates w2w edits, samples and inverts in.

    Immutable (arrays are read-only) so an analyzer cannot change the space another one reads. It answers the
    questions of :class:`wsa.space.FittedSpace` (as :class:`wsa.delta_space.DeltaSpace` does in the ΔW
    geometry) from its components and the store's rows.

    Attributes
    ----------
    mean : ndarray of shape (n_features,), float32
        Column means of the fitted rows; zeros if fitted with ``center=False``.
    scale : ndarray of shape (n_features,), float32
        Column standard deviations (``ddof=1``, as ``torch.std`` in w2w) if fitted with
        ``standardize=True``, with 1 for zero-variance columns; otherwise ones.
    components : ndarray of shape (n_components, n_features), float32
        Orthonormal principal directions in the standardized space ``(x - mean) / scale``, by
        decreasing variance, signed so the largest-magnitude entry of each is positive.
    singular_values : ndarray of shape (n_components,), float64
        Singular values of the standardized data matrix, descending.
    explained_variance : ndarray of shape (n_components,), float64
        ``singular_values**2 / (n_samples - 1)``.
    total_variance : float
        ``||X̃||_F² / (n_samples - 1)`` of the standardized data (the sum of the column variances when
        centered), so ``explained_variance / total_variance`` are variance fractions.
    n_samples : int
        Rows fitted.
    ids : tuple of str
        Ids of the rows fitted, in order (store ids, or ``"0", "1", …`` for a plain matrix).
    coefficients : ndarray of shape (n_samples, n_components), float32
        PC coordinates of the fitted rows, equal to ``transform`` of those rows.
    config : dict
        How the space was fitted (resolved solver, options, device, store path and fingerprint, versions,
        elapsed seconds); JSON-serializable.
    """

    mean: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]
    components: npt.NDArray[np.float32]
    singular_values: npt.NDArray[np.float64]
    explained_variance: npt.NDArray[np.float64]
    total_variance: float
    n_samples: int
    ids: tuple[str, ...]
    coefficients: npt.NDArray[np.float32]
    config: dict[str, Any]

    geometry: ClassVar[str] = "explicit"  # the geometry's name, as ``--space`` spells it (``DeltaSpace``: "delta")

    def __post_init__(self) -> None:
        for name in _TENSOR_NAMES:
            getattr(self, name).setflags(write=False)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_ratio(self) -> npt.NDArray[np.float64]:
        """Fraction of the total variance per component, shape (n_components,); NaN if the data had none."""
        if self.total_variance <= 0:
            return np.full(self.n_components, np.nan)
        return self.explained_variance / self.total_variance

    def n_components_for(self, fraction: float) -> int | None:
        """Smallest number of components whose cumulative explained variance reaches ``fraction``.

        Returns ``None`` when the components kept do not reach it (or the data had no variance), so a
        caller cannot mistake "not enough components fitted" for an answer. A fraction counts as reached
        within 1e-6, the rounding of float32 data, so ``1.0`` is reached at full rank.
        """
        return components_for(self.explained_variance_ratio, fraction)

    def member_sq_norms(self, store: Any, block_rows: int = 2048) -> npt.NDArray[np.float64]:
        """``‖x̃_i‖²`` of each member (centred and scaled as the space sees it), in the order of :attr:`ids`.

        One of the questions both spaces answer (:meth:`wsa.delta_space.DeltaSpace.member_sq_norms`), so an analyzer
        asks it without knowing which space it has: here by one streaming pass over the member rows.
        """
        rows = member_rows(store, self.ids)
        total = np.empty(len(rows), dtype=np.float64)
        for start, block in store.iter_blocks(block_rows, rows=rows):
            z = self._scaled(block)
            total[start : start + len(block)] = np.einsum("ij,ij->i", z, z, dtype=np.float64)
        return total

    def mean_sq_norm(self) -> float:
        """``‖mean / scale‖²``: the members' size before centring, in the space's (scaled) units.

        The twin of :meth:`wsa.delta_space.DeltaSpace.mean_sq_norm`: identical adapters leave a total variance of
        float rounding of this (not exactly 0), so the "no variance" test compares against it in either geometry.
        0 for a space fitted with ``center=False`` (its mean is zeros).
        """
        return float(np.sum((self.mean.astype(np.float64) / self.scale) ** 2))

    def _scaled(self, block: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``x̃ = (x − mean) / scale`` of stored rows, float32: the members as this space decomposes them."""
        return (block - self.mean) / self.scale

    def _residual(self, z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``x̃ − (x̃ Vᵀ) V``: the part of scaled rows the components do not hold, computed directly.

        Why directly and not as ``‖x̃‖² − ‖c‖²``: with the components at hand the projection costs one more
        product, while the difference of two near-equal norms loses ~1e-6 of ‖x̃‖² to cancellation — a
        residual of 1e-3·‖x̃‖ where the space holds everything.
        """
        return z - (z @ self.components.T) @ self.components

    def member_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> npt.NDArray[np.float64]:
        """``⟨x̃_a, x̃_b⟩`` (centred and scaled) for each pair of member positions ``a[p]``, ``b[p]``, float64.

        A question both spaces answer (:meth:`wsa.delta_space.DeltaSpace.member_inner` from the factors): here
        from the pairs' stored rows, read once per distinct member of each chunk of pairs (bounded memory).
        """
        rows = member_rows(store, self.ids)
        out = np.empty(len(a), dtype=np.float64)
        for where, members, ia, ib in pair_chunks(a, b, self.n_samples, self.n_features):
            z = self._scaled(read_rows(store, rows[members]))
            out[where] = np.einsum("ij,ij->i", z[ia], z[ib], dtype=np.float64)
        return out

    def member_residual_inner(self, store: Any, a: Sequence[int], b: Sequence[int]) -> npt.NDArray[np.float64]:
        """``⟨r_a, r_b⟩`` of the pairs' residuals off the space (all components), float64.

        The residuals are projected out of the stored rows directly (:meth:`_residual`), so they are accurate
        where the space holds nearly everything; a ΔW space, with no components, answers
        ``member_inner − c_a·c_b`` instead.
        """
        rows = member_rows(store, self.ids)
        out = np.empty(len(a), dtype=np.float64)
        for where, members, ia, ib in pair_chunks(a, b, self.n_samples, self.n_features):
            e = self._residual(self._scaled(read_rows(store, rows[members])))
            out[where] = np.einsum("ij,ij->i", e[ia], e[ib], dtype=np.float64)
        return out

    def member_residual_sq(self, store: Any, block_rows: int = 2048) -> npt.NDArray[np.float64]:
        """``‖r_i‖²`` of every member: what the space misses of it, in its (scaled) units, float64.

        Mathematically ``‖x̃_i‖² − ‖c_i‖²`` (the components are orthonormal); computed by one streaming pass
        that projects each block of rows (:meth:`_residual`), which is exact where that difference would cancel.
        """
        rows = member_rows(store, self.ids)
        out = np.empty(len(rows), dtype=np.float64)
        for start, block in store.iter_blocks(block_rows, rows=rows):
            e = self._residual(self._scaled(np.asarray(block, dtype=np.float32)))
            out[start : start + len(block)] = np.einsum("ij,ij->i", e, e, dtype=np.float64)
        return out

    def heldout(
        self,
        store: Any,
        ks: Sequence[int],
        *,
        test_fraction: float = 0.2,
        random_state: int | None = 0,
        progress: bool = True,
    ) -> dict[str, list]:
        """The held-out reconstruction test (:func:`wsa.space.heldout_reconstruction`) fitted as this space was.

        Centring and standardization come from :attr:`config`, so the test measures the geometry this space
        has; :meth:`wsa.delta_space.DeltaSpace.heldout` runs the same split in dual form.
        """
        from wsa.space.heldout import heldout_reconstruction  # heldout imports this module

        return heldout_reconstruction(
            store,
            list(ks),
            test_fraction=test_fraction,
            random_state=random_state,
            center=bool(self.config.get("center", True)),
            standardize=bool(self.config.get("standardize", False)),
            progress=progress,
        )

    def module_grams(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> Iterator[npt.NDArray[np.float64]]:
        """Per module, in order: the (s, s) float64 uncentred Gram ``x xᵀ`` of its stored columns of ``members``.

        In the stored units — neither centred by the space's mean nor divided by its scale — as
        :meth:`module_stats`: per-module questions ask where the collection's own variation sits, and on a
        standardized space every column would weigh the same. Float64 products, so a caller can centre the
        Gram without cancellation. Columns are read in groups of whole modules (:func:`module_columns`).
        """
        pos = member_positions(members, self.n_samples)
        rows = member_rows(store, self.ids)[pos]
        for _, x in module_columns(store, modules, rows, block_rows):
            x64 = x.astype(np.float64)
            yield x64 @ x64.T

    def module_spectra(
        self,
        store: Any,
        modules: Sequence[Any],
        members: Sequence[int] | None = None,
        k: int = 16,
        block_rows: int = 512,
    ) -> Iterator[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Per module, in order: the centred spectrum of ``members``' stored columns and their top-``k`` PC scores.

        The PCA of :meth:`module_grams` (same stored units), taken from the smaller side of each module's
        centred members × columns block (:func:`~wsa.space.protocol.feature_spectrum`): a module narrower than
        the number of members costs its width cubed, not the members' count cubed.
        """
        pos = member_positions(members, self.n_samples)
        rows = member_rows(store, self.ids)[pos]
        for _, x in module_columns(store, modules, rows, block_rows):
            yield feature_spectrum(x, k)

    def module_stats(
        self, store: Any, modules: Sequence[Any], members: Sequence[int] | None = None, block_rows: int = 512
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Per module: the variance of ``members`` (sum of its column variances) and their squared norms.

        In the stored units, as :meth:`module_grams`; one streaming pass. Returns ``(variance (n_modules,),
        sq_norms (n, n_modules))`` with ``sq_norms[i, j] = ‖x_i[module j]‖²`` (uncentred).
        """
        pos = member_positions(members, self.n_samples)
        rows = member_rows(store, self.ids)[pos]
        n = len(rows)
        col_sum = np.zeros(self.n_features)
        col_sq = np.zeros(self.n_features)
        sq_norms = np.zeros((n, len(modules)))
        shift: npt.NDArray[np.float32] | None = None
        for start, block in store.iter_blocks(block_rows, rows=rows):
            if shift is None:
                # Shift by the first block's mean: sums of squares of near-centred data do not cancel.
                shift = block.mean(axis=0, dtype=np.float64).astype(np.float32)
            c = block - shift
            col_sum += c.sum(axis=0, dtype=np.float64)
            col_sq += np.einsum("ij,ij->j", c, c, dtype=np.float64)
            for j, m in enumerate(modules):
                part = block[:, m.columns]
                sq_norms[start : start + len(block), j] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
        col_var = (col_sq - col_sum**2 / max(n, 1)) / max(n - 1, 1)
        variance = np.array([col_var[m.columns].sum() for m in modules])
        return np.clip(variance, 0, None), sq_norms

    def directions_in_weights(self, directions: npt.ArrayLike) -> WeightDirections:
        """PC-space directions (m, k'), k' ≤ n_components, as vectors over the store's columns.

        ``standardized = directions @ components[:k']`` (the space's units), ``raw = standardized × scale``
        (the change of the stored weights per unit step) — what ``directions.*`` store for ``wsa edit``.
        """
        d = np.atleast_2d(np.asarray(directions, dtype=np.float32))
        if d.ndim != 2 or d.shape[1] > self.n_components:
            raise ConfigError(f"directions must be (m, k) with k <= {self.n_components}; got {d.shape}")
        standardized = d @ self.components[: d.shape[1]]
        raw = standardized * self.scale
        norms = np.linalg.norm(raw.astype(np.float64), axis=1)
        return WeightDirections("features", standardized, raw, norms)

    def transform(self, X: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """PC coordinates of rows: ``((X - mean) / scale) @ components.T``.

        Parameters
        ----------
        X : array of shape (n, n_features) or (n_features,)
            float16, float32 or float64, memory-mapped or not (e.g. ``store.matrix``); read in blocks of
            about 64 MB so a memory map is never loaded whole.

        Returns
        -------
        ndarray of shape (n, n_components) or (n_components,), float32
        """
        X = X if isinstance(X, np.ndarray) else np.asarray(X)
        single = X.ndim == 1
        X2 = X[None] if single else X
        if X2.ndim != 2 or X2.shape[1] != self.n_features:
            raise ConfigError(
                f"X must have shape (n, {self.n_features}) (the space's n_features); got {tuple(X.shape)}"
            )
        out = np.empty((X2.shape[0], self.n_components), dtype=np.float32)
        step = _default_block_rows(self.n_features)
        for start in range(0, X2.shape[0], step):
            block = np.asarray(X2[start : start + step], dtype=np.float32)
            out[start : start + step] = ((block - self.mean) / self.scale) @ self.components.T
        return out[0] if single else out

    def transform_adapters(self, adapters: Sequence[Any], store: Any, block_rows: int = 2048) -> np.ndarray:
        """PC coefficients (n, k) of adapters: each encoded as a row of the store's layout, then :meth:`transform`.

        An adapter whose modules, shapes or ranks do not fit the layout is one ConfigError naming it (raw rows
        have one rank per module; a ΔW space takes any rank).
        """
        from wsa.store.representations import encode

        rows = np.empty((len(adapters), store.layout.n_features), dtype=np.float32)
        for i, adapter in enumerate(adapters):
            try:
                encode(adapter, store.layout, out=rows[i])
            except Exception as exc:
                raise ConfigError(f"{adapter.path}: cannot be placed in this space ({exc})") from None
        return self.transform(rows)

    def inverse_transform(self, Z: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Rows from PC coordinates: ``mean + scale * (Z @ components[:m])`` with ``m = Z.shape[-1]``.

        Fewer than ``n_components`` columns reconstruct with the leading components only (the rank-m
        approximation), which is how w2w edits and truncates.

        Parameters
        ----------
        Z : array of shape (n, m) or (m,), m <= n_components

        Returns
        -------
        ndarray of shape (n, n_features) or (n_features,), float32
        """
        Z = np.asarray(Z, dtype=np.float32)
        if Z.ndim not in (1, 2) or Z.shape[-1] > self.n_components:
            raise ConfigError(
                f"Z must have shape (n, m) with m <= n_components = {self.n_components}; got {tuple(Z.shape)}"
            )
        m = Z.shape[-1]
        return (Z @ self.components[:m]) * self.scale + self.mean

    def save(self, folder: str | Path) -> None:
        """Write ``space.safetensors`` then ``space.json`` into ``folder``, each atomically.

        The JSON carries the sha256 of the tensors file and is written last, so a crash between the two
        writes leaves a pair that :meth:`load` refuses instead of mixing two fits.
        """
        write_space_files(
            folder,
            SPACE_TENSORS,
            {name: getattr(self, name) for name in _TENSOR_NAMES},
            {
                "wsa_space_version": SPACE_VERSION,
                "n_components": self.n_components,
                "n_features": self.n_features,
                "n_samples": self.n_samples,
                "total_variance": self.total_variance,
                "ids": list(self.ids),
                "config": self.config,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> Space:
        """Read a folder written by :meth:`save`; every inconsistency is a :class:`~wsa.errors.StoreError`."""
        folder = Path(folder)
        json_path = folder / SPACE_JSON
        if not json_path.is_file():
            raise StoreError(f"not a saved space (no {SPACE_JSON}); fit one and call Space.save", folder)
        try:
            meta = json.loads(json_path.read_text())
        except OSError as exc:
            raise StoreError(f"cannot read {SPACE_JSON} ({exc.strerror or exc})", folder) from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"{SPACE_JSON} is not valid JSON ({exc}); save the space again", folder) from None
        if not isinstance(meta, dict):
            raise StoreError(f"{SPACE_JSON} is not a JSON object; save the space again", folder)
        if meta.get("kind") == "delta-gram":
            raise StoreError(
                "this space is a PCA of ΔW fitted from factor Grams (wsa analyze --space delta): it has no explicit "
                "components to sample, edit, invert or decode with; analyze with --space explicit for those "
                "(raw factors of a uniform-rank collection)",
                folder,
            )
        version = meta.get("wsa_space_version")
        if version != SPACE_VERSION:
            raise StoreError(
                f"space format version {version!r}; this wsa reads version {SPACE_VERSION}; refit the space", folder
            )
        tensors = read_space_tensors(folder, SPACE_TENSORS, meta, _TENSOR_NAMES)
        k, d, n = (_meta_field(meta, key, _is_count, "a non-negative integer", folder) for key in _COUNTS)
        ids = tuple(
            _meta_field(
                meta,
                "ids",
                lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                "a list of strings",
                folder,
            )
        )
        if len(set(ids)) != len(ids):
            raise StoreError(f"{SPACE_JSON} field 'ids' repeats an id; save the space again", folder)
        total = float(_meta_field(meta, "total_variance", _is_finite_number, "a finite number >= 0", folder))
        config = dict(_meta_field(meta, "config", lambda v: isinstance(v, dict), "an object", folder))
        shapes = {
            "mean": (d,),
            "scale": (d,),
            "components": (k, d),
            "singular_values": (k,),
            "explained_variance": (k,),
            "coefficients": (n, k),
        }
        bad = [
            f"{name} {tensors[name].shape} != {shape}" for name, shape in shapes.items() if tensors[name].shape != shape
        ]
        if bad or len(ids) != n:
            bad += [] if len(ids) == n else [f"{len(ids)} ids for {n} samples"]
            raise StoreError(f"inconsistent shapes ({'; '.join(bad)}); save the space again", folder)
        for name in _TENSOR_NAMES:
            t = tensors[name]
            if not np.issubdtype(t.dtype, np.floating):
                raise StoreError(f"{SPACE_TENSORS}: {name} is {t.dtype}, expected floats; save the space again", folder)
            if not np.isfinite(t).all():
                raise StoreError(f"{SPACE_TENSORS}: {name} holds NaN or Inf values; refit the space", folder)
        if not np.all(tensors["scale"] > 0):
            raise StoreError(f"{SPACE_TENSORS}: scale has values <= 0; refit the space", folder)
        f32 = {name: tensors[name].astype(np.float32, copy=False) for name in ("mean", "scale", "components")}
        return cls(
            mean=f32["mean"],
            scale=f32["scale"],
            components=f32["components"],
            singular_values=tensors["singular_values"].astype(np.float64, copy=False),
            explained_variance=tensors["explained_variance"].astype(np.float64, copy=False),
            total_variance=total,
            n_samples=n,
            ids=ids,
            coefficients=tensors["coefficients"].astype(np.float32, copy=False),
            config=config,
        )


_COUNTS = ("n_components", "n_features", "n_samples")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _meta_field(meta: dict, key: str, ok: Callable[[Any], bool], want: str, folder: Path) -> Any:
    """``meta[key]`` if present and ``ok``; otherwise one StoreError naming the field."""
    if key not in meta:
        raise StoreError(f"{SPACE_JSON} lacks the field {key!r}; save the space again", folder)
    value = meta[key]
    if not ok(value):
        raise StoreError(f"{SPACE_JSON} field {key!r} is {value!r:.60}, expected {want}; save the space again", folder)
    return value
