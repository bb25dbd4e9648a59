"""Canonical module names: every spelling of one layer becomes its diffusers module path.

Canonical form: the denoiser's modules keep their bare diffusers path
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); text-encoder modules carry the
pipeline component as prefix (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``,
``text_encoder_2.…``). The spellings handled (formats.md §4.1):

* kohya ``lora_unet_<path with _>`` over diffusers paths (SD 1.x) or LDM paths (SDXL),
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, LyCORIS ``lycoris_``;
* LDM/SGM block names (``input_blocks.4.1``) with ``layers_per_block = 2`` (SD 1.x, SD 2, SDXL);
* old diffusers processor names (``attn1.processor.to_q_lora``).
"""

from __future__ import annotations

import re

#: kohya prefixes -> canonical component prefix ("" = the denoiser).
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "",
    "lycoris_": "",
    "lora_transformer_": "",  # OneTrainer (DiT families): diffusers paths with '_'
    "lora_te1_": "text_encoder.",
    "lora_te2_": "text_encoder_2.",
    "lora_te3_": "text_encoder_3.",  # sd-scripts' T5; the family decides its component (wsa.families)
    "lora_te_": "text_encoder.",
}
#: The prefixes that name the denoiser (the rest name text encoders).
DENOISER_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")

# Identifiers made of several '_'-joined words in SD/SDXL UNets and CLIP text encoders. kohya turns
# every '.' into '_', so these are what tells a word separator from a path separator.
_COMPOUNDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(w.split("_"))
    for w in sorted(
        [
            "down_blocks",
            "up_blocks",
            "mid_block",
            "transformer_blocks",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
            "proj_in",
            "proj_out",
            "conv_in",
            "conv_out",
            "conv_shortcut",
            "time_emb_proj",
            "time_embedding",
            "linear_1",
            "linear_2",
            "add_embedding",
            "conv_norm_out",
            "text_model",
            "self_attn",
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "layer_norm1",
            "layer_norm2",
            "final_layer_norm",
            "add_k_proj",
            "add_v_proj",
            "add_q_proj",
            "to_add_out",
            "input_blocks",
            "middle_block",
            "output_blocks",
            "in_layers",
            "out_layers",
            "emb_layers",
            "skip_connection",
            "time_embed",
            "label_emb",
            "token_embedding",
            "position_embedding",
            "text_projection",
            "single_transformer_blocks",
            "norm_out",
            "proj_mlp",
            "ff_context",
            "norm1_context",
            # T5 and LLM text encoders (sd-scripts lora_te3_, musubi/Lumina lora_te_)
            "SelfAttention",
            "EncDecAttention",
            "DenseReluDense",
            "wi_0",
            "wi_1",
            "layer_norm",
            "relative_attention_bias",
            "gate_proj",
            "up_proj",
            "down_proj",
            "o_proj",
            "input_layernorm",
            "post_attention_layernorm",
            "embed_tokens",
        ],
        key=lambda w: -w.count("_"),
    )
)


def kohya_path_to_dotted(name: str) -> str:
    """Undo kohya's ``.`` -> ``_``: ``down_blocks_0_attentions_0_..._to_q`` -> ``down_blocks.0....to_q``."""
    words = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(words):
        for compound in _COMPOUNDS:
            n = len(compound)
            if tuple(words[i : i + n]) == compound:
                parts.append("_".join(compound))
                i += n
                break
        else:
            parts.append(words[i])
            i += 1
    return ".".join(parts)


_RESNET_LEAVES = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}


def _resnet(prefix: str, rest: str) -> str:
    for ldm, diff in _RESNET_LEAVES.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return f"{prefix}.{diff}{rest[len(ldm) :]}"
    return f"{prefix}.{rest}"


