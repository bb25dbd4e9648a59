"""PixArt-α and PixArt-Σ (256-2K) and the fine-tunes that keep their keys.

LoRAs for PixArt are trained on diffusers' ``PixArtTransformer2DModel`` and keyed by its module paths:
PixArt-alpha's own ``train_scripts/train_pixart_lora_hf.py`` saves PEFT's adapter whole
(``base_model.model.<path>.lora_A/lora_B``, no alpha), ai-toolkit writes
``lora_transformer_<path with _>.lora_down/lora_up/alpha`` (``ss_base_model_version = "pixart"``) and T5
modules as ``lora_te_``, SimpleTuner (LyCORIS only for PixArt) ``lycoris_<path with _>``. diffusers has no
PixArt LoRA loader, hence no converter and no native spelling to map: :data:`MODULES` are the diffusers
module templates, every Linear/Conv of a one-layer model's ``named_modules()`` (with
``use_additional_conditions``, PixArt-α's resolution/aspect-ratio embedders) with the block index as ``{i}``.

The blocks' ``attn1``/``attn2``/``ff.net`` names coincide with LTX-Video's, Sana's and CogVideoX's; the
timestep-conditioning ``adaln_single`` is PixArt's own as a diffusers name (:data:`EVIDENCE`; LTX-Video's
*native* ``adaln_single`` is its ``time_embed``). Not mapped yet: PixArt's original-checkpoint names
(``blocks.0.attn.qkv``, ``cross_attn.kv_linear``, ``t_block.1``: ComfyUI's PixArt model) and OneTrainer's
OMI-standard spellings of them (``transformer.blocks.0.attn.qkv.0``, ``convert_pixart_lora.py``).
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

#: ``PixArtTransformer2DModel(num_layers=1, use_additional_conditions=True).named_modules()``, Linear/Conv2d.
MODULES = (
    "pos_embed.proj",
    *block_templates(
        "transformer_blocks",
        (
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "ff.net.0.proj",
            "ff.net.2",
        ),
    ),
    "proj_out",
    "adaln_single.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2",
    "adaln_single.emb.resolution_embedder.linear_1",
    "adaln_single.emb.resolution_embedder.linear_2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "adaln_single.linear",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
)
EVIDENCE = r"^adaln_single\."

PIXART = register(
    Family(
        name="pixart",
        title="PixArt-α / PixArt-Σ",
        denoiser="transformer",
        modules=MODULES,
        # ai-toolkit "pixart" / "pixart_sigma"; SimpleTuner "pixart_sigma"; CivitAI "PixArt a", "PixArt E"
        metadata_names=("pixart",),
        text_encoders={"lora_te_": "text_encoder"},
        hidden_sizes=(1152,),
        evidence=EVIDENCE,
    )
)
