"""diffusers ``pytorch_lora_weights.safetensors``, as ``save_lora_weights`` writes it (formats.md §3.2).

Keys ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.…`` / ``text_encoder_2.…``.
The file has no alpha tensors, so without more diffusers would load every module with scale 1;
the header therefore carries ``lora_adapter_metadata``: the ``LoraConfig`` kwargs of each component,
keys prefixed with the component (``unet.r``, ``unet.lora_alpha``, ...), as JSON with ``indent=2``
and sorted keys, next to ``format: pt`` — checked against what diffusers 0.42's
``StableDiffusionPipeline.save_lora_weights`` writes. diffusers ≥ 0.34 reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from wsa.adapter import Adapter
from wsa.export._common import by_component, header, require_plain_lora, save_safetensors
from wsa.export.peft import lora_config, lora_tensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def target_path(out: Path) -> Path:
    """``out`` itself if it names a ``.safetensors`` file, else ``out/pytorch_lora_weights.safetensors``."""
    return out if out.suffix == ".safetensors" and not out.is_dir() else out / WEIGHT_NAME


def write(adapter: Adapter, out: Path, *, metadata: Mapping[str, str] | None, dtype: torch.dtype) -> Path:
    require_plain_lora(adapter, "diffusers")
    tensors: dict[str, Tensor] = {}
    packed: dict[str, object] = {}
    for component, modules in by_component(adapter).items():
        for path, m in modules.items():
            tensors.update(lora_tensors(f"{component}.{path}", m, dtype))
        packed.update({f"{component}.{k}": v for k, v in lora_config(modules).items()})
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    meta.update(header(adapter, "diffusers", metadata))
    return save_safetensors(target_path(out), tensors, meta)
