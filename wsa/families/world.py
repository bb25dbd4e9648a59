"""The embedded world's base models (``builtin:faces``, ``builtin:dogs``): small UNets with SD's module names.

Their keys are Stable Diffusion's (the world's UNet is built from diffusers' parts so that LoRA targets
carry SD's names), so keys alone would call them SD 1.x or SDXL; only the adapters' own
``base_model_name_or_path`` (``builtin:<family>``, written by ``wsa world zoo``) names them. The family is
therefore ``metadata_only``: never a candidate from keys, chosen when the metadata says so.
"""

from __future__ import annotations

from wsa.families.base import Family
from wsa.families.registry import register
from wsa.families.sd import _SD_TE, _rename

WORLD = register(
    Family(
        name="world",
        title="wsa embedded world (builtin:faces, builtin:dogs)",
        denoiser="unet",
        rename=_rename,
        metadata_names=("builtin",),
        text_encoders=_SD_TE,
        metadata_only=True,
    )
)
