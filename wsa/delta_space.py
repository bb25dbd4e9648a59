"""The ΔW space as a value: :class:`DeltaSpace`, the PCA of ΔW held in dual form, and its save/load.

Why a value of its own: the ΔW space has no component matrix (a component is a weighted sum of the
members' ΔW, which are never formed), so it holds what the dual form needs instead — the members'
coefficients, the dual weights ``U/√λ`` and the Gram statistics that centre any inner product. It is
fitted by :func:`wsa.gram.fit_delta_gram` and turned back into weights by :mod:`wsa.delta_points`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from wsa.atomic import write_bytes
from wsa.errors import StoreError
from wsa.space import SPACE_JSON, components_for

DELTA_SPACE_TENSORS = "delta_space.safetensors"
DELTA_KIND = "delta-gram"
_TENSORS = ("coefficients", "explained_variance", "dual_weights", "row_sq_norms", "gram_row_means")


@dataclass(frozen=True, eq=False)
class DeltaSpace:
    """PCA of ΔW in dual form: what ``wsa analyze --space delta`` fits, with no component matrix.

    It answers the questions :class:`~wsa.space.Space` answers from coefficients (spectrum, PCs for
    x %, per-model residuals, probes, maps, sampling statistics); analyzers that need explicit
    components in weight space (``requires_components``) are skipped on it, and the applications
    refuse it, each with a message saying so.

    Attributes
    ----------
    coefficients : (N, k) float32 — PC coordinates of the members (``U·√λ``).
    explained_variance : (k,) float64 — λ / (N − 1).
    total_variance : float — trace of the centred Gram / (N − 1): Σ of ΔW's column variances.
    dual_weights : (N, k) float64 — component j = Σ_i dual_weights[i, j] · (ΔW_i − mean ΔW).
    row_sq_norms : (N,) float64 — ‖ΔW_i − mean ΔW‖², the diagonal of the centred Gram.
    gram_row_means : (N,) float64 — ⟨ΔW_i, mean ΔW⟩, so any pair's centred inner product is
        ``⟨ΔW_i, ΔW_j⟩ − m_i − m_j + mean(m)`` (:meth:`centred_inner`).
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

    def centred_inner(self, i: int, j: int, inner_ij: float) -> float:
        """⟨ΔW_i − mean, ΔW_j − mean⟩ of members ``i``, ``j`` from their uncentred inner product."""
        m = self.gram_row_means
        return float(inner_ij - m[i] - m[j] + m.mean())

    def save(self, folder: str | Path) -> None:
        """``space.json`` (``"kind": DELTA_KIND``) + ``delta_space.safetensors``, written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "coefficients": self.coefficients,
            "explained_variance": self.explained_variance,
            "dual_weights": self.dual_weights,
            "row_sq_norms": self.row_sq_norms,
            "gram_row_means": self.gram_row_means,
        }
        blob = safetensors_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        write_bytes(folder / DELTA_SPACE_TENSORS, blob)
        meta = {
            "kind": DELTA_KIND,
            "tensors": DELTA_SPACE_TENSORS,
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "n_components": self.n_components,
            "n_samples": self.n_samples,
            "total_variance": self.total_variance,
            "ids": list(self.ids),
            "config": self.config,
        }
        write_bytes(folder / SPACE_JSON, json.dumps(meta, indent=1, sort_keys=True).encode())

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
        try:
            blob = (folder / DELTA_SPACE_TENSORS).read_bytes()
        except OSError as exc:
            raise StoreError(
                f"cannot read {DELTA_SPACE_TENSORS} ({exc.strerror or exc}); save it again", folder
            ) from None
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise StoreError(
                f"{DELTA_SPACE_TENSORS} does not match {SPACE_JSON} (sha256 differs: interrupted save or mixed files)",
                folder,
            )
        try:
            tensors = safetensors_load(blob)
        except (SafetensorError, ValueError) as exc:
            raise StoreError(f"{DELTA_SPACE_TENSORS} cannot be read ({exc}); save the space again", folder) from None
        if sorted(tensors) != sorted(_TENSORS):
            raise StoreError(f"{DELTA_SPACE_TENSORS} holds {sorted(tensors)}, expected {sorted(_TENSORS)}", folder)
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


def load_space(folder: str | Path) -> Any:
    """The saved space in ``folder``, whichever geometry: :class:`~wsa.space.Space` or :class:`DeltaSpace`."""
    from wsa.space import Space

    folder = Path(folder)
    try:
        kind = json.loads((folder / SPACE_JSON).read_bytes().decode("utf-8")).get("kind")
    except (OSError, ValueError, RecursionError, AttributeError):
        kind = None  # Space.load names the problem
    return DeltaSpace.load(folder) if kind == DELTA_KIND else Space.load(folder)
