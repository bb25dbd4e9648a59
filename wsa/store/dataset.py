"""w2w-style datasets: one N × D matrix of flattened factors plus a layout file saying what each run is.

The w2w release ships ``all_weights.pt`` (64,974 × 99,648 float32 rows of raw ``lora_A``/``lora_B``
values) and ``weight_dimensions.pt`` (per PEFT key: flattened length and shape, in flattening order),
with ``adapter_config.json`` (``lora_alpha`` 27, ``r`` 1) beside it (formats.md §5). wsa reads:

* matrix: ``.npy`` (memory-mapped), ``.safetensors`` (one 2-D tensor, read row by row) or ``.pt``
  (``torch.load(weights_only=True, mmap=True)``: a tensor, or a dict holding one);
* layout: w2w's ``weight_dimensions.pt`` (``{key: [[length], shape]}``), or JSON
  ``{key: shape}`` / ``[[key, shape], ...]`` in flattening order;
* scale: ``alpha`` argument, else ``adapter_config.json`` next to the layout file, else alpha = rank.

Each row becomes a :class:`~wsa.store.discover.Source` that decodes to an :class:`~wsa.adapter.Adapter`,
so datasets go through the same ingest (and representations) as files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from wsa.adapter import Adapter
from wsa.errors import ConfigError, FormatError
from wsa.families.names import canonical_unet_path, kohya_module_to_canonical
from wsa.formats._modules import build_module, make_adapter, split_keys
from wsa.formats._prefixed import LORA_SUFFIXES
from wsa.formats._tensorfile import check_finite
from wsa.formats.peft import SUFFIXES as PEFT_SUFFIXES
from wsa.store.discover import Source
from wsa.text import first_line

LAYOUT_SUFFIXES = {**PEFT_SUFFIXES, **{k: v for k, v in LORA_SUFFIXES.items() if k not in {".alpha", ".dora_scale"}}}


def read_layout_file(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """``[(key, shape)]`` in flattening order."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise FormatError(f"layout is not valid JSON ({first_line(exc, 200)})", path) from None
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list) and all(isinstance(e, list) and len(e) == 2 for e in data):
            items = [tuple(e) for e in data]
        else:
            raise FormatError("layout must be an object key -> shape, or a list of [key, shape] pairs", path)
        out = []
        for key, shape in items:
            ok = isinstance(shape, list) and 0 < len(shape) <= 5
            ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31 for d in shape)
            if not isinstance(key, str) or not ok:
                raise FormatError(f"layout entry {str(key)[:80]!r}: shape must be a list of positive integers", path)
            out.append((key, tuple(shape)))
        if not out:
            raise FormatError("layout lists no tensors", path)
        return out
    if path.suffix in {".pt", ".pth", ".bin"}:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FormatError(f"refused to load layout with weights_only=True ({first_line(exc)})", path) from None
        if not isinstance(data, dict):
            raise FormatError(f"layout holds {type(data).__name__}, expected a dict key -> [[length], shape]", path)
        out = []
        for key, value in data.items():
            try:
                length, shape = int(value[0][0]), tuple(int(d) for d in value[1])
            except (TypeError, IndexError, ValueError):
                raise FormatError(f"layout entry {key!r} is not [[length], shape]", path) from None
            if length != math.prod(shape):
                raise FormatError(f"layout entry {key!r}: length {length} != prod{shape}", path)
            out.append((str(key), shape))
        return out
    raise FormatError("layout must be .json or w2w's weight_dimensions.pt", path)


