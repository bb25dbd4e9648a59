"""A user's own Stable Diffusion base, exercised on a tiny SD-shaped pipeline built from configs.

Why: users decode on their own SD 1.5 / SDXL folders or checkpoints; the same code path (load without
network, per-sample adapters on UNet and text encoder, the stock pipeline's sampling) must run here
on random tiny weights, and agree with diffusers' own ``load_lora_weights`` for an exported adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_sd_pipeline, write_single_file_checkpoint
from wsa.adapter import Adapter, ModuleWeights
from wsa.decoding import BatchedLoRA
from wsa.decoding.sd import SDBase
from wsa.decoding.stacks import stacks_from_adapters
from wsa.errors import ConfigError
from wsa.export import write_adapter

PROMPTS = ["a photo of sks person", "a photo of sks person, smiling"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def base(pipeline_dir) -> SDBase:
    return SDBase.load(pipeline_dir)


def random_adapter(base: SDBase, seed: int) -> Adapter:
    """Rank-2 LoRA on the UNet's to_q/to_v and the text encoder's q_proj (large enough to show)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, layer in base.adapter_layers().items():
        if name.endswith((".to_q", ".to_v")) or name.endswith("self_attn.q_proj"):
            down = torch.randn(2, layer.in_features, generator=g) * 0.5
            up = torch.randn(layer.out_features, 2, generator=g) * 0.5
            modules[name] = ModuleWeights("lora", {"down": down, "up": up}, tuple(layer.weight.shape), 2, 2.0, 1.0)
    return Adapter(f"random-{seed}", "test", modules)


def test_folder_loads_without_network_and_samples_deterministically(base):
    assert base.kind == "sd" and base.config.image_size == 16
    names = base.adapter_layers()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in names
    a = base.sample(PROMPTS, [0, 1], steps=2)
    b = base.sample(PROMPTS[:1], [0], steps=2)
    assert a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a[:1], b, atol=1e-4, rtol=1e-3)


def test_per_sample_adapters_match_diffusers_load_lora_weights(base, pipeline_dir, tmp_path):
    adapters = [random_adapter(base, 1), random_adapter(base, 2)]
    lora = BatchedLoRA(base.adapter_layers(), stacks_from_adapters(adapters))
    ours = base.sample([PROMPTS[0]] * 3, [5, 5, 5], steps=3, lora=lora, assignment=[1, 0, -1])
    plain = base.sample([PROMPTS[0]], [5], steps=3)
    torch.testing.assert_close(ours[2:], plain, atol=1e-4, rtol=1e-3)  # -1: the base alone
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    for k, row in ((1, 0), (0, 1)):
        path = write_adapter(adapters[k], tmp_path / f"a{k}", "diffusers")
        reference = SDBase.load(pipeline_dir)
        reference.pipe.load_lora_weights(str(path))
        theirs = reference.sample([PROMPTS[0]], [5], steps=3)
        torch.testing.assert_close(ours[row : row + 1], theirs, atol=2e-4, rtol=1e-3)


def test_delayed_injection_starts_from_the_base(base):
    adapters = [random_adapter(base, 3)]
    lora = BatchedLoRA(base.adapter_layers(), stacks_from_adapters(adapters))
    full = base.sample(PROMPTS[:1], [7], steps=4, lora=lora, assignment=[0])
    late = base.sample(PROMPTS[:1], [7], steps=4, lora=lora, assignment=[0], inject_after=2)
    assert (full - late).abs().max() > 1e-4


def test_single_file_checkpoint_loads_with_its_config_folder(base, pipeline_dir, tmp_path):
    checkpoint = write_single_file_checkpoint(pipeline_dir, tmp_path / "tiny-sd.safetensors")
    single = SDBase.load(checkpoint, config=pipeline_dir)
    torch.testing.assert_close(single.sample(PROMPTS[:1], [3], steps=2), base.sample(PROMPTS[:1], [3], steps=2))
    adapters = [random_adapter(base, 4)]
    lora = BatchedLoRA(single.adapter_layers(), stacks_from_adapters(adapters))
    ours = single.sample(PROMPTS[:1], [3], steps=2, lora=lora, assignment=[0])
    lora_folder = BatchedLoRA(base.adapter_layers(), stacks_from_adapters(adapters))
    torch.testing.assert_close(ours, base.sample(PROMPTS[:1], [3], steps=2, lora=lora_folder, assignment=[0]))


def test_bad_bases_are_one_line_errors(pipeline_dir, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="base-config"):
        SDBase.load(checkpoint)
    with pytest.raises(ConfigError, match=r"model_index\.json"):
        SDBase.load(tmp_path)
    from wsa.decoding.decoder import resolve_base

    with pytest.raises(ConfigError, match="cannot decode on base"):
        resolve_base(tmp_path / "nothing")
    model, ref = resolve_base(pipeline_dir)
    assert isinstance(model, SDBase) and ref == str(pipeline_dir)
