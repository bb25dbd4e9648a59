"""Where each module's numbers sit in a row, and how to read them back into factors.

A :class:`Layout` is the column map of a store: modules in a fixed order, each a run of
*parts* (tensors flattened C-order). It is written into the store manifest as JSON and is all
that is needed to turn a row back into an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from wsa.errors import StoreError

REPRESENTATIONS = ("raw", "delta", "canonical")


@dataclass(frozen=True)
class Part:
    name: str
    shape: tuple[int, ...]
    offset: int  # column of the first value, within the row

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModuleLayout:
    """One module's columns.

    ``kind`` is the adapter algorithm of the parts (``lora``, ``loha``, ``lokr``, ``full``) — in
    ``delta`` and ``canonical`` stores non-LoRA modules are ``full`` (the dense ΔW).
    ``scale`` multiplies the factor product when the row is read back (``raw``: the collection's
    reference scale; ``canonical``/``delta``: 1). ``alpha`` is the alpha that gives that scale.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    parts: tuple[Part, ...]
    dora_axis: str | None = None

    @property
    def offset(self) -> int:
        return self.parts[0].offset

    @cached_property  # read per row by the ingest fast path; the dataclass is frozen, so it never goes stale
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    @property
    def alpha(self) -> float:
        return self.scale * self.rank if self.rank else self.scale


@dataclass(frozen=True)
class Layout:
    repr: str
    modules: tuple[ModuleLayout, ...]

    @cached_property
    def n_features(self) -> int:
        return sum(m.size for m in self.modules)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    def module(self, name: str) -> ModuleLayout:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "repr": self.repr,
            "n_features": self.n_features,
            "modules": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "shape": list(m.shape),
                    "rank": m.rank,
                    "scale": m.scale,
                    "alpha": m.alpha,
                    "offset": m.offset,
                    "size": m.size,
                    "dora_axis": m.dora_axis,
                    "parts": [{"name": p.name, "shape": list(p.shape), "offset": p.offset} for p in m.parts],
                }
                for m in self.modules
            ],
        }

    @classmethod
    def from_json(
        cls, data: Any, where: str | Path | None = None, key: str = "layout", file: str | None = None
    ) -> Layout:
        """The layout a manifest (or plan) holds, validated: every failure is one :class:`StoreError` line.

        ``where``: the file or folder named in the error; ``key``: how the layout is reached in it; ``file``: the
        JSON file holding it, when ``where`` is its folder. Checked:
        types, known kinds and part names, positive shapes, parts' offsets contiguous from 0 (no gaps or
        overlaps), part sizes from their shapes, LoRA factor shapes against the module's shape and rank,
        finite scales, and ``n_features`` (when present) equal to the sum of the part sizes.
        """
        return _layout_from_json(data, where, key, file)