class _Matrix:
    """Row access to a dataset matrix without loading it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".npy":
            try:
                self._data: Any = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise FormatError(f"cannot read .npy matrix ({exc})", path) from None
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
            if len(keys) != 1:
                raise FormatError(f"expected one 2-D tensor, found {len(keys)} tensors", path)
            self._key = keys[0]
            with safe_open(path, framework="pt") as f:
                self._data = f.get_slice(self._key)
                self.shape = tuple(self._data.get_shape())
        elif path.suffix in {".pt", ".pth"}:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise FormatError(f"refused to load with weights_only=True ({first_line(exc)})", path) from None
            if isinstance(obj, dict) and len(obj) == 1:
                obj = next(iter(obj.values()))
            if not isinstance(obj, torch.Tensor):
                raise FormatError(f"holds {type(obj).__name__}, expected a 2-D tensor", path)
            self._data = obj
        else:
            raise FormatError("dataset matrix must be .npy, .safetensors or .pt", path)
        if path.suffix != ".safetensors":
            self.shape = tuple(self._data.shape)
        if len(self.shape) != 2:
            raise FormatError(f"matrix has shape {self.shape}, expected 2-D (rows × features)", path)

    def row(self, i: int) -> torch.Tensor:
        if self.path.suffix == ".safetensors":
            with safe_open(self.path, framework="pt") as f:
                return f.get_slice(self._key)[i : i + 1][0]
        value = self._data[i]
        return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value.clone()


def _module_name(raw: str) -> str:
    kohya = kohya_module_to_canonical(raw)
    if kohya is not None:
        return kohya
    raw = raw.removeprefix("base_model.model.").removeprefix("unet.")
    return canonical_unet_path(raw)


def _row_adapter(matrix: _Matrix, layout: list[tuple[str, tuple[int, ...]]], groups, alpha, i: int) -> Adapter:
    row = matrix.row(i)
    check_finite(row, f"row {i}", matrix.path)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for key, shape in layout:
        n = math.prod(shape)
        tensors[key] = row[offset : offset + n].reshape(shape)
        offset += n
    modules = {}
    for raw, parts in groups.items():
        name = _module_name(raw)
        mod = build_module(name, {p: tensors[k] for p, k in parts.items()}, alpha=alpha, path=matrix.path)
        if alpha == 0 and mod.rank:  # PEFT: scaling = lora_alpha / r = 0 (the shared rule reads 0 as "rank")
            mod = dataclasses.replace(mod, alpha=0.0, scale=0.0)
        modules[name] = mod
    return make_adapter(f"{matrix.path}#{i}", "w2w-dataset", modules, {})


def _config_alpha(config: Path) -> float | None:
    """``lora_alpha`` of a dataset's ``adapter_config.json`` (None: absent, alpha = rank), checked finite.

    ``lora_alpha: 0`` is scale 0, as PEFT computes it (``lora_alpha / r``), not kohya's "0 means rank".
    """
    try:
        data = json.loads(config.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise FormatError(f"cannot read ({exc.strerror or exc})", config) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"not valid JSON ({first_line(exc)})", config) from None
    if not isinstance(data, dict):
        raise FormatError(f"is a JSON {type(data).__name__}, expected an object", config)
    for key in ("lora_alpha", "r"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FormatError(f"{key} is {value!r:.60}, expected a finite number", config)
        if value < 0 or (key == "r" and (value != int(value) or value == 0)):
            raise FormatError(
                f"{key} is {value!r}, expected a {'positive integer' if key == 'r' else 'number >= 0'}", config
            )
    alpha = data.get("lora_alpha")
    return None if alpha is None else float(alpha)


def dataset_sources(
    matrix: str | Path,
    layout: str | Path,
    *,
    alpha: float | None = None,
    ids: list[str] | None = None,
) -> list[Source]:
    """One :class:`Source` per matrix row; nothing is read until a row is loaded."""
    matrix_path, layout_path = Path(matrix), Path(layout)
    for p in (matrix_path, layout_path):
        if not p.is_file():
            raise FormatError("no such file", p)
    m = _Matrix(matrix_path)
    keys = read_layout_file(layout_path)
    width = sum(math.prod(s) for _, s in keys)
    if width != m.shape[1]:
        raise FormatError(
            f"layout {layout_path.name} covers {width} columns but the matrix has {m.shape[1]}", matrix_path
        )
    groups = split_keys([k for k, _ in keys], LAYOUT_SUFFIXES, layout_path)
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
    ):
        raise ConfigError(f"--alpha must be a finite number; got {alpha!r}")
    if alpha is None:
        config = layout_path.parent / "adapter_config.json"
        if config.is_file():
            alpha = _config_alpha(config)
    n = m.shape[0]
    if ids is None:
        width_id = len(str(n - 1))
        ids = [f"row_{i:0{width_id}d}" for i in range(n)]
    if len(ids) != n:
        raise FormatError(f"{len(ids)} ids for {n} rows", matrix_path)
    loader = partial(_row_adapter, m, keys, groups, alpha)
    files = (matrix_path, layout_path)
    return [Source(ids[i], matrix_path, files, row=i, loader=partial(loader, i)) for i in range(n)]
