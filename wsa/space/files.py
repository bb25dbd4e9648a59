"""A saved space on disk: one tensors file, then ``space.json`` carrying its sha256 — for both geometries.

Why one module: :class:`~wsa.space.Space` and :class:`~wsa.delta_space.DeltaSpace` save different tensors
but the same pair, in the same order (tensors first, the JSON last and atomically, so a crash between the
two leaves a pair that the reader refuses instead of mixing two fits), and read it with the same checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from wsa.atomic import write_bytes
from wsa.errors import StoreError

SPACE_JSON = "space.json"


def write_space_files(folder: str | Path, tensors_file: str, tensors: Mapping[str, np.ndarray], meta: dict) -> None:
    """``folder/tensors_file`` then ``folder/space.json`` (``meta`` + the tensors' sha256), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors_save({name: np.ascontiguousarray(t) for name, t in tensors.items()})
    write_bytes(folder / tensors_file, blob)
    meta = {**meta, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    write_bytes(folder / SPACE_JSON, json.dumps(meta, indent=1, sort_keys=True).encode())


def read_space_tensors(
    folder: Path, tensors_file: str, meta: Mapping[str, Any], names: Iterable[str]
) -> dict[str, np.ndarray]:
    """The tensors of a saved space, checked against ``meta``'s sha256 and for exactly ``names``.

    Every problem is one :class:`~wsa.errors.StoreError` naming the folder and the file.
    """
    path = folder / tensors_file
    if not path.is_file():
        raise StoreError(f"{tensors_file} is missing; save the space again", folder)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {tensors_file} ({exc.strerror or exc})", folder) from None
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise StoreError(
            f"{tensors_file} does not match {SPACE_JSON} (sha256 differs: interrupted save or mixed files); "
            "save the space again",
            folder,
        )
    try:
        tensors = safetensors_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise StoreError(f"{tensors_file} cannot be read ({exc}); save the space again", folder) from None
    want = set(names)
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        raise StoreError(f"{tensors_file}: missing {missing}, unexpected {unexpected}; save it again", folder)
    return tensors
