"""CogVideoX files give diffusers' own ΔW on one-layer CogVideoXTransformer3DModels (1.0 and 1.5 layouts).

The reference is diffusers' ``CogVideoXLoraLoaderMixin.lora_state_dict`` (which converts nothing) +
``load_lora_adapter`` + PEFT's merge. The trainers that write CogVideoX LoRAs (THUDM's ``finetune/``, diffusers'
``train_cogvideox_lora.py``, finetrainers, cogvideox-factory) all save diffusers' ``transformer.<path>`` keys.
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
from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.loaders import CogVideoXLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    time_embed_dim=8,
    text_embed_dim=12,
    num_layers=1,
    sample_width=8,
    sample_height=8,
    sample_frames=5,
    patch_size=2,
    max_text_seq_length=8,
)
#: CogVideoX 1.0 (Conv2d patch embedding) and 1.5 (temporal patches: a Linear patch embedding; I2V's ofs embedding).
CONFIGS = {
    "1.0": {},
    "1.5": {"patch_size_t": 1, "ofs_embed_dim": 8, "use_rotary_positional_embeddings": True},
}


def _model(config: str = "1.5") -> nn.Module:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**TINY, **CONFIGS[config])


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _factors(model, seed, names=None, rank=None):
    return lora_factors(_targets(model), seed, names, rank)


def _peft_file(path, factors, metadata=None):
    return write_keyed(path, factors, metadata=metadata)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_diffusers_keys_match_diffusers(tmp_path, config):
    """Every Linear (and 1.0's Conv2d patch embedding) under its diffusers path, ranks 1-5: the keys decide."""
    model = _model(config)
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(CogVideoXLoraLoaderMixin, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "cogvideox")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


ATTENTION = tuple(f"transformer_blocks.0.attn1.{leaf}" for leaf in ("to_q", "to_k", "to_v", "to_out.0"))


def test_attention_only_file_is_decided_by_metadata(tmp_path):
    """The usual ``target_modules=["to_q", "to_k", "to_v", "to_out.0"]`` file has LTX-Video's, PixArt's, Sana's and
    Mochi's names too: without a header LTX-Video wins the tie (CogVideoX listed), with CivitAI's ``CogVideoX`` it
    is CogVideoX; the blocks' second AdaLN (``norm2.linear``) decides by itself."""
    model = _model()
    factors = _factors(model, 1, names=set(ATTENTION))
    distinct = _factors(model, 2, names={*ATTENTION, "transformer_blocks.0.norm2.linear"})
    bare = wsa.load_adapter(_peft_file(tmp_path / "bare.safetensors", factors))
    assert bare.family == "ltx_video"
    assert "cogvideox" in bare.family_source
    path = _peft_file(tmp_path / "tagged.safetensors", factors, metadata={"baseModel": "CogVideoX"})
    reference = diffusers_deltas(CogVideoXLoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "cogvideox").family_source.startswith("keys+metadata")
    path = _peft_file(tmp_path / "distinct.safetensors", distinct)
    reference = diffusers_deltas(CogVideoXLoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "cogvideox").family_source == "keys"


def test_unknown_module_in_a_cogvideox_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name in ("patch_embed.text_proj", "transformer_blocks.0.norm2.linear", "transformer_blocks.0.norm3.linear"):
        down, up = random_lora(D, D, 2, g)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(
        FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.norm3\.linear'.*CogVideoX"
    ):
        wsa.load_adapter(path)
