"""PixArt-α/Σ files of every trainer convention give the ΔW diffusers and PEFT compute on a one-layer PixArt model.

diffusers has no PixArt LoRA loader and ``PixArtTransformer2DModel`` is no ``PeftAdapterMixin``; the references are:

* ``transformer.``-keyed files: diffusers' own ``load_lora_adapter`` (``PeftAdapterMixin``, mixed into the model
  class here; the state dict as saved, since no converter exists) + PEFT's merge;
* PixArt-alpha's ``train_pixart_lora_hf.py`` (PEFT's ``base_model.model.<path>`` adapter saved whole): PEFT's own
  loader, ``get_peft_model`` + ``set_peft_model_state_dict``;
* ai-toolkit (``lora_transformer_<path with _>``, ``ss_base_model_version = "pixart"``) and SimpleTuner LyCORIS
  (``lycoris_<path with _>``), which neither reads: derived from the ``transformer.`` file by re-keying,
  ``lora_B`` -> ``lora_up · rank / alpha`` (ΔW unchanged).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
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
from tests.tiny import reference_deltas
from wsa.errors import FormatError

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import PixArtTransformer2DModel  # noqa: E402
from diffusers.loaders import PeftAdapterMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)


class _PixArt(PixArtTransformer2DModel, PeftAdapterMixin):
    """The diffusers model with diffusers' LoRA-adapter loading (which it lacks) mixed in."""


class _SavedAsIs:
    """No PixArt LoRA mixin in diffusers: the state dict as saved goes to ``load_lora_adapter``."""

    @staticmethod
    def lora_state_dict(path: str) -> dict[str, torch.Tensor]:
        return load_file(path)


def _model(cls: type = _PixArt, alpha_conditions: bool = True) -> nn.Module:
    """PixArt-α (resolution/aspect-ratio embedders, ``use_additional_conditions``) or PixArt-Σ (without)."""
    torch.manual_seed(0)
    return cls(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        norm_num_groups=1,
        use_additional_conditions=alpha_conditions,
    )


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _factors(model, seed, names=None, rank=None):
    return lora_factors(_targets(model), seed, names, rank)


def _peft_file(path, factors, prefix="transformer.", metadata=None):
    return write_keyed(path, factors, prefix, metadata)


def _kohya_file(path, factors, prefix, alpha, metadata=None):
    return write_kohya(path, factors, prefix, alpha, metadata)


@pytest.mark.parametrize("alpha_conditions", [True, False], ids=["alpha", "sigma"])
def test_diffusers_keys_match_diffusers(tmp_path, alpha_conditions):
    """Every Linear and the patch-embedding Conv2d under its diffusers path, ranks 1-5: the keys alone decide."""
    model = _model(alpha_conditions=alpha_conditions)
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(_SavedAsIs, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "pixart")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


def test_peft_single_file_matches_peft(tmp_path):
    """``base_model.model.<path>`` (PixArt-alpha's LoRA script saves PEFT's adapter whole): PEFT's own loader."""
    model = _model(PixArtTransformer2DModel)
    factors = _factors(model, 1, rank=4)
    path = _peft_file(tmp_path / "adapter_model.safetensors", factors, prefix="base_model.model.")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=sorted(factors))  # no alpha in the file: scale 1
    wrapped = peft.get_peft_model(model, config)
    peft.set_peft_model_state_dict(wrapped, load_file(str(path)))
    reference = reference_deltas(wrapped)
    assert set(reference) == set(factors)
    adapter = assert_same_deltas(path, reference, "pixart")
    assert adapter.format == "peft-file"


@pytest.mark.parametrize(
    ("prefix", "fmt", "metadata"),
    [("lora_transformer_", "onetrainer", {"ss_base_model_version": "pixart"}), ("lycoris_", "kohya", None)],
    ids=["ai-toolkit", "simpletuner-lycoris"],
)
def test_kohya_style_keys_with_alpha_match_diffusers(tmp_path, prefix, fmt, metadata):
    model = _model()
    factors = _factors(model, 2)
    reference = diffusers_deltas(_SavedAsIs, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "k.safetensors", factors, prefix, 3.0, metadata)
    adapter = assert_same_deltas(path, reference, "pixart")
    assert adapter.format == fmt
    assert adapter.modules["transformer_blocks.0.attn2.to_k"].alpha == 3.0


ATTENTION = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn2.to_v")


def test_attention_only_file_is_decided_by_metadata(tmp_path):
    """Self/cross-attention names are PixArt's, LTX-Video's and Sana's alike: without a header LTX-Video wins the tie
    (PixArt listed as another candidate), with ai-toolkit's ``pixart`` it is PixArt; a PixArt-only module
    (the resolution embedder) decides by itself."""
    model = _model()
    factors = _factors(model, 3, names=set(ATTENTION))
    distinct = _factors(model, 4, names={*ATTENTION, "adaln_single.emb.resolution_embedder.linear_1"})
    bare = wsa.load_adapter(_peft_file(tmp_path / "bare.safetensors", factors))
    assert bare.family == "ltx_video"
    assert "pixart" in bare.family_source
    path = _peft_file(tmp_path / "tagged.safetensors", factors, metadata={"ss_base_model_version": "pixart_sigma"})
    reference = diffusers_deltas(_SavedAsIs, model, path)
    assert assert_same_deltas(path, reference, "pixart").family_source.startswith("keys+metadata")
    path = _peft_file(tmp_path / "distinct.safetensors", distinct)
    reference = diffusers_deltas(_SavedAsIs, model, path)
    assert assert_same_deltas(path, reference, "pixart").family_source == "keys"


def test_adaln_single_proves_pixart_over_ltx_video(tmp_path):
    """``adaln_single.linear`` is also LTX-Video's native name (of its ``time_embed.linear``); as a diffusers name it
    is PixArt's alone, which PixArt's evidence says."""
    model = _model()
    factors = _factors(model, 5, names={*ATTENTION, "adaln_single.linear"})
    path = _peft_file(tmp_path / "adaln.safetensors", factors)
    reference = diffusers_deltas(_SavedAsIs, model, path)
    assert assert_same_deltas(path, reference, "pixart").family_source.startswith("keys (structure)")


def test_unknown_module_in_a_pixart_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name in (
        "adaln_single.emb.resolution_embedder.linear_1",
        "adaln_single.linear",
        "transformer_blocks.0.attn3.to_q",
    ):
        down, up = random_lora(D, D, 2, g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.attn3\.to_q'.*PixArt"):
        wsa.load_adapter(path)
