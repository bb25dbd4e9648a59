"""diffusers LoRA files (``pytorch_lora_weights.safetensors``), all three key generations.

* PEFT-style ``unet.<path>.lora_A.weight`` (what ``save_lora_adapter`` and the loaders use),
* intermediate ``.lora.down.weight`` / ``.lora_linear_layer.down.weight`` (what the training
  scripts still write for attention modules),
* old attention-processor ``<path>.processor.to_q_lora.down.weight``, with or without ``unet.``.

Scale: from the ``lora_adapter_metadata`` header JSON (diffusers ≥ 0.34) when present, else from
``<module>.alpha`` tensors, else 1 (diffusers reads "no alpha" as alpha = rank; formats.md §3.2).
"""

from __future__ import annotations

import json
from pathlib import Path

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import FormatError
from wsa.families.names import canonical_text_encoder_path, canonical_unet_path, processor_to_canonical
from wsa.formats._modules import assemble, build_module, checked_lora_config, pattern_value, read_alpha, split_keys
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register

METADATA_KEY = "lora_adapter_metadata"
#: File component prefix -> canonical module prefix ("" = denoiser).
COMPONENTS = {
    "unet.": "",
    "transformer.": "",
    "text_encoder.": "text_encoder.",
    "text_encoder_2.": "text_encoder_2.",
    "text_encoder_3.": "text_encoder_3.",  # SD3's T5 (OneTrainer, diffusers)
}
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "bias",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    # old processor names: `to_q_lora.down.weight`; the module name must then end in `_lora` (checked)
    ".down.weight": "down",
    ".up.weight": "up",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # OneTrainer / newer PEFT spelling
    ".dora_scale": "magnitude",
    ".alpha": "alpha",
    # LoKr (diffusers >= 0.37 loads `<component>.<path>.lokr_w1` ... as a PEFT LoKrConfig)
    **{f".lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_BARE_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "time_embedding.")
#: PEFT-style suffixes that mark an unprefixed ``save_lora_adapter`` file (``ModelMixin`` level).
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector")


def _sniff(path: Path, file: TensorFile | None) -> bool:
    if file is None or not file.keys:
        return False
    for key in file.keys:
        if key.startswith(tuple(COMPONENTS)):
            continue
        if key.startswith(_BARE_ROOTS) and ".processor." in key:
            continue  # oldest format: no component prefix
        if key.startswith(_BARE_ROOTS) and key.endswith(_PEFT_SUFFIXES):
            continue  # `unet.save_lora_adapter(...)`: PEFT names, no component prefix
        return False
    return True


def _split_component(module: str) -> tuple[str, str, str]:
    """``unet.down_blocks...`` -> (file prefix, canonical prefix, path)."""
    for file_prefix, canonical in COMPONENTS.items():
        if module.startswith(file_prefix):
            return file_prefix, canonical, module[len(file_prefix) :]
    return "unet.", "", module


def _canonical(module: str, path: Path) -> tuple[str, bool]:
    """``(name, is_denoiser)``: text encoders get their canonical name here, denoiser paths go to the family."""
    _, prefix, rest = _split_component(module)
    if rest.rsplit(".", 1)[-1].endswith("_lora"):
        rest = processor_to_canonical(rest, text_encoder=bool(prefix))
    elif ".processor." in rest:
        raise FormatError(f"unexpected processor key {module!r}", path)
    return (prefix + canonical_text_encoder_path(rest), False) if prefix else (rest, True)


def _metadata_config(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """``lora_adapter_metadata`` -> ``{file prefix: LoraConfig kwargs}``.

    The pipeline saver (``save_lora_weights``) writes one flat JSON object whose keys carry the
    component, ``{"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": ...}`` (diffusers
    ``_pack_dict_with_prefix``); a model's ``save_lora_adapter`` writes the bare ``LoraConfig``
    dict, which then applies to the (unprefixed) denoiser keys.
    """
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        raise FormatError(f"header field {METADATA_KEY!r} is not JSON (or is nested too deeply)", path) from None
    if not isinstance(flat, dict):
        raise FormatError(f"header field {METADATA_KEY!r} is not a JSON object", path)
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component + "." not in COMPONENTS or not field:
            checked_lora_config(flat, path)
            return {"unet.": flat, "transformer.": flat}  # bare LoraConfig dict
        out.setdefault(component + ".", {})[field] = value
    for cfg in out.values():
        checked_lora_config(cfg, path)  # refuses NaN alphas, non-integer ranks, hostile patterns
    return out


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    assert file is not None
    tensors = file.tensors()
    groups = split_keys(sorted(tensors), SUFFIXES, path)
    configs = _metadata_config(file.metadata, path)
    modules: dict[tuple[str, bool], ModuleWeights] = {}
    for raw_name, parts in groups.items():
        for part in ("down", "up"):
            key = parts.get(part, "")
            spelled = (
                f".lora.{part}.weight",
                f".lora_linear_layer.{part}.weight",
                f".lora_{'A' if part == 'down' else 'B'}.weight",
            )
            if key and not key.endswith(spelled) and not raw_name.endswith("_lora"):
                raise FormatError(f"unexpected key {key!r}: not a LoRA tensor", path)
        file_prefix, _, rest = _split_component(raw_name)
        alpha = read_alpha(tensors[parts.pop("alpha")], raw_name + ".alpha", path) if "alpha" in parts else None
        rslora = False
        lokr = any(p.startswith("lokr_") for p in parts)
        if file_prefix in configs:
            cfg = configs[file_prefix]
            rslora = bool(cfg.get("use_rslora", False))
            pattern = pattern_value(cfg.get("alpha_pattern") or {}, rest, path, "alpha_pattern")
            alpha_key = "alpha" if lokr else "lora_alpha"
            value = pattern if pattern is not None else cfg.get(alpha_key, cfg.get("r"))
            try:
                alpha = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise FormatError(
                    f"header field {METADATA_KEY!r} has no usable lora_alpha for {file_prefix[:-1]!r}", path
                ) from None
        name, is_denoiser = _canonical(raw_name, path)
        if (name, is_denoiser) in modules:
            raise FormatError(f"module {name!r} appears twice under different spellings", path)
        mod = build_module(
            canonical_unet_path(name) if is_denoiser else name,
            {p: tensors[k] for p, k in parts.items()},
            alpha=alpha,
            path=path,
            rslora=rslora,
            # PEFT's magnitude is per output row; kohya/OneTrainer's `dora_scale` says by its shape
            dora_axis=None if parts.get("magnitude", "").endswith(".dora_scale") else "out",
            base_shapes=base_shapes,
        )
        if lokr:
            # diffusers builds a PEFT LoKrConfig: with metadata, scale = alpha / r (config r, as PEFT);
            # without, its converters have baked alpha into the factors and it loads with scale 1.
            scale = 1.0
            if file_prefix in configs:
                cfg = configs[file_prefix]
                r = pattern_value(cfg.get("rank_pattern") or {}, rest, path, "rank_pattern") or cfg.get(
                    "r", mod.rank or 1
                )
                scale = float(alpha) / float(r)  # type: ignore[arg-type]
            mod = ModuleWeights(mod.kind, mod.tensors, mod.shape, mod.rank, alpha, scale, mod.dora_axis)
        modules[(name, is_denoiser)] = mod
    return assemble(
        path,
        "diffusers",
        denoiser={(n, False): m for (n, d), m in modules.items() if d},
        text_encoders={n: m for (n, d), m in modules.items() if not d},
        metadata=file.metadata,
    )


register(
    FormatSpec(
        name="diffusers",
        pretty_name="diffusers LoRA file",
        reference="https://huggingface.co/docs/diffusers/main/en/api/loaders/lora",
        sniff=_sniff,
        read=_read,
    )
)
