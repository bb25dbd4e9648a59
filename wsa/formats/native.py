"""Files keyed by module paths with a model-level prefix, or none: what most post-2025 DiT trainers write.

The conventions (formats-2026.md), told apart by their prefix and suffixes:

* ``diffusion_model.<path>`` (also ``model.diffusion_model.``): ComfyUI's saved and extracted LoRAs, ostris
  ai-toolkit (Flux.2, Qwen-Image, Z-Image, Chroma, HiDream, LTX, Wan), diffusion-pipe, the LTX trainer —
  with ``lora_A/lora_B`` or ``lora_down/lora_up/alpha``, ``.diff`` (a full weight delta, e.g. a norm) and
  ``.diff_b`` (a bias delta);
* ``base_model.model.<path>``: PEFT's state dict saved as one file (fal's Kontext LoRAs, PixArt);
* no prefix: DiffSynth (``<path>.lora_A.default.weight``), XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``),
  BFL's control LoRAs (``double_blocks.0.img_attn.qkv.lora_A.weight``, ``lora_B.bias``);
* ComfyUI's text encoders as ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>``.

``<path>`` is the original checkpoint's name or diffusers' name; :mod:`wsa.families` decides the family
and renames. Scale: ``alpha / rank`` where an ``.alpha`` is stored, else 1 (ComfyUI's rule: missing alpha
means alpha = rank).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import FormatError
from wsa.families.names import canonical_unet_path
from wsa.formats import _prefixed, diffusers
from wsa.formats._modules import assemble, build_module, read_alpha, split_keys, unscaled_bias
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register

DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.")
#: ComfyUI's text-encoder names (``text_encoders.<name>.transformer.<path>``) -> the kohya-style tag the
#: family maps to a pipeline component; any other name (umt5xxl for Wan, qwen25_7b for Qwen-Image, llama,
#: gemma…) is the pipeline's single or first text encoder.
TEXT_ENCODER_NAMES = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
TEXT_ENCODER_PREFIXES = ("text_encoders.",)


def text_encoder_tag(name: str) -> tuple[str, str] | None:
    """``text_encoders.t5xxl.transformer.encoder.block.0…`` -> ``("lora_te3_", "encoder.block.0…")``."""
    if not name.startswith("text_encoders."):
        return None
    encoder, _, rest = name[len("text_encoders.") :].partition(".")
    rest = rest.removeprefix("transformer.")
    return TEXT_ENCODER_NAMES.get(encoder, "lora_te_"), rest


SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "bias",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "bias",
    ".dora_scale": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
#: BFL control LoRAs store new values of the q/k norm weights (``….norm.query_norm.scale``): replacements of
#: base weights, not differences, so they are no part of ΔW; they are counted in the adapter's notes.
NORM_REPLACEMENT = ".scale"
#: XLabs' processor LoRAs: ``processor.qkv_lora1.down.weight``.
XLABS_SUFFIXES = {".down.weight": "down", ".up.weight": "up"}
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B)\.(?!weight$|bias$)[^.]+\.(weight|bias)$")  # DiffSynth `.default.`
_XLABS = re.compile(r"\.processor\.(qkv|proj)_lora\d?\.(down|up)\.weight$")


def _sniff(path: Path, file: TensorFile | None) -> bool:
    if file is None or not file.keys:
        return False
    if _prefixed.all_prefixed(file) or diffusers._sniff(path, file):
        return False  # kohya / LyCORIS / diffusers files have their own readers
    known = (*DENOISER_PREFIXES, *TEXT_ENCODER_PREFIXES)
    suffixes = (*SUFFIXES, *XLABS_SUFFIXES, NORM_REPLACEMENT)
    return all(
        (k.startswith(known) or not k.startswith(("lora_", "lycoris_")))
        and (k.endswith(suffixes) or _ADAPTER_NAME.search(k))
        for k in file.keys
    )


def _convention(keys: list[str]) -> str:
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft-file"
    if any(_ADAPTER_NAME.search(k) for k in keys):
        return "diffsynth"
    if any(_XLABS.search(k) for k in keys):
        return "xlabs"
    if any(k.endswith("_norm.scale") for k in keys):
        return "bfl-control"
    return "bare"


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    assert file is not None
    tensors = {_ADAPTER_NAME.sub(r".\1.\2", k): v for k, v in file.tensors().items()}
    fmt = _convention(file.keys)
    replaced = sorted(k for k in tensors if k.endswith(NORM_REPLACEMENT) and "norm" in k)
    for k in replaced:
        del tensors[k]
    keys = sorted(tensors)
    table = {**SUFFIXES, **XLABS_SUFFIXES} if fmt == "xlabs" else SUFFIXES
    groups = split_keys(keys, table, path)
    denoiser: dict[tuple[str, bool], ModuleWeights] = {}
    tagged: dict[tuple[str, str], ModuleWeights] = {}
    for raw_name, parts in groups.items():
        alpha = read_alpha(tensors[parts.pop("alpha")], raw_name + ".alpha", path) if "alpha" in parts else None
        # A LoHa/LoKr conv's kernel shape is inferred from the module's leaf: give it the canonical leaf (LDM names).
        guess = canonical_unet_path(raw_name.removeprefix("model.").removeprefix("diffusion_model."))
        mod = build_module(
            guess, {p: tensors[k] for p, k in parts.items()}, alpha=alpha, path=path, base_shapes=base_shapes
        )
        if "bias" in parts and parts["bias"].endswith(".diff_b"):
            mod = unscaled_bias(mod)
        te = text_encoder_tag(raw_name)
        if te is not None:
            tagged[te] = mod
            continue
        name = raw_name
        for prefix in DENOISER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if (name, False) in denoiser:
            raise FormatError(f"module {name!r} appears twice under different spellings", path)
        denoiser[(name, False)] = mod
    adapter = assemble(path, fmt, denoiser=denoiser, tagged_text_encoders=tagged, metadata=file.metadata)
    if not replaced:
        return adapter
    note = (
        f"{len(replaced)} norm weight(s) replaced outright (e.g. {replaced[0]!r}; BFL control LoRA): values, "
        "not differences, so not part of ΔW here"
    )
    return dataclasses.replace(adapter, notes=(*adapter.notes, note))


register(
    FormatSpec(
        name="native",
        pretty_name="original-checkpoint keys (ComfyUI, ai-toolkit, diffusion-pipe, PEFT file, DiffSynth, XLabs, BFL)",
        reference="https://github.com/comfyanonymous/ComfyUI/blob/master/comfy/lora.py",
        sniff=_sniff,
        read=_read,
    )
)
