"""LTX-Video (0.9.x: 2B and 13B, distilled) and the fine-tunes that keep its keys.

Lightricks' checkpoint already names its blocks as diffusers does (``transformer_blocks.0.attn1.to_q``,
``ff.net.0.proj``), so what the LTX trainer, ai-toolkit and ComfyUI write (``diffusion_model.<path>``) is
diffusers' ``LTXVideoTransformer3DModel`` path after the prefix: diffusers'
``_convert_non_diffusers_ltxv_lora_to_diffusers`` only strips ``diffusion_model.``. Four top-level and
norm names differ; their map is diffusers' ``single_file_utils.convert_ltx_transformer_checkpoint_to_diffusers``
(``patchify_proj`` -> ``proj_in``, ``adaln_single`` -> ``time_embed``, ``q_norm``/``k_norm`` -> ``norm_q``/
``norm_k``). Nothing is fused. ``scale_shift_table`` (top level and per block) is a parameter, reachable
only as a full ``.diff``.

LTX-2 (``LTX2VideoTransformer3DModel``, audio + video) reuses every LTX-Video name and adds its audio
modules; it is its own family (:mod:`wsa.families.ltx2`), registered after this one so a video-only file
of unknown width resolves here, and told apart by width (LTX-Video 2048, LTX-2 4096) or metadata.
"""

from __future__ import annotations

from wsa.families.base import Family, native
from wsa.families.registry import register

_B = "transformer_blocks.{i}"

#: diffusers module paths (the same in Lightricks' checkpoint, except the four NATIVE ones below).
BLOCK = (
    *(f"{_B}.{attn}.{leaf}" for attn in ("attn1", "attn2") for leaf in ("to_q", "to_k", "to_v", "to_out.0")),
    f"{_B}.ff.net.0.proj",
    f"{_B}.ff.net.2",
    f"{_B}.scale_shift_table",
)
TOP = (
    "proj_in",
    "time_embed.emb.timestep_embedder.linear_1",
    "time_embed.emb.timestep_embedder.linear_2",
    "time_embed.linear",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
    "proj_out",
    "scale_shift_table",
)
#: Lightricks' names where they differ from diffusers' (``convert_ltx_transformer_checkpoint_to_diffusers``).
NATIVE = (
    native("patchify_proj", "proj_in"),
    native("adaln_single.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_1"),
    native("adaln_single.emb.timestep_embedder.linear_2", "time_embed.emb.timestep_embedder.linear_2"),
    native("adaln_single.linear", "time_embed.linear"),
    *(native(f"{_B}.{a}.{n}_norm", f"{_B}.{a}.norm_{n}") for a in ("attn1", "attn2") for n in ("q", "k")),
)

LTX_VIDEO = register(
    Family(
        name="ltx_video",
        title="LTX-Video",
        denoiser="transformer",
        modules=BLOCK + TOP,
        natives=NATIVE,
        metadata_names=("ltx-video", "ltxvideo", "ltxv"),
        hidden_sizes=(2048,),
    )
)
