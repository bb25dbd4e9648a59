"""Synthetic adapter collections of w2w's shape, written as real PEFT folders, with planted structure.

Why: benchmarks, tests and the demo need collections whose truth is known and whose size can be
dialled up to w2w's (64,974 × 99,648) without a GPU. Each adapter is a rank-``r`` LoRA on
``attn1/attn2 . to_q/to_v`` of the 16 SD 1.5 attention blocks (99,648 raw parameters at rank 1),
with ``lora_A`` near a shared initialisation (w2w trains every model from seed 0) and ``lora_B``
a planted low-rank signal ``z @ basis`` plus noise. Attributes are functions of ``z``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

# (diffusers path of a Transformer2DModel, channel width) for the 16 SD 1.5 attention blocks.
SD15_ATTENTION_BLOCKS: tuple[tuple[str, int], ...] = (
    *((f"down_blocks.{i}.attentions.{j}", c) for i, c in enumerate((320, 640, 1280)) for j in range(2)),
    ("mid_block.attentions.0", 1280),
    *((f"up_blocks.{i}.attentions.{j}", c) for i, c in zip((1, 2, 3), (1280, 640, 320), strict=True) for j in range(3)),
)
CROSS_ATTENTION_DIM = 768


def w2w_modules(
    blocks: Sequence[tuple[str, int]] = SD15_ATTENTION_BLOCKS, context_dim: int = CROSS_ATTENTION_DIM
) -> list[tuple[str, int, int]]:
    """``(module, in_features, out_features)`` for w2w's targets: q and v of attn1 and attn2."""
    mods = []
    for block, c in blocks:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_v"):
                fan_in = context_dim if (attn == "attn2" and proj == "to_v") else c
                mods.append((f"{block}.transformer_blocks.0.{attn}.{proj}", fan_in, c))
    return sorted(mods)


def synth_collection(
    out: str | Path,
    n: int,
    *,
    seed: int = 0,
    rank: int = 1,
    alpha: float = 27.0,
    n_factors: int = 16,
    noise: float = 0.05,
    a_jitter: float = 0.01,
    modules: Sequence[tuple[str, int, int]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Write ``n`` PEFT folders ``<out>/id_<k>/unet`` and ``<out>/attributes.csv``; return the attributes.

    Planted truth: ``B_i = Σ_f z_if · basis_f + noise``; binary attributes ``attr_k = z_ik > 0`` for
    the first half of the factors, continuous ``score_k = z_ik`` for the rest (``id`` column joins).
    """
    out = Path(out)
    mods = list(modules) if modules is not None else w2w_modules()
    rng = np.random.default_rng(seed)
    shared_a = {
        m: (rng.uniform(-1, 1, size=(rank, fan_in)) / np.sqrt(fan_in)).astype(np.float32) for m, fan_in, _ in mods
    }
    basis = {m: rng.standard_normal((n_factors, fan_out * rank)).astype(np.float32) * 1e-3 for m, _, fan_out in mods}
    z = rng.standard_normal((n, n_factors)).astype(np.float32)
    targets = sorted({m.rsplit(".", 1)[-1] for m, _, _ in mods})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": "wsa-synthetic-sd15",
        "task_type": None,
        "init_lora_weights": True,
    }
    width = len(str(n - 1))
    for i in tqdm(range(n), desc="synth", unit="adapter", disable=None if progress else True, file=sys.stderr):
        folder = out / f"id_{i:0{width}d}" / "unet"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m, fan_in, fan_out in mods:
            a = (shared_a[m] + a_jitter * rng.standard_normal(shared_a[m].shape) / np.sqrt(fan_in)).astype(np.float32)
            b = (z[i] @ basis[m] + noise * 1e-3 * rng.standard_normal(fan_out * rank)).astype(np.float32)
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.from_numpy(a)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.from_numpy(b.reshape(fan_out, rank))
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    half = n_factors // 2
    table = {"id": [f"id_{i:0{width}d}" for i in range(n)]}
    table.update({f"attr_{k}": (z[:, k] > 0).astype(int) for k in range(half)})
    table.update({f"score_{k}": z[:, k].round(6) for k in range(half, n_factors)})
    attributes = pd.DataFrame(table)
    attributes.to_csv(out / "attributes.csv", index=False)
    return attributes
