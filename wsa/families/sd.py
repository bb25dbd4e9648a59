"""The UNet families: Stable Diffusion 1.x, 2.x and SDXL (which covers Pony, Illustrious and NoobAI).

Their modules are named in diffusers' ``UNet2DConditionModel`` paths or in the original LDM/SGM
paths (``input_blocks.4.1…``); ``wsa.families.names`` holds the block arithmetic (diffusers'
``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key`` for kohya's ``lora_unet_`` names,
and ``scripts/convert_diffusers_to_original_stable_diffusion.py`` / ``…_sdxl.py`` for the LDM names
ComfyUI writes as ``diffusion_model.…``). :data:`MODULES` lists every module of a
``UNet2DConditionModel`` a LoRA, LoCon, LoHa or ``.diff`` patch may target; a name outside it is an
error, not a silently invented module.

The three share their names, so the family comes from metadata, from SDXL's own structure
(``add_embedding``, ten transformer blocks, attention in ``up_blocks.0``), or from the
cross-attention width (768 / 1024 / 2048). Pony / Illustrious / NoobAI files have SDXL's keys exactly:
only metadata names them, and they are recorded as the SDXL family's variants (Pony V7 is AuraFlow,
not SDXL, and is not one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wsa.families.base import Family, normalise_arch
from wsa.families.names import canonical_unet_path, kohya_path_to_dotted
from wsa.families.registry import register

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

#: Inside a ``Transformer2DModel`` (``attentions.{j}``): its GroupNorm, projections, and per-block layers.
_ATTENTION_LEAVES = (
    "norm",
    "proj_in",
    "proj_out",
    *(
        f"transformer_blocks.{{k}}.{leaf}"
        for leaf in (
            "norm1",
            "norm2",
            "norm3",
            *(f"attn{n}.{p}" for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
            "ff.net.0.proj",
            "ff.net.2",
        )
    ),
)
#: Inside a ``ResnetBlock2D`` (LDM ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``).
_RESNET_LEAVES = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")

#: Every UNet2DConditionModel module an adapter may patch (diffusers paths).
MODULES = (
    "conv_in",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
    *(f"{b}.{{i}}.attentions.{{j}}.{leaf}" for b in ("down_blocks", "up_blocks") for leaf in _ATTENTION_LEAVES),
    *(f"{b}.{{i}}.resnets.{{j}}.{leaf}" for b in ("down_blocks", "up_blocks") for leaf in _RESNET_LEAVES),
    "down_blocks.{i}.downsamplers.0.conv",
    "up_blocks.{i}.upsamplers.0.conv",
    *(f"mid_block.attentions.{{j}}.{leaf}" for leaf in _ATTENTION_LEAVES),
    *(f"mid_block.resnets.{{j}}.{leaf}" for leaf in _RESNET_LEAVES),
    "conv_norm_out",
    "conv_out",
)


def _template_regex(template: str) -> str:
    return "".join(r"\d+" if p.startswith("{") else re.escape(p) for p in re.split(r"(\{\w+\})", template) if p)


_UNET = re.compile("|".join(_template_regex(t) for t in MODULES))


def _rename(path: str, sep: str) -> str | None:
    """The diffusers path of a UNet module given in diffusers or LDM spelling, ``.``- or ``_``-joined."""
    if not path.startswith(_ROOTS):
        return None
    dotted = kohya_path_to_dotted(path) if sep == "_" else path
    name = canonical_unet_path(dotted)
    return name if _UNET.fullmatch(name) else None


@dataclass(frozen=True)
class UNetFamily(Family):
    """A SD family; ``not_metadata`` are metadata prefixes that look like a variant but name another model."""

    not_metadata: tuple[str, ...] = ()

    def names_metadata(self, value: str) -> bool:
        return not normalise_arch(value).startswith(self.not_metadata) and super().names_metadata(value)


_SD_TE = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}

# Metadata values (normalised: lower case, '_' and ' ' as '-', cut at '/' or ':'): sd-scripts'
# ss_base_model_version `sd_v1`, `sd_v1_v`, `sd_v2`, `sd_v2_v` (model_util.get_model_version_str_for_sd1_sd2),
# `sdxl_base_v1-0` / `sdxl_base_v0-9` (sdxl_model_util); SAI model spec `stable-diffusion-v1`,
# `stable-diffusion-v2-512`, `stable-diffusion-v2-768-v`, `stable-diffusion-xl-v1-base` (+ `/lora`);
# CivitAI baseModel `SD 1.4`, `SD 1.5`, `SD 1.5 LCM`, `SD 2.0`, `SD 2.1 768`, `SDXL 1.0`, `SDXL Turbo`,
# `Pony`, `Illustrious`, `NoobAI`, `Playground v2`.
SD15 = register(
    UNetFamily(
        name="sd15",
        title="Stable Diffusion 1.x",
        denoiser="unet",
        rename=_rename,
        modules=MODULES,
        metadata_names=("sd-v1", "sd1", "sd-1", "stable-diffusion-v1", "stable-diffusion-1"),
        text_encoders=_SD_TE,
        hidden_sizes=(768,),
    )
)
SD2 = register(
    UNetFamily(
        name="sd2",
        title="Stable Diffusion 2.x",
        denoiser="unet",
        rename=_rename,
        modules=MODULES,
        metadata_names=("sd-v2", "sd2", "sd-2", "stable-diffusion-v2", "stable-diffusion-2"),
        text_encoders=_SD_TE,
        hidden_sizes=(1024,),
    )
)
SDXL = register(
    UNetFamily(
        name="sdxl",
        title="Stable Diffusion XL (and Pony, Illustrious, NoobAI)",
        denoiser="unet",
        rename=_rename,
        modules=MODULES,
        metadata_names=("sdxl", "sd-xl", "stable-diffusion-xl"),
        variants=("pony", "illustrious", "noobai", "sdxl-turbo", "sdxl-lightning", "playground-v2"),
        not_metadata=("pony-v7", "ponyv7", "pony-diffusion-v7"),
        text_encoders=_SD_TE,
        hidden_sizes=(2048,),
        # SD 1.x/2.x have one transformer block per attention; SDXL has 2 or 10 (diffusion-pipe, ComfyUI files
        # often touch down_blocks.1's second block only)
        evidence=r"add_embedding|transformer_blocks\.[1-9]\d*\.|^up_blocks\.0\.attentions",
    )
)
