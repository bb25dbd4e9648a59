"""Fine-tune one LoRA per identity of a family on the base model — many at once — and write a zoo.

The w2w recipe (arXiv 2406.09413 §3): per identity, a handful of images, a rank-1 LoRA on the
UNet's attention ``to_q``/``to_v`` (self- and cross-attention), every LoRA initialised from the same
seed (so the factors of different identities live in one coordinate system: the weight space is
only linear because of that), and a fixed identity prompt with a rare token ("a sks face, ...").

Batching: a group of M identities is trained in one pass. Each step takes ``batch_per_identity``
images of every identity of the group, and :class:`~wsa.decoding.BatchedLoRA` routes each image
through its own identity's factors; the loss is the *sum* over identities of each one's mean loss,
so every LoRA gets exactly the gradient of its own loss and Adam's per-parameter update is the same
as training it alone (only the random draws differ with the group size). The base model's weights
are shared and frozen.

Output (``out/``): one adapter per identity, ``<id>/`` as a PEFT folder (``adapter_config.json``
+ ``adapter_model.safetensors``) or a diffusers file (``pytorch_lora_weights.safetensors``), with
``<id>/reference.png`` (the identity rendered in the neutral view); ``attributes.csv`` (the ground
truth, w2w's ``identity_df``); ``zoo.json`` (options, base model and its sha256, timings, losses).
Identities finished are skipped when the command is run again; a group interrupted mid-way resumes
from ``.partial/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsa.adapter import Adapter, ModuleWeights
from wsa.atomic import write_json, write_with
from wsa.decoding.batched_lora import BatchedLoRA, LowRankStack
from wsa.decoding.schedule import alphas_cumprod
from wsa.devices import resolve_device
from wsa.errors import ConfigError
from wsa.worlds.family import IDENTITY_TOKEN, Family
from wsa.worlds.model import BaseModel
from wsa.worlds.runtime import config_parser, hardware

ZOO_FILE = "zoo.json"
ATTRIBUTES_FILE = "attributes.csv"
REFERENCE_FILE = "reference.png"
PARTIAL = ".partial"
FORMATS = ("peft", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Options that may differ between a run and its resumption (they do not change the adapters).
_FREE_OPTIONS = ("progress", "device", "group_size", "n", "checkpoint_every")


@dataclass(frozen=True)
class ZooConfig:
    """Options of :func:`build_zoo`; the command-line flags of ``wsa world zoo`` are these fields."""

    n: int = 1000  # identities (rows 0..n-1 of the family's table for ``seed``)
    seed: int = 1  # identity table and training randomness; the shipped bases saw seed 0's table
    images_per_identity: int = 8  # K renders per identity, nuisance varied (w2w used ~10 photos)
    rank: int = 1
    alpha: float = 1.0  # LoRA scale = alpha / rank
    targets: str = "to_q,to_v"  # attention projections adapted, in attn1 and attn2 of every block
    steps: int = 1000
    lr: float = 1e-2
    batch_per_identity: int = 4  # images of each identity per step
    group_size: int = 0  # identities trained at once; 0 = 1024 on GPU, 32 on CPU
    init_seed: int = 0  # shared initialisation of every LoRA (w2w: the same seed for all)
    prior_weight: float = 0.0  # > 0: add prior preservation (other identities, class prompt) at this weight
    format: str = "peft"  # peft | diffusers
    dtype: str = "float32"  # on disk: float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 100  # steps between resumable checkpoints of a group
    progress: bool = True


@dataclass
class GroupResult:
    """Factors of a trained group: ``down[name]`` (M, r, in), ``up[name]`` (M, out, r), final losses (M,)."""

    down: dict[str, Tensor]
    up: dict[str, Tensor]
    final_loss: np.ndarray
    seconds: float


def target_layers(unet: nn.Module, targets: str) -> dict[str, nn.Linear]:
    """Attention projections of ``unet`` named by ``targets`` (e.g. ``"to_q,to_v"``, ``"to_out.0"``)."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise ConfigError("targets is empty; name attention projections such as to_q,to_v")
    found: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        match = re.search(r"\.attn[12]\.(.+)$", name)
        if match and match.group(1) in wanted and isinstance(module, nn.Linear):
            found[name] = module
    unmatched = [t for t in wanted if not any(n.endswith("." + t) for n in found)]
    if unmatched:
        raise ConfigError(
            f"target(s) {unmatched} match no attention projection; choose from to_q, to_k, to_v, to_out.0"
        )
    return dict(sorted(found.items()))


