"""Wan 2.1 and Wan 2.2 (T2V, I2V, FLF2V, VACE; 1.3B, 5B, 14B, A14B) and the models that keep their keys.

Native names are the Wan-Video checkpoint's (``wan/modules/model.py``: ``blocks.0.self_attn.q``,
``cross_attn.k_img``, ``ffn.0``, ``modulation``, ``head.head``, ``img_emb.proj.1``), which musubi-tuner
(``lora_unet_blocks_0_self_attn_q``), diffusion-pipe, ai-toolkit, ComfyUI and lightx2v (``diffusion_model.``),
DiffSynth (no prefix) and Wan-Fun (``lora_unet__``) write. The map to diffusers' ``WanTransformer3DModel``
(and ``WanVACETransformer3DModel``) is diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers``,
``_convert_musubi_wan_lora_to_diffusers`` and, for the modules those converters skip (norms,
``modulation``, ``img_emb.proj.0/4``, VACE), ``single_file_utils.convert_wan_transformer_to_diffusers``.
Mind the swap there: native ``norm3`` (the affine cross-attention norm) is diffusers' ``norm2``; native
``norm2`` / diffusers ``norm3`` have no weights. ``modulation`` is the parameter ``scale_shift_table``.

No native module is fused. diffusers' own ``fuse_projections`` makes ``attn1.to_qkv``, ``attn2.to_kv`` and
``attn2.to_added_kv``; a LoRA on those is split exactly into the unfused modules.

Wan 2.1 and 2.2 share every key (the 14B models share every shape too), so only metadata tells a 2.2
A14B LoRA from a 2.1 14B one; the 5B (width 3072) and 1.3B (1536) are told by shape. Metadata in the
wild: ai-toolkit ``ss_base_model_version`` ``wan_2.1`` / ``wan_2.2_14b`` / ``wan_2.2_5b``; CivitAI
``baseModel`` ``Wan Video 14B t2v`` / ``Wan Video 1.3B t2v`` / ``Wan Video 2.2 T2V-A14B`` / ``Wan Video 2.2
TI2V-5B``. musubi-tuner writes ``ss_base_model_version = "wan"`` and ``modelspec.architecture =
"wan2.1/lora"`` for *every* Wan model, 2.2 included (``sai_model_spec.ARCH_WAN``), so neither names a
version here: a bare ``wan2.1`` is deliberately not a metadata name of ``wan21``.
"""

from __future__ import annotations

from wsa.families.base import Family, Native, equal, native
from wsa.families.registry import register

#: Attention projections: native leaf -> diffusers leaf (``WanAttention``).
_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))


def _block(native_prefix: str, diffusers_prefix: str) -> tuple[Native, ...]:
    """One ``WanAttentionBlock`` (``blocks.{i}`` / ``vace_blocks.{i}``) in native and diffusers names."""
    n, d = native_prefix, diffusers_prefix
    rules = [native(f"{n}.self_attn.{a}", f"{d}.attn1.{b}") for a, b in _ATTN]
    rules += [native(f"{n}.cross_attn.{a}", f"{d}.attn2.{b}") for a, b in _ATTN]
    rules += [
        # I2V / FLF2V image cross-attention (Wan 2.1 I2V, FLF2V; absent from Wan 2.2 A14B and 5B)
        native(f"{n}.cross_attn.k_img", f"{d}.attn2.add_k_proj"),
        native(f"{n}.cross_attn.v_img", f"{d}.attn2.add_v_proj"),
        native(f"{n}.cross_attn.norm_k_img", f"{d}.attn2.norm_added_k"),
        native(f"{n}.ffn.0", f"{d}.ffn.net.0.proj"),
        native(f"{n}.ffn.2", f"{d}.ffn.net.2"),
        native(f"{n}.norm3", f"{d}.norm2"),  # the affine cross-attention norm (names swapped in diffusers)
        native(f"{n}.modulation", f"{d}.scale_shift_table"),
        # diffusers' fuse_projections() layers (diffusers names, split exactly into the unfused modules)
        native(f"{d}.attn1.to_qkv", f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v", split=equal(3)),
        native(f"{d}.attn2.to_kv", f"{d}.attn2.to_k", f"{d}.attn2.to_v", split=equal(2)),
        native(f"{d}.attn2.to_added_kv", f"{d}.attn2.add_k_proj", f"{d}.attn2.add_v_proj", split=equal(2)),
    ]
    return tuple(rules)


BLOCKS = _block("blocks.{i}", "blocks.{i}")
#: VACE context blocks (``WanVACETransformer3DModel``): the same block plus ``before_proj``/``after_proj``.
VACE = (
    *_block("vace_blocks.{i}", "vace_blocks.{i}"),
    native("vace_blocks.{i}.before_proj", "vace_blocks.{i}.proj_in"),
    native("vace_blocks.{i}.after_proj", "vace_blocks.{i}.proj_out"),
)
_C = "condition_embedder"
TOP = (
    native("text_embedding.0", f"{_C}.text_embedder.linear_1"),
    native("text_embedding.2", f"{_C}.text_embedder.linear_2"),
    native("time_embedding.0", f"{_C}.time_embedder.linear_1"),
    native("time_embedding.2", f"{_C}.time_embedder.linear_2"),
    native("time_projection.1", f"{_C}.time_proj"),
    native("head.head", "proj_out"),
    native("head.modulation", "scale_shift_table"),
    # I2V / FLF2V CLIP-image projection (MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm)
    native("img_emb.proj.0", f"{_C}.image_embedder.norm1"),
    native("img_emb.proj.1", f"{_C}.image_embedder.ff.net.0.proj"),
    native("img_emb.proj.3", f"{_C}.image_embedder.ff.net.2"),
    native("img_emb.proj.4", f"{_C}.image_embedder.norm2"),
)
#: Modules whose native and diffusers names agree (the Conv3d patch embeddings).
MODULES = ("patch_embedding", "vace_patch_embedding")

WAN21 = register(
    Family(
        name="wan21",
        title="Wan 2.1 (T2V/I2V/FLF2V/VACE, 1.3B and 14B)",
        denoiser="transformer",
        modules=MODULES,
        natives=BLOCKS + VACE + TOP,
        # ai-toolkit "wan_2.1"; CivitAI "Wan Video 14B t2v/i2v …", "Wan Video 1.3B t2v". Not musubi's bare "wan2.1".
        metadata_names=("wan-2.1", "wan2.1-", "wan21", "wan-video-14b", "wan-video-1.3b"),
        metadata_regex=r"^wan-.*-2\.1(-|$)",  # SimpleTuner: wan-<flavour>/lora, e.g. wan-t2v-480p-14b-2.1
        hidden_sizes=(1536, 5120),
    )
)
WAN22 = register(
    Family(
        name="wan22",
        title="Wan 2.2 (T2V/I2V A14B, TI2V 5B)",
        denoiser="transformer",
        modules=MODULES,
        natives=BLOCKS + VACE + TOP,
        # ai-toolkit "wan_2.2_14b" / "wan_2.2_5b"; CivitAI "Wan Video 2.2 T2V-A14B / I2V-A14B / TI2V-5B".
        metadata_names=("wan-2.2", "wan2.2", "wan22", "wan-video-2.2"),
        metadata_regex=r"^wan-.*-2\.2(-|$)",  # SimpleTuner: wan-i2v-14b-2.2-high/lora
        hidden_sizes=(3072, 5120),
    )
)
