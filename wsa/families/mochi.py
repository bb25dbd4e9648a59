"""Mochi 1 (Genmo's Mochi 1 preview, 10B) and the fine-tunes that keep its keys.

LoRAs for Mochi are trained on diffusers' ``MochiTransformer3DModel`` and keyed by its module paths:
Genmo's own ``mochi`` fine-tuner as converted for diffusers, diffusers' ``train_mochi_lora`` research
project, finetrainers and SimpleTuner write ``transformer.<path>.lora_A/lora_B``. diffusers'
``Mochi1LoraLoaderMixin`` converts nothing, so there is no native spelling to map: :data:`MODULES` are the
diffusers module templates, every Linear/Conv2d (and the RMSNorms a ``.diff`` may touch) of a two-layer
model's ``named_modules()`` with the block index as ``{i}`` (two layers: the last block is
``context_pre_only``, its context AdaLN is ``norm1_context.linear_1`` and it has no ``to_add_out`` or
``ff_context``).

Mochi's asymmetric joint attention keeps the text stream's projections in ``attn1`` (``attn1.add_q_proj``,
``attn1.to_add_out``), its text width is 1536 (the visual 3072); those, the attention pooler and
``norm1_context.linear_1`` are Mochi's own (:data:`EVIDENCE`).
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

#: ``MochiTransformer3DModel(num_layers=2, ...).named_modules()``: Linear/Conv2d, plus the q/k RMSNorms.
MODULES = (
    "patch_embed.proj",
    "time_embed.timestep_embedder.linear_1",
    "time_embed.timestep_embedder.linear_2",
    "time_embed.pooler.to_kv",
    "time_embed.pooler.to_q",
    "time_embed.pooler.to_out",
    "time_embed.caption_proj",
    *block_templates(
        "transformer_blocks",
        (
            "norm1.linear",
            "norm1_context.linear",
            "norm1_context.linear_1",
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.add_q_proj",
            "attn1.add_k_proj",
            "attn1.add_v_proj",
            "attn1.to_out.0",
            "attn1.to_add_out",
            "attn1.norm_q",
            "attn1.norm_k",
            "attn1.norm_added_q",
            "attn1.norm_added_k",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
        ),
    ),
    "norm_out.linear",
    "proj_out",
)
EVIDENCE = (
    r"^time_embed\.(pooler|caption_proj)|\.attn1\.(add_[qkv]_proj|to_add_out|norm_added_[qk])$"
    r"|\.norm1_context\.linear_1$"
)

MOCHI = register(
    Family(
        name="mochi",
        title="Mochi 1",
        denoiser="transformer",
        modules=MODULES,
        # CivitAI "Mochi"; SimpleTuner / finetrainers "mochi"
        metadata_names=("mochi",),
        hidden_sizes=(3072, 1536),
        evidence=EVIDENCE,
    )
)
