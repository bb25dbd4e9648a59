"""Qwen-Image (and Qwen-Image-Edit, -Edit-2509/2511, -Layered): one double-stream MMDiT, 60 blocks.

Qwen's released checkpoint is already in diffusers' layout, so there is no native spelling to
translate: every trainer writes diffusers' ``QwenImageTransformer2DModel`` paths
(``diffusers/models/transformers/transformer_qwenimage.py``), with ``.`` (diffusers, ai-toolkit,
ComfyUI ``diffusion_model.``, DiffSynth ``….lora_A.default.weight``) or ``_`` between the words
(musubi ``lora_unet_transformer_blocks_0_img_mlp_net_0_proj``, OneTrainer ``lora_transformer_…``).
diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` reads all of these by prefix removal
and, for ``lora_unet_``, by re-dotting exactly the words of the templates below.

Flux.1's diffusers names share ``transformer_blocks.{i}.attn.*`` (same 3072 width); only Qwen has
``img_mod``/``txt_mod``/``img_mlp``/``txt_mlp``/``txt_norm`` and blocks past Flux's 19 double blocks
(SD 3.5 Large's joint blocks stop at 37), so an attention-only file is Qwen's when it reaches block 38.
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

#: Per-block modules (``QwenImageTransformerBlock``); ``img_mod``/``txt_mod`` are ``Sequential(SiLU, Linear)``.
BLOCK = block_templates(
    "transformer_blocks",
    (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.norm_q",
        "attn.norm_k",
        "attn.norm_added_q",
        "attn.norm_added_k",
        "img_mod.1",
        "txt_mod.1",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ),
)
#: Top-level modules (the same set diffusers' converter maps for ``lora_unet_``, plus norms and Layered's t-embedding).
TOP = (
    "img_in",
    "txt_in",
    "txt_norm",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.addition_t_embedding",  # Qwen-Image-Layered (use_additional_t_cond)
)

QWEN_IMAGE = register(
    Family(
        name="qwen_image",
        title="Qwen-Image (Edit, Layered)",
        denoiser="transformer",
        modules=BLOCK + TOP,
        # ai-toolkit ``qwen_image`` (-> ``qwen-image``), musubi ``qwen-image``/``qwen-image-edit``…
        metadata_names=("qwen-image", "qwenimage", "qwen-image-edit", "qwen-image-layered"),
        text_encoders={"lora_te_": "text_encoder", "lora_te1_": "text_encoder"},  # Qwen2.5-VL
        hidden_sizes=(3072,),
        evidence=(
            r"^transformer_blocks\.\d+\.(?:img_mod|txt_mod|img_mlp|txt_mlp)\."
            r"|^transformer_blocks\.(?:3[89]|[4-9]\d)\.attn\.|^txt_norm$|^time_text_embed\.addition_t_embedding$"
        ),
    )
)
