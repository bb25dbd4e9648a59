"""FLUX.1 (dev, schnell, Kontext, Krea) and the models that keep its keys.

Native names are Black Forest Labs' checkpoint names (what sd-scripts, musubi, ComfyUI and Forge
write); the map to diffusers' ``FluxTransformer2DModel`` is diffusers'
``_convert_kohya_flux_lora_to_diffusers`` and ``scripts/convert_flux_to_diffusers.py``: fused
``qkv`` splits into three, single blocks' ``linear1`` into q, k, v (the input width each) and
``proj_mlp`` (the rest), and ``final_layer.adaLN_modulation.1`` swaps its shift/scale halves.
XLabs' processor names (``processor.qkv_lora1``) are diffusers' ``_convert_xlabs_flux_lora_to_diffusers``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from wsa.families.base import Family, equal, heads_then_rest, native, swap_halves
from wsa.families.registry import register

_D = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{i}"

#: BFL double/single-block and top-level modules -> diffusers (shared with Chroma and Flux.2 where they agree).
DOUBLE = (
    native("double_blocks.{i}.img_attn.qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", split=equal(3)),
    native("double_blocks.{i}.img_attn.proj", f"{_D}.attn.to_out.0"),
    native("double_blocks.{i}.img_mlp.0", f"{_D}.ff.net.0.proj"),
    native("double_blocks.{i}.img_mlp.2", f"{_D}.ff.net.2"),
    native("double_blocks.{i}.img_mod.lin", f"{_D}.norm1.linear"),
    native(
        "double_blocks.{i}.txt_attn.qkv",
        f"{_D}.attn.add_q_proj",
        f"{_D}.attn.add_k_proj",
        f"{_D}.attn.add_v_proj",
        split=equal(3),
    ),
    native("double_blocks.{i}.txt_attn.proj", f"{_D}.attn.to_add_out"),
    native("double_blocks.{i}.txt_mlp.0", f"{_D}.ff_context.net.0.proj"),
    native("double_blocks.{i}.txt_mlp.2", f"{_D}.ff_context.net.2"),
    native("double_blocks.{i}.txt_mod.lin", f"{_D}.norm1_context.linear"),
    native("double_blocks.{i}.img_attn.norm.query_norm", f"{_D}.attn.norm_q"),
    native("double_blocks.{i}.img_attn.norm.key_norm", f"{_D}.attn.norm_k"),
    native("double_blocks.{i}.txt_attn.norm.query_norm", f"{_D}.attn.norm_added_q"),
    native("double_blocks.{i}.txt_attn.norm.key_norm", f"{_D}.attn.norm_added_k"),
)
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
    native("single_blocks.{i}.modulation.lin", f"{_S}.norm.linear"),
    native("single_blocks.{i}.norm.query_norm", f"{_S}.attn.norm_q"),
    native("single_blocks.{i}.norm.key_norm", f"{_S}.attn.norm_k"),
)
TOP = (
    native("img_in", "x_embedder"),
    native("txt_in", "context_embedder"),
    native("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    native("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    native("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    native("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    native("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    native("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    native("final_layer.linear", "proj_out"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear", split=swap_halves),
)
XLABS = (
    native(
        "double_blocks.{i}.processor.qkv_lora1",
        f"{_D}.attn.to_q",
        f"{_D}.attn.to_k",
        f"{_D}.attn.to_v",
        split=equal(3),
    ),
    native("double_blocks.{i}.processor.proj_lora1", f"{_D}.attn.to_out.0"),
    native(
        "double_blocks.{i}.processor.qkv_lora2",
        f"{_D}.attn.add_q_proj",
        f"{_D}.attn.add_k_proj",
        f"{_D}.attn.add_v_proj",
        split=equal(3),
    ),
    native("double_blocks.{i}.processor.proj_lora2", f"{_D}.attn.to_add_out"),
    native(
        "single_blocks.{i}.processor.qkv_lora", f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", split=equal(3)
    ),
    native("single_blocks.{i}.processor.proj_lora", f"{_S}.proj_out"),
)

#: DiffSynth-Studio's own FluxDiT names (``diffsynth/models/flux_dit.py``; LoRAs trained without
#: ``--align_to_opensource_format``): joint blocks ``blocks.N`` with ``a_``/``b_`` for the image/text streams.
#: Its AdaLN layers chunk in diffusers' order (no swap).
_B = "blocks.{i}"
DIFFSYNTH = (
    native(f"{_B}.attn.a_to_qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", split=equal(3)),
    native(
        f"{_B}.attn.b_to_qkv", f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj", split=equal(3)
    ),
    native(f"{_B}.attn.a_to_out", f"{_D}.attn.to_out.0"),
    native(f"{_B}.attn.b_to_out", f"{_D}.attn.to_add_out"),
    native(f"{_B}.attn.norm_q_a", f"{_D}.attn.norm_q"),
    native(f"{_B}.attn.norm_k_a", f"{_D}.attn.norm_k"),
    native(f"{_B}.attn.norm_q_b", f"{_D}.attn.norm_added_q"),
    native(f"{_B}.attn.norm_k_b", f"{_D}.attn.norm_added_k"),
    native(f"{_B}.norm1_a.linear", f"{_D}.norm1.linear"),
    native(f"{_B}.norm1_b.linear", f"{_D}.norm1_context.linear"),
    native(f"{_B}.ff_a.0", f"{_D}.ff.net.0.proj"),
    native(f"{_B}.ff_a.2", f"{_D}.ff.net.2"),
    native(f"{_B}.ff_b.0", f"{_D}.ff_context.net.0.proj"),
    native(f"{_B}.ff_b.2", f"{_D}.ff_context.net.2"),
    native(
        "single_blocks.{i}.to_qkv_mlp",
        f"{_S}.attn.to_q",
        f"{_S}.attn.to_k",
        f"{_S}.attn.to_v",
        f"{_S}.proj_mlp",
        split=heads_then_rest(3),
    ),
    native("single_blocks.{i}.proj_out", f"{_S}.proj_out"),
    native("single_blocks.{i}.norm.linear", f"{_S}.norm.linear"),
    native("single_blocks.{i}.norm_q_a", f"{_S}.attn.norm_q"),
    native("single_blocks.{i}.norm_k_a", f"{_S}.attn.norm_k"),
    native("time_embedder.timestep_embedder.0", "time_text_embed.timestep_embedder.linear_1"),
    native("time_embedder.timestep_embedder.2", "time_text_embed.timestep_embedder.linear_2"),
    native("guidance_embedder.timestep_embedder.0", "time_text_embed.guidance_embedder.linear_1"),
    native("guidance_embedder.timestep_embedder.2", "time_text_embed.guidance_embedder.linear_2"),
    native("pooled_text_embedder.0", "time_text_embed.text_embedder.linear_1"),
    native("pooled_text_embedder.2", "time_text_embed.text_embedder.linear_2"),
    native("final_norm_out.linear", "norm_out.linear"),
    native("final_proj_out", "proj_out"),
)

#: Text encoders: sd-scripts writes CLIP-L as ``lora_te1_`` and T5 as ``lora_te3_``; OneTrainer T5 as ``lora_te2_``.
TEXT_ENCODERS = {
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_2",
}

_BLOCK_INDEX = re.compile(
    r"^(double|single)(?:_transformer)?[._]blocks[._](\d+)|^(single_)?transformer_blocks[._](\d+)"
)


def block_range(n_double: int, n_single: int) -> Callable[[Mapping[str, tuple[int, ...]]], bool | None]:
    """A ``Family.fits`` that is False when a block index is past the model's double / single block counts.

    FLUX.1 and Chroma have 19 / 38 blocks, FLUX.2 at most 8 / 48, HunyuanVideo (same names in ComfyUI) 20 / 40.
    """

    def fits(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
        for name in shapes:
            m = _BLOCK_INDEX.match(name)
            if m is None:
                continue
            single = (m[1] == "single") if m[1] else bool(m[3])
            index = int(m[2] if m[1] else m[4])
            if index >= (n_single if single else n_double):
                return False
        return None

    return fits


fits_block_range = block_range(19, 38)


FLUX1 = register(
    Family(
        name="flux1",
        title="FLUX.1 (dev, schnell, Kontext, Krea)",
        denoiser="transformer",
        natives=DOUBLE + SINGLE + TOP + XLABS + DIFFSYNTH,
        metadata_names=("flux-1", "flux.1", "flux1", "flux-dev", "flux-schnell", "flux-kontext", "flux-krea"),
        text_encoders=TEXT_ENCODERS,
        hidden_sizes=(3072,),
        fits=fits_block_range,
    )
)
