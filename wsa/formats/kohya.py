"""kohya-ss / A1111 LoRA and LoCon files: ``lora_unet_…`` / ``lora_te…`` with ``lora_down``/``lora_up``/``alpha``.

Module names may follow diffusers paths (SD 1.x) or LDM paths (SDXL); both become the canonical
diffusers path. Missing ``alpha`` means alpha = rank. ``dora_scale`` is read as DoRA.
"""

from __future__ import annotations

from pathlib import Path

from wsa.adapter import Adapter
from wsa.formats._prefixed import all_prefixed, has_lycoris_parts, read_prefixed
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register


def _sniff(path: Path, file: TensorFile | None) -> bool:
    return all_prefixed(file) and not has_lycoris_parts(file)  # type: ignore[arg-type]


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    return read_prefixed(path, file, base_shapes, "kohya")


register(
    FormatSpec(
        name="kohya",
        pretty_name="kohya-ss / A1111 LoRA",
        reference="https://github.com/kohya-ss/sd-scripts",
        sniff=_sniff,
        read=_read,
    )
)
