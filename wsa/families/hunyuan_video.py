"""HunyuanVideo (1.0: T2V, I2V) and the fine-tunes that keep its keys.

Native names are Tencent's checkpoint names (what musubi-tuner, diffusion-pipe and ComfyUI write;
diffusion-pipe keeps them under diffusers' ``transformer.`` prefix). The map to diffusers'
``HunyuanVideoTransformer3DModel`` is diffusers' ``_convert_hunyuan_video_lora_to_diffusers``: the
fused ``img_attn_qkv`` / ``txt_attn_qkv`` / the token refiner's ``self_attn_qkv`` split into three
equal parts, single blocks' ``linear1`` into q, k, v (the input width each) and ``proj_mlp`` (the
rest; diffusers hard-codes 3072 rows, the input width of the full model), and
``final_layer.adaLN_modulation.1`` swaps its shift/scale halves (``remap_norm_scale_shift_``); the
token refiner's ``adaLN_modulation.1`` (two gates) keeps its order.

The diffusers names coincide with FLUX.1's for the double/single-block attention, so a file that
touches only those modules fits both; the metadata (musubi writes ``hunyuan-video``) decides, and
without it FLUX.1 wins the tie and the adapter lists ``hunyuan_video`` as another candidate.
HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``) is a different model and not covered here.
musubi-tuner and diffusion-pipe train the denoiser only, so no text-encoder prefixes are listed.
"""

from __future__ import annotations

from wsa.families.base import Family, equal, heads_then_rest, native, swap_halves
from wsa.families.registry import register

_D = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{i}"
_R = "context_embedder.token_refiner.refiner_blocks.{i}"

