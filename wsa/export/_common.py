"""Shared by every exporter: module checks, the ``wsa`` header, dtype casting and atomic writes.

Why atomic writes: an exporter that dies half-way must never leave a truncated file under the
final name, because every reader (wsa's, diffusers', ComfyUI's) would then fail on it later or,
worse, a half-written folder would look complete. Each file goes to a temp file in the same
directory, is fsynced, then renamed over the target with ``os.replace``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

import wsa
from wsa.adapter import Adapter, ModuleWeights
from wsa.atomic import write_with
from wsa.errors import ConfigError

#: dtypes the exporters write; alphas are always float32 (see :func:`alpha_tensor`).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Canonical module prefix -> pipeline component name ("" = the denoiser).
COMPONENT_PREFIXES = {"text_encoder_2.": "text_encoder_2", "text_encoder.": "text_encoder"}
DENOISER = "unet"


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"cannot write dtype {dtype}; choose one of {', '.join(map(str, DTYPES))}")
    return dtype


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous CPU copy in ``dtype`` (a copy, so no two written tensors share storage)."""
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def alpha_tensor(alpha: float) -> Tensor:
    """A 0-dim float32 ``alpha``.

    Why float32 whatever the factor dtype: every loader reads ``alpha / rank`` from this scalar, and
    an alpha like ``scale · rank = 1.2`` is not representable in fp16/bf16, which would change the
    scale silently (kohya casts alphas to the save dtype; we don't copy that).
    """
    return torch.tensor(float(alpha), dtype=torch.float32)


def split_component(name: str) -> tuple[str, str]:
    """Canonical module name -> (component, path inside that component)."""
    for prefix, component in COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    return DENOISER, name


def by_component(adapter: Adapter) -> dict[str, dict[str, ModuleWeights]]:
    """``{component: {path in component: module}}``, denoiser first."""
    out: dict[str, dict[str, ModuleWeights]] = {}
    for name, module in adapter.modules.items():
        component, path = split_component(name)
        out.setdefault(component, {})[path] = module
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != DENOISER, kv[0])))


def num(x: float) -> float | int:
    """JSON-friendly number: ``4`` rather than ``4.0`` when the value is integral."""
    return int(x) if float(x).is_integer() else float(x)


def most_common(values: Iterable[float]) -> float | int:
    """The most frequent value; ties go to the smallest, so the choice is deterministic."""
    counts = Counter(num(v) for v in values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def require_plain_lora(adapter: Adapter, fmt: str) -> None:
    """Raise unless every module is a LoRA that a ``lora_A``/``lora_B`` format can hold.

    Why: PEFT's and diffusers' LoRA layers have no place for LoHa/LoKr/full factors, a Tucker
    ``lora_mid`` or an input-axis DoRA magnitude; writing them anyway would drop or corrupt ΔW.
    """
    problems = []
    for name, m in adapter.modules.items():
        if m.kind != "lora":
            problems.append(f"{name} is {m.kind}")
        elif "mid" in m.tensors:
            problems.append(f"{name} is a Tucker LoCon (lora_mid)")
        elif m.is_dora and m.dora_axis != "out":
            problems.append(f"{name} has an input-axis DoRA magnitude")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError(
            f"format {fmt!r} holds only plain LoRA modules, but {'; '.join(problems[:3])}{more}; "
            "write format 'kohya' instead (LyCORIS keys, loaded by ComfyUI and A1111)",
            adapter.path,
        )


def header(adapter: Adapter, fmt: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The ``wsa`` header entry: provenance as one sorted-key JSON string (style.md §2).

    The caller's ``extra`` entries are merged in; the provenance keys win so they stay truthful.
    """
    info: dict[str, object] = dict(extra or {})
    info.update(wsa_version=wsa.__version__, source=adapter.path, source_format=adapter.format, format=fmt)
    try:
        return {"wsa": json.dumps(info, sort_keys=True)}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata must be JSON-serialisable strings ({exc})") from None


def save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` with string ``metadata`` to ``path`` atomically."""
    return write_with(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


def save_json(path: Path, obj: object) -> Path:
    """Write ``obj`` as indented, sorted-key JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return write_with(path, lambda tmp: Path(tmp).write_text(text))