def ldm_to_diffusers(path: str) -> str:
    """Map an LDM/SGM UNet path to its diffusers path (``layers_per_block = 2``; SD 1.x/2/XL).

    Block arithmetic from diffusers' ``convert_diffusers_to_original_stable_diffusion.py``
    (formats.md §4.2): ``input_blocks.{3i+j+1}`` is ``down_blocks.i`` layer ``j``, ``input_blocks.{3i+3}.0.op``
    its downsampler, ``output_blocks.{3i+j}`` is ``up_blocks.i`` layer ``j``; inside an output block,
    sub-block 1 is the attention unless it is a bare ``conv`` (then the upsampler, as in SD 1.x
    ``up_blocks.0``), and sub-block 2 is the upsampler.
    """
    for ldm, diff in _TOP_LEVEL.items():
        if path == ldm or path.startswith(ldm + "."):
            return diff + path[len(ldm) :]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.?(.*)", path)
    if m:
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, 3)
        if j == 2:  # input_blocks.{3i+3}.0.op
            return f"down_blocks.{i}.downsamplers.0." + re.sub(r"^op", "conv", rest)
        if sub == 0:
            return _resnet(f"down_blocks.{i}.resnets.{j}", rest)
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d+)\.?(.*)", path)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return _resnet(f"mid_block.resnets.{sub // 2}", rest)
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.?(.*)", path)
    if m:
        i, j = divmod(int(m[1]), 3)
        sub, rest = int(m[2]), m[3]
        if sub == 0:
            return _resnet(f"up_blocks.{i}.resnets.{j}", rest)
        if sub == 2 or (sub == 1 and rest.split(".")[0] == "conv"):
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    return path


_LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")


def canonical_unet_path(path: str) -> str:
    """Diffusers path for a denoiser module given in diffusers or LDM spelling."""
    path = path.removeprefix("diffusion_model.").removeprefix("model.diffusion_model.")
    if path.startswith(_LDM_ROOTS):
        return ldm_to_diffusers(path)
    return path


_CLIP_TEXT_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")  # not T5's "encoder.block."


def canonical_text_encoder_path(path: str) -> str:
    """CLIP text-encoder path in the ``text_model.`` spelling kohya, A1111 and transformers < 5 use.

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` (not from
    ``CLIPTextModelWithProjection``), so PEFT/diffusers adapters saved with it name
    ``encoder.layers.0.self_attn.q_proj`` what older files name ``text_model.encoder.layers.0...``.
    """
    return "text_model." + path if path.startswith(_CLIP_TEXT_ROOTS) else path


def kohya_module_to_canonical(name: str) -> str | None:
    """``lora_unet_down_blocks_0_..._to_q`` -> canonical path; ``None`` if the prefix is unknown."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            dotted = kohya_path_to_dotted(name[len(prefix) :])
            return component + canonical_text_encoder_path(dotted) if component else canonical_unet_path(dotted)
    return None


#: Old diffusers processor / CLIP attention names -> modern names.
_PROCESSOR_LEAVES = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_CLIP_PROCESSOR_LEAVES = {
    "to_q_lora": "q_proj",
    "to_k_lora": "k_proj",
    "to_v_lora": "v_proj",
    "to_out_lora": "out_proj",
}


def processor_to_canonical(path: str, text_encoder: bool) -> str:
    """``...attn1.processor.to_q_lora`` -> ``...attn1.to_q`` (and CLIP ``self_attn.to_q_lora`` -> ``q_proj``)."""
    head, _, leaf = path.rpartition(".")
    table = _CLIP_PROCESSOR_LEAVES if text_encoder else _PROCESSOR_LEAVES
    if leaf not in table:
        return path
    head = head.removesuffix(".processor")
    return f"{head}.{table[leaf]}"


def kohya_name(canonical: str) -> str:
    """Canonical path -> the kohya name that diffusers, ComfyUI and A1111 all load (SD 1.x spelling).

    formats.md §6.4: ``lora_unet_<diffusers path with _>`` and ``lora_te_`` / ``lora_te2_``.
    """
    for component, prefix in (("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_")):
        if canonical.startswith(component):
            return prefix + canonical[len(component) :].replace(".", "_")
    return "lora_unet_" + canonical.replace(".", "_")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
