"""CogVideoX (2B, 5B, 5B-I2V) and CogVideoX 1.5, and the fine-tunes that keep their keys.

LoRAs for CogVideoX are trained on diffusers' ``CogVideoXTransformer3DModel`` and keyed by its module
paths: THUDM's ``finetune/`` scripts, diffusers' ``train_cogvideox_lora.py``, finetrainers and
cogvideox-factory write ``transformer.<path>.lora_A/lora_B``. diffusers' ``CogVideoXLoraLoaderMixin``
converts nothing, so there is no native spelling to map: :data:`MODULES` are the diffusers module templates,
every Linear (and the LayerNorms a ``.diff`` may touch) of a one-layer model's ``named_modules()`` with the
block index as ``{i}`` (CogVideoX 1.5: ``patch_size_t``, which makes ``patch_embed.proj`` a Linear, and the
``ofs_embedding``; CogVideoX 1.0's ``patch_embed.proj`` is a Conv2d of the same name).

The blocks' ``attn1``/``ff.net``/``norm1.linear`` names coincide with LTX-Video's, PixArt's and Sana's;
the time/ofs embeddings, ``patch_embed.text_proj``, ``norm_final`` and the blocks' second AdaLN
(``norm2.linear``) are CogVideoX's own (:data:`EVIDENCE`).
"""

from __future__ import annotations

from wsa.families.base import Family, block_templates
from wsa.families.registry import register

#: ``CogVideoXTransformer3DModel(num_layers=1, patch_size_t=1, ofs_embed_dim=...).named_modules()``.
MODULES = (
    "patch_embed.proj",
    "patch_embed.text_proj",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "ofs_embedding.linear_1",
    "ofs_embedding.linear_2",
    *block_templates(
        "transformer_blocks",
        (
            "norm1.linear",
            "norm1.norm",
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn1.norm_q",
            "attn1.norm_k",
            "norm2.linear",
            "norm2.norm",
            "ff.net.0.proj",
            "ff.net.2",
        ),
    ),
    "norm_final",
    "norm_out.linear",
    "norm_out.norm",
    "proj_out",
)
EVIDENCE = r"^(time_embedding\.|ofs_embedding\.|patch_embed\.text_proj$|norm_final$)|\.norm2\.(linear|norm)$"

COGVIDEOX = register(
    Family(
        name="cogvideox",
        title="CogVideoX",
        denoiser="transformer",
        modules=MODULES,
        # CivitAI "CogVideoX"; finetrainers / SimpleTuner "cogvideox"
        metadata_names=("cogvideox", "cogvideo-x", "cogvideo"),
        hidden_sizes=(1920, 3072),
        evidence=EVIDENCE,
    )
)
