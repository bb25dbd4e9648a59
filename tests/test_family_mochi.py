"""Mochi 1 files give diffusers' own ΔW on a two-layer MochiTransformer3DModel.

The reference is diffusers' ``Mochi1LoraLoaderMixin.lora_state_dict`` (which converts nothing) +
``load_lora_adapter`` + PEFT's merge. The trainers that write Mochi LoRAs for diffusers (finetrainers, diffusers'
``mochi-1`` research project, SimpleTuner) save diffusers' ``transformer.<path>`` keys. Two layers: the last block
is ``context_pre_only`` (its context AdaLN is ``norm1_context.linear_1``; no ``to_add_out``, no ``ff_context``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, lora_factors, random_lora, write_keyed
from wsa.errors import FormatError

diffusers = pytest.importorskip("diffusers")
from diffusers import MochiTransformer3DModel  # noqa: E402
from diffusers.loaders import Mochi1LoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8); the text stream is 12 wide


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=12,
        in_channels=4,
        text_embed_dim=12,
        time_embed_dim=4,
        max_sequence_length=8,
    )


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _factors(model, seed, names=None, rank=None):
    return lora_factors(_targets(model), seed, names, rank)


def _peft_file(path, factors, metadata=None):
    return write_keyed(path, factors, metadata=metadata)


def test_diffusers_keys_match_diffusers(tmp_path):
    """Every Linear and the Conv2d patch embedding under its diffusers path, ranks 1-5: the keys alone decide."""
    model = _model()
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(Mochi1LoraLoaderMixin, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "mochi")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


ATTENTION = tuple(f"transformer_blocks.{i}.attn1.{leaf}" for i in (0, 1) for leaf in ("to_q", "to_k", "to_out.0"))


def test_attention_only_file_is_decided_by_metadata(tmp_path):
    """Visual-stream attention alone has LTX-Video's, PixArt's, Sana's and CogVideoX's names too: without a header
    LTX-Video wins the tie (Mochi listed), with CivitAI's ``Mochi`` it is Mochi; the text stream's projections
    (``attn1.add_q_proj``) decide by themselves."""
    model = _model()
    factors = _factors(model, 1, names=set(ATTENTION))
    distinct = _factors(model, 2, names={*ATTENTION, "transformer_blocks.1.attn1.add_q_proj"})
    bare = wsa.load_adapter(_peft_file(tmp_path / "bare.safetensors", factors))
    assert bare.family == "ltx_video"
    assert "mochi" in bare.family_source
    path = _peft_file(tmp_path / "tagged.safetensors", factors, metadata={"baseModel": "Mochi"})
    reference = diffusers_deltas(Mochi1LoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "mochi").family_source.startswith("keys+metadata")
    path = _peft_file(tmp_path / "distinct.safetensors", distinct)
    reference = diffusers_deltas(Mochi1LoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "mochi").family_source == "keys"


def test_unknown_module_in_a_mochi_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for leaf in ("attn1.add_q_proj", "attn1.to_add_out", "attn1.to_add_kv"):
        down, up = random_lora(D, D, 2, g)
        tensors[f"transformer.transformer_blocks.0.{leaf}.lora_A.weight"] = down
        tensors[f"transformer.transformer_blocks.0.{leaf}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.attn1\.to_add_kv'.*Mochi"):
        wsa.load_adapter(path)
