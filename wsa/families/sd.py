"""The UNet families: Stable Diffusion 1.x, 2.x and SDXL (which covers Pony, Illustrious and NoobAI).

Their modules are named in diffusers' ``UNet2DConditionModel`` paths or in the original LDM/SGM
paths (``input_blocks.4.1…``); ``wsa.formats.names`` holds the block arithmetic. The three share
names, so the family comes from metadata, from SDXL's own structure (``add_embedding``, ten
transformer blocks, attention in ``up_blocks.0``), or from the cross-attention width (768 / 1024 / 2048).
Pony / Illustrious / NoobAI files have SDXL's keys exactly: only metadata names them, and they are
recorded as the SDXL family's variants.
"""

from __future__ import annotations

import re

from wsa.families.base import Family
from wsa.families.registry import register
from wsa.formats.names import canonical_unet_path, kohya_path_to_dotted

_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "label_emb",
    "out",
)
_UNET = re.compile(
    r"(down_blocks|up_blocks)\.\d+\.(attentions|resnets|downsamplers|upsamplers)\.\d+(\..+)?"
    r"|mid_block\.(attentions|resnets)\.\d+(\..+)?"
    r"|conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
)


def _rename(path: str, sep: str) -> str | None:
    if not path.startswith(_ROOTS):
        return None
    dotted = kohya_path_to_dotted(path) if sep == "_" else path
    name = canonical_unet_path(dotted)
    return name if _UNET.fullmatch(name) else None


_SD_TE = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}

SD15 = register(
    Family(
        name="sd15",
        title="Stable Diffusion 1.x",
        denoiser="unet",
        rename=_rename,
        metadata_names=("sd-v1", "sd1", "sd-1", "sd-v1-5", "stable-diffusion-v1", "sd-1.5", "sd1.5"),
        text_encoders=_SD_TE,
        hidden_sizes=(768,),
    )
)
SD2 = register(
    Family(
        name="sd2",
        title="Stable Diffusion 2.x",
        denoiser="unet",
        rename=_rename,
        metadata_names=("sd-v2", "sd2", "sd-2", "stable-diffusion-v2", "sd-2.1", "sd2.1"),
        text_encoders=_SD_TE,
        hidden_sizes=(1024,),
    )
)
SDXL = register(
    Family(
        name="sdxl",
        title="Stable Diffusion XL (and Pony, Illustrious, NoobAI)",
        denoiser="unet",
        rename=_rename,
        metadata_names=("sdxl", "sd-xl", "stable-diffusion-xl"),
        variants=("pony", "illustrious", "noobai", "sdxl-turbo", "sdxl-lightning"),
        text_encoders=_SD_TE,
        hidden_sizes=(2048,),
        evidence=r"add_embedding|transformer_blocks\.[2-9]\b|^up_blocks\.0\.attentions",
    )
)
