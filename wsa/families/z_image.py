"""Z-Image (Turbo, Base, Omni): Tongyi-MAI's single-stream S3-DiT, 30 main layers and two refiners.

Canonical names are diffusers' ``ZImageTransformer2DModel`` paths
(``diffusers/models/transformers/transformer_z_image.py``): ``layers``, ``noise_refiner`` and
``context_refiner`` (and Omni's ``siglip_refiner``) blocks of ``attention.to_q/to_k/to_v/to_out.0``,
``feed_forward.w1/w2/w3`` and ``adaLN_modulation.0`` (the context refiner has no modulation). musubi,
ai-toolkit, DiffSynth and diffusers write these names, with ``_`` (musubi ``lora_unet_layers_0_attention_to_q``)
or ``.`` between the words.

Native names are the original checkpoint's (what ComfyUI's Lumina-style ``NextDiT`` and sd-scripts-style
trainers write): fused ``attention.qkv`` (q, k, v, equal thirds), ``attention.out``, ``attention.q_norm``/``k_norm``,
``x_embedder`` and ``final_layer``; the map is diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``
(``single_file_utils.py``) and ``_convert_non_diffusers_z_image_lora_to_diffusers`` (``qkv`` split into
``to_q/to_k/to_v`` with the down factor shared, ``out`` -> ``to_out.0``). Lumina 2 shares those native block
names but has 26 layers (Z-Image 30) and ``adaLN_modulation.1``; its width is 2304, Z-Image's 3840.
"""

from __future__ import annotations

from wsa.families.base import Family, equal, native
from wsa.families.registry import register

#: ``ZImageTransformerBlock`` containers: main layers, refiners before the joint stream, Omni's SigLIP refiner.
BLOCKS = ("layers", "noise_refiner", "context_refiner", "siglip_refiner")
_LEAVES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "attention.norm_q",
    "attention.norm_k",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "attention_norm1",
    "attention_norm2",
    "ffn_norm1",
    "ffn_norm2",
    "adaLN_modulation.0",
)
#: The patch embedder and final layer live in ModuleDicts keyed ``"{patch}-{frame patch}"`` (``2-1`` in releases).
TOP = (
    "all_x_embedder.{p}-{f}",
    "all_final_layer.{p}-{f}.linear",
    "all_final_layer.{p}-{f}.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.0",
    "cap_embedder.1",
    "siglip_embedder.0",
    "siglip_embedder.1",
)
MODULES = tuple(f"{b}.{{i}}.{leaf}" for b in BLOCKS for leaf in _LEAVES) + TOP


def _block_natives(b: str) -> tuple:
    a = f"{b}.{{i}}.attention"
    return (
        native(f"{a}.qkv", f"{a}.to_q", f"{a}.to_k", f"{a}.to_v", split=equal(3, of_input=True)),
        native(f"{a}.out", f"{a}.to_out.0"),
        native(f"{a}.q_norm", f"{a}.norm_q"),
        native(f"{a}.k_norm", f"{a}.norm_k"),
    )


#: Original-checkpoint spellings (the released single file, ComfyUI) -> diffusers.
NATIVES = (
    *(r for b in BLOCKS for r in _block_natives(b)),
    native("x_embedder", "all_x_embedder.2-1"),
    native("final_layer.linear", "all_final_layer.2-1.linear"),
    native("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
)

Z_IMAGE = register(
    Family(
        name="z_image",
        title="Z-Image (Turbo, Base, Omni)",
        denoiser="transformer",
        modules=MODULES,
        natives=NATIVES,
        # ai-toolkit ``zimage``, musubi ``Z-Image/lora`` (-> ``z-image``), also ``z-image-turbo`` etc. by prefix.
        metadata_names=("z-image", "zimage"),
        text_encoders={"lora_te_": "text_encoder", "lora_te1_": "text_encoder"},  # Qwen3
        hidden_sizes=(3840,),
        # Only what Lumina 2's native names (shared with Z-Image's) cannot give: layers 26-29, block modulation ``.0``.
        evidence=r"^layers\.2[6-9]\.|^(?:layers|noise_refiner)\.\d+\.adaLN_modulation\.0$",
    )
)
