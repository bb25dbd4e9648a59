"""HunyuanVideo 1.5 (T2V, I2V; 480p/720p, distilled, step-distilled) and the fine-tunes that keep its keys.

A different model from HunyuanVideo 1.0 (``hunyuan_video``): 54 double-stream blocks of width 2048
and no single-stream blocks, separate (not fused) q/k/v projections, a ByT5 glyph-text mapper
(``byt5_in``), a SigLIP image projection (``vision_in``) and a condition-type embedding.

Native names are Tencent's checkpoint names (``tencent/HunyuanVideo-1.5``), which musubi-tuner trains
(``networks/lora_hv_1_5.py``: the ``MMDoubleStreamBlock`` Linears, ``lora_unet_double_blocks_0_img_attn_q``,
``img_mod_linear``, ``img_mlp_fc1``; ``*_in`` modules excluded). The map to diffusers'
``HunyuanVideo15Transformer3DModel`` is diffusers' ``scripts/convert_hunyuan_video1_5_to_diffusers.py``
(``convert_hyvideo15_transformer_to_diffusers``; diffusers has no HunyuanVideo 1.5 LoRA converter): the
double blocks map one to one, the token refiner's fused ``self_attn_qkv`` splits into three equal parts,
and ``final_layer.adaLN_modulation.1`` swaps its shift/scale halves (``swap_scale_shift``).

ComfyUI runs 1.5 on its Flux-style HunyuanVideo model: fused ``img_attn.qkv``, ``img_attn.proj``,
``img_mod.lin``, ``img_mlp.0`` / ``.2``, the refiner's ``self_attn.qkv`` / ``mlp.0``, ``*.in_layer``.
diffusion-pipe trains that model (``models/hunyuan_video_15.py``, ``DoubleStreamBlock``) and saves
``diffusion_model.<ComfyUI name>`` with ``lora_A``/``lora_B``; musubi's
``convert_hunyuan_video_1_5_lora_to_comfy.py`` writes the same names with ``lora_unet_`` and fuses q/k/v as a
block-diagonal LoRA (rank ×3, alpha ×3). Same diffusers targets; the fused ``qkv`` splits into three equal parts.

Names shared with HunyuanVideo 1.0 (the refiner, ``img_mod.linear``, ``img_mlp.fc1``, the ComfyUI names)
and with FLUX.1 (the ComfyUI double-block names) make metadata and widths decide: musubi writes
``ss_base_model_version = "hunyuan_video_1_5"`` and ``modelspec.architecture = "hunyuan-video-1.5"``,
whose prefix ``hunyuan-video`` is HunyuanVideo 1.0's metadata name, so this family comes before it in
``registry.PRIORITY``. That place must not also win 1.0's ties, so :func:`fits` leaves a tie on shared names to
the older families unless the file has 1.5's width (2048): keys alone say 1.5 only through 1.5-only modules
(separate ``img_attn_q``, ``byt5_in``, ``vision_in``, ``cond_type_embedding``) or its width.
"""

from __future__ import annotations

from collections.abc import Mapping

from wsa.families.base import Family, equal, native, swap_halves
from wsa.families.hunyuan_video import REFINER, _comfy
from wsa.families.registry import register

_D = "transformer_blocks.{i}"

