"""Train a family's base model: epsilon-prediction DDPM on images rendered on the fly, EMA weights saved.

Why on the fly: a family renders any identity under any nuisance, so the base model sees a fresh
sample of the family's distribution in (almost) every batch instead of a fixed dataset. The identity
is *not* in the prompt: the base learns the family; identities are bound later by LoRAs (``sks``).

Data flow. Chunks of ``batch_size × chunk_batches`` images (identities drawn from a fixed table of
``n_identities``, fresh nuisance) are rendered by a background thread on the CPU — torch releases the
GIL, so on a GPU machine rendering overlaps training — and each chunk is used for ``chunk_reuse``
shuffled passes. Everything about step ``s`` (its chunk, its permutation, noise, timesteps, prompt
dropout) is a function of ``(seed, s)``, so a run resumed from ``checkpoint.pt`` continues exactly.

Run on a GPU (the shipped weights)::

    python -m wsa.worlds.train_base --family faces --out wsa/worlds/assets/faces/base --max-minutes 8.5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsa.atomic import write_with
from wsa.decoding.schedule import alphas_cumprod
from wsa.devices import resolve_device
from wsa.errors import ConfigError
from wsa.images import image_grid
from wsa.worlds.model import BaseModel, ModelConfig
from wsa.worlds.runtime import config_parser, hardware

CHECKPOINT = "checkpoint.pt"
_FREE_OPTIONS = ("max_minutes", "progress", "device", "log_every", "grid_images")  # may change on resume


@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`train_base` (the command-line flags are generated from these fields).

    Defaults target one H100 for < 9 minutes (see the module docstring of :mod:`wsa.worlds.model`).
    """

    n_identities: int = 5000  # identities the base model sees (a fixed table, seed ``seed``)
    steps: int = 8000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 250
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # share of empty prompts (classifier-free guidance)
    chunk_batches: int = 16  # batches rendered at once
    chunk_reuse: int = 2  # shuffled passes over each rendered chunk
    checkpoint_every: int = 500
    log_every: int = 100
    max_minutes: float = 0.0  # stop (checkpoint + write the folder) after this wall time; 0 = no limit
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    grid_images: int = 32  # samples drawn into samples.png at the end (0: no grid)
    progress: bool = True


