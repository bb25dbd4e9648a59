"""HiDream files of every trainer convention give diffusers' own ΔW on a one-layer HiDreamImageTransformer2DModel.

The reference is diffusers' ``HiDreamImageLoraLoaderMixin.lora_state_dict`` (its
``_convert_non_diffusers_hidream_lora_to_diffusers``, which swaps ``diffusion_model.`` for ``transformer.``) +
``load_lora_adapter`` + PEFT's merge. The tiny model keeps the mixture of experts (two routed experts, one
active, plus the shared expert) with one double-stream and one single-stream block; every Linear is
covered, the experts included.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, linear_shapes, random_lora
from wsa.errors import FormatError
from wsa.families import family_from_metadata

diffusers = pytest.importorskip("diffusers")
from diffusers import HiDreamImageTransformer2DModel  # noqa: E402
from diffusers.loaders import HiDreamImageLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[12, 12],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 4),
        max_resolution=(8, 8),
        llama_layers=[0, 1],
    )


def _file(tmp_path, shapes, key, *, seed=0, name="f.safetensors", kohya_alpha=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, module in enumerate(sorted(shapes)):
        down, up = random_lora(*shapes[module], 1 + i % 4, g)
        if kohya_alpha is None:
            tensors[f"{key(module)}.lora_A.weight"] = down
            tensors[f"{key(module)}.lora_B.weight"] = up
        else:  # the same ΔW with alpha: lora_up = B · rank / alpha
            tensors[f"{key(module)}.lora_down.weight"] = down
            tensors[f"{key(module)}.lora_up.weight"] = up * (down.shape[0] / kohya_alpha)
            tensors[f"{key(module)}.alpha"] = torch.tensor(kohya_alpha)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."], ids=["ai-toolkit", "simpletuner"])
def test_keys_match_diffusers(model, tmp_path, prefix):
    """ai-toolkit / ComfyUI (``diffusion_model.``) and SimpleTuner / diffusers (``transformer.``), ranks 1-4."""
    shapes = linear_shapes(model)
    path = _file(tmp_path, shapes, lambda m: prefix + m)
    reference = diffusers_deltas(HiDreamImageLoraLoaderMixin, model, path)
    adapter = assert_same_deltas(path, reference, "hidream")
    assert adapter.format == ("comfyui" if prefix == "diffusion_model." else "diffusers")
    assert len(reference) == len(shapes)
    assert "single_stream_blocks.0.block.ff_i.experts.1.w3" in adapter.modules


@pytest.mark.parametrize("spell", ["comfyui", "lycoris-underscored"])
def test_kohya_style_keys_with_alpha_match_diffusers(model, tmp_path, spell):
    """``lora_down``/``lora_up``/``alpha`` under ``diffusion_model.``, and SimpleTuner LyCORIS' ``lycoris_`` spelling.

    diffusers' HiDream loader reads neither alpha nor ``lycoris_``; both files are the PEFT file re-keyed
    (``lora_up = B · rank / alpha``, so ΔW is unchanged) and checked against its reference.
    """
    shapes = linear_shapes(model)
    peft = _file(tmp_path, shapes, lambda m: "transformer." + m, seed=1, name="p.safetensors")
    key = (lambda m: "diffusion_model." + m) if spell == "comfyui" else (lambda m: "lycoris_" + m.replace(".", "_"))
    path = _file(tmp_path, shapes, key, seed=1, kohya_alpha=2.0)
    reference = diffusers_deltas(HiDreamImageLoraLoaderMixin, model, peft)
    adapter = assert_same_deltas(path, reference, "hidream")
    assert adapter.modules["double_stream_blocks.0.block.attn1.to_q_t"].alpha == 2.0


def test_full_weight_diffs_of_norms_and_router(tmp_path):
    """ComfyUI ``.diff``: the q/k RMSNorms of both streams and the MoE router's bare ``gate`` parameter."""
    g = torch.Generator().manual_seed(2)
    names = {
        "double_stream_blocks.0.block.attn1.q_rms_norm": (D,),
        "double_stream_blocks.0.block.attn1.k_rms_norm_t": (D,),
        "single_stream_blocks.0.block.attn1.k_rms_norm": (D,),
        "double_stream_blocks.0.block.ff_i.gate": (2, D),
    }
    tensors = {f"diffusion_model.{n}.diff": torch.randn(shape, generator=g) for n, shape in names.items()}
    path = tmp_path / "diff.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hidream"
    for name in names:
        assert torch.equal(adapter.delta(name), tensors[f"diffusion_model.{name}.diff"]), name


@pytest.mark.parametrize("value", ["hidream", "HiDream-I1-Full", "hidream_i1_dev/lora"])
def test_metadata_names(value):
    assert family_from_metadata({"ss_base_model_version": value})[0] == "hidream"


def test_unknown_module_in_a_hidream_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name in (
        "double_stream_blocks.0.block.attn1.to_q",
        "double_stream_blocks.0.block.ff_i.experts.0.w1",
        "double_stream_blocks.0.block.ff_i.experts.0.w4",
    ):
        down, up = random_lora(D, D, 2, g)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(
        FormatError, match=r"bad\.safetensors: module 'double_stream_blocks\.0\.block\.ff_i\.experts\.0\.w4'.*HiDream"
    ):
        wsa.load_adapter(path)
