"""kohya-ss / LyCORIS single file: what diffusers, ComfyUI and A1111 all load (formats.md §6.4).

Keys ``<kohya name>.<part>`` with ``kohya name`` from :func:`wsa.families.names.kohya_name`
(``lora_unet_<diffusers path with _>``, ``lora_te_``, ``lora_te2_``). Plain LoRA/LoCon gets
``lora_down``/``lora_up`` (+ ``lora_mid`` for Tucker) and an explicit ``alpha = scale · rank``,
because every loader computes ``scale = alpha / lora_down.shape[0]`` (§2). LoHa, LoKr and full
modules get the LyCORIS keys (§3.4), a bias ``diff_b``, a DoRA magnitude ``dora_scale`` (§3.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from wsa.adapter import Adapter, ModuleWeights
from wsa.errors import ConfigError
from wsa.export._common import alpha_tensor, cast, header, most_common, num, save_safetensors
from wsa.families.names import kohya_name

# wsa part name -> file suffix, per kind.
_LORA = {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"}
_LOHA = {p: f".hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
_LOKR = {p: f".lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
_SUFFIXES = {"lora": _LORA, "loha": _LOHA, "lokr": _LOKR, "full": {"diff": ".diff"}}
#: Source-file metadata worth keeping (training provenance); hashes are dropped as they go stale.
_KEEP_PREFIXES = ("ss_", "modelspec.")


def _rank(m: ModuleWeights) -> int | None:
    """The rank every loader divides alpha by (``None``: the module has no alpha)."""
    t = m.tensors
    if m.kind == "lora":
        return int(t["down"].shape[0])
    if m.kind == "loha":
        return int(t["w1_b"].shape[0])
    if m.kind == "lokr":  # ComfyUI/LyCORIS: w1_b's inner dim, else w2_b's; none when both factors are full
        for key in ("w1_b", "w2_b"):
            if key in t:
                return int(t[key].shape[0])
    return None


def _magnitude_shape(m: ModuleWeights) -> tuple[int, ...]:
    """LyCORIS ``dora_scale`` shape: ``(out, 1, …)`` on the output axis, ``(1, in, 1, …)`` on the input axis."""
    ones = [1] * (len(m.shape) - 2)
    if m.dora_axis == "in":
        return (1, m.shape[1], *ones)
    return (m.shape[0], 1, *ones)


def module_tensors(name: str, m: ModuleWeights, dtype: torch.dtype) -> dict[str, Tensor]:
    """The file tensors of one module under its kohya name."""
    key = kohya_name(name)
    parts: dict[str, Tensor] = {p: t for p, t in m.tensors.items() if p not in ("bias", "magnitude")}
    rank = _rank(m)
    if m.kind == "lokr" and rank is None and m.scale != 1.0:
        # LyCORIS and ComfyUI ignore alpha when both Kronecker factors are full: fold the scale into W1.
        parts["w1"] = parts["w1"].to(torch.float32) * m.scale
    out = {key + _SUFFIXES[m.kind][p]: cast(t, dtype) for p, t in parts.items()}
    if rank is not None:
        out[key + ".alpha"] = alpha_tensor(m.scale * rank)
    if "bias" in m.tensors:
        # `.diff_b` is the bias change itself (ComfyUI adds it unscaled); wsa's factor-module bias is scaled.
        bias = m.tensors["bias"] if m.kind == "full" else m.tensors["bias"].to(torch.float64) * m.scale
        out[key + ".diff_b"] = cast(bias, dtype)
    if m.is_dora:
        out[key + ".dora_scale"] = cast(m.tensors["magnitude"].reshape(_magnitude_shape(m)), dtype)
    return out


def _kohya_metadata(adapter: Adapter, fmt_header: Mapping[str, str]) -> dict[str, str]:
    """kohya's minimal network metadata (``build_minimum_network_metadata``) plus the source's ``ss_*``."""
    meta = {
        k: v
        for k, v in adapter.metadata.items()
        if k.startswith(_KEEP_PREFIXES) and "hash" not in k and adapter.format in ("kohya", "lycoris")
    }
    lycoris = any(m.kind != "lora" or "mid" in m.tensors for m in adapter.modules.values())
    ranked = [(r, m.scale * r) for m in adapter.modules.values() if (r := _rank(m)) is not None]
    meta["ss_network_module"] = "lycoris.kohya" if lycoris else "networks.lora"
    if ranked:
        meta["ss_network_dim"] = str(most_common(r for r, _ in ranked))
        meta["ss_network_alpha"] = str(num(most_common(a for _, a in ranked)))
    meta["format"] = "pt"
    meta.update(fmt_header)
    return meta


def write(adapter: Adapter, out: Path, *, metadata: Mapping[str, str] | None, dtype: torch.dtype) -> Path:
    if out.is_dir() or out.suffix != ".safetensors":
        raise ConfigError("format 'kohya' writes one file; give a path ending in .safetensors", out)
    tensors: dict[str, Tensor] = {}
    for name, m in adapter.modules.items():
        written = module_tensors(name, m, dtype)
        if written.keys() & tensors.keys():
            raise ConfigError(f"module {name!r} gets the same kohya name as another module", adapter.path)
        tensors.update(written)
    return save_safetensors(out, tensors, _kohya_metadata(adapter, header(adapter, "kohya", metadata)))