#: Double-stream blocks (Tencent's ``MMDoubleStreamBlock``): separate q/k/v for both streams.
DOUBLE = (
    native("double_blocks.{i}.img_attn_q", f"{_D}.attn.to_q"),
    native("double_blocks.{i}.img_attn_k", f"{_D}.attn.to_k"),
    native("double_blocks.{i}.img_attn_v", f"{_D}.attn.to_v"),
    native("double_blocks.{i}.img_attn_proj", f"{_D}.attn.to_out.0"),
    native("double_blocks.{i}.img_attn_q_norm", f"{_D}.attn.norm_q"),
    native("double_blocks.{i}.img_attn_k_norm", f"{_D}.attn.norm_k"),
    native("double_blocks.{i}.img_mod.linear", f"{_D}.norm1.linear"),
    native("double_blocks.{i}.img_mlp.fc1", f"{_D}.ff.net.0.proj"),
    native("double_blocks.{i}.img_mlp.fc2", f"{_D}.ff.net.2"),
    native("double_blocks.{i}.txt_attn_q", f"{_D}.attn.add_q_proj"),
    native("double_blocks.{i}.txt_attn_k", f"{_D}.attn.add_k_proj"),
    native("double_blocks.{i}.txt_attn_v", f"{_D}.attn.add_v_proj"),
    native("double_blocks.{i}.txt_attn_proj", f"{_D}.attn.to_add_out"),
    native("double_blocks.{i}.txt_attn_q_norm", f"{_D}.attn.norm_added_q"),
    native("double_blocks.{i}.txt_attn_k_norm", f"{_D}.attn.norm_added_k"),
    native("double_blocks.{i}.txt_mod.linear", f"{_D}.norm1_context.linear"),
    native("double_blocks.{i}.txt_mlp.fc1", f"{_D}.ff_context.net.0.proj"),
    native("double_blocks.{i}.txt_mlp.fc2", f"{_D}.ff_context.net.2"),
)
#: Embedders and the final layer (``convert_hyvideo15_transformer_to_diffusers``).
TOP = (
    native("img_in.proj", "x_embedder.proj"),
    native("time_in.mlp.0", "time_embed.timestep_embedder.linear_1"),
    native("time_in.mlp.2", "time_embed.timestep_embedder.linear_2"),
    native("time_r_in.mlp.0", "time_embed.timestep_embedder_r.linear_1"),  # MeanFlow (step-distilled) models
    native("time_r_in.mlp.2", "time_embed.timestep_embedder_r.linear_2"),
    native("byt5_in.layernorm", "context_embedder_2.norm"),
    native("byt5_in.fc1", "context_embedder_2.linear_1"),
    native("byt5_in.fc2", "context_embedder_2.linear_2"),
    native("byt5_in.fc3", "context_embedder_2.linear_3"),
    native("vision_in.proj.0", "image_embedder.norm_in"),
    native("vision_in.proj.1", "image_embedder.linear_1"),
    native("vision_in.proj.3", "image_embedder.linear_2"),
    native("vision_in.proj.4", "image_embedder.norm_out"),
    native("cond_type_embedding", "cond_type_embed"),
    native("final_layer.linear", "proj_out"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear", split=swap_halves),
)
#: ComfyUI's Flux-style spellings (module docstring); ``img_attn.qkv`` is fused where Tencent's 1.5 is not.
COMFY = (
    native("double_blocks.{i}.img_attn.qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", split=equal(3)),
    native(
        "double_blocks.{i}.txt_attn.qkv",
        f"{_D}.attn.add_q_proj",
        f"{_D}.attn.add_k_proj",
        f"{_D}.attn.add_v_proj",
        split=equal(3),
    ),
    # ComfyUI's token refiner embeds the pooled text with an MLPEmbedder (``in_layer``/``out_layer``)
    native("txt_in.c_embedder.in_layer", "context_embedder.time_text_embed.text_embedder.linear_1"),
    native("txt_in.c_embedder.out_layer", "context_embedder.time_text_embed.text_embedder.linear_2"),
    *(
        native(_comfy(r.native), *r.targets, split=r.split)
        for r in DOUBLE + REFINER + TOP
        if _comfy(r.native) != r.native
    ),
)

WIDTH = 2048


def fits(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
    """A tie on names shared with HunyuanVideo 1.0 / FLUX.1 is 1.5's only at its width (module docstring)."""
    return None if any(WIDTH in shape for shape in shapes.values()) else False


HUNYUAN_VIDEO15 = register(
    Family(
        name="hunyuan_video15",
        title="HunyuanVideo 1.5",
        denoiser="transformer",
        natives=DOUBLE + REFINER + TOP + COMFY,
        # musubi: ss_base_model_version "hunyuan_video_1_5", modelspec "hunyuan-video-1.5"; SimpleTuner/others
        metadata_names=(
            "hunyuan-video-1-5",
            "hunyuan-video-1.5",
            "hunyuan-video-15",
            "hunyuanvideo-1.5",
            "hunyuanvideo-1-5",
            "hunyuanvideo1.5",
            "hunyuanvideo15",
            "hunyuan-video15",
            "hyvideo15",
            "hv15",
        ),
        hidden_sizes=(WIDTH,),
        fits=fits,
        # Modules HunyuanVideo 1.0 and FLUX.1 have no counterpart for: the ByT5 mapper, the image projection,
        # the condition-type embedding, the MeanFlow time embedder.
        evidence=r"^(context_embedder_2\.|image_embedder\.|cond_type_embed$|time_embed\.timestep_embedder_r\.)",
    )
)
