"""Where each module's numbers sit in a row, and how to read them back into factors.

A :class:`Layout` is the column map of a store: modules in a fixed order, each a run of
*parts* (tensors flattened C-order). It is written into the store manifest as JSON and is all
that is needed to turn a row back into an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

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
    def from_json(cls, data: dict[str, Any]) -> Layout:
        modules = tuple(
            ModuleLayout(
                name=m["name"],
                kind=m["kind"],
                shape=tuple(m["shape"]),
                rank=int(m["rank"]),
                scale=float(m["scale"]),
                parts=tuple(Part(p["name"], tuple(p["shape"]), int(p["offset"])) for p in m["parts"]),
                dora_axis=m.get("dora_axis"),
            )
            for m in data["modules"]
        )
        return cls(data["repr"], modules)


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
