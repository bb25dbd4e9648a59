"""FLUX.1 files from every trainer convention give diffusers' own ΔW on a one-layer FluxTransformer2DModel.

The reference is diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` (its kohya, XLabs and OneTrainer
converters) + ``load_lora_adapter`` + PEFT's merge. One documented exception: diffusers' kohya
converter hard-codes the full model's single-block split (``dims=[3072] * 3 + [12288]``), so on a tiny
model the single blocks' fused ``linear1`` cannot go through it; those files are checked against
diffusers without ``linear1``, and ``linear1``'s four diffusers modules against the row blocks of
``scale · B · A`` (q, k, v the input width each, ``proj_mlp`` the rest). And the same converter drops
the final layer's ``.alpha`` ("TODO: alphas" in its code; sd-scripts and ComfyUI apply alpha / rank to
every module), so the final layer's modules are written without alpha here.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, linear_shapes, random_lora
from tests.tiny import relative_error
from wsa.errors import FormatError

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

D = 16  # hidden width of the tiny model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        axes_dims_rope=(2, 2, 4),
    )


# BFL name -> diffusers module(s) on the tiny model, fused layers with their (out, in).
BFL = {
    "double_blocks.0.img_attn.qkv": (3 * D, D),
    "double_blocks.0.img_attn.proj": (D, D),
    "double_blocks.0.img_mlp.0": (4 * D, D),
    "double_blocks.0.img_mlp.2": (D, 4 * D),
    "double_blocks.0.img_mod.lin": (6 * D, D),
    "double_blocks.0.txt_attn.qkv": (3 * D, D),
    "double_blocks.0.txt_attn.proj": (D, D),
    "double_blocks.0.txt_mlp.0": (4 * D, D),
    "double_blocks.0.txt_mlp.2": (D, 4 * D),
    "double_blocks.0.txt_mod.lin": (6 * D, D),
    "single_blocks.0.linear2": (D, 5 * D),
    "single_blocks.0.modulation.lin": (3 * D, D),
    "final_layer.linear": (4, D),
    "final_layer.adaLN_modulation.1": (2 * D, D),
    "img_in": (D, 4),
    "txt_in": (D, 16),
}
LINEAR1 = ("single_blocks.0.linear1", (7 * D, D))


def _kohya_file(tmp_path, name, spell, *, with_linear1: bool, rank=4, alpha=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = dict(BFL)
    if with_linear1:
        modules[LINEAR1[0]] = LINEAR1[1]
    factors = {}
    for bfl, (out, inp) in modules.items():
        down, up = random_lora(out, inp, rank, g)
        key = spell(bfl)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        if alpha is not None and not bfl.startswith("final_layer"):
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        factors[bfl] = (down, up)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path, factors


def _kohya(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def _comfy(bfl: str) -> str:
    return "diffusion_model." + bfl


@pytest.mark.parametrize("spell", [_kohya, _comfy], ids=["kohya", "comfyui"])
def test_bfl_keys_match_diffusers(model, tmp_path, spell):
    path, _ = _kohya_file(tmp_path, "f.safetensors", spell, with_linear1=False)
    reference = diffusers_deltas(FluxPipeline, model, path)
    adapter = assert_same_deltas(path, reference, "flux1")
    assert adapter.format == ("kohya" if spell is _kohya else "comfyui")
    assert any("split double_blocks.0.img_attn.qkv" in n for n in adapter.notes)
    assert any("reordered rows of final_layer.adaLN_modulation.1" in n for n in adapter.notes)


@pytest.mark.parametrize("spell", [_kohya, _comfy], ids=["kohya", "comfyui"])
def test_single_block_linear1_splits_into_q_k_v_mlp(tmp_path, spell):
    path, factors = _kohya_file(tmp_path, "f.safetensors", spell, with_linear1=True, alpha=8.0)
    adapter = wsa.load_adapter(path)
    down, up = factors[LINEAR1[0]]
    full = (8.0 / 4) * up @ down
    rows = {"attn.to_q": (0, D), "attn.to_k": (D, 2 * D), "attn.to_v": (2 * D, 3 * D), "proj_mlp": (3 * D, 7 * D)}
    for leaf, (a, b) in rows.items():
        got = adapter.delta(f"single_transformer_blocks.0.{leaf}")
        assert relative_error(got, full[a:b]) < 1e-6, leaf
        assert adapter.modules[f"single_transformer_blocks.0.{leaf}"].rank == 4


def test_diffusers_keys_and_mixed_ranks_per_module(model, tmp_path):
    """A diffusers/ai-toolkit file, each module its own rank (as a dynamically resized CivitAI file)."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, (name, (out, inp)) in enumerate(sorted(linear_shapes(model).items())):
        down, up = random_lora(out, inp, 1 + i % 5, g)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    reference = diffusers_deltas(FluxPipeline, model, path)
    adapter = assert_same_deltas(path, reference, "flux1")
    assert len({m.rank for m in adapter.modules.values()}) == 5


