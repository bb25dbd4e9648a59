"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Also the diffusers-pipeline layout with one PEFT folder per component (``unet/``,
``text_encoder/``, ``text_encoder_2/``, ``transformer/``), as w2w writes ``models/<i>/unet/``.
Scale: ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), per module from ``rank_pattern`` /
``alpha_pattern``; LoHa/LoKr take ``alpha`` (formats.md §3.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import FormatError
from wsa.formats._modules import assemble, build_module, pattern_value, split_keys
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register
from wsa.formats.names import canonical_text_encoder_path

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Pipeline component folder -> canonical module prefix.
COMPONENTS = {
    "unet": "",
    "transformer": "",
    "text_encoder": "text_encoder.",
    "text_encoder_2": "text_encoder_2.",
    "text_encoder_3": "text_encoder_3.",
}
#: Model-level prefixes inside a PEFT state dict when the wrapped model held the denoiser as an attribute
#: (diffusion-pipe saves ``diffusion_model.blocks.0…`` for Wan, ``transformer.double_blocks.0…`` for HunyuanVideo).
WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    # LoHa/LoKr parts keep their algorithm prefix: the two share the names w1_a ... w2_b.
    **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
# In-memory names that carry the adapter name (w2w's exports: `.lora_A.identity1.weight`).
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B)\.(?!weight$|bias$)[^.]+\.(weight|bias)$")


def component_folders(path: Path) -> list[tuple[str, Path]]:
    """``[(canonical prefix, folder)]`` for a PEFT folder or a pipeline folder of PEFT components."""
    if (path / CONFIG).is_file():
        return [(COMPONENTS.get(path.name, ""), path)]
    return [(prefix, path / name) for name, prefix in COMPONENTS.items() if (path / name / CONFIG).is_file()]


def _sniff(path: Path, file: TensorFile | None) -> bool:
    return path.is_dir() and bool(component_folders(path))


def _read_component(prefix: str, folder: Path, base_shapes: BaseShapes | None) -> tuple[dict, dict]:
    config_path = folder / CONFIG
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise FormatError(f"adapter_config.json is not valid JSON ({exc})", config_path) from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in {"LORA", "LOHA", "LOKR"}:
        raise FormatError(f"PEFT type {peft_type!r} is not a LoRA-family adapter wsa reads", config_path)
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise FormatError(f"no {' or '.join(WEIGHTS)} next to adapter_config.json", folder)
    tf = TensorFile(weights)
    tensors = {_ADAPTER_NAME.sub(r".\1.\2", k): v for k, v in tf.tensors().items()}
    groups = split_keys(sorted(tensors), SUFFIXES, weights)
    alpha_key = "lora_alpha" if peft_type == "LORA" else "alpha"
    rank_default = config.get("r", 8)
    alpha_default = config.get(alpha_key, 8)
    modules: dict[str, ModuleWeights] = {}
    for raw_name, parts in groups.items():
        name = raw_name.removeprefix("base_model.model.")
        if not prefix:
            name = next((name[len(w) :] for w in WRAPPER_PREFIXES if name.startswith(w)), name)
        canonical = prefix + canonical_text_encoder_path(name) if prefix else name  # denoiser: the family names it
        r = pattern_value(config.get("rank_pattern") or {}, name) or rank_default
        alpha = pattern_value(config.get("alpha_pattern") or {}, name)
        alpha = float(alpha_default if alpha is None else alpha)  # type: ignore[arg-type]
        mod = build_module(
            canonical,
            {p: tensors[k] for p, k in parts.items()},
            alpha=alpha,
            path=weights,
            rslora=bool(config.get("use_rslora", False)),
            lokr_full_means_scale_one=False,
            dora_axis="out",
            base_shapes=base_shapes,
        )
        try:
            r = int(r)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise FormatError(f"config rank {r!r} for module {name!r} is not an integer", config_path) from None
        if mod.rank not in (0, r) or r <= 0:
            raise FormatError(
                f"module {name!r} has rank {mod.rank} but adapter_config.json says r={r}; "
                "the config does not belong to these weights",
                weights,
            )
        if peft_type in {"LOHA", "LOKR"}:
            # PEFT LoHa/LoKr: scale = alpha / r with r from the config, even for full LoKr factors
            # (peft tuners/lokr/layer.py update_layer), unlike LyCORIS, where full LoKr means scale 1.
            mod = ModuleWeights(mod.kind, mod.tensors, mod.shape, r, alpha, alpha / r, mod.dora_axis)
        if canonical in modules:
            raise FormatError(f"module {canonical!r} appears twice under different spellings", weights)
        modules[canonical] = mod
    meta = {f"{prefix}{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in config.items()}
    return modules, meta


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    denoiser: dict[tuple[str, bool], ModuleWeights] = {}
    text_encoders: dict[str, ModuleWeights] = {}
    metadata: dict[str, str] = {}
    for prefix, folder in component_folders(path):
        mods, meta = _read_component(prefix, folder, base_shapes)
        if prefix:
            text_encoders.update(mods)
        else:
            denoiser.update({(n, False): m for n, m in mods.items()})
        metadata.update(meta)
    return assemble(path, "peft", denoiser=denoiser, text_encoders=text_encoders, metadata=metadata)


register(
    FormatSpec(
        name="peft",
        pretty_name="PEFT adapter folder",
        reference="https://huggingface.co/docs/peft",
        sniff=_sniff,
        read=_read,
    )
)