def train_base(
    family: Any,
    out: str | Path,
    *,
    model_config: ModelConfig | None = None,
    **options: Any,
) -> BaseModel:
    """Train (or resume) a base model of ``family`` into the folder ``out``.

    Parameters
    ----------
    family : a :class:`wsa.worlds.family.Family` instance
    out : folder; receives ``checkpoint.pt`` while training, then ``model.safetensors``, ``model.json``
        and ``samples.png``. An existing checkpoint there is resumed (same options required).
    model_config : architecture (default :class:`ModelConfig`)
    **options : fields of :class:`TrainConfig`

    Returns
    -------
    BaseModel holding the EMA weights (float32, on CPU).
    """
    unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(TrainConfig.__dataclass_fields__)}")
    cfg = TrainConfig(**options)
    model_config = model_config or ModelConfig()
    _validate(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.time()

    model = BaseModel(model_config, family.vocabulary(), family.name, seed=cfg.seed).to(device)
    ema = [p.detach().clone().float() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    alphas = alphas_cumprod(model_config).to(device)

    step, elapsed_before, losses = 0, 0.0, []
    checkpoint_path = out / CHECKPOINT
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["config"] != _plain(asdict(cfg), drop=_FREE_OPTIONS):
            raise ConfigError(
                "checkpoint was written with other training options; use the same options or another --out",
                checkpoint_path,
            )
        model.load_state_dict(state["model"])
        for e, saved in zip(ema, state["ema"], strict=True):
            e.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, elapsed_before, losses = int(state["step"]), float(state["elapsed_s"]), list(state["losses"])

    stream = ChunkStream(family, cfg, model, start_step=step)
    bar = _progress(cfg, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    stopped_early = False
    model.train()
    try:
        while step < cfg.steps:
            images, ids = stream.batch(step, device)
            g = torch.Generator(device).manual_seed(_step_seed(cfg.seed, step))
            with autocast:
                loss = diffusion_loss(model, images, ids, alphas, g, cfg.prompt_dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in model.parameters()], 1 - decay)
            if step % cfg.log_every == 0 or step == cfg.steps:
                value = loss.detach().item()
                losses.append([step, value])
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            bar.update(1)
            over_time = cfg.max_minutes > 0 and (time.time() - started) > cfg.max_minutes * 60
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or over_time:
                _save_checkpoint(
                    checkpoint_path,
                    model,
                    ema,
                    optimizer,
                    schedule,
                    step,
                    cfg,
                    elapsed_before + time.time() - started,
                    losses,
                )
            if over_time and step < cfg.steps:
                stopped_early = True
                break
    finally:
        stream.close()
        bar.close()

    # The shipped model holds the EMA weights.
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema, strict=True):
            p.copy_(e)
    model = model.float().cpu().eval()
    model.info = {
        "steps_done": step,
        "steps_planned": cfg.steps,
        "stopped_early": stopped_early,
        "options": _plain(asdict(cfg)),
        "hardware": hardware(device),
        "train_seconds": round(elapsed_before + time.time() - started, 1),
        "losses": losses,
        "command": "python -m wsa.worlds.train_base " + " ".join(_flags(cfg, family.name, out)),
    }
    model.save(out)
    if cfg.grid_images > 0:
        _write_samples(model, family, out / "samples.png", cfg.seed, cfg.grid_images)
    return model


def diffusion_loss(
    model: BaseModel,
    images: Tensor,
    ids: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator,
    prompt_dropout: float = 0.0,
) -> Tensor:
    """Epsilon-prediction MSE at uniform timesteps (DDPM), prompts dropped to padding with ``prompt_dropout``.

    ``images`` (B, 3, H, W) in [-1, 1]; ``ids`` (B, L); all randomness from ``generator``.
    """
    b, device = images.shape[0], images.device
    t = torch.randint(0, alphas_cumprod.shape[0], (b,), device=device, generator=generator)
    noise = torch.randn(images.shape, device=device, generator=generator)
    keep = torch.rand(b, device=device, generator=generator) >= prompt_dropout
    ids = ids * keep[:, None]
    a = alphas_cumprod[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    return torch.nn.functional.mse_loss(model(noisy, t, ids).float(), noise)


class ChunkStream:
    """Batches for step ``s``: chunk ``s // (chunk_batches × chunk_reuse)``, rendered in a background thread."""

    def __init__(self, family: Any, cfg: TrainConfig, model: BaseModel, start_step: int = 0) -> None:
        self.family, self.cfg = family, cfg
        self.size = model.config.image_size
        self.tokenizer = model.tokenizer
        self.identities = family.sample_identities(cfg.n_identities, cfg.seed)
        self.steps_per_chunk = cfg.chunk_batches * cfg.chunk_reuse
        self._token_cache: dict[str, list[int]] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._current: tuple[int, Tensor, Tensor] | None = None
        first = start_step // self.steps_per_chunk
        self._thread = threading.Thread(target=self._produce, args=(first,), daemon=True)
        self._thread.start()

    def render_chunk(self, index: int) -> tuple[Tensor, Tensor]:
        """Chunk ``index``: images (N, 3, S, S) in [-1, 1] and token ids (N, L), a function of (seed, index)."""
        n = self.cfg.batch_size * self.cfg.chunk_batches
        rng = np.random.default_rng([self.cfg.seed, 17, index])
        rows = self.identities.iloc[rng.integers(0, len(self.identities), n)].reset_index(drop=True)
        nuisance = self.family.sample_nuisance(n, seed=int(rng.integers(0, 2**31)))
        images = self.family.render(rows, nuisance, size=self.size) * 2 - 1
        ids = torch.tensor([self._ids(p) for p in self.family.prompts(nuisance)], dtype=torch.long)
        return images, ids

    def _ids(self, prompt: str) -> list[int]:
        if prompt not in self._token_cache:
            self._token_cache[prompt] = self.tokenizer.ids(prompt)
        return self._token_cache[prompt]

    def _produce(self, index: int) -> None:
        try:
            while not self._stop.is_set():
                item = (index, *self.render_chunk(index))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                index += 1
        except BaseException as exc:  # surfaced in batch()
            self._queue.put((-1, exc, None))

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        index, within = divmod(step, self.steps_per_chunk)
        while self._current is None or self._current[0] != index:
            got = self._queue.get()
            if got[0] == -1:
                raise got[1]
            self._current = (got[0], got[1].to(device, non_blocking=True), got[2].to(device))
        _, images, ids = self._current
        rounds, position = divmod(within, self.cfg.chunk_batches)
        order = np.random.default_rng([self.cfg.seed, 23, index, rounds]).permutation(images.shape[0])
        pick = torch.from_numpy(order[position * self.cfg.batch_size : (position + 1) * self.cfg.batch_size])
        pick = pick.to(device)
        return images[pick], ids[pick]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


def _save_checkpoint(path: Path, model, ema, optimizer, schedule, step, cfg, elapsed, losses) -> None:
    # Plain tensors, numbers and lists only, so it loads with torch.load(weights_only=True).
    state = {
        "model": model.state_dict(),
        "ema": ema,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "step": step,
        "elapsed_s": elapsed,
        "losses": losses,
        "config": _plain(asdict(cfg), drop=_FREE_OPTIONS),
    }
    write_with(path, lambda tmp: torch.save(state, tmp))


def _plain(options: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in sorted(options.items()) if k not in drop}


def _validate(cfg: TrainConfig) -> None:
    for name in (
        "n_identities",
        "steps",
        "batch_size",
        "chunk_batches",
        "chunk_reuse",
        "checkpoint_every",
        "log_every",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1; got {getattr(cfg, name)!r}")
    if not 0 <= cfg.prompt_dropout < 1:
        raise ConfigError(f"prompt_dropout must be in [0, 1); got {cfg.prompt_dropout!r}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay must be in [0, 1); got {cfg.ema_decay!r}")


def _progress(cfg: TrainConfig, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.steps, initial=initial, disable=None if cfg.progress else True, desc="train-base", file=sys.stderr
    )


def _write_samples(model: BaseModel, family: Any, path: Path, seed: int, n: int = 32) -> None:
    """A grid of ``n`` samples: rows cycle through prompts from the family's nuisance sampler."""
    prompts = family.prompts(family.sample_nuisance(n, seed=seed + 1))
    device = str(resolve_device("auto"))
    images = model.sample(prompts, list(range(n)), steps=25, guidance=3.0, device=device)
    grid = image_grid(images, columns=8)
    write_with(path, lambda tmp: grid.save(tmp, format="PNG"))


def _flags(cfg: TrainConfig, family: str, out: Path) -> list[str]:
    flags = ["--family", family, "--out", str(out)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default and f.name != "progress":
            flags += [f"--{f.name.replace('_', '-')}", str(value)]
    return flags


def parser() -> argparse.ArgumentParser:
    return config_parser("python -m wsa.worlds.train_base", __doc__.splitlines()[0], TrainConfig)


def main(argv: list[str] | None = None) -> int:
    from wsa.worlds import get_family

    args = vars(parser().parse_args(argv))
    family = get_family(args.pop("family"))
    out = args.pop("out")
    t0 = time.time()
    model = train_base(family, out, **args)
    print(f"{out}: {model.info['steps_done']} steps in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
