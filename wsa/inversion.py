"""Inversion: one image → a point of the space (a model of that identity), by the diffusion loss.

w2w (arXiv 2406.09413 §3.3) optimises the first k PC coefficients of a LoRA so that the base model with
that LoRA denoises noisy copies of the single image well, under the identity prompt; staying inside the
space is what keeps the result a valid identity model even for out-of-domain images (a painting).
Here the coefficients are optimised *whitened* (``z = u · σ_pc``, σ_pc the collection's standard
deviation per PC), so one learning rate suits every component, and an optional Gaussian prior
``prior_weight · mean(u²)`` keeps the point near the collection. A mask restricts the loss to pixels.

The comparison the paper makes — fine-tuning a LoRA directly on the one image — is
:func:`finetune_on_image` (same base, targets, rank and prompt as the zoo).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsa.decoding.batched_lora import BatchedLoRA, LowRankStack
from wsa.errors import ConfigError
from wsa.store.layout import Layout
from wsa.text import terminal_safe


@dataclass
class InversionResult:
    point: np.ndarray  # the model as a point of the space (a row, or member weights in a ΔW space)
    coefficients: np.ndarray  # (k,) PC coefficients
    losses: list[float]
    seconds: float


def load_image(path: str, size: int, mask: bool = False) -> Tensor:
    """An image file as (3, size, size) in [0, 1] (mask: (1, size, size), white = used), area-resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if mask else "RGB")
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        # PIL refuses images over ~179 M pixels (a decompression bomb) and raises SyntaxError on some corrupt PNGs
        raise ConfigError(f"{path}: cannot read image ({terminal_safe(exc, 200)})") from None
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if mask else tensor.permute(2, 0, 1)
    return F.interpolate(tensor[None], size=(size, size), mode="area")[0].clamp(0, 1)


class _DiffusionObjective:
    """The denoising loss of a decoder's base on M images, shared by inversion and direct fine-tuning.

    Holds what both set up the same way — the frozen base on its device, the images in [−1, 1], masks,
    the prompt's context, the noise schedule and a seeded generator — and ``(stacks) -> loss``: the sum
    over the M images of each one's mean noise-prediction error (``batch`` noise draws each), image i
    under LoRA ``stacks`` member i.
    """

    def __init__(self, decoder: Any, image: Tensor, mask: Tensor | None, batch: int, seed: int) -> None:
        from wsa.decoding.schedule import alphas_cumprod

        self.single = image.ndim == 3
        images = image[None] if self.single else image
        masks = None if mask is None else (mask[None] if self.single else mask)
        self.device = torch.device(decoder.device)
        self.model = decoder.model.to(self.device).eval().requires_grad_(False)
        self.m = images.shape[0]
        self.batch = batch
        self.target = images.to(self.device).float() * 2 - 1
        self.masks = None if masks is None else masks.to(self.device).float()
        with torch.no_grad():
            self.context = self.model.encode_prompts([decoder.prompt]).detach()
        self.alphas = alphas_cumprod(self.model.config).to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, stacks: dict[str, Any]) -> Tensor:
        m, batch, device = self.m, self.batch, self.device
        x0 = self.target.repeat_interleave(batch, 0)
        t = torch.randint(0, self.alphas.shape[0], (m * batch,), device=device, generator=self.generator)
        noise = torch.randn(x0.shape, device=device, generator=self.generator)
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        assignment = torch.arange(m, device=device).repeat_interleave(batch)
        with BatchedLoRA(self.model.unet, stacks).active(assignment):
            predicted = self.model.unet(noisy, t, self.context.expand(m * batch, -1, -1)).sample
        error = (predicted.float() - noise).pow(2)
        if self.masks is not None:
            w = self.masks.repeat_interleave(batch, 0)
            per = (error * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * error.shape[1]).clamp(min=1.0)
        else:
            per = error.mean(dim=(1, 2, 3))
        return per.view(m, batch).mean(1).sum()


