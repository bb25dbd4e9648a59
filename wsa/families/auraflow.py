"""AuraFlow (fal's AuraFlow v0.1-v0.3) and the fine-tunes that keep its keys.

LoRAs for AuraFlow are trained on diffusers' ``AuraFlowTransformer2DModel`` and keyed by its module paths:
SimpleTuner and diffusion-pipe (``save_lora_weights``) write ``transformer.<path>.lora_A/lora_B``,
ai-toolkit writes ``lora_transformer_<path with _>.lora_down/lora_up/alpha`` (its ``LoRANetwork`` for
``is_auraflow``, ``ss_base_model_version = "auraflow"``). diffusers' ``AuraFlowLoraLoaderMixin`` converts
nothing, so there is no native spelling to map: :data:`MODULES` are the diffusers module templates, every
Linear of a one-layer model's ``named_modules()`` (MMDiT "joint" blocks, single DiT blocks, embedders) with
the block index as ``{i}``.

The single blocks' attention shares its diffusers names with FLUX.1's single blocks; the joint blocks, the
SwiGLU feed-forward (``ff.linear_1`` / ``ff.linear_2`` / ``ff.out_projection``) and ``time_step_proj`` are
AuraFlow's own (:data:`EVIDENCE`).
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

_FF = ("linear_1", "linear_2", "out_projection")

#: ``AuraFlowTransformer2DModel(num_mmdit_layers=1, num_single_dit_layers=1).named_modules()``, Linears only.
MODULES = (
    "pos_embed.proj",
    "context_embedder",
    "time_step_proj.linear_1",
    "time_step_proj.linear_2",
    *block_templates(
        "joint_transformer_blocks",
        (
            "norm1.linear",
            "norm1_context.linear",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_out.0",
            "attn.to_add_out",
            *(f"ff.{leaf}" for leaf in _FF),
            *(f"ff_context.{leaf}" for leaf in _FF),
        ),
    ),
    *block_templates(
        "single_transformer_blocks",
        ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", *(f"ff.{leaf}" for leaf in _FF)),
    ),
    "norm_out.linear",
    "proj_out",
)
EVIDENCE = r"^(joint_transformer_blocks\.|time_step_proj\.)|\.ff(_context)?\.(linear_[12]|out_projection)$"

AURAFLOW = register(
    Family(
        name="auraflow",
        title="AuraFlow",
        denoiser="transformer",
        modules=MODULES,
        # ai-toolkit / SimpleTuner "auraflow"; CivitAI baseModel "AuraFlow"
        metadata_names=("auraflow", "aura-flow"),
        text_encoders={"lora_te_": "text_encoder"},
        hidden_sizes=(3072,),
        evidence=EVIDENCE,
    )
)
