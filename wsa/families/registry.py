"""The family registry: one entry per base-model family, and the order ties are broken in."""

from __future__ import annotations

from wsa.families.base import Family
from wsa.registry import Registry

FAMILIES: Registry[Family] = Registry("model family")
#: When keys and shapes fit several families and neither metadata nor structure decides, the first in this
#: order wins (and the adapter records the others): the older and more common family of a shared key set
#: first (Flux.1 before Chroma, whose files reuse Flux's names; Wan 2.1 before 2.2). Families not listed
#: come after, in registration order.
PRIORITY = (
    "sd15",
    "sd2",
    "sdxl",
    "flux1",
    "chroma",
    "flux2",
    "sd3",
    "qwen_image",
    "z_image",
    "lumina2",
    "hunyuan_video15",  # before hunyuan_video: its metadata name "hunyuan-video" is a prefix of 1.5's
    "hunyuan_video",
    "ltx_video",
    "ltx2",
    "hidream",
    "wan21",
    "wan22",
    "auraflow",
    "pixart",
    "sana",
    "cogvideox",
    "mochi",
    "world",
)
_registered: list[str] = []


def register(family: Family) -> Family:
    FAMILIES.register(family.name)(family)
    _registered.append(family.name)
    return family


def families() -> list[Family]:
    """Every registered family, in tie-break order (:data:`PRIORITY`)."""
    rank = {n: i for i, n in enumerate(PRIORITY)}
    ordered = sorted(_registered, key=lambda n: (rank.get(n, len(rank)), _registered.index(n)))
    return [FAMILIES.get(n) for n in ordered]
