"""Reader shared by kohya and LyCORIS single files: ``<prefix><path with _>.<suffix>`` keys.

Both tools name modules the same way (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``,
``lycoris_``) and store ``alpha`` per module; only the factor suffixes differ (formats.md §3.3–3.5).
"""

from __future__ import annotations

from pathlib import Path

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import FormatError
from wsa.formats._modules import build_module, make_adapter, read_alpha, split_keys
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes
from wsa.formats.names import KOHYA_PREFIXES, kohya_module_to_canonical

LORA_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "magnitude",
}
LYCORIS_SUFFIXES = {
    # LoHa/LoKr parts keep their algorithm prefix: the two share the names w1_a ... w2_b.
    **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    ".diff": "diff",
    ".diff_b": "bias",
}
ALL_SUFFIXES = {**LORA_SUFFIXES, **LYCORIS_SUFFIXES}


def all_prefixed(file: TensorFile | None) -> bool:
    return file is not None and bool(file.keys) and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in file.keys)


def has_lycoris_parts(file: TensorFile) -> bool:
    return any(k.endswith(tuple(LYCORIS_SUFFIXES)) for k in file.keys)


def read_prefixed(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None, fmt: str) -> Adapter:
    assert file is not None
    tensors = file.tensors()
    groups = split_keys(sorted(tensors), ALL_SUFFIXES, path)
    modules: dict[str, ModuleWeights] = {}
    for raw_name, parts in groups.items():
        name = kohya_module_to_canonical(raw_name)
        if name is None:
            raise FormatError(f"unknown module prefix in {raw_name!r}", path)
        if name in modules:
            raise FormatError(f"module {name!r} appears twice under different spellings", path)
        alpha = read_alpha(tensors[parts.pop("alpha")], raw_name + ".alpha", path) if "alpha" in parts else None
        modules[name] = build_module(
            name, {p: tensors[k] for p, k in parts.items()}, alpha=alpha, path=path, base_shapes=base_shapes
        )
    return make_adapter(path, fmt, modules, file.metadata)
