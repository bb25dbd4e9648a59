"""Sana files of every trainer convention give diffusers' own ΔW on one-layer SanaTransformer2DModels.

The reference is diffusers' ``SanaLoraLoaderMixin.lora_state_dict`` (which converts nothing) +
``load_lora_adapter`` + PEFT's merge on a ``transformer.``-keyed file (diffusers' own training script,
SimpleTuner). diffusers' Sana loader reads no other convention, so OneTrainer's ``lora_transformer_<path with _>``
and SimpleTuner LyCORIS's ``lycoris_<path with _>`` files (``lora_down``/``lora_up``/``alpha``) are derived from
it by re-keying: ``lora_B`` -> ``lora_up · rank / alpha``, which keeps ΔW.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsa
from tests.family_harness import (
    assert_same_deltas,
    diffusers_deltas,
    lora_factors,
    random_lora,
    write_keyed,
    write_kohya,
)
from wsa.errors import FormatError

diffusers = pytest.importorskip("diffusers")
from diffusers import SanaTransformer2DModel  # noqa: E402
from diffusers.loaders import SanaLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)
TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=1,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=12,
    sample_size=8,
    patch_size=1,
)
#: Sana 1.0 (AdaLayerNormSingle ``time_embed.emb``) and Sana-Sprint / 1.5 (guidance embedder, q/k RMSNorms).
CONFIGS = {"sana": {}, "sprint": {"guidance_embeds": True, "qk_norm": "rms_norm_across_heads"}}


def _model(config: str = "sana") -> nn.Module:
    torch.manual_seed(0)
    return SanaTransformer2DModel(**TINY, **CONFIGS[config])


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / ungrouped Conv2d (a LoRA on the depthwise ``ff.conv_depth`` is not ``B·A``)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    }


def _factors(model, seed, names=None, rank=None):
    return lora_factors(_targets(model), seed, names, rank)


def _peft_file(path, factors, metadata=None):
    return write_keyed(path, factors, metadata=metadata)


def _kohya_file(path, factors, prefix, alpha, metadata=None):
    return write_kohya(path, factors, prefix, alpha, metadata)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_diffusers_keys_match_diffusers(tmp_path, config):
    """Every Linear and pointwise Conv2d under its diffusers path, ranks 1-5: the keys alone decide."""
    model = _model(config)
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(SanaLoraLoaderMixin, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "sana")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


@pytest.mark.parametrize(("prefix", "fmt"), [("lora_transformer_", "onetrainer"), ("lycoris_", "kohya")])
def test_kohya_style_keys_with_alpha_match_diffusers(tmp_path, prefix, fmt):
    model = _model("sprint")
    factors = _factors(model, 1)
    reference = diffusers_deltas(SanaLoraLoaderMixin, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "k.safetensors", factors, prefix, alpha=3.0)
    adapter = assert_same_deltas(path, reference, "sana")
    assert adapter.format == fmt
    assert adapter.modules["transformer_blocks.0.attn1.to_q"].alpha == 3.0


ATTENTION = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn2.to_v")


def test_attention_only_file_is_decided_by_metadata(tmp_path):
    """Self/cross-attention names are PixArt's, LTX-Video's and Sana's alike: without a header LTX-Video wins the tie
    (Sana listed as another candidate), with SimpleTuner's ``sana`` it is Sana; ``ff.conv_inverted`` proves Sana."""
    model = _model()
    factors = _factors(model, 2, names=set(ATTENTION))
    distinct = _factors(model, 3, names={*ATTENTION, "transformer_blocks.0.ff.conv_inverted"})
    bare = wsa.load_adapter(_peft_file(tmp_path / "bare.safetensors", factors))
    assert bare.family == "ltx_video"
    assert "sana" in bare.family_source
    path = _peft_file(tmp_path / "tagged.safetensors", factors, metadata={"ss_base_model_version": "sana"})
    reference = diffusers_deltas(SanaLoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "sana").family_source.startswith("keys+metadata")
    path = _peft_file(tmp_path / "distinct.safetensors", distinct)
    assert assert_same_deltas(path, diffusers_deltas(SanaLoraLoaderMixin, model, path), "sana").family_source == "keys"


def test_unknown_module_in_a_sana_file_is_named(tmp_path):
    """Also the depthwise ``ff.conv_depth``, deliberately no template (its LoRA is grouped, not ``B·A``)."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name in ("ff.conv_inverted", "ff.conv_point", "ff.conv_depth"):
        down, up = random_lora(D, D, 2, g)
        tensors[f"transformer.transformer_blocks.0.{name}.lora_A.weight"] = down.reshape(2, D, 1, 1)
        tensors[f"transformer.transformer_blocks.0.{name}.lora_B.weight"] = up.reshape(D, 2, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.ff\.conv_depth'.*Sana"):
        wsa.load_adapter(path)
