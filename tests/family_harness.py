"""Shared by the per-family tests: the ΔW diffusers itself computes for a LoRA file on a tiny model.

The reference is diffusers' own loading path: ``<Family>LoraLoaderMixin.lora_state_dict`` (where
every trainer-format converter runs) and ``ModelMixin.load_lora_adapter``, then PEFT's merge
(``tests.tiny.reference_deltas``: merged minus base weight, in float64).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

import wsa
from tests.tiny import reference_deltas, relative_error


def diffusers_deltas(mixin: type, model: nn.Module, file: Path, prefix: str = "transformer") -> dict[str, Tensor]:
    """ΔW per diffusers module path for ``file`` loaded by ``mixin`` into ``model`` (left unloaded after)."""
    kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(mixin.lora_state_dict).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mixin.lora_state_dict(str(file), **kwargs)
        state, alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        # diffusers' kohya Flux converter leaves the top-level modules (x_embedder, proj_out, norm_out, ...)
        # without the component prefix, and load_lora_adapter(prefix=...) would then drop them silently;
        # they are the denoiser's, so they get the prefix here.
        state = {
            (k if k.startswith(f"{prefix}.") else f"{prefix}.{k}"): v
            for k, v in state.items()
            if not k.startswith("text_encoder")
        }
        model.load_lora_adapter(state, network_alphas=alphas, prefix=prefix, adapter_name="default")
    try:
        return reference_deltas(model)
    finally:
        model.delete_adapters("default")


def assert_same_deltas(file: Path, reference: Mapping[str, Tensor], family: str, rtol: float = 1e-5) -> wsa.Adapter:
    """wsa's adapter for ``file`` has exactly ``reference``'s denoiser modules and the same ΔW for each."""
    adapter = wsa.load_adapter(file)
    assert adapter.family == family, (adapter.family, adapter.family_source)
    denoiser = {n for n in adapter.modules if not n.startswith("text_encoder")}
    assert denoiser == set(reference), (sorted(denoiser ^ set(reference)))[:6]
    for name, expected in reference.items():
        got = adapter.delta(name)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        assert relative_error(got, expected) < rtol, (name, relative_error(got, expected))
    return adapter


def random_lora(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(down, up)`` with both factors non-zero, so ΔW is not trivially zero."""
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    return down, up


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of every Linear of ``model``."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}  # type: ignore[misc]


def lora_factors(
    targets: Mapping[str, nn.Module], seed: int, names: set[str] | None = None, rank: int | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (down, up)}`` for ``targets`` (sorted), ranks 1-5 in turn unless ``rank``.

    Conv factors are ``r × in × kh × kw`` / ``out × r × 1 … 1`` (a LoRA on a conv puts the kernel in down).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, mod) in enumerate(sorted(targets.items())):
        if names is not None and name not in names:
            continue
        r, w = rank or 1 + i % 5, mod.weight
        down, up = random_lora(w.shape[0], w[0].numel(), r, g)
        out[name] = (down.reshape(r, *w.shape[1:]), up.reshape(w.shape[0], r, *[1] * (w.ndim - 2)))
    return out


def write_keyed(path: Path, factors: Mapping[str, tuple[Tensor, Tensor]], prefix: str = "transformer.", metadata=None):
    """A diffusers/PEFT-keyed file: ``<prefix><path>.lora_A.weight`` / ``.lora_B.weight``."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_kohya(path: Path, factors: Mapping[str, tuple[Tensor, Tensor]], prefix: str, alpha: float, metadata=None):
    """``<prefix><path with _>`` with ``lora_up = B · rank / alpha`` (ΔW unchanged) and alpha per module."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (down, up) in factors.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up * (down.shape[0] / alpha)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=metadata)
    return path
