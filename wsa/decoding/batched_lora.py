"""Different low-rank adapters for different samples of one batch, on one copy of the model.

Why: a zoo of 1,000 LoRAs is trained, and a 4×4 grid of sampled models is decoded, in one batched
pass each, not one model copy (or one ``load_lora_weights``) per adapter. A forward hook on each
target ``nn.Linear`` adds, for sample ``b`` using adapter ``m = assignment[b]``::

    y_b += scale_m · (x_b @ down_mᵀ) @ up_mᵀ        (factored; rank r)
    y_b += x_b @ ΔW_mᵀ                              (dense; any adapter kind, after ``Adapter.delta``)

which is exactly what PEFT's LoRA layer computes for one adapter (``lora_B(lora_A(x)) * scaling``).
Factors may be ``nn.Parameter``s: gradients flow into each adapter's own slice only, so training M
adapters at once with a summed loss is M independent trainings sharing the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wsa.errors import ConfigError


@dataclass
class LowRankStack:
    """Factors of M adapters on one layer: ``down`` (M, r, in), ``up`` (M, out, r), ``scale`` (M,)."""

    down: Tensor
    up: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        m, r, _ = self.down.shape
        if self.up.shape[0] != m or self.up.shape[2] != r or self.scale.shape != (m,):
            raise ConfigError(
                f"factor shapes do not agree: down {tuple(self.down.shape)}, up {tuple(self.up.shape)}, "
                f"scale {tuple(self.scale.shape)}"
            )

    def apply(self, x: Tensor, index: Tensor) -> Tensor:
        down, up = self.down[index].to(x.dtype), self.up[index].to(x.dtype)
        inner = torch.bmm(x, down.transpose(1, 2)) * self.scale[index].to(x.dtype)[:, None, None]
        return torch.bmm(inner, up.transpose(1, 2))


@dataclass
class DenseStack:
    """Dense updates of M adapters on one layer: ``delta`` (M, out, in)."""

    delta: Tensor

    def apply(self, x: Tensor, index: Tensor) -> Tensor:
        return torch.bmm(x, self.delta[index].to(x.dtype).transpose(1, 2))


Stack = LowRankStack | DenseStack


class BatchedLoRA:
    """Per-sample adapters on named ``nn.Linear`` layers (forward hooks; the weights stay untouched).

    Parameters
    ----------
    model : the module whose layers are adapted (e.g. a diffusers ``UNet2DConditionModel``), or a
        mapping from layer name to layer (to adapt several models at once, e.g. a pipeline's UNet and
        text encoder under wsa's canonical names).
    stacks : layer path → :class:`LowRankStack` or :class:`DenseStack`; every stack holds the same
        number M of adapters.

    Use ``with lora.active(assignment):`` around forward passes, where ``assignment`` (B,) gives the
    adapter of each sample (``-1``: none, i.e. the base model). A layer called on a batch that is a
    multiple of B (classifier-free guidance concatenates [unconditional; conditional]) gets the
    assignment tiled. :meth:`switch` changes the assignment mid-run (delayed injection).
    """

    def __init__(self, model: nn.Module | Mapping[str, nn.Module], stacks: Mapping[str, Stack]) -> None:
        modules = dict(model.named_modules()) if isinstance(model, nn.Module) else dict(model)
        missing = sorted(set(stacks) - set(modules))
        if missing:
            raise ConfigError(f"the model has no layer(s) {missing[:3]} ({len(missing)} missing)")
        sizes = {_size(s) for s in stacks.values()}
        if len(sizes) > 1:
            raise ConfigError(f"stacks hold different numbers of adapters: {sorted(sizes)}")
        for name in stacks:
            if not isinstance(modules[name], nn.Linear):
                raise ConfigError(f"layer {name!r} is a {type(modules[name]).__name__}, not nn.Linear")
        self.stacks = dict(stacks)
        self.n_adapters = sizes.pop() if sizes else 0
        self._modules = {name: modules[name] for name in stacks}
        self._index: Tensor | None = None
        self._cache: dict[tuple[torch.device, int], tuple[Tensor, Tensor, bool]] = {}

    def to(self, device: torch.device | str) -> BatchedLoRA:
        """Move every stack's tensors to ``device`` (in place; returns self)."""
        for name, stack in self.stacks.items():
            if isinstance(stack, LowRankStack):
                self.stacks[name] = LowRankStack(stack.down.to(device), stack.up.to(device), stack.scale.to(device))
            else:
                self.stacks[name] = DenseStack(stack.delta.to(device))
        return self

    def switch(self, assignment: Tensor | Sequence[int]) -> None:
        """Use ``assignment`` from the next forward pass on (inside :meth:`active`)."""
        index = torch.as_tensor(assignment, dtype=torch.long)
        if index.ndim != 1:
            raise ConfigError("assignment must be one adapter index per sample")
        if len(index) and (int(index.max()) >= self.n_adapters or int(index.min()) < -1):
            raise ConfigError(f"assignment has indices outside [-1, {self.n_adapters - 1}]")
        self._index = index
        self._cache = {}

    def _prepared(self, device: torch.device, batch: int, name: str) -> tuple[Tensor, Tensor, bool]:
        assert self._index is not None
        key = (device, batch)
        if key not in self._cache:
            n = len(self._index)
            if n == 0 or batch % n:
                raise ConfigError(f"layer {name!r} got a batch of {batch} but the assignment has {n} entries")
            index = self._index.to(device).repeat(batch // n)
            used = index >= 0
            self._cache[key] = (index.clamp(min=0), used, bool(used.all()))
        return self._cache[key]

    @contextmanager
    def active(self, assignment: Tensor | Sequence[int]) -> Iterator[BatchedLoRA]:
        self.switch(assignment)
        handles = []

        def hook(name: str):
            stack = self.stacks[name]

            def add(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
                x = inputs[0]
                idx, used, all_used = self._prepared(x.device, x.shape[0], name)
                flat = x.reshape(x.shape[0], -1, x.shape[-1])
                extra = stack.apply(flat, idx)
                if not all_used:
                    extra = extra * used[:, None, None].to(extra.dtype)
                return output + extra.reshape(output.shape)

            return add

        try:
            for name, module in self._modules.items():
                handles.append(module.register_forward_hook(hook(name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._index, self._cache = None, {}


def _size(stack: Stack) -> int:
    return int(stack.down.shape[0] if isinstance(stack, LowRankStack) else stack.delta.shape[0])
