"""Adapters → per-layer stacks for :class:`~wsa.decoding.BatchedLoRA` (factored when possible, else dense)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from wsa.adapter import Adapter, ModuleWeights
from wsa.decoding.batched_lora import DenseStack, LowRankStack, Stack


def _plain(m: ModuleWeights | None, rank: int) -> bool:
    return m is None or (
        m.kind == "lora" and not m.is_dora and set(m.tensors) == {"down", "up"} and m.rank == rank and len(m.shape) == 2
    )


def stacks_from_adapters(
    adapters: Sequence[Adapter],
    base_weight: Callable[[str], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Stack]:
    """One stack per module present in any adapter; an adapter without a module contributes zero there.

    Plain LoRA modules of one rank in every adapter stay factored (``LowRankStack``: memory M·r·(in+out));
    anything else (LoHa, LoKr, full, DoRA, mixed ranks) becomes dense ΔW per adapter (``DenseStack``).
    ``base_weight(module)`` supplies the base layer's weight where DoRA needs it.
    """
    names = sorted({name for a in adapters for name in a.modules})
    stacks: dict[str, Stack] = {}
    for name in names:
        mods = [a.modules.get(name) for a in adapters]
        present = [m for m in mods if m is not None]
        rank = present[0].rank
        shape = present[0].shape
        if all(_plain(m, rank) for m in mods):
            r, (out_f, in_f) = rank, shape
            down = torch.zeros(len(mods), r, in_f, dtype=dtype)
            up = torch.zeros(len(mods), out_f, r, dtype=dtype)
            scale = torch.zeros(len(mods), dtype=dtype)
            for i, m in enumerate(mods):
                if m is not None:
                    down[i], up[i], scale[i] = m.tensors["down"].to(dtype), m.tensors["up"].to(dtype), m.scale
            stacks[name] = LowRankStack(down, up, scale)
        else:
            delta = torch.zeros(len(mods), *shape[:2], dtype=dtype)
            for i, (adapter, m) in enumerate(zip(adapters, mods, strict=True)):
                if m is not None:
                    weight = base_weight(name) if (m.is_dora and base_weight is not None) else None
                    delta[i] = adapter.delta(name, weight).reshape(shape[:2]).to(dtype)
            stacks[name] = DenseStack(delta)
    return stacks