#: Double-stream blocks (``MMDoubleStreamBlock``): image and text streams, fused q/k/v.
DOUBLE = (
    native("double_blocks.{i}.img_attn_qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", split=equal(3)),
    native("double_blocks.{i}.img_attn_proj", f"{_D}.attn.to_out.0"),
    native("double_blocks.{i}.img_attn_q_norm", f"{_D}.attn.norm_q"),
    native("double_blocks.{i}.img_attn_k_norm", f"{_D}.attn.norm_k"),
    native("double_blocks.{i}.img_mod.linear", f"{_D}.norm1.linear"),
    native("double_blocks.{i}.img_mlp.fc1", f"{_D}.ff.net.0.proj"),
    native("double_blocks.{i}.img_mlp.fc2", f"{_D}.ff.net.2"),
    native(
        "double_blocks.{i}.txt_attn_qkv",
        f"{_D}.attn.add_q_proj",
        f"{_D}.attn.add_k_proj",
        f"{_D}.attn.add_v_proj",
        split=equal(3),
    ),
    native("double_blocks.{i}.txt_attn_proj", f"{_D}.attn.to_add_out"),
    native("double_blocks.{i}.txt_attn_q_norm", f"{_D}.attn.norm_added_q"),
    native("double_blocks.{i}.txt_attn_k_norm", f"{_D}.attn.norm_added_k"),
    native("double_blocks.{i}.txt_mod.linear", f"{_D}.norm1_context.linear"),
    native("double_blocks.{i}.txt_mlp.fc1", f"{_D}.ff_context.net.0.proj"),
    native("double_blocks.{i}.txt_mlp.fc2", f"{_D}.ff_context.net.2"),
)
#: Single-stream blocks (``MMSingleStreamBlock``): ``linear1`` = q, k, v and the MLP's first layer.
SINGLE = (
    native(
        "single_blocks.{i}.linear1",
        f"{_S}.attn.to_q",
        f"{_S}.attn.to_k",
        f"{_S}.attn.to_v",
        f"{_S}.proj_mlp",
        split=heads_then_rest(3),
    ),
    native("single_blocks.{i}.linear2", f"{_S}.proj_out"),
    native("single_blocks.{i}.modulation.linear", f"{_S}.norm.linear"),
    native("single_blocks.{i}.q_norm", f"{_S}.attn.norm_q"),
    native("single_blocks.{i}.k_norm", f"{_S}.attn.norm_k"),
)
#: The text stream's token refiner (``txt_in``, ``SingleTokenRefiner``) and its embedders.
REFINER = (
    native(
        "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv",
        f"{_R}.attn.to_q",
        f"{_R}.attn.to_k",
        f"{_R}.attn.to_v",
        split=equal(3),
    ),
    native("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj", f"{_R}.attn.to_out.0"),
    native("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1", f"{_R}.ff.net.0.proj"),
    native("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2", f"{_R}.ff.net.2"),
    native("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1", f"{_R}.norm_out.linear"),
    native("txt_in.individual_token_refiner.blocks.{i}.norm1", f"{_R}.norm1"),
    native("txt_in.individual_token_refiner.blocks.{i}.norm2", f"{_R}.norm2"),
    native("txt_in.input_embedder", "context_embedder.proj_in"),
    native("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    native("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    native("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    native("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
)
TOP = (
    native("img_in.proj", "x_embedder.proj"),
    native("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    native("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    native("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    native("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    native("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    native("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    native("final_layer.linear", "proj_out"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear", split=swap_halves),
)

#: ComfyUI's own HunyuanVideo model (``comfy/ldm/hunyuan_video/model.py``) reuses its Flux layers, so LoRAs trained
#: or extracted in ComfyUI spell the same modules the Flux way (``img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``,
#: ``modulation.lin``, the refiner's ``self_attn.qkv`` / ``mlp.0``, ``time_in.in_layer``); with ``_`` both spellings
#: coincide. Same diffusers targets and splits as the original names.
_COMFY_RENAMES = (
    ("_attn_qkv", "_attn.qkv"),
    ("_attn_proj", "_attn.proj"),
    ("_attn_q_norm", "_attn.norm.query_norm"),
    ("_attn_k_norm", "_attn.norm.key_norm"),
    ("_mod.linear", "_mod.lin"),
    ("modulation.linear", "modulation.lin"),
    ("_mlp.fc1", "_mlp.0"),
    ("_mlp.fc2", "_mlp.2"),
    ("single_blocks.{i}.q_norm", "single_blocks.{i}.norm.query_norm"),
    ("single_blocks.{i}.k_norm", "single_blocks.{i}.norm.key_norm"),
    ("self_attn_qkv", "self_attn.qkv"),
    ("self_attn_proj", "self_attn.proj"),
    ("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.0"),
    ("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.2"),
    ("time_in.mlp.0", "time_in.in_layer"),
    ("time_in.mlp.2", "time_in.out_layer"),
    ("guidance_in.mlp.0", "guidance_in.in_layer"),
    ("guidance_in.mlp.2", "guidance_in.out_layer"),
    ("t_embedder.mlp.0", "t_embedder.in_layer"),
    ("t_embedder.mlp.2", "t_embedder.out_layer"),
)


def _comfy(name: str) -> str:
    for old, new in _COMFY_RENAMES:
        name = name.replace(old, new)
    return name


COMFY = tuple(
    native(_comfy(r.native), *r.targets, split=r.split)
    for r in DOUBLE + SINGLE + REFINER + TOP
    if _comfy(r.native) != r.native
)

HUNYUAN_VIDEO = register(
    Family(
        name="hunyuan_video",
        title="HunyuanVideo",
        denoiser="transformer",
        natives=DOUBLE + SINGLE + REFINER + TOP + COMFY,
        # musubi's FramePack (HunyuanVideo packed) writes "framepack" and keeps HunyuanVideo's module names
        metadata_names=("hunyuan-video", "hunyuanvideo", "hyvideo", "framepack"),
        hidden_sizes=(3072,),
        # Modules FLUX.1 has no counterpart for: the token refiner, the 3-D patch embedder, the text embedder.
        evidence=r"^(context_embedder\.(token_refiner|proj_in|time_text_embed)|x_embedder\.proj$)",
    )
)
