"""Sana (0.6B, 1.6B; Sana 1.5 1.6B/4.8B; Sana-Sprint) and the fine-tunes that keep its keys.

LoRAs for Sana are trained on diffusers' ``SanaTransformer2DModel`` and keyed by its module paths:
diffusers' ``train_dreambooth_lora_sana.py`` and SimpleTuner write ``transformer.<path>.lora_A/lora_B``
(SimpleTuner LyCORIS ``lycoris_<path with _>``). diffusers' ``SanaLoraLoaderMixin`` converts nothing, so
there is no native spelling to map: :data:`MODULES` are the diffusers module templates, every Linear and
ungrouped Conv2d (and the RMSNorms a ``.diff`` may touch) of one-layer models' ``named_modules()`` with the
block index as ``{i}``: with ``guidance_embeds`` (Sana-Sprint's ``time_embed.guidance_embedder``) and without (the plain
``AdaLayerNormSingle`` as ``time_embed.emb``), with ``qk_norm`` (Sana 1.5).

The blocks' ``attn1``/``attn2`` names coincide with PixArt's, LTX-Video's and CogVideoX's; the Mix-FFN's
pointwise convolutions (``ff.conv_inverted`` / ``ff.conv_point``) and ``caption_norm`` are Sana's own
(:data:`EVIDENCE`). The Mix-FFN's depthwise ``ff.conv_depth`` has no template (see :data:`MODULES`). Sana's
original-checkpoint names (ComfyUI's Sana model, ``convert_sana_to_diffusers.py``) are not mapped: no trainer
is known to write them. Sana-Video (``SanaVideoTransformer3DModel``) is a different model, not covered here.
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

#: ``SanaTransformer2DModel(num_layers=1, ...).named_modules()``: Linear/Conv2d, plus the q/k RMSNorms.
MODULES = (
    "patch_embed.proj",
    "time_embed.emb.timestep_embedder.linear_1",  # without guidance embeds (AdaLayerNormSingle)
    "time_embed.emb.timestep_embedder.linear_2",
    "time_embed.timestep_embedder.linear_1",  # with guidance embeds (Sana-Sprint)
    "time_embed.timestep_embedder.linear_2",
    "time_embed.guidance_embedder.linear_1",
    "time_embed.guidance_embedder.linear_2",
    "time_embed.linear",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
    "caption_norm",
    *block_templates(
        "transformer_blocks",
        (
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn1.norm_q",
            "attn1.norm_k",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "attn2.norm_q",
            "attn2.norm_k",
            "ff.conv_inverted",
            # not ff.conv_depth: a depthwise conv (groups = its width), whose LoRA (PEFT needs rank divisible by
            # the groups) is grouped, not B·A; a file touching it fails by name rather than giving a wrong ΔW
            "ff.conv_point",
        ),
    ),
    "proj_out",
)
EVIDENCE = r"\.ff\.conv_(inverted|point)$|^caption_norm$"

SANA = register(
    Family(
        name="sana",
        title="Sana",
        denoiser="transformer",
        modules=MODULES,
        # SimpleTuner "sana"; CivitAI "Sana"
        metadata_names=("sana",),
        hidden_sizes=(1152, 2240),
        evidence=EVIDENCE,
    )
)
