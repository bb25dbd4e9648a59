"""LTX-2 (LTX-2.0 / 2.3, joint audio + video) and the fine-tunes that keep its keys.

Lightricks' checkpoint names its blocks as diffusers' ``LTX2VideoTransformer3DModel`` does
(``transformer_blocks.0.audio_attn1.to_q``, ``video_to_audio_attn``, ``audio_ff.net.0.proj``); what the LTX-2
trainer, ai-toolkit and ComfyUI write (``diffusion_model.<path>``) differs only in the top-level modulation
modules and the q/k norms. The map is diffusers' ``_convert_non_diffusers_ltx2_lora_to_diffusers``
(``adaln_single`` -> ``time_embed``, ``av_ca_*_adaln_single`` -> ``av_cross_attn_*``, ``q_norm`` -> ``norm_q``,
…). Nothing is fused. The ``*scale_shift_table*`` entries are parameters, reachable only as a full ``.diff``.
The text connectors (``text_embedding_projection.``) are not the denoiser and not covered here.

Every LTX-Video module name is also an LTX-2 name, so LTX-Video (:mod:`wsa.families.ltx_video`) is
registered first: a video-only file resolves to LTX-2 by its width (4096; LTX-Video 2048) or metadata.
"""

from __future__ import annotations

from wsa.families.base import Family, native
from wsa.families.registry import register

_B = "transformer_blocks.{i}"
_ATTNS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_TABLES = (
    "scale_shift_table",
    "audio_scale_shift_table",
    "prompt_scale_shift_table",
    "audio_prompt_scale_shift_table",
    "video_a2v_cross_attn_scale_shift_table",
    "audio_a2v_cross_attn_scale_shift_table",
)
BLOCK = (
    *(f"{_B}.{a}.{leaf}" for a in _ATTNS for leaf in ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits")),
    *(f"{_B}.{ff}.{leaf}" for ff in ("ff", "audio_ff") for leaf in ("net.0.proj", "net.2")),
    *(f"{_B}.{t}" for t in _TABLES),
)
#: Timestep/modulation embedders (``LTX2AdaLayerNormSingle``): diffusers name -> Lightricks' name.
_ADALN = {
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
    "prompt_adaln": "prompt_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single",
}
_ADALN_LEAVES = ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")
TOP = (
    "proj_in",
    "audio_proj_in",
    *(f"{p}.{leaf}" for p in ("caption_projection", "audio_caption_projection") for leaf in ("linear_1", "linear_2")),
    *(f"{d}.{leaf}" for d in _ADALN for leaf in _ADALN_LEAVES),
    "proj_out",
    "audio_proj_out",
    "scale_shift_table",
    "audio_scale_shift_table",
)
NATIVE = (
    native("patchify_proj", "proj_in"),
    native("audio_patchify_proj", "audio_proj_in"),
    *(native(f"{n}.{leaf}", f"{d}.{leaf}") for d, n in _ADALN.items() for leaf in _ADALN_LEAVES),
    native(f"{_B}.scale_shift_table_a2v_ca_video", f"{_B}.video_a2v_cross_attn_scale_shift_table"),
    native(f"{_B}.scale_shift_table_a2v_ca_audio", f"{_B}.audio_a2v_cross_attn_scale_shift_table"),
    *(native(f"{_B}.{a}.{n}_norm", f"{_B}.{a}.norm_{n}") for a in _ATTNS for n in ("q", "k")),
)

LTX2 = register(
    Family(
        name="ltx2",
        title="LTX-2",
        denoiser="transformer",
        modules=BLOCK + TOP,
        natives=NATIVE,
        metadata_names=("ltx-2", "ltx2"),
        hidden_sizes=(4096,),
    )
)
