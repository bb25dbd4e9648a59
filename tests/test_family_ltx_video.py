"""LTX-Video files of every trainer convention give diffusers' own ΔW on a one-layer LTXVideoTransformer3DModel.

The reference is diffusers' ``LTXVideoLoraLoaderMixin.lora_state_dict`` (its
``_convert_non_diffusers_ltxv_lora_to_diffusers``, which only strips ``diffusion_model.``) +
``load_lora_adapter`` + PEFT's merge. One documented exception: Lightricks' four top-level names that differ
from diffusers' (``patchify_proj``, ``adaln_single.*``) are not renamed by that LoRA converter, so that file
is checked against the diffusers-named file (renamed by the table of diffusers'
``convert_ltx_transformer_checkpoint_to_diffusers``, written out independently below).
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
from diffusers import LTXVideoTransformer3DModel  # noqa: E402
from diffusers.loaders import LTXVideoLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=D,
        num_layers=1,
        caption_channels=12,
    )


def _file(tmp_path, model, key, *, rank=lambda i: 1 + i % 4, names=None, seed=0, name="f.safetensors"):
    """A PEFT-style file over the tiny model's Linears (or ``names``), key ``key(diffusers path)``.

    Call it before loading a LoRA into ``model``: PEFT's wrappers add ``….base_layer`` Linears.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(model)
    tensors = {}
    for i, module in enumerate(sorted(names or shapes)):
        down, up = random_lora(*shapes[module], rank(i), g)
        tensors[f"{key(module)}.lora_A.weight"] = down
        tensors[f"{key(module)}.lora_B.weight"] = up
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."], ids=["ltx-trainer", "diffusers"])
def test_keys_match_diffusers(model, tmp_path, prefix):
    """LTX trainer / ai-toolkit / ComfyUI (``diffusion_model.``) and diffusers: every Linear, ranks 1-4."""
    path = _file(tmp_path, model, lambda m: prefix + m)
    reference = diffusers_deltas(LTXVideoLoraLoaderMixin, model, path)
    adapter = assert_same_deltas(path, reference, "ltx_video")
    assert adapter.format == ("comfyui" if prefix == "diffusion_model." else "diffusers")
    assert len(reference) == len(linear_shapes(model))


#: Lightricks' checkpoint names where they differ from diffusers' (convert_ltx_transformer_checkpoint_to_diffusers).
LIGHTRICKS = {
    "proj_in": "patchify_proj",
    "time_embed.emb.timestep_embedder.linear_1": "adaln_single.emb.timestep_embedder.linear_1",
    "time_embed.emb.timestep_embedder.linear_2": "adaln_single.emb.timestep_embedder.linear_2",
    "time_embed.linear": "adaln_single.linear",
}


def test_lightricks_top_level_names_match_diffusers(model, tmp_path):
    diffusers_file = _file(tmp_path, model, lambda m: "transformer." + m, seed=1, name="d.safetensors")
    path = _file(tmp_path, model, lambda m: "diffusion_model." + LIGHTRICKS.get(m, m), seed=1)
    reference = diffusers_deltas(LTXVideoLoraLoaderMixin, model, diffusers_file)
    adapter = assert_same_deltas(path, reference, "ltx_video")
    assert "proj_in" in adapter.modules


def test_full_weight_diffs_of_norms_and_scale_shift_tables(tmp_path):
    """ComfyUI ``.diff``: the q/k RMSNorms (Lightricks' ``q_norm``) and the ``scale_shift_table`` parameters."""
    g = torch.Generator().manual_seed(2)
    diffs = {
        "transformer_blocks.0.attn1.q_norm": ("transformer_blocks.0.attn1.norm_q", (D,)),
        "transformer_blocks.0.attn2.norm_k": ("transformer_blocks.0.attn2.norm_k", (D,)),
        "transformer_blocks.0.scale_shift_table": ("transformer_blocks.0.scale_shift_table", (6, D)),
        "scale_shift_table": ("scale_shift_table", (2, D)),
    }
    tensors = {f"diffusion_model.{n}.diff": torch.randn(shape, generator=g) for n, (_, shape) in diffs.items()}
    down, up = random_lora(D, D, 2, g)
    tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight"] = down
    tensors["diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight"] = up
    path = tmp_path / "diff.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "ltx_video"
    for native, (name, _) in diffs.items():
        assert torch.equal(adapter.delta(name), tensors[f"diffusion_model.{native}.diff"]), name


@pytest.mark.parametrize("value", ["ltxv", "LTX-Video", "ltx_video", "ltxv-13b-0.9.7-dev/lora"])
def test_metadata_names(value):
    assert family_from_metadata({"modelspec.architecture": value})[0] == "ltx_video"


def test_unknown_module_in_an_ltx_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name in (
        "transformer_blocks.0.attn1.to_q",
        "transformer_blocks.0.attn2.to_k",
        "transformer_blocks.0.attn3.to_q",
    ):
        down, up = random_lora(D, D, 2, g)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'transformer_blocks\.0\.attn3\.to_q'.*LTX-Video"):
        wsa.load_adapter(path)