_KINDS = ("lora", "loha", "lokr", "full")
_DORA_AXES = (None, "in", "out")
_PART_NAMES = {
    "lora": ("down", "up", "mid", "bias", "magnitude"),
    "loha": ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2", "bias", "magnitude"),
    "lokr": ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2", "bias", "magnitude"),
    "full": ("diff", "bias", "magnitude"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layout_from_json(data: Any, where: str | Path | None, key: str, file: str | None) -> Layout:
    def fail(at: str, problem: str) -> StoreError:
        label = f"{file} key {at!r}" if file else f"key {at!r}"
        return StoreError(f"{label}: {problem}; the file was edited or damaged (rebuild it)", where)

    if not isinstance(data, dict):
        raise fail(key, f"is {type(data).__name__}, expected an object")
    rep = data.get("repr")
    if rep not in REPRESENTATIONS:
        raise fail(f"{key}.repr", f"is {rep!r}, expected one of {', '.join(REPRESENTATIONS)}")
    raw_modules = data.get("modules")
    if not isinstance(raw_modules, list) or not raw_modules:
        raise fail(f"{key}.modules", "is missing or not a non-empty list")
    modules: list[ModuleLayout] = []
    names: set[str] = set()
    column = 0
    for i, m in enumerate(raw_modules):
        at = f"{key}.modules[{i}]"
        if not isinstance(m, dict):
            raise fail(at, f"is {type(m).__name__}, expected an object")
        name = m.get("name")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise fail(f"{at}.name", f"is {name!r}, expected a non-empty string")
        if name in names:
            raise fail(f"{at}.name", f"{name!r} appears twice")
        names.add(name)
        kind = m.get("kind")
        if kind not in _KINDS:
            raise fail(f"{at}.kind", f"is {kind!r}, expected one of {', '.join(_KINDS)}")
        shape = _shape(m.get("shape"), f"{at}.shape", fail)
        rank = m.get("rank")
        if not _is_int(rank) or rank < 0:
            raise fail(f"{at}.rank", f"is {rank!r}, expected a non-negative integer")
        scale = m.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise fail(f"{at}.scale", f"is {scale!r}, expected a finite number")
        dora_axis = m.get("dora_axis")
        if dora_axis not in _DORA_AXES:
            raise fail(f"{at}.dora_axis", f"is {dora_axis!r}, expected null, 'in' or 'out'")
        raw_parts = m.get("parts")
        if not isinstance(raw_parts, list) or not raw_parts:
            raise fail(f"{at}.parts", "is missing or not a non-empty list")
        parts: list[Part] = []
        for j, p in enumerate(raw_parts):
            pat = f"{at}.parts[{j}]"
            if not isinstance(p, dict):
                raise fail(pat, f"is {type(p).__name__}, expected an object")
            pname = p.get("name")
            if pname not in _PART_NAMES[kind]:
                raise fail(f"{pat}.name", f"is {pname!r}, not a part of a {kind} module")
            if any(q.name == pname for q in parts):
                raise fail(f"{pat}.name", f"{pname!r} appears twice in module {name!r}")
            pshape = _shape(p.get("shape"), f"{pat}.shape", fail)
            offset = p.get("offset")
            if not _is_int(offset):
                raise fail(f"{pat}.offset", f"is {offset!r}, expected an integer")
            if offset != column:
                how = "overlaps the previous part" if offset < column else "leaves a gap after the previous part"
                raise fail(f"{pat}.offset", f"is {offset}, expected {column} ({how})")
            part = Part(pname, pshape, offset)
            column += part.size
            parts.append(part)
        module = ModuleLayout(name, kind, shape, rank, float(scale), tuple(parts), dora_axis)
        _check_module(module, at, fail)
        for field, value in (("offset", module.offset), ("size", module.size)):
            if field in m and m[field] != value:
                raise fail(f"{at}.{field}", f"is {m[field]!r}, but its parts give {value}")
        modules.append(module)
    n_features = data.get("n_features", column)
    if not _is_int(n_features) or n_features != column:
        raise fail(f"{key}.n_features", f"is {n_features!r}, but the parts cover {column} columns")
    return Layout(rep, tuple(modules))


def _shape(value: Any, at: str, fail) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_is_int(d) and d > 0 for d in value):
        raise fail(at, f"is {value!r}, expected a list of positive integers")
    return tuple(value)


def _check_module(m: ModuleLayout, at: str, fail) -> None:
    """The cheap consistency checks between a module's shape, rank and its parts' shapes."""
    parts = {p.name: p.shape for p in m.parts}
    if m.kind == "lora":
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            raise fail(f"{at}.parts", f"LoRA module {m.name!r} needs both 'down' and 'up'")
        if len(down) < 2 or len(up) < 2 or len(m.shape) < 2:
            raise fail(f"{at}.parts", f"LoRA module {m.name!r} has factors {down} / {up} for shape {m.shape}")
        if down[0] != m.rank or up[1] != m.rank:
            raise fail(f"{at}.parts", f"LoRA module {m.name!r}: down {down} / up {up} do not have rank {m.rank}")
        if up[0] != m.shape[0] or down[1] != m.shape[1]:
            raise fail(f"{at}.parts", f"LoRA module {m.name!r}: down {down} / up {up} do not make shape {m.shape}")
    elif m.kind == "full":
        if parts.get("diff") != m.shape:
            raise fail(f"{at}.parts", f"full module {m.name!r}: diff {parts.get('diff')} is not its shape {m.shape}")
        if m.rank != 0:
            raise fail(f"{at}.rank", f"is {m.rank}, a full module has rank 0")
    if "bias" in parts and parts["bias"] != (m.shape[0],):
        raise fail(f"{at}.parts", f"module {m.name!r}: bias {parts['bias']} is not ({m.shape[0]},)")
    if ("magnitude" in parts) != (m.dora_axis is not None):
        raise fail(f"{at}.dora_axis", f"module {m.name!r}: a DoRA magnitude and dora_axis go together")


def build_layout(
    repr: str,
    specs: list[tuple[str, str, tuple[int, ...], int, float, list[tuple[str, tuple[int, ...]]], str | None]],
) -> Layout:
    """Assign consecutive columns to ``(name, kind, shape, rank, scale, [(part, shape)], dora_axis)``."""
    offset = 0
    modules = []
    for name, kind, shape, rank, scale, parts, dora_axis in specs:
        placed = []
        for part_name, part_shape in parts:
            placed.append(Part(part_name, tuple(part_shape), offset))
            offset += math.prod(part_shape)
        modules.append(ModuleLayout(name, kind, tuple(shape), rank, scale, tuple(placed), dora_axis))
    return Layout(repr, tuple(modules))
