"""Stable Diffusion 3 / 3.5 (medium, large, large turbo): the MMDiT of ``SD3Transformer2DModel``.

Native names are Stability AI's checkpoint names (``joint_blocks.{i}.x_block…`` /
``context_block…``, what sd-scripts ``networks/lora_sd3.py``, ComfyUI and SwarmUI write); the map to
diffusers' ``SD3Transformer2DModel`` is diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``), which OneTrainer's ``convert_sd3_lora.py`` agrees with:

* fused ``attn.qkv`` splits into three equal parts (``x_block`` -> ``to_q/k/v``, ``context_block`` ->
  ``add_q/k/v_proj``, SD3.5-medium's ``x_block.attn2`` -> ``attn2.to_q/k/v``);
* the last block's context stream is "pre-only" (no ``attn.proj``, no MLP) and its
  ``adaLN_modulation.1`` gives ``(shift, scale)`` where diffusers' ``AdaLayerNormContinuous`` wants
  ``(scale, shift)``: the converter swaps the halves there (``swap_scale_shift``) and nowhere else in
  the blocks. The template cannot name "the last block", so the shape does: only the pre-only
  modulation has ``2 × width`` output rows (the others ``6 × width``). ComfyUI's own ``mmdit_to_diffusers``
  table does not swap there; diffusers and OneTrainer do, and diffusers is the reference;
* ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` swaps its halves as in Flux.

diffusers' ``SD3LoraLoaderMixin`` reads only diffusers-keyed files (no kohya/native converter exists for
SD3), so this table is the only reader of the native spellings.
"""

from __future__ import annotations

from wsa.families.base import Family, equal, native, swap_halves
from wsa.families.registry import register

_B = "transformer_blocks.{i}"
_J = "joint_blocks.{i}"


def pre_only_swap(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """The context stream's AdaLN: halves swapped in the last (pre-only, ``2 × width`` rows) block, else as is."""
    if len(shape) >= 2 and shape[0] == 2 * shape[1]:
        return swap_halves(shape)
    return [[(0, shape[0])]]


#: SAI MMDiT joint-block modules -> diffusers (``convert_sd3_transformer_checkpoint_to_diffusers``).
JOINT = (
    native(f"{_J}.x_block.attn.qkv", f"{_B}.attn.to_q", f"{_B}.attn.to_k", f"{_B}.attn.to_v", split=equal(3)),
    native(f"{_J}.x_block.attn.proj", f"{_B}.attn.to_out.0"),
    native(f"{_J}.x_block.attn.ln_q", f"{_B}.attn.norm_q"),
    native(f"{_J}.x_block.attn.ln_k", f"{_B}.attn.norm_k"),
    native(f"{_J}.x_block.mlp.fc1", f"{_B}.ff.net.0.proj"),
    native(f"{_J}.x_block.mlp.fc2", f"{_B}.ff.net.2"),
    native(f"{_J}.x_block.adaLN_modulation.1", f"{_B}.norm1.linear"),
    native(
        f"{_J}.context_block.attn.qkv",
        f"{_B}.attn.add_q_proj",
        f"{_B}.attn.add_k_proj",
        f"{_B}.attn.add_v_proj",
        split=equal(3),
    ),
    native(f"{_J}.context_block.attn.proj", f"{_B}.attn.to_add_out"),
    native(f"{_J}.context_block.attn.ln_q", f"{_B}.attn.norm_added_q"),
    native(f"{_J}.context_block.attn.ln_k", f"{_B}.attn.norm_added_k"),
    native(f"{_J}.context_block.mlp.fc1", f"{_B}.ff_context.net.0.proj"),
    native(f"{_J}.context_block.mlp.fc2", f"{_B}.ff_context.net.2"),
    native(f"{_J}.context_block.adaLN_modulation.1", f"{_B}.norm1_context.linear", split=pre_only_swap),
)
#: SD3.5 medium's second self-attention in the image stream (``dual_attention_layers``).
ATTN2 = (
    native(f"{_J}.x_block.attn2.qkv", f"{_B}.attn2.to_q", f"{_B}.attn2.to_k", f"{_B}.attn2.to_v", split=equal(3)),
    native(f"{_J}.x_block.attn2.proj", f"{_B}.attn2.to_out.0"),
    native(f"{_J}.x_block.attn2.ln_q", f"{_B}.attn2.norm_q"),
    native(f"{_J}.x_block.attn2.ln_k", f"{_B}.attn2.norm_k"),
)
#: Embedders and the final layer (sd-scripts trains them with ``emb_dims``).
TOP = (
    native("x_embedder.proj", "pos_embed.proj"),
    native("context_embedder", "context_embedder"),
    native("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    native("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    native("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    native("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    native("final_layer.linear", "proj_out"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear", split=swap_halves),
)

#: sd-scripts and OneTrainer: CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5-XXL ``lora_te3_``.
TEXT_ENCODERS = {
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}

SD3 = register(
    Family(
        name="sd3",
        title="Stable Diffusion 3 / 3.5",
        denoiser="transformer",
        natives=JOINT + ATTN2 + TOP,
        metadata_names=("sd3", "sd-3", "stable-diffusion-3", "stable-diffusion-v3", "sd3.5", "sd-3.5"),
        text_encoders=TEXT_ENCODERS,
        hidden_sizes=(1536, 2432),
        # diffusers names shared with Flux.1's double blocks; these two exist only in SD3/3.5.
        evidence=r"^pos_embed\.proj$|^transformer_blocks\.\d+\.attn2\.(to_[qkv]|to_out\.0|norm_[qk])$",
    )
)
