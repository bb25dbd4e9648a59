"""Attribute edits in a fitted space, with strength in standard deviations and joint debiasing.

w2w (arXiv 2406.09413 §3.2) edits by adding a multiple of a least-squares direction to a model's PC
coefficients, with raw multipliers (of order 5e5) tuned by eye, and projects other attributes'
directions out one at a time. Here:

* **Calibrated strength**: the direction ``d`` (unit, in PC space) moves a model by ``strength × σ``,
  where σ is the standard deviation of the collection's scores ``z · d``: ``+2`` moves a model as far
  along the attribute as two standard deviations of the collection — the same meaning in any space.
* **Joint debiasing**: ``d`` loses its components along *all* listed attributes' directions at once
  (orthogonal projection onto the complement of their span, by QR), so the result is orthogonal to
  each of them, which sequential projection does not guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsa.errors import ConfigError


@dataclass(frozen=True)
class EditDirection:
    """A unit direction in PC space (length k), σ of the collection's scores along it, and provenance."""

    name: str
    vector: np.ndarray
    sigma: float
    debiased_against: tuple[str, ...]
    retained: float  # norm of the direction left after debiasing (1 = untouched)


def _names_for(meta: dict, attr: str) -> list[str]:
    """Direction names of ``attr``: itself (binary/continuous), or every ``attr=class`` (categorical)."""
    names = list(meta["directions"])
    if attr in names:
        return [attr]
    classes = [n for n in names if n.startswith(attr + "=")]
    return classes


def edit_direction(ws, attr: str, debias: Sequence[str] = ()) -> EditDirection:
    """The calibrated, jointly debiased edit direction of ``attr`` (``beard``, ``hair_colour=red``)."""
    found = ws.directions
    if found is None:
        raise ConfigError(
            "this space has no attribute directions; run `wsa analyze` with --labels (the probes analyzer writes them)"
        )
    meta, pcs = found["meta"], found["pc"]
    if attr not in pcs:
        options = ", ".join(sorted(pcs))
        raise ConfigError(f"no direction {attr!r} in this space; directions: {options}")
    d = np.asarray(pcs[attr], dtype=np.float64)
    others: list[np.ndarray] = []
    used: list[str] = []
    for name in debias:
        group = _names_for(meta, name)
        if not group:
            raise ConfigError(f"cannot debias against {name!r}: no such attribute direction")
        if meta["directions"].get(attr, {}).get("attribute") == name or attr in group:
            raise ConfigError(f"cannot debias {attr!r} against its own attribute {name!r}")
        others += [np.asarray(pcs[g], dtype=np.float64) for g in group]
        used.append(name)
    retained = 1.0
    if others:
        q, _ = np.linalg.qr(np.stack(others, axis=1))
        d = d - q @ (q.T @ d)
        retained = float(np.linalg.norm(d))
        if retained < 1e-6:
            raise ConfigError(f"{attr!r} lies in the span of {used}: nothing is left after debiasing")
        d = d / retained
    z = np.asarray(ws.space.coefficients[:, : d.shape[0]], dtype=np.float64)
    sigma = float(np.std(z @ d, ddof=1))
    return EditDirection(attr, d.astype(np.float32), sigma, tuple(used), retained)


def edited_points(ws, point: np.ndarray, direction: EditDirection, strengths: Sequence[float]) -> np.ndarray:
    """``point`` moved by ``strength × σ`` along the direction, one point per strength (strength 0: the point).

    Through the space's points (:attr:`wsa.workspace.Workspace.points`), so the same edit is a row step in an
    explicit space and a change of member weights in a ΔW space.
    """
    steps = np.outer(np.asarray(strengths, dtype=np.float64), direction.vector.astype(np.float64) * direction.sigma)
    return ws.points.step(np.repeat(np.atleast_2d(point), len(steps), axis=0), steps)
