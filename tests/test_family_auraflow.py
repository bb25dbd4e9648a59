"""AuraFlow files of every trainer convention give diffusers' own ΔW on a one-layer AuraFlowTransformer2DModel.

The reference is diffusers' ``AuraFlowLoraLoaderMixin.lora_state_dict`` (which converts nothing) +
``load_lora_adapter`` + PEFT's merge on a ``transformer.``-keyed file (SimpleTuner, diffusion-pipe). diffusers'
AuraFlow loader reads no other convention, so ai-toolkit's ``lora_transformer_<path with _>`` (with
``ss_base_model_version = "auraflow"``) and SimpleTuner LyCORIS's ``lycoris_<path with _>`` files
(``lora_down``/``lora_up``/``alpha``) are derived from it by re-keying: ``lora_B`` -> ``lora_up · rank / alpha``,
which keeps ΔW.
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
from diffusers import AuraFlowTransformer2DModel  # noqa: E402
from diffusers.loaders import AuraFlowLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _factors(model, seed, names=None, rank=None):
    return lora_factors(_targets(model), seed, names, rank)


def _peft_file(path, factors, metadata=None):
    return write_keyed(path, factors, metadata=metadata)


def _kohya_file(path, factors, prefix, alpha, metadata=None):
    return write_kohya(path, factors, prefix, alpha, metadata)


def test_diffusers_keys_match_diffusers(tmp_path):
    """Every Linear (joint and single blocks, embedders) under its diffusers path, ranks 1-5: the keys decide."""
    model = _model()
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(AuraFlowLoraLoaderMixin, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "auraflow")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


@pytest.mark.parametrize(
    ("prefix", "fmt", "metadata"),
    [("lora_transformer_", "onetrainer", {"ss_base_model_version": "auraflow"}), ("lycoris_", "kohya", None)],
    ids=["ai-toolkit", "simpletuner-lycoris"],
)
def test_kohya_style_keys_with_alpha_match_diffusers(tmp_path, prefix, fmt, metadata):
    model = _model()
    factors = _factors(model, 1)
    reference = diffusers_deltas(AuraFlowLoraLoaderMixin, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "k.safetensors", factors, prefix, 3.0, metadata)
    adapter = assert_same_deltas(path, reference, "auraflow")
    assert adapter.format == fmt
    assert adapter.modules["joint_transformer_blocks.0.ff_context.out_projection"].alpha == 3.0


ATTENTION = tuple(f"single_transformer_blocks.0.attn.{leaf}" for leaf in ("to_q", "to_k", "to_v"))


def test_attention_only_file_is_decided_by_metadata(tmp_path):
    """The single blocks' q/k/v are FLUX.1's (and HunyuanVideo's) diffusers names too, at the same full width 3072:
    without a header FLUX.1 wins the tie (AuraFlow listed), with ``auraflow`` it is AuraFlow; a joint block decides
    by itself."""
    model = _model()
    factors = _factors(model, 2, names=set(ATTENTION))
    distinct = _factors(model, 3, names={*ATTENTION, "joint_transformer_blocks.0.attn.add_q_proj"})
    bare = wsa.load_adapter(_peft_file(tmp_path / "bare.safetensors", factors))
    assert bare.family == "flux1"
    assert "auraflow" in bare.family_source
    path = _peft_file(tmp_path / "tagged.safetensors", factors, metadata={"baseModel": "AuraFlow"})
    reference = diffusers_deltas(AuraFlowLoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "auraflow").family_source.startswith("keys+metadata")
    path = _peft_file(tmp_path / "distinct.safetensors", distinct)
    reference = diffusers_deltas(AuraFlowLoraLoaderMixin, model, path)
    assert assert_same_deltas(path, reference, "auraflow").family_source == "keys"


def test_unknown_module_in_an_auraflow_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for leaf in ("ff.linear_1", "ff.out_projection", "ff.linear_3"):
        down, up = random_lora(D, D, 2, g)
        tensors[f"transformer.joint_transformer_blocks.0.{leaf}.lora_A.weight"] = down
        tensors[f"transformer.joint_transformer_blocks.0.{leaf}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(
        FormatError, match=r"bad\.safetensors: module 'joint_transformer_blocks\.0\.ff\.linear_3'.*Aura"
    ):
        wsa.load_adapter(path)
