"""What a format is: a header-only ``sniff`` and an exact ``read``, registered under a stable name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wsa.adapter import Adapter
from wsa.formats._tensorfile import TensorFile
from wsa.registry import Registry

#: Base weight shapes by canonical module name, when a base model is at hand (exact conv shapes).
BaseShapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class FormatSpec:
    """One adapter format.

    ``sniff(path, file)`` looks at the path and, for single files, only the header (keys and
    metadata) of ``file``; ``read(path, file, base_shapes)`` returns the exact :class:`Adapter`.
    """

    name: str
    pretty_name: str
    reference: str
    sniff: Callable[[Path, TensorFile | None], bool]
    read: Callable[[Path, TensorFile | None, BaseShapes | None], Adapter]


FORMATS: Registry[FormatSpec] = Registry("adapter format")


def register(spec: FormatSpec) -> FormatSpec:
    return FORMATS.register(spec.name)(spec)
