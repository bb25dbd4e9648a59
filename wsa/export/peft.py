"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (formats.md §3.1).

Keys ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` as ``PeftModel.save_pretrained``
writes them; the scale lives only in the config (``lora_alpha / r``), so the most common rank and
alpha become ``r`` / ``lora_alpha`` and every other module gets a ``rank_pattern`` /
``alpha_pattern`` entry. PEFT matches ``target_modules`` entries and pattern keys as dot-separated
*suffixes* of module names, so the full module path names exactly one module. Text-encoder paths
drop their leading ``text_model.``: transformers 5 flattened ``CLIPTextModel``
(``encoder.layers.0…``) while files keep the old spelling (``text_model.encoder.layers.0…``), and
the shorter suffix matches both. PEFT maps tensor keys without any such conversion, so text-encoder
keys are written the way PEFT + transformers 5 saves them (``base_model.model.encoder.layers.0…``);
wsa reads both. An adapter with text-encoder modules becomes a pipeline folder (``unet/``,
``text_encoder/``, ``text_encoder_2/``), as wsa's reader and w2w expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import ConfigError
from wsa.export._common import (
    DENOISER,
    by_component,
    cast,
    header,
    most_common,
    num,
    require_plain_lora,
    save_json,
    save_safetensors,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_LOHA = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
_LOKR = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")


def target_name(path: str) -> str:
    """The ``target_modules`` / pattern entry for a module path (see the module docstring)."""
    return path.removeprefix("text_model.")


def _patterns(values: Mapping[str, float]) -> tuple[float | int, dict[str, float | int]]:
    default = most_common(values.values())
    return default, {target_name(name): num(v) for name, v in values.items() if num(v) != default}


def lora_config(modules: Mapping[str, ModuleWeights]) -> dict[str, object]:
    """``LoraConfig`` kwargs that give every module its own rank and ``alpha = scale · rank``.

    Also what diffusers stores as ``lora_adapter_metadata`` (it calls ``LoraConfig(**kwargs)``).
    """
    ranks = {n: float(m.tensors["down"].shape[0]) for n, m in modules.items()}
    r, rank_pattern = _patterns(ranks)
    lora_alpha, alpha_pattern = _patterns({n: m.scale * ranks[n] for n, m in modules.items()})
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(target_name(n) for n in modules),
        "use_dora": any(m.is_dora for m in modules.values()),
        "lora_bias": any("bias" in m.tensors for m in modules.values()),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
    }


def lora_tensors(path: str, m: ModuleWeights, dtype: torch.dtype) -> dict[str, Tensor]:
    """``<path>.lora_A.weight`` etc. for one plain-LoRA module (checked by ``require_plain_lora``)."""
    out = {
        f"{path}.lora_A.weight": cast(m.tensors["down"], dtype),
        f"{path}.lora_B.weight": cast(m.tensors["up"], dtype),
    }
    if "bias" in m.tensors:
        # PEFT adds ``scaling · lora_B.bias`` to the base bias (layer.py ``merge``), so undo the scale.
        out[f"{path}.lora_B.bias"] = cast(m.tensors["bias"].to(torch.float32) / m.scale, dtype)
    if m.is_dora:
        # PEFT's shapes: ``(out,)`` for Linear, ``(1, out, 1, 1)`` for conv (dora.py ``get_weight_norm``).
        shape = (-1,) if len(m.shape) == 2 else (1, -1, *[1] * (len(m.shape) - 2))
        out[f"{path}.lora_magnitude_vector"] = cast(m.tensors["magnitude"].reshape(shape), dtype)
    return out


def _peft_type(adapter: Adapter) -> str:
    kinds = {m.kind for m in adapter.modules.values()}
    if kinds == {"loha"} or kinds == {"lokr"}:
        extras = [n for n, m in adapter.modules.items() if set(m.tensors) & {"bias", "magnitude"}]
        if extras:
            raise ConfigError(
                f"PEFT {kinds.pop().upper()} cannot hold a bias or DoRA magnitude ({extras[0]}); "
                "write format 'kohya' instead",
                adapter.path,
            )
        return kinds.pop().upper()
    require_plain_lora(adapter, "peft")
    return "LORA"


def _rank(m: ModuleWeights, peft_type: str) -> int:
    t = m.tensors
    if peft_type == "LOHA":
        return int(t["w1_b"].shape[0])
    for key in ("w1_b", "w2_b"):
        if key in t:
            return int(t[key].shape[0])
    # Both Kronecker factors full: PEFT still divides by r, and keeps W2 full only when
    # r >= max(W2 dims) / 2 (lokr/layer.py update_layer), so take r = the largest factor dim.
    return max(int(d) for k in ("w1", "w2") for d in t[k].shape[:2])


def _lycoris_config(modules: Mapping[str, ModuleWeights], peft_type: str) -> dict[str, object]:
    ranks = {n: float(_rank(m, peft_type)) for n, m in modules.items()}
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns({n: m.scale * ranks[n] for n, m in modules.items()})
    config: dict[str, object] = {
        "peft_type": peft_type,
        "r": r,
        "alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(target_name(n) for n in modules),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": any("t1" in m.tensors or "t2" in m.tensors for m in modules.values()),
        "init_weights": True,
    }
    if peft_type == "LOKR":
        config["decompose_both"] = any("w1_a" in m.tensors for m in modules.values())
    return config


def _lycoris_tensors(path: str, m: ModuleWeights, peft_type: str, dtype: torch.dtype) -> dict[str, Tensor]:
    parts = _LOHA if peft_type == "LOHA" else _LOKR
    prefix = "hada" if peft_type == "LOHA" else "lokr"
    return {f"{path}.{prefix}_{p}": cast(m.tensors[p], dtype) for p in parts if p in m.tensors}


def write(adapter: Adapter, out: Path, *, metadata: Mapping[str, str] | None, dtype: torch.dtype) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError("format 'peft' writes a folder, but this path is a file", out)
    peft_type = _peft_type(adapter)
    components = by_component(adapter)
    pipeline = set(components) != {DENOISER}
    if pipeline and (out / CONFIG).is_file():
        raise ConfigError(
            f"folder holds a single-component PEFT adapter ({CONFIG}), which readers would take "
            "instead of the new pipeline subfolders; write to an empty folder",
            out,
        )
    meta = {"format": "pt", **header(adapter, "peft", metadata)}
    for component, modules in components.items():
        folder = out / component if pipeline else out
        tensors: dict[str, Tensor] = {}
        for path, m in modules.items():
            key = KEY_PREFIX + (target_name(path) if component != DENOISER else path)
            if peft_type == "LORA":
                tensors.update(lora_tensors(key, m, dtype))
            else:
                tensors.update(_lycoris_tensors(key, m, peft_type, dtype))
        config = lora_config(modules) if peft_type == "LORA" else _lycoris_config(modules, peft_type)
        if metadata and "base" in metadata:  # what the adapter was trained on, where PEFT looks for it
            config["base_model_name_or_path"] = str(metadata["base"])
        save_safetensors(folder / WEIGHTS, tensors, meta)
        save_json(folder / CONFIG, config)
    return out