def test_xlabs_keys_match_diffusers(model, tmp_path):
    g = torch.Generator().manual_seed(2)
    shapes = {
        "double_blocks.0.processor.qkv_lora1": (3 * D, D),
        "double_blocks.0.processor.proj_lora1": (D, D),
        "double_blocks.0.processor.qkv_lora2": (3 * D, D),
        "double_blocks.0.processor.proj_lora2": (D, D),
        "single_blocks.0.processor.qkv_lora": (3 * D, D),
    }
    tensors = {}
    for name, (out, inp) in shapes.items():
        down, up = random_lora(out, inp, 4, g)
        tensors[f"{name}.down.weight"] = down
        tensors[f"{name}.up.weight"] = up
    path = tmp_path / "xlabs.safetensors"
    save_file(tensors, str(path))
    reference = diffusers_deltas(FluxPipeline, model, path)
    adapter = assert_same_deltas(path, reference, "flux1")
    assert adapter.format == "xlabs"


def test_onetrainer_keys_match_diffusers(model, tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    shapes = linear_shapes(model)
    # diffusers' OneTrainer ("mixture") converter maps a block's attention modules and the top-level ones only.
    names = [
        n for n in shapes if ".attn." in n or not n.startswith(("transformer_blocks", "single_transformer_blocks"))
    ]
    for name in names:
        down, up = random_lora(*shapes[name], 2, g)
        key = "lora_transformer_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "onetrainer.safetensors"
    save_file(tensors, str(path))
    reference = diffusers_deltas(FluxPipeline, model, path)
    adapter = assert_same_deltas(path, reference, "flux1")
    assert adapter.format == "onetrainer"


def test_peft_single_file_and_fused_equal_split(tmp_path):
    """``base_model.model.`` (fal, PEFT state dict saved whole): a fused qkv gives the same ΔW as its split."""
    g = torch.Generator().manual_seed(4)
    down, up = random_lora(3 * D, D, 4, g)
    fused = tmp_path / "fused.safetensors"
    save_file(
        {
            "base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
            "base_model.model.double_blocks.0.img_attn.qkv.lora_B.weight": up,
        },
        str(fused),
    )
    split = {}
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        split[f"transformer.transformer_blocks.0.attn.{leaf}.lora_A.weight"] = down.clone()
        split[f"transformer.transformer_blocks.0.attn.{leaf}.lora_B.weight"] = up[j * D : (j + 1) * D].clone()
    split_path = tmp_path / "split.safetensors"
    save_file(split, str(split_path))
    a, b = wsa.load_adapter(fused), wsa.load_adapter(split_path)
    assert a.format == "peft-file"
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        assert relative_error(a.delta(name), b.delta(name)) < 1e-7


def test_sparse_split_qkv_keeps_each_modules_rank(tmp_path):
    """sd-scripts' ``split_qkv``: q, k, v trained as rank-2 LoRAs, saved fused with a block-diagonal up factor."""
    g = torch.Generator().manual_seed(5)
    down, up = random_lora(3 * D, D, 6, g)
    for j in range(3):
        mask = torch.ones(6, dtype=torch.bool)
        mask[2 * j : 2 * j + 2] = False
        up[j * D : (j + 1) * D, mask] = 0
    path = tmp_path / "sparse.safetensors"
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(6.0)}, str(path)
    )
    adapter = wsa.load_adapter(path)
    full = up @ down
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        mod = adapter.modules[f"transformer_blocks.0.attn.{leaf}"]
        assert mod.rank == 2
        assert relative_error(adapter.delta(f"transformer_blocks.0.attn.{leaf}"), full[j * D : (j + 1) * D]) < 1e-6


def test_metadata_decides_between_families_and_disagreement_is_noted(tmp_path):
    g = torch.Generator().manual_seed(6)
    down, up = random_lora(3 * D, D, 2, g)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    adapter = wsa.load_adapter(path)
    assert adapter.family == "flux1"
    assert any("metadata says 'sdxl_base_v1-0'" in n for n in adapter.notes)


