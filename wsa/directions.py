"""Attribute directions: one type, one file format, written by the probes and read by ``wsa edit``.

A :class:`Directions` holds, per direction (an attribute, or one class of a categorical attribute), the
vectors of :data:`PARTS`: unit vectors in PC space (``pc``, ``debiased_pc``, ``probe_pc``; length ``k``)
and the same edits in weight space (``weight``, ``debiased_weight``: standardized; ``raw_weight``,
``debiased_raw_weight``: raw change per unit step), with ``meta`` (kinds, score spreads, label mappings,
``k``, ``n_features``, ``weight_basis``). The weight vectors are in the basis the space's geometry has
(:class:`wsa.space.WeightDirections`): ``"features"`` — one value per store column (explicit space), or
``"members"`` — one weight per member, the direction being ``Σ_i w_i ΔW_i`` (ΔW space, which has no
component matrix); ``n_features`` is then the number of members. On disk: ``directions.safetensors`` then
``directions.json``, each atomically; the JSON is written last and carries the tensors' sha256.

Why its own module: the probes wrote the format and the workspace re-read it with its own, weaker checks
(no version, no checksum). A report folder is input to ``wsa edit``; :meth:`Directions.load` checks it whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsa.atomic import write_bytes
from wsa.errors import StoreError
from wsa.text import first_line

#: Bumped when the layout of ``directions.safetensors`` / ``directions.json`` changes.
VERSION = 1
TENSORS = "directions.safetensors"
JSON = "directions.json"
#: Parts saved per direction: PC-space unit vectors, and weight-space vectors (standardized and raw).
PARTS = ("pc", "debiased_pc", "probe_pc", "weight", "debiased_weight", "raw_weight", "debiased_raw_weight")
_PC_PARTS = ("pc", "debiased_pc", "probe_pc")


@dataclass(frozen=True)
class Directions:
    """``meta`` (what ``directions.json`` holds) and ``vectors[direction][part]`` (float32, 1-D)."""

    meta: Mapping[str, Any]
    vectors: Mapping[str, Mapping[str, np.ndarray]]

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @property
    def pc(self) -> dict[str, np.ndarray]:
        """Each direction's unit vector in PC space: what ``wsa edit`` steps along."""
        return {name: parts["pc"] for name, parts in self.vectors.items()}

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write the tensors, then the JSON with their sha256 (a half-finished pair is refused by :meth:`load`)."""
        from safetensors.numpy import save as safetensors_save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}/{part}": np.ascontiguousarray(vec, dtype=np.float32)
            for name, parts in self.vectors.items()
            for part, vec in parts.items()
        }
        for key, vec in tensors.items():
            if not np.isfinite(vec).all():
                raise StoreError(f"direction part {key!r} is not finite; not written", folder)
        blob = safetensors_save(tensors, metadata={"wsa": json.dumps({"k": self.meta.get("k"), "kind": "directions"})})
        write_bytes(folder / TENSORS, blob)
        meta = {**self.meta, "wsa_directions_version": VERSION, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        meta["parts"] = list(PARTS)
        write_bytes(folder / JSON, json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode())
        return folder / TENSORS, folder / JSON

    @classmethod
    def load(cls, folder: str | Path) -> Directions:
        """Read a pair written by :meth:`save`; every inconsistency is one :class:`StoreError` line.

        Checked: both files, the version, the tensors' sha256, ``meta['directions']`` an object of objects,
        ``k``/``n_features`` positive integers, every direction with every part, 1-D, finite, PC parts of
        length ``k`` and weight parts of length ``n_features``, no tensor left over.
        """
        from safetensors.numpy import load as safetensors_load

        folder = Path(folder)
        json_path, tensors_path = folder / JSON, folder / TENSORS
        if not json_path.is_file() or not tensors_path.is_file():
            raise StoreError(f"no saved directions ({JSON} + {TENSORS}); run `wsa analyze` with labels", folder)

        def fail(problem: str) -> StoreError:
            return StoreError(f"{problem}; re-run `wsa analyze` with labels", folder)

        try:
            meta = json.loads(json_path.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise fail(f"{JSON} is not valid JSON ({first_line(exc, 120)})") from None
        if not isinstance(meta, dict):
            raise fail(f"{JSON} is not a JSON object")
        version = meta.get("wsa_directions_version")
        if version != VERSION or isinstance(version, bool):
            raise fail(f"directions format version {str(version)[:20]!r}; this wsa reads version {VERSION}")
        blob = tensors_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise fail(f"{TENSORS} does not match {JSON} (sha256 differs: interrupted save or mixed files)")
        k, n_features = meta.get("k"), meta.get("n_features")
        for key, value in (("k", k), ("n_features", n_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(f"{JSON} key {key!r} is {str(value)[:40]!r}, expected a positive integer")
        names = meta.get("directions")
        if not isinstance(names, dict) or not all(isinstance(v, dict) for v in names.values()):
            raise fail(f"{JSON} key 'directions' is not an object of directions")
        try:
            flat = safetensors_load(blob)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise fail(f"{TENSORS} cannot be read ({first_line(exc, 120)})") from None
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for name in names:
            parts = {}
            for part in PARTS:
                vec = flat.pop(f"{name}/{part}", None)
                want = k if part in _PC_PARTS else n_features
                if vec is None or vec.ndim != 1 or vec.shape[0] != want or not np.isfinite(vec).all():
                    got = "missing" if vec is None else f"shape {vec.shape}"
                    raise fail(f"direction {str(name)[:60]!r} part {part!r} is {got}, expected {want} finite values")
                parts[part] = vec
            vectors[name] = parts
        if flat:
            raise fail(f"{TENSORS} holds {len(flat)} tensor(s) {JSON} does not list")
        return cls(meta, vectors)
