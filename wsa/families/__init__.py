"""Base-model families (SD 1.x … Flux, Wan, Qwen-Image): module names, native spellings, fused layers.

One module per family registers a :class:`~wsa.families.base.Family`; ``resolve`` decides an
adapter's family from its module names, shapes and metadata and renames its modules to diffusers'
paths. Adding a family: one module here, its import below, and its place in ``registry.PRIORITY``.
"""

from __future__ import annotations

from wsa.families import (
    auraflow,
    chroma,
    cogvideox,
    flux1,
    flux2,
    hidream,
    hunyuan_video,
    hunyuan_video15,
    ltx2,
    ltx_video,
    lumina2,
    mochi,
    pixart,
    qwen_image,
    sana,
    sd,
    sd3,
    wan,
    world,
    z_image,
)
from wsa.families.base import Family
from wsa.families.registry import FAMILIES, families
from wsa.families.resolve import Resolved, family_from_metadata, resolve

__all__ = ["FAMILIES", "Family", "Resolved", "families", "family_from_metadata", "resolve"]
