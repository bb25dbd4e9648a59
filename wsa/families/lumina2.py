"""Lumina-Image 2.0 (and Neta Lumina / NetaYume, which keep its keys).

Native names are Alpha-VLLM's checkpoint names (``NextDiT``: ``layers.0.attention.qkv``,
``feed_forward.w1``, ``adaLN_modulation.1``), what sd-scripts (``lora_unet_layers_0_attention_qkv``) and
diffusion-pipe / ComfyUI (``diffusion_model.layers.0.attention.qkv``) write. The map to diffusers'
``Lumina2Transformer2DModel`` is diffusers' ``_convert_non_diffusers_lumina2_lora_to_diffusers`` (blocks)
and ``single_file_utils.convert_lumina2_to_diffusers`` (norms, embedders, final layer). The fused ``qkv`` is
grouped-query attention: q has the model width (the layer's input width), k and v split the rest equally
(diffusers hard-codes the full model's ``[2304, 768, 768]``). The context refiner has no modulation, and
its ``attention_norm1``/``attention_norm2`` are diffusers' ``norm1``/``norm2`` (``norm1.norm``/``norm2``
elsewhere). sd-scripts trains the Gemma-2 text encoder as ``lora_te_``.
"""

from __future__ import annotations

from wsa.families.base import Family, Native, native
from wsa.families.registry import register


def q_then_kv(shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """q: the input width's rows; k, v: the remaining rows in two equal halves (grouped-query ``qkv``)."""
    out, d = shape[0], shape[1]
    if out <= d or (out - d) % 2:
        raise ValueError(f"{out} output rows do not split into q ({d}) and two equal k, v")
    kv = (out - d) // 2
    return [[(0, d)], [(d, d + kv)], [(d + kv, out)]]


def _block(prefix: str, *, modulated: bool) -> tuple[Native, ...]:
    """One ``JointTransformerBlock`` (native) / ``Lumina2TransformerBlock`` (diffusers) at ``prefix.{i}``."""
    p = f"{prefix}.{{i}}"
    rules = [
        native(f"{p}.attention.qkv", f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v", split=q_then_kv),
        native(f"{p}.attention.out", f"{p}.attn.to_out.0"),
        native(f"{p}.attention.q_norm", f"{p}.attn.norm_q"),
        native(f"{p}.attention.k_norm", f"{p}.attn.norm_k"),
        *(native(f"{p}.feed_forward.w{n}", f"{p}.feed_forward.linear_{n}") for n in (1, 2, 3)),
        native(f"{p}.attention_norm1", f"{p}.norm1.norm" if modulated else f"{p}.norm1"),
        native(f"{p}.attention_norm2", f"{p}.norm2"),
        native(f"{p}.ffn_norm1", f"{p}.ffn_norm1"),
        native(f"{p}.ffn_norm2", f"{p}.ffn_norm2"),
    ]
    if modulated:
        rules.append(native(f"{p}.adaLN_modulation.1", f"{p}.norm1.linear"))
    return tuple(rules)


BLOCKS = _block("layers", modulated=True) + _block("noise_refiner", modulated=True)
CONTEXT_REFINER = _block("context_refiner", modulated=False)
TOP = (
    native("x_embedder", "x_embedder"),
    native("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1"),
    native("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2"),
    native("cap_embedder.0", "time_caption_embed.caption_embedder.0"),
    native("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear_1"),
    native("final_layer.linear", "norm_out.linear_2"),
)

LUMINA2 = register(
    Family(
        name="lumina2",
        title="Lumina-Image 2.0",
        denoiser="transformer",
        natives=BLOCKS + CONTEXT_REFINER + TOP,
        metadata_names=("lumina-2", "lumina2", "lumina-image-2", "neta-lumina", "netayume"),
        text_encoders={"lora_te_": "text_encoder"},
        hidden_sizes=(2304,),
        # diffusers' spelling of Lumina 2 (Z-Image's diffusers names say `attention.`, its native ones coincide)
        spelled_evidence=r"\.attn\.to_[qkv]$|\.feed_forward\.linear_[123]$|^time_caption_embed\.",
    )
)