def test_unknown_module_in_a_flux_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for key in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.bogus"):
        down, up = random_lora(3 * D, D, 2, g)
        tensors[f"diffusion_model.{key}.lora_A.weight"] = down
        tensors[f"diffusion_model.{key}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'double_blocks\.0\.img_attn\.bogus'.*FLUX\.1"):
        wsa.load_adapter(path)


def test_fused_layer_that_does_not_split_is_an_error(tmp_path):
    g = torch.Generator().manual_seed(8)
    down, up = random_lora(3 * D + 1, D, 2, g)
    path = tmp_path / "odd.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
        },
        str(path),
    )
    with pytest.raises(FormatError, match=r"odd\.safetensors: module 'double_blocks_0_img_attn_qkv'.*split"):
        wsa.load_adapter(path)


def test_bfl_control_lora_biases_widened_input_and_norm_replacements(tmp_path):
    """BFL's Canny/Depth control LoRAs: ``lora_B.bias``, ``img_in`` wider than the base (extra input channels), and
    q/k norm weights stored as new values (``….norm.query_norm.scale``).

    diffusers' converter hard-codes the full model (19/38 blocks, width 3072), so the expected ΔW is the formula
    (no alpha: scale 1; bias change = ``lora_B.bias``, as PEFT merges it with scaling 1); the norm replacements are
    values, not differences, and must be reported, not silently mixed into ΔW.
    """
    g = torch.Generator().manual_seed(9)
    down, up = random_lora(3 * D, D, 4, g)
    wide_down, wide_up = random_lora(D, 8, 4, g)  # img_in: 8 input channels where the base has 4
    bias = torch.randn(3 * D, generator=g)
    tensors = {
        "double_blocks.0.img_attn.qkv.lora_A.weight": down,
        "double_blocks.0.img_attn.qkv.lora_B.weight": up,
        "double_blocks.0.img_attn.qkv.lora_B.bias": bias,
        "img_in.lora_A.weight": wide_down,
        "img_in.lora_B.weight": wide_up,
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(8),
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(8),
    }
    path = tmp_path / "canny.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "flux1" and adapter.format == "bfl-control"
    assert relative_error(adapter.delta("x_embedder"), wide_up @ wide_down) < 1e-6
    assert adapter.delta("x_embedder").shape == (D, 8)
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        name = f"transformer_blocks.0.attn.{leaf}"
        assert relative_error(adapter.delta(name), (up @ down)[j * D : (j + 1) * D]) < 1e-6
        assert relative_error(adapter.bias_delta(name), bias[j * D : (j + 1) * D]) < 1e-6
    assert any("2 norm weight(s) replaced outright" in n for n in adapter.notes)
    assert not any("norm" in n for n in adapter.modules)


def test_diffsynth_flux_names_equal_the_bfl_file_of_the_same_factors(tmp_path):
    """DiffSynth-Studio's own FluxDiT names (``blocks.N.attn.a_to_qkv``, ``single_blocks.N.to_qkv_mlp``, PEFT's
    ``.default`` adapter name). diffusers reads no DiffSynth Flux file, so the reference is the BFL-keyed file with the
    same factors, whose ΔW test_bfl_keys_match_diffusers checks against diffusers (documented re-keying)."""
    bfl_of = {
        "blocks.0.attn.a_to_qkv": "double_blocks.0.img_attn.qkv",
        "blocks.0.attn.b_to_out": "double_blocks.0.txt_attn.proj",
        "blocks.0.norm1_a.linear": "double_blocks.0.img_mod.lin",
        "blocks.0.ff_b.2": "double_blocks.0.txt_mlp.2",
        "single_blocks.0.to_qkv_mlp": "single_blocks.0.linear1",
        "single_blocks.0.proj_out": "single_blocks.0.linear2",
    }
    shapes = {**BFL, LINEAR1[0]: LINEAR1[1]}
    g = torch.Generator().manual_seed(10)
    synth, bfl = {}, {}
    for ds, native in bfl_of.items():
        down, up = random_lora(*shapes[native], 4, g)
        synth |= {f"{ds}.lora_A.default.weight": down, f"{ds}.lora_B.default.weight": up}
        bfl |= {
            f"diffusion_model.{native}.lora_A.weight": down.clone(),
            f"diffusion_model.{native}.lora_B.weight": up.clone(),
        }
    save_file(synth, str(tmp_path / "ds.safetensors"))
    save_file(bfl, str(tmp_path / "bfl.safetensors"))
    a, b = wsa.load_adapter(tmp_path / "ds.safetensors"), wsa.load_adapter(tmp_path / "bfl.safetensors")
    assert a.format == "diffsynth" and a.family == "flux1"
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        assert relative_error(a.delta(name), b.delta(name)) < 1e-7, name
