"""LyCORIS files: LoHa (``hada_*``), LoKr (``lokr_*``), full (``diff``), beside LoCon modules.

Same module naming as kohya. Non-LoRA modules have no shared factor form, so their dense ΔW is
their representation in ``delta`` and ``canonical`` stores (``raw`` keeps the stored factors).
"""

from __future__ import annotations

from pathlib import Path

from wsa.adapter import Adapter
from wsa.formats._prefixed import all_prefixed, has_lycoris_parts, read_prefixed
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register


def _sniff(path: Path, file: TensorFile | None) -> bool:
    return all_prefixed(file) and has_lycoris_parts(file)  # type: ignore[arg-type]


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    return read_prefixed(path, file, base_shapes, "lycoris")


register(
    FormatSpec(
        name="lycoris",
        pretty_name="LyCORIS (LoCon, LoHa, LoKr, full)",
        reference="https://github.com/KohakuBlueleaf/LyCORIS",
        sniff=_sniff,
        read=_read,
    )
)
