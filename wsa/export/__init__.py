"""Writing an :class:`~wsa.adapter.Adapter` back out as files other tools load.

Formats (formats.md §6): ``"kohya"`` (one ``.safetensors`` that diffusers, ComfyUI and A1111 all
load; the only one that holds LoHa/LoKr/full/Tucker/input-axis DoRA), ``"peft"`` (an
``adapter_config.json`` folder for ``PeftModel.from_pretrained``) and ``"diffusers"``
(``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``). Every written file is
read back by :func:`wsa.load_adapter` with the same ΔW per module, and carries a ``wsa`` header
entry recording where it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from wsa.adapter import Adapter
from wsa.export import diffusers, kohya, peft
from wsa.export._common import check_dtype
from wsa.registry import Registry

Writer = Callable[..., Path]
WRITERS: Registry[Writer] = Registry("export format")
WRITERS.register("kohya")(kohya.write)
WRITERS.register("peft")(peft.write)
WRITERS.register("diffusers")(diffusers.write)


def write_adapter(
    adapter: Adapter,
    out: str | Path,
    format: str = "peft",
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``adapter`` in ``format`` at ``out`` and return the path written.

    Parameters
    ----------
    adapter : the adapter to write; module names are canonical (``wsa.families.names``).
    out : ``"kohya"``: a ``.safetensors`` file path. ``"peft"``: a folder (with ``unet/`` and
        ``text_encoder/`` subfolders when the adapter has text-encoder modules).
        ``"diffusers"``: a folder (gets ``pytorch_lora_weights.safetensors``) or a ``.safetensors`` path.
    format : ``"kohya"``, ``"peft"`` or ``"diffusers"``.
    metadata : extra string entries merged into the ``wsa`` JSON header entry.
    dtype : tensor dtype on disk, float32 (default), float16 or bfloat16; alphas stay float32.

    Raises
    ------
    ConfigError : unknown format or dtype, a path of the wrong kind, or modules the format
        cannot hold (e.g. LoHa as diffusers; the message suggests ``"kohya"``).
    """
    writer = WRITERS.get(format)
    return writer(adapter, Path(out), metadata=metadata, dtype=check_dtype(dtype))


__all__ = ["WRITERS", "write_adapter"]
