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
from wsa.families.names import canonical_text_encoder_path
from wsa.formats._modules import assemble, build_module, checked_lora_config, pattern_value, split_keys
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes, FormatSpec, register
from wsa.text import first_line

CONFIG = "adapter_config.json"
#: A PEFT config is a few kB (a rank_pattern for every module of a DiT: ~1 MB).
MAX_CONFIG_BYTES = 16 << 20
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


def read_config(path: Path) -> tuple[dict, dict]:
    """``adapter_config.json``, checked field by field: the scale comes from it, so it is input like the weights.

    Returns ``(config as written, checked)``: the second has ``peft_type`` upper-cased and ``r``,
    ``lora_alpha``/``alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` present and typed (peft's
    defaults where absent: r=8, alpha=8). Every problem is one :class:`FormatError` naming the file and the field.
    """
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise FormatError(f"adapter_config.json is larger than {MAX_CONFIG_BYTES >> 20} MB; not a PEFT config", path)
    try:
        config = json.loads(path.read_bytes())
    except RecursionError:
        raise FormatError("adapter_config.json is nested too deeply", path) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise FormatError(f"adapter_config.json is not valid JSON ({first_line(exc, 200)})", path) from None
    if not isinstance(config, dict):
        raise FormatError(f"adapter_config.json is a JSON {type(config).__name__}, not an object", path)
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() not in {"LORA", "LOHA", "LOKR"}:
        raise FormatError(f"PEFT type {str(peft_type)[:40]!r} is not a LoRA-family adapter wsa reads", path)
    return config, {**checked_lora_config(config, path), "peft_type": peft_type.upper()}


def _sniff(path: Path, file: TensorFile | None) -> bool:
    return path.is_dir() and bool(component_folders(path))


def _read_component(prefix: str, folder: Path, base_shapes: BaseShapes | None) -> tuple[dict, dict]:
    config_path = folder / CONFIG
    written, config = read_config(config_path)
    peft_type = config["peft_type"]
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise FormatError(f"no {' or '.join(WEIGHTS)} next to adapter_config.json", folder)
    tf = TensorFile(weights)
    tensors = {_ADAPTER_NAME.sub(r".\1.\2", k): v for k, v in tf.tensors().items()}
    groups = split_keys(sorted(tensors), SUFFIXES, weights)
    alpha_key = "lora_alpha" if peft_type == "LORA" else "alpha"
    rank_default, alpha_default = config["r"], config[alpha_key]
    rank_pattern, alpha_pattern = config["rank_pattern"], config["alpha_pattern"]
    modules: dict[str, ModuleWeights] = {}
    for raw_name, parts in groups.items():
        name = raw_name.removeprefix("base_model.model.")
        if not prefix:
            name = next((name[len(w) :] for w in WRAPPER_PREFIXES if name.startswith(w)), name)
        canonical = prefix + canonical_text_encoder_path(name) if prefix else name  # denoiser: the family names it
        r = pattern_value(rank_pattern, name, config_path, "rank_pattern")
        r = rank_default if r is None else r
        alpha = pattern_value(alpha_pattern, name, config_path, "alpha_pattern")
        alpha = float(alpha_default if alpha is None else alpha)  # type: ignore[arg-type]
        mod = build_module(
            canonical,
            {p: tensors[k] for p, k in parts.items()},
            alpha=alpha,
            path=weights,
            rslora=config["use_rslora"],
            lokr_full_means_scale_one=False,
            dora_axis="out",
            base_shapes=base_shapes,
        )
        if mod.rank not in (0, r):
            raise FormatError(
                f"module {name!r} has rank {mod.rank} but adapter_config.json says r={r}; "
                "the config does not belong to these weights",
                weights,
            )
        if peft_type in {"LOHA", "LOKR"}:
            # PEFT LoHa/LoKr: scale = alpha / r with r from the config, even for full LoKr factors
            # (peft tuners/lokr/layer.py update_layer), unlike LyCORIS, where full LoKr means scale 1.
            mod = ModuleWeights(mod.kind, mod.tensors, mod.shape, r, alpha, alpha / r, mod.dora_axis)
        elif alpha == 0:  # peft: scaling = lora_alpha / r, so 0 switches the adapter off (kohya reads 0 as "= rank")
            mod = ModuleWeights(mod.kind, mod.tensors, mod.shape, mod.rank, 0.0, 0.0, mod.dora_axis)
        if canonical in modules:
            raise FormatError(f"module {canonical!r} appears twice under different spellings", weights)
        modules[canonical] = mod
    meta = {f"{prefix}{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in written.items()}
    return modules, meta


def _read(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None) -> Adapter:
    denoiser: dict[tuple[str, bool], ModuleWeights] = {}
    text_encoders: dict[str, ModuleWeights] = {}
    metadata: dict[str, str] = {}
    for prefix, folder in component_folders(path):
        mods, meta = _read_component(prefix, folder, base_shapes)
        target = text_encoders if prefix else denoiser
        keys = {n: n for n in mods} if prefix else {n: (n, False) for n in mods}
        twice = sorted(n for n, key in keys.items() if key in target)
        if twice:  # e.g. both unet/ and transformer/ hold the same module: one would silently replace the other
            raise FormatError(
                f"module {twice[0]!r} appears in two component folders ({folder.name}/ and another)", path
            )
        target.update({keys[n]: m for n, m in mods.items()})
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
