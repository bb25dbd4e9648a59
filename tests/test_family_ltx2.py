"""LTX-2 files give diffusers' own ΔW on a one-layer LTX2VideoTransformer3DModel (audio and video streams).

The reference is diffusers' ``LTX2LoraLoaderMixin.lora_state_dict`` (its
``_convert_non_diffusers_ltx2_lora_to_diffusers``, which strips ``diffusion_model.`` and renames Lightricks'
top-level modulation modules) + ``load_lora_adapter`` + PEFT's merge. LTX-2 reuses every LTX-Video name, so
a video-only file is told apart by width or metadata (last test).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, linear_shapes, random_lora
from wsa.errors import FormatError

diffusers = pytest.importorskip("diffusers")
from diffusers import LTX2VideoTransformer3DModel  # noqa: E402
from diffusers.loaders import LTX2LoraLoaderMixin  # noqa: E402

D = 16  # video width of the tiny model (2 heads of 8); audio width 8


def _file(tmp_path, model, key, *, seed=0, name="f.safetensors"):
    """A PEFT-style file over every Linear of ``model`` (ranks 1-4), key ``key(diffusers path)``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (module, shape) in enumerate(sorted(linear_shapes(model).items())):
        down, up = random_lora(*shape, 1 + i % 4, g)
        tensors[f"{key(module)}.lora_A.weight"] = down
        tensors[f"{key(module)}.lora_B.weight"] = up
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.fixture
def ltx2_model():
    torch.manual_seed(0)
    return LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=D,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        caption_channels=12,
    )


#: Lightricks' LTX-2 names where they differ from diffusers' (_convert_non_diffusers_ltx2_lora_to_diffusers).
LTX2_TOP = {
    "proj_in": "patchify_proj",
    "audio_proj_in": "audio_patchify_proj",
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
}


def _lightricks_ltx2(module: str) -> str:
    head, _, rest = module.partition(".")
    return LTX2_TOP.get(head, head) + (f".{rest}" if rest else "")


@pytest.mark.parametrize(
    "key",
    [lambda m: "diffusion_model." + _lightricks_ltx2(m), lambda m: "transformer." + m],
    ids=["ltx2-trainer", "diffusers"],
)
def test_ltx2_keys_match_diffusers(ltx2_model, tmp_path, key):
    """Every Linear of the tiny LTX-2 (audio and video streams, the a2v/v2a cross-attention), ranks 1-4."""
    path = _file(tmp_path, ltx2_model, key)
    reference = diffusers_deltas(LTX2LoraLoaderMixin, ltx2_model, path)
    adapter = assert_same_deltas(path, reference, "ltx2")
    assert "transformer_blocks.0.video_to_audio_attn.to_k" in adapter.modules
    assert "av_cross_attn_audio_v2a_gate.linear" in adapter.modules


def test_video_only_file_is_ltx_video_unless_width_or_metadata_say_ltx2(tmp_path):
    """LTX-2's video modules carry LTX-Video's names: a tiny file is LTX-Video; LTX-2's width or header decides."""
    g = torch.Generator().manual_seed(4)

    def write(name, width, metadata=None):
        tensors = {}
        for leaf in ("attn1.to_q", "attn1.to_k"):
            down, up = random_lora(width, width, 1, g)
            tensors[f"diffusion_model.transformer_blocks.0.{leaf}.lora_A.weight"] = down
            tensors[f"diffusion_model.transformer_blocks.0.{leaf}.lora_B.weight"] = up
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        return wsa.load_adapter(tmp_path / name)

    assert write("tiny.safetensors", D).family == "ltx_video"
    assert write("ltx2-wide.safetensors", 4096).family == "ltx2"
    assert write("ltxv-wide.safetensors", 2048).family == "ltx_video"
    assert write("tagged.safetensors", D, {"ss_base_model_version": "ltx2"}).family == "ltx2"


def test_unknown_module_in_an_ltx2_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name in ("transformer_blocks.0.audio_attn1.to_q", "audio_proj_in", "transformer_blocks.0.audio_attn3.to_q"):
        down, up = random_lora(8, 8, 2, g)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(
        FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.audio_attn3\.to_q'.*LTX-2"
    ):
        wsa.load_adapter(path)