def invert(
    ws: Any,
    decoder: Any,
    image: Tensor,
    *,
    mask: Tensor | None = None,
    k: int | None = None,
    steps: int = 400,
    lr: float = 0.05,
    batch: int = 8,
    prior_weight: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> InversionResult:
    """Optimise ``k`` PC coefficients of ``ws`` so the base denoises ``image`` (3, S, S) in [0, 1].

    ``image`` may also be a batch (M, 3, S, S) (with ``mask`` (M, 1, S, S)): M independent inversions
    in one pass (each image's loss only reaches its own coefficients); ``point``/``coefficients`` are then
    (M, ·) / (M, k) and ``losses`` the mean over images. Either geometry: the coefficients reach the
    weights through ``ws.points.torch_stacks`` (explicit rows, or a ΔW space's stacked member factors).
    """
    import time

    from tqdm.auto import tqdm

    space, points = ws.space, ws.points
    k = space.n_components if k is None else int(k)
    if not 1 <= k <= space.n_components:
        raise ConfigError(f"k must be in [1, {space.n_components}] (the space's components); got {k}")
    if steps < 1 or batch < 1 or lr <= 0 or prior_weight < 0:
        raise ConfigError("steps and batch must be >= 1, lr > 0 and prior_weight >= 0")
    started = time.time()
    objective = _DiffusionObjective(decoder, image, mask, batch, seed)
    device = objective.device
    sigma = torch.as_tensor(np.sqrt(np.maximum(np.asarray(space.explained_variance[:k]), 1e-12)), device=device).float()
    start = np.asarray(space.coefficients[:, :k], dtype=np.float32).mean(0)  # the collection's mean model
    u = torch.nn.Parameter((torch.as_tensor(start, device=device) / sigma).repeat(objective.m, 1))
    optimizer = torch.optim.Adam([u], lr=lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="invert", disable=None if progress else True, file=sys.stderr)
    for _ in bar:
        loss = objective(points.torch_stacks(u * sigma))  # the same map z → weights in either geometry
        total = loss + prior_weight * u.pow(2).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(loss.detach()) / objective.m)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    coefficients = (u * sigma).detach().cpu().numpy()
    found = points.from_coefficients(coefficients)
    if objective.single:
        found, coefficients = found[0], coefficients[0]
    return InversionResult(point=found, coefficients=coefficients, losses=losses, seconds=time.time() - started)


def finetune_on_image(
    decoder: Any,
    image: Tensor,
    layout: Layout,
    *,
    mask: Tensor | None = None,
    steps: int = 400,
    lr: float = 1e-2,
    batch: int = 8,
    init_seed: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """The paper's baseline: a LoRA of the space's layout fine-tuned directly on the one image.

    Same targets and rank as the layout's LoRA modules, PEFT initialisation from ``init_seed`` (as the
    zoo); returns the result as a row of the layout (raw representation). A batch of images (M, 3, S, S)
    gives M independent LoRAs (rows (M, D)).
    """
    from tqdm.auto import tqdm

    if layout.repr != "raw" or any(
        m.kind != "lora" or {p.name for p in m.parts} != {"down", "up"} for m in layout.modules
    ):
        raise ConfigError("direct fine-tuning writes raw LoRA rows; this space's layout is not a raw LoRA layout")
    objective = _DiffusionObjective(decoder, image, mask, batch, seed)
    m, device = objective.m, objective.device
    g = torch.Generator().manual_seed(init_seed)
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for ml in layout.modules:
        out_f, in_f = ml.shape[:2]
        bound = 1.0 / np.sqrt(in_f)
        down = ((torch.rand(ml.rank, in_f, generator=g) * 2 - 1) * bound).expand(m, -1, -1).clone()
        params[ml.name] = (
            torch.nn.Parameter(down.to(device)),
            torch.nn.Parameter(torch.zeros(m, out_f, ml.rank, device=device)),
        )
    optimizer = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr, betas=(0.9, 0.99))
    scale = {ml.name: torch.full((m,), ml.scale, device=device) for ml in layout.modules}
    for _ in tqdm(range(steps), desc="fine-tune", disable=None if progress else True, file=sys.stderr):
        stacks = {n: LowRankStack(params[n][0], params[n][1], scale[n]) for n in params}
        loss = objective(stacks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    rows = np.zeros((m, layout.n_features), dtype=np.float32)
    for ml in layout.modules:
        down, up = params[ml.name]
        for part in ml.parts:
            value = down if part.name == "down" else up
            rows[:, part.offset : part.offset + part.size] = value.detach().float().cpu().numpy().reshape(m, -1)
    return rows[0] if objective.single else rows
