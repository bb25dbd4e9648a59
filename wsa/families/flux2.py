"""FLUX.2 (dev, klein 4B/9B and their base models).

Native names are Black Forest Labs' FLUX.2 checkpoint names (what ai-toolkit, musubi-tuner and
ComfyUI write); the map to diffusers' ``Flux2Transformer2DModel`` is diffusers'
``_convert_non_diffusers_flux2_lora_to_diffusers`` (ai-toolkit, single-file PEFT),
``_convert_kohya_flux2_lora_to_diffusers`` (musubi/kohya) and, for the modules no LoRA converter
names, ``convert_flux2_transformer_checkpoint_to_diffusers``. Unlike FLUX.1, diffusers keeps two
layers fused: a single block's ``linear1`` (q, k, v and the SwiGLU MLP's input) is
``attn.to_qkv_mlp_proj`` and its ``linear2`` is ``attn.to_out``, both unsplit. Double blocks' ``qkv``
splits into three as in FLUX.1; the MLPs are ``ff.linear_in``/``ff.linear_out``; modulation is global
(``double_stream_modulation_img.lin`` ...), not per block. ``final_layer.adaLN_modulation.1`` swaps its
shift/scale halves for ``norm_out.linear`` as the checkpoint converter does (diffusers' LoRA converter
renames it without the swap). diffusers' fused-attention spellings ``attn.to_qkv``/``attn.to_added_qkv``
(what its LoKr converters target) split back into q, k, v.

Widths: dev 6144 (48 heads x 128), klein 9B 4096, klein 4B 3072 (FLUX.1's width too: a klein-4B file
whose names fit FLUX.1 as well needs its metadata, see :func:`fits_shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping

from wsa.families.base import Family, Native, equal, native, swap_halves
from wsa.families.flux1 import DOUBLE as FLUX1_DOUBLE
from wsa.families.flux1 import SINGLE as FLUX1_SINGLE
from wsa.families.flux1 import TOP as FLUX1_TOP
from wsa.families.flux1 import block_range
from wsa.families.registry import register

_D = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{i}"


def _shared(rules: tuple[Native, ...], *natives: str) -> tuple[Native, ...]:
    """FLUX.1's rules for these native templates (the ones whose diffusers names FLUX.2 keeps)."""
    picked = tuple(r for r in rules if r.native in natives)
    assert len(picked) == len(natives), natives
    return picked


DOUBLE = (
    *_shared(
        FLUX1_DOUBLE,
        "double_blocks.{i}.img_attn.qkv",
        "double_blocks.{i}.img_attn.proj",
        "double_blocks.{i}.txt_attn.qkv",
        "double_blocks.{i}.txt_attn.proj",
        "double_blocks.{i}.img_attn.norm.query_norm",
        "double_blocks.{i}.img_attn.norm.key_norm",
        "double_blocks.{i}.txt_attn.norm.query_norm",
        "double_blocks.{i}.txt_attn.norm.key_norm",
    ),
    native("double_blocks.{i}.img_mlp.0", f"{_D}.ff.linear_in"),
    native("double_blocks.{i}.img_mlp.2", f"{_D}.ff.linear_out"),
    native("double_blocks.{i}.txt_mlp.0", f"{_D}.ff_context.linear_in"),
    native("double_blocks.{i}.txt_mlp.2", f"{_D}.ff_context.linear_out"),
)
SINGLE = (
    *_shared(FLUX1_SINGLE, "single_blocks.{i}.norm.query_norm", "single_blocks.{i}.norm.key_norm"),
    native("single_blocks.{i}.linear1", f"{_S}.attn.to_qkv_mlp_proj"),
    native("single_blocks.{i}.linear2", f"{_S}.attn.to_out"),
)
TOP = (
    *_shared(FLUX1_TOP, "img_in", "txt_in", "final_layer.linear"),
    native("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    native("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    native("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    native("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    native("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    native("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    native("single_stream_modulation.lin", "single_stream_modulation.linear"),
    native("final_layer.adaLN_modulation.1", "norm_out.linear", split=swap_halves),
)
#: diffusers' own fused projections (``Attention.fuse_projections``; its Flux.2 LoKr converters target them).
FUSED = (
    native(f"{_D}.attn.to_qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", split=equal(3)),
    native(
        f"{_D}.attn.to_added_qkv",
        f"{_D}.attn.add_q_proj",
        f"{_D}.attn.add_k_proj",
        f"{_D}.attn.add_v_proj",
        split=equal(3),
    ),
)

#: Widths of the full models' attention projections: dev, klein 9B, klein 4B.
HIDDEN_SIZES = (6144, 4096, 3072)
#: ``mlp_ratio`` 3 with SwiGLU: a double block's ``img_mlp.0`` is 6 x hidden wide and ``img_mlp.2`` takes
#: 3 x hidden; a single block's ``linear1`` is 3 + 6 = 9 x hidden, its ``linear2`` takes 1 + 3 = 4 x hidden
#: (FLUX.1, Chroma: 4, 4, 7 and 5). ``(leaf, (out, in) ratio)``.
_WIDTHS = (("mlp.0", (6, 1)), ("mlp.2", (1, 3)), ("linear1", (9, 1)), ("linear2", (1, 4)))


def fits_shapes(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
    """Do these native-named ΔW shapes (``double_blocks.0.img_mlp.0`` -> ``(out, in)``) have FLUX.2's widths?

    ``True``/``False`` where an MLP or single-block layer decides, ``None`` where only layers whose
    shapes FLUX.1 shares (attention) are present. For telling FLUX.2 from FLUX.1 by shape where their
    native names coincide and the width does not (klein 4B and FLUX.1 are both 3072 wide).
    """
    verdict: bool | None = None
    for name, shape in shapes.items():
        leaf = name.replace("_", ".")
        ratio = next((r for suffix, r in _WIDTHS if leaf.endswith(suffix)), None)
        if ratio is None or len(shape) != 2:
            continue
        if shape[0] * ratio[1] != shape[1] * ratio[0]:
            return False
        verdict = True
    return verdict


_in_range = block_range(8, 48)  # dev: 8 double / 48 single blocks (klein has fewer)


def _fits(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
    return False if _in_range(shapes) is False else fits_shapes(shapes)


FLUX2 = register(
    Family(
        name="flux2",
        title="FLUX.2 (dev, klein)",
        denoiser="transformer",
        natives=(*DOUBLE, *SINGLE, *TOP, *FUSED),
        # ai-toolkit: flux2, flux2_klein_4b, flux2_klein_9b; musubi: Flux.2-dev, Flux.2-klein-4b.
        metadata_names=("flux2", "flux-2", "flux.2"),
        # Mistral-3 (dev) or Qwen3 (klein): the pipeline's one text encoder.
        text_encoders={"lora_te_": "text_encoder", "lora_te1_": "text_encoder"},
        hidden_sizes=HIDDEN_SIZES,
        fits=_fits,
        evidence=r"\.ff(_context)?\.linear_(in|out)$|\.attn\.to_qkv_mlp_proj$|^single_transformer_blocks\.\d+\.attn\.to_out$"
        r"|_stream_modulation",
    )
)
