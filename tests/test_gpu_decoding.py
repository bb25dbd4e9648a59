"""Decoding and zoo training on CUDA (fp16 sampling, bf16 training) agree with the CPU in what they draw.

Run on a GPU machine: ``python -m pytest -m gpu tests/test_gpu_decoding.py``.
"""

from __future__ import annotations

import pytest
import torch

import wsa
from wsa.decoding import BatchedLoRA
from wsa.decoding.stacks import stacks_from_adapters
from wsa.worlds import builtin_base, get_family
from wsa.worlds.model import BaseModel
from wsa.worlds.oracle import builtin_oracle

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_fp16_cuda_decoding_reads_like_cpu(tmp_path):
    from wsa.worlds.shipped import unpack_zoo

    zoo = unpack_zoo("faces", tmp_path / "zoo", n=16, progress=False)
    adapters = [wsa.load_adapter(zoo / f"id_{i:05d}") for i in range(16)]
    model = BaseModel.load(builtin_base("faces"))
    lora = BatchedLoRA(model.unet, stacks_from_adapters(adapters))
    prompts = ["a sks face, neutral, on blue"] * 16
    seeds = list(range(16))
    cpu = model.sample(prompts, seeds, steps=20, device="cpu", lora=lora, assignment=list(range(16)))
    gpu = model.sample(
        prompts, seeds, steps=20, device="cuda", dtype=torch.float16, lora=lora, assignment=list(range(16))
    )
    assert (cpu - gpu).abs().mean() < 0.02
    oracle = builtin_oracle("faces")
    a, b = oracle.predict(cpu), oracle.predict(gpu)
    same = [(a[c].astype(str) == b[c].astype(str)).mean() for c in ("beard", "glasses", "bald", "hair_colour")]
    assert min(same) >= 0.85, same


@needs_cuda
def test_zoo_trains_on_cuda(tmp_path):
    from wsa.worlds.zoo import build_zoo

    record = build_zoo(
        get_family("faces"),
        None,
        tmp_path / "z",
        n=4,
        steps=20,
        images_per_identity=2,
        batch_per_identity=2,
        device="cuda",
        progress=False,
    )
    assert record["hardware"]["device"].startswith("cuda") and record["summary"]["identities"] == 4
