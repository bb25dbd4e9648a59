"""Reader shared by kohya and LyCORIS single files: ``<prefix><path with _>.<suffix>`` keys.

Both tools name modules the same way (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``,
``lycoris_``) and store ``alpha`` per module; only the factor suffixes differ (formats.md §3.3–3.5).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import FormatError
from wsa.families.names import DENOISER_PREFIXES, KOHYA_PREFIXES, kohya_module_to_canonical, kohya_path_to_dotted
from wsa.formats._modules import assemble, build_module, read_alpha, split_keys, unscaled_bias
from wsa.formats._tensorfile import TensorFile
from wsa.formats.base import BaseShapes

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
    # LyCORIS norm modules (`NormModule`): weight and bias differences of a norm layer
    ".w_norm": "diff",
    ".b_norm": "bias",
}
ALL_SUFFIXES = {**LORA_SUFFIXES, **LYCORIS_SUFFIXES}


#: sd-scripts / OneTrainer bundle textual-inversion embeddings in a LoRA file (``bundle_emb.<token>.<encoder>``):
#: new token vectors, not weight changes, so they are counted in the adapter's notes and not read as modules.
BUNDLED_EMBEDDINGS = "bundle_emb."


def all_prefixed(file: TensorFile | None) -> bool:
    if file is None or not file.keys:
        return False
    keys = [k for k in file.keys if not k.startswith(BUNDLED_EMBEDDINGS)]
    return bool(keys) and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)


def has_lycoris_parts(file: TensorFile) -> bool:
    return any(k.endswith(tuple(LYCORIS_SUFFIXES)) for k in file.keys)


def read_prefixed(path: Path, file: TensorFile | None, base_shapes: BaseShapes | None, fmt: str) -> Adapter:
    assert file is not None
    tensors = file.tensors()
    bundled = sorted({k.split(".")[1] for k in tensors if k.startswith(BUNDLED_EMBEDDINGS) and k.count(".") >= 1})
    tensors = {k: v for k, v in tensors.items() if not k.startswith(BUNDLED_EMBEDDINGS)}
    groups = split_keys(sorted(tensors), ALL_SUFFIXES, path)
    denoiser: dict[tuple[str, bool], ModuleWeights] = {}
    tagged: dict[tuple[str, str], ModuleWeights] = {}
    onetrainer = False
    for raw_name, parts in groups.items():
        prefix = next((p for p in KOHYA_PREFIXES if raw_name.startswith(p)), None)
        if prefix is None:
            raise FormatError(f"unknown module prefix in {raw_name!r}", path)
        onetrainer = onetrainer or prefix == "lora_transformer_"
        alpha = read_alpha(tensors[parts.pop("alpha")], raw_name + ".alpha", path) if "alpha" in parts else None
        rest = raw_name[len(prefix) :]
        if prefix == "lora_unet_" and rest.startswith("_"):
            rest = rest[1:]  # Wan-Fun writes `lora_unet__blocks_0_…` (ComfyUI's convert_lora_wan_fun)
        # A conv's shape may need the canonical name; SD's is known before the family is (LDM names).
        guess = kohya_module_to_canonical(raw_name) if prefix in DENOISER_PREFIXES else None
        mod = build_module(
            guess or raw_name,
            {p: tensors[k] for p, k in parts.items()},
            alpha=alpha,
            path=path,
            base_shapes=base_shapes,
        )
        if "bias" in parts and parts["bias"].endswith(".diff_b"):
            mod = unscaled_bias(mod)
        if prefix in DENOISER_PREFIXES:
            if (rest, True) in denoiser:
                raise FormatError(f"module {raw_name!r} appears twice", path)
            denoiser[(rest, True)] = mod
        else:
            tagged[(prefix, kohya_path_to_dotted(rest))] = mod
    adapter = assemble(
        path,
        "onetrainer" if onetrainer and fmt == "kohya" else fmt,
        denoiser=denoiser,
        tagged_text_encoders=tagged,
        metadata=file.metadata,
    )
    if not bundled:
        return adapter
    note = f"{len(bundled)} bundled embedding(s) ({', '.join(bundled[:5])}): token vectors, not part of ΔW"
    return dataclasses.replace(adapter, notes=(*adapter.notes, note))