def shared_init(layers: dict[str, nn.Linear], rank: int, seed: int) -> dict[str, Tensor]:
    """The ``down`` (lora_A) initialisation every identity starts from: PEFT's Kaiming-uniform, one seed.

    ``up`` (lora_B) starts at zero, as in PEFT, so every LoRA starts as the base model.
    """
    generator = torch.Generator().manual_seed(seed)
    init = {}
    for name, layer in layers.items():
        bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
        init[name] = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
    return init


def identity_views(family: Family, index: int, k: int, seed: int) -> Any:
    """Nuisance table of the ``k`` training images of identity ``index``: a function of (seed, index) only."""
    return family.sample_nuisance(k, seed=int((seed * 1_000_003 + index * 7919 + 11) % (2**31)))


def train_group(
    model: BaseModel,
    family: Family,
    identities: Any,
    indices: list[int],
    cfg: ZooConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    bar: Any = None,
) -> GroupResult:
    """Train the LoRAs of ``identities`` (rows of the attribute table, table positions ``indices``) together."""
    started = time.time()
    m, k, b = len(identities), cfg.images_per_identity, cfg.batch_per_identity
    size = model.config.image_size
    layers = target_layers(model.unet, cfg.targets)
    init = shared_init(layers, cfg.rank, cfg.init_seed)

    # Training data: K views of each identity (row m*K + j), identity prompt with the token.
    views = [identity_views(family, i, k, cfg.seed) for i in indices]
    nuisance = _concat(views)
    rows = identities.loc[identities.index.repeat(k)].reset_index(drop=True)
    images = (family.render(rows, nuisance, size=size) * 2 - 1).to(device)
    with torch.no_grad():
        context = model.encode_prompts(family.prompts(nuisance, token=IDENTITY_TOKEN)).detach()
        prior_images = prior_context = None
        if cfg.prior_weight > 0:
            others = family.sample_identities(m * k, seed=cfg.seed + 7919 + indices[0])
            prior_views = family.sample_nuisance(m * k, seed=cfg.seed + 104729 + indices[0])
            prior_images = (family.render(others.reset_index(drop=True), prior_views, size=size) * 2 - 1).to(device)
            prior_context = model.encode_prompts(family.prompts(prior_views)).detach()

    down = {n: nn.Parameter(init[n].expand(m, -1, -1).clone().to(device)) for n in layers}
    up = {n: nn.Parameter(torch.zeros(m, layer.out_features, cfg.rank, device=device)) for n, layer in layers.items()}
    scale = torch.full((m,), cfg.alpha / cfg.rank, device=device)
    lora = BatchedLoRA(model.unet, {n: LowRankStack(down[n], up[n], scale) for n in layers})
    params = [*down.values(), *up.values()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99))
    alphas = alphas_cumprod(model.config).to(device)
    step, losses = 0, torch.zeros(m)
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["indices"] == indices and state["config"] == _comparable(cfg):
            with torch.no_grad():
                for n in layers:
                    down[n].copy_(state["down"][n])
                    up[n].copy_(state["up"][n])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
            if bar is not None:
                bar.update(step)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    per_identity = torch.arange(m, device=device).repeat_interleave(b)
    assignment = per_identity if cfg.prior_weight <= 0 else torch.cat([per_identity, per_identity])
    model.requires_grad_(False)
    while step < cfg.steps:
        g = torch.Generator(device).manual_seed(int((cfg.seed * 1_000_003 + indices[0] * 65_537 + step) % 2**62))
        pick = torch.randint(0, k, (m, b), device=device, generator=g) + torch.arange(m, device=device)[:, None] * k
        pick = pick.reshape(-1)
        x0, ctx = images[pick], context[pick]
        if prior_images is not None:
            prior_pick = torch.randint(0, m * k, (m * b,), device=device, generator=g)
            x0 = torch.cat([x0, prior_images[prior_pick]])
            ctx = torch.cat([ctx, prior_context[prior_pick]])
        t = torch.randint(0, alphas.shape[0], (x0.shape[0],), device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast, lora.active(assignment):
            predicted = model.unet(noisy, t, ctx).sample
        error = (predicted.float() - noise).pow(2).mean(dim=(1, 2, 3))
        own = error[: m * b].view(m, b).mean(1)
        loss = own.sum()
        if prior_images is not None:
            loss = loss + cfg.prior_weight * error[m * b :].view(m, b).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses = 0.9 * losses + 0.1 * own.detach().float().cpu() if step > 1 else own.detach().float().cpu()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{float(losses.mean()):.4f}")
        if checkpoint is not None and (step % cfg.checkpoint_every == 0) and step < cfg.steps:
            state = {
                "indices": indices,
                "config": _comparable(cfg),
                "step": step,
                "down": {n: p.detach().cpu() for n, p in down.items()},
                "up": {n: p.detach().cpu() for n, p in up.items()},
                "optimizer": optimizer.state_dict(),
            }
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            write_with(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
    return GroupResult(
        down={n: p.detach().float().cpu() for n, p in down.items()},
        up={n: p.detach().float().cpu() for n, p in up.items()},
        final_loss=losses.numpy(),
        seconds=time.time() - started,
    )


def group_adapter(result: GroupResult, i: int, cfg: ZooConfig, layers: dict[str, nn.Linear], path: str) -> Adapter:
    """Identity ``i`` of a trained group as an :class:`Adapter` (canonical module names)."""
    modules = {
        name: ModuleWeights(
            kind="lora",
            tensors={"down": result.down[name][i].contiguous(), "up": result.up[name][i].contiguous()},
            shape=(layer.out_features, layer.in_features),
            rank=cfg.rank,
            alpha=cfg.alpha,
            scale=cfg.alpha / cfg.rank,
        )
        for name, layer in layers.items()
    }
    return Adapter(path=path, format="wsa-zoo", modules=modules)


def build_zoo(family: Family, base: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """Fine-tune a LoRA for identities ``0..n-1`` of ``family`` on the base model and write them to ``out``.

    Parameters
    ----------
    family : the concept family.
    base : base model folder; ``None`` uses the family's shipped base (:func:`builtin_base`).
    out : the zoo folder (created; an existing zoo with the same options is completed, not redone).
    **options : fields of :class:`ZooConfig`.

    Returns
    -------
    The ``zoo.json`` record: options, base, per-group timings, seconds per LoRA, mean final loss.
    """
    from tqdm.auto import tqdm

    from wsa.export import write_adapter
    from wsa.images import save_grid
    from wsa.worlds import builtin_base

    unknown = sorted(set(options) - set(ZooConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown zoo option(s) {unknown}; known: {sorted(ZooConfig.__dataclass_fields__)}")
    cfg = ZooConfig(**options)
    _validate(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base_path = Path(base) if base is not None else builtin_base(family.name)
    model = BaseModel.load(base_path, device=device)
    if model.family != family.name:
        raise ConfigError(f"base model {base_path} was trained on {model.family!r}, not {family.name!r}")
    base_record = {
        "path": str(base_path) if base is not None else f"builtin:{family.name}",
        "sha256": json.loads((base_path / "model.json").read_text())["weights"]["sha256"],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / ZOO_FILE
    if record_path.is_file():
        previous = json.loads(record_path.read_text())
        if previous.get("family") != family.name or previous.get("comparable") != _comparable(cfg):
            raise ConfigError(
                "folder holds a zoo built with other options (see its zoo.json); use the same options or another --out",
                out,
            )
        if previous.get("base", {}).get("sha256") != base_record["sha256"]:
            raise ConfigError("folder holds a zoo of another base model (sha256 differs); use another --out", out)
        groups = previous.get("groups", [])
    else:
        groups = []

    identities = family.sample_identities(cfg.n, cfg.seed)
    write_with(out / ATTRIBUTES_FILE, lambda tmp: identities.to_csv(tmp, index=False))
    record: dict[str, Any] = {
        "kind": "wsa_world_zoo",
        "family": family.name,
        "base": base_record,
        "options": asdict(cfg),
        "comparable": _comparable(cfg),
        "prompt": family.prompt(family.neutral_nuisance().iloc[0], token=IDENTITY_TOKEN),
        "groups": groups,
    }
    write_json(record_path, record)

    todo = [i for i in range(cfg.n) if not (out / identities.id[i] / REFERENCE_FILE).is_file()]
    group_size = cfg.group_size or (1024 if device.type == "cuda" else 32)
    batches = [todo[s : s + group_size] for s in range(0, len(todo), group_size)]
    layers = target_layers(model.unet, cfg.targets)
    dtype = DTYPES[cfg.dtype]
    bar = tqdm(
        total=len(batches) * cfg.steps,
        desc=f"zoo {family.name} ({len(todo)} of {cfg.n} to train)",
        unit="step",
        disable=None if cfg.progress else True,
        file=sys.stderr,
    )
    try:
        for indices in batches:
            rows = identities.iloc[indices].reset_index(drop=True)
            checkpoint = out / PARTIAL / f"group-{indices[0]:06d}-{len(indices)}.pt"
            result = train_group(model, family, rows, indices, cfg, device, checkpoint, bar)
            references = family.render(rows, family.neutral_nuisance(len(rows)), size=64)
            for j, identity in enumerate(rows.id):
                folder = out / identity
                adapter = group_adapter(result, j, cfg, layers, str(folder))
                meta = {"base": base_record["path"], "family": family.name, "identity": identity}
                write_adapter(adapter, folder, cfg.format, metadata=meta, dtype=dtype)
                save_grid(references[j : j + 1], folder / REFERENCE_FILE)  # written last: marks it done
            checkpoint.unlink(missing_ok=True)
            groups.append(
                {
                    "first": indices[0],
                    "size": len(indices),
                    "seconds": round(result.seconds, 2),
                    "seconds_per_lora": round(result.seconds / len(indices), 4),
                    "final_loss_mean": round(float(result.final_loss.mean()), 5),
                }
            )
            record["groups"] = groups
            record["hardware"] = hardware(device)
            write_json(record_path, record)
    finally:
        bar.close()
    done = sum((out / i / REFERENCE_FILE).is_file() for i in identities.id)
    seconds = sum(g["seconds"] for g in groups)
    record["summary"] = {
        "identities": done,
        "train_seconds": round(seconds, 1),
        "seconds_per_lora": round(seconds / max(1, sum(g["size"] for g in groups)), 4),
    }
    write_json(record_path, record)
    partial = out / PARTIAL
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return record


def _concat(frames: list[Any]) -> Any:
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _comparable(cfg: ZooConfig) -> dict[str, Any]:
    return {k: v for k, v in sorted(asdict(cfg).items()) if k not in _FREE_OPTIONS}


def _validate(cfg: ZooConfig) -> None:
    for name in ("n", "images_per_identity", "rank", "steps", "batch_per_identity", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1; got {getattr(cfg, name)!r}")
    if cfg.group_size < 0:
        raise ConfigError(f"group_size must be >= 0 (0: automatic); got {cfg.group_size}")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}; got {cfg.format!r}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {cfg.dtype!r}")
    if cfg.prior_weight < 0 or cfg.lr <= 0 or cfg.alpha <= 0:
        raise ConfigError("prior_weight must be >= 0, lr and alpha > 0")


def parser() -> Any:
    """argparse parser generated from :class:`ZooConfig` (``python -m wsa.worlds.zoo``)."""
    base = {"default": None, "help": "base model folder (default: the family's shipped base)"}
    return config_parser("python -m wsa.worlds.zoo", __doc__.splitlines()[0], ZooConfig, {"--base": base})


def main(argv: list[str] | None = None) -> int:
    from wsa.worlds import get_family

    args = vars(parser().parse_args(argv))
    family = get_family(args.pop("family"))
    out, base = args.pop("out"), args.pop("base")
    record = build_zoo(family, base, out, **args)
    summary = record["summary"]
    print(
        f"{out}: {summary['identities']} {family.name} LoRAs; {summary['train_seconds']} s of training, "
        f"{summary['seconds_per_lora']} s per LoRA",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
