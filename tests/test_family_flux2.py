"""FLUX.2 LoRAs from every trainer convention: wsa's ΔW per diffusers module equals diffusers' own.

The reference is ``Flux2LoraLoaderMixin.lora_state_dict`` (its converters
``_convert_non_diffusers_flux2_lora_to_diffusers`` and ``_convert_kohya_flux2_lora_to_diffusers``) and
``load_lora_adapter`` on a tiny ``Flux2Transformer2DModel``, then PEFT's merge. Conventions diffusers
cannot read (OneTrainer, DiffSynth, ComfyUI's ``lora_down`` spelling) are derived from a file it can read
by a re-keying written out in the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, linear_shapes, random_lora
from tests.tiny import relative_error, save_safetensors
from wsa.adapter import ModuleWeights
from wsa.errors import FormatError
from wsa.families import resolve
from wsa.families.flux2 import fits_shapes

RANK = 4
ALPHA = 3.0

#: BFL native module -> diffusers modules (row blocks in order), written from the converters' tables.
NATIVE = {
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.linear_in"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.linear_out"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.linear_in"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.linear_out"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.attn.to_out"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
}
#: Only ai-toolkit's converter knows these (the kohya one warns and drops them).
NATIVE_AI_TOOLKIT_ONLY = {
    "guidance_in.in_layer": ["time_guidance_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_guidance_embed.guidance_embedder.linear_2"],
    "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
    "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
    "single_stream_modulation.lin": ["single_stream_modulation.linear"],
}


def make_model():
    """A fresh tiny model (diffusers' ``delete_adapters`` leaves PEFT wrappers behind, so one per load)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        joint_attention_dim=12,
        timestep_guidance_channels=8,
        axes_dims_rope=(2, 2, 2, 2),
    ).eval()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture(scope="module")
def shapes():
    return linear_shapes(make_model())


def _mixin():
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

    return Flux2LoraLoaderMixin


def native_factors(table, shapes, seed=0):
    """``{native: (down, up)}`` with the native (fused) shape: rows = the diffusers modules' rows summed."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, targets in table.items():
        rows = sum(shapes[t][0] for t in targets)
        out[name] = random_lora(rows, shapes[targets[0]][1], RANK, g)
    return out


def diffusers_factors(names, shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: random_lora(*shapes[n], RANK, g) for n in names}


def _underscored(path: str) -> str:
    return path.replace(".", "_")


# --- native names ------------------------------------------------------------------------------------


def test_ai_toolkit(tmp_path: Path, model, shapes):
    """ai-toolkit: ``diffusion_model.<BFL name>.lora_A/lora_B.weight``, no alpha, ``ss_base_model_version`` flux2."""
    factors = native_factors({**NATIVE, **NATIVE_AI_TOOLKIT_ONLY}, shapes)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    file = save_safetensors(tmp_path / "aitk.safetensors", tensors, {"ss_base_model_version": "flux2"})
    reference = diffusers_deltas(_mixin(), model, file)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in reference
    adapter = assert_same_deltas(file, reference, "flux2")
    assert any("split double_blocks.0.img_attn.qkv" in n for n in adapter.notes)


def test_ai_toolkit_family_from_metadata(tmp_path: Path, shapes):
    """Attention + MLP + single blocks only: every name also fits FLUX.1; ai-toolkit's metadata decides."""
    factors = native_factors(NATIVE, shapes, seed=2)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    for value in ("flux2", "flux2_klein_4b", "flux2_klein_9b"):
        file = save_safetensors(tmp_path / f"{value}.safetensors", tensors, {"ss_base_model_version": value})
        reference = diffusers_deltas(_mixin(), make_model(), file)
        adapter = assert_same_deltas(file, reference, "flux2")
        assert adapter.family_source.startswith("keys+metadata"), adapter.family_source


def test_peft_single_file(tmp_path: Path, model, shapes):
    """Single-file PEFT: ``base_model.model.<BFL name>.lora_A/lora_B.weight`` (diffusers renames it to ai-toolkit's)."""
    factors = native_factors({**NATIVE, **NATIVE_AI_TOOLKIT_ONLY}, shapes, seed=3)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down
        tensors[f"base_model.model.{name}.lora_B.weight"] = up
    file = save_safetensors(tmp_path / "peft.safetensors", tensors)
    reference = diffusers_deltas(_mixin(), model, file)
    assert_same_deltas(file, reference, "flux2")


def _musubi_tensors(shapes, seed=4):
    factors = native_factors(NATIVE, shapes, seed=seed)
    tensors = {}
    for name, (down, up) in factors.items():
        key = "lora_unet_" + _underscored(name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return tensors


def test_musubi_kohya(tmp_path: Path, model, shapes):
    """musubi-tuner / kohya: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``alpha``."""
    tensors = _musubi_tensors(shapes)
    file = save_safetensors(
        tmp_path / "musubi.safetensors", tensors, {"modelspec.architecture": "Flux.2-klein-4b/lora"}
    )
    reference = diffusers_deltas(_mixin(), model, file)
    assert len(reference) == 19  # qkv x2 split in three, the rest one to one
    assert_same_deltas(file, reference, "flux2")


def test_comfyui_lora_down(tmp_path: Path, model, shapes):
    """ComfyUI spelling ``diffusion_model.<BFL name>.lora_down/lora_up.weight`` + ``.alpha``.

    diffusers' Flux.2 loader sends any ``lora_down`` file to its kohya converter, which knows only
    ``lora_unet_`` keys; so the reference is the musubi file of the same tensors, re-keyed
    ``lora_unet_<a_b_c>`` -> ``diffusion_model.<a.b.c>`` (same factors, same alpha, same ΔW).
    """
    musubi = _musubi_tensors(shapes, seed=5)
    kohya_file = save_safetensors(tmp_path / "musubi.safetensors", musubi)
    reference = diffusers_deltas(_mixin(), model, kohya_file)
    dotted = {_underscored(n): n for n in NATIVE}
    comfy = {}
    for key, value in musubi.items():
        module, suffix = key.split(".", 1)
        comfy[f"diffusion_model.{dotted[module.removeprefix('lora_unet_')]}.{suffix}"] = value
    file = save_safetensors(tmp_path / "comfy.safetensors", comfy, {"ss_base_model_version": "flux2"})
    assert_same_deltas(file, reference, "flux2")


def test_final_layer_swaps_shift_scale(tmp_path: Path, model, shapes):
    """``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its (shift, scale) halves swapped.

    BFL's last layer chunks its modulation as (shift, scale), diffusers' ``AdaLayerNormContinuous`` as
    (scale, shift); ``convert_flux2_transformer_checkpoint_to_diffusers`` swaps the halves (as FLUX.1's
    converters do). diffusers' LoRA converter renames it without the swap, so its ΔW is wsa's with the
    halves exchanged.
    """
    g = torch.Generator().manual_seed(6)
    down, up = random_lora(*shapes["norm_out.linear"], RANK, g)
    a, b = native_factors({"img_in": ["x_embedder"]}, shapes, seed=7)["img_in"]
    tensors = {
        "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight": down,
        "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight": up,
        "diffusion_model.img_in.lora_A.weight": a,
        "diffusion_model.img_in.lora_B.weight": b,
    }
    file = save_safetensors(tmp_path / "final.safetensors", tensors, {"ss_base_model_version": "flux2"})
    reference = diffusers_deltas(_mixin(), model, file)
    adapter = wsa.load_adapter(file)
    assert adapter.family == "flux2"
    assert relative_error(adapter.delta("x_embedder"), reference["x_embedder"]) < 1e-5
    ours, theirs = adapter.delta("norm_out.linear"), reference["norm_out.linear"]
    half = ours.shape[0] // 2
    assert relative_error(ours, torch.cat([theirs[half:], theirs[:half]])) < 1e-5
    assert relative_error(ours, up @ down) > 0.1  # really reordered


# --- diffusers names ---------------------------------------------------------------------------------

DIFFUSERS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
    "transformer_blocks.0.ff.linear_in",
    "transformer_blocks.0.ff_context.linear_out",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
    "single_transformer_blocks.0.attn.to_out",
    "double_stream_modulation_img.linear",
    "single_stream_modulation.linear",
    "x_embedder",
    "proj_out",
]


def _diffusers_file(tmp_path: Path, shapes, scale: float = 1.0, seed: int = 8) -> tuple[Path, dict]:
    """diffusers/PEFT keys ``transformer.<path>.lora_A/lora_B.weight``; ``scale`` baked into ``lora_A``."""
    factors = diffusers_factors(DIFFUSERS, shapes, seed=seed)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"transformer.{name}.lora_A.weight"] = down * scale
        tensors[f"transformer.{name}.lora_B.weight"] = up
    return save_safetensors(tmp_path / "diffusers.safetensors", tensors), factors


def test_diffusers(tmp_path: Path, model, shapes):
    """diffusers / SimpleTuner: ``transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight``."""
    file, _ = _diffusers_file(tmp_path, shapes)
    reference = diffusers_deltas(_mixin(), model, file)
    adapter = assert_same_deltas(file, reference, "flux2")
    assert adapter.family_source == "keys"


def test_onetrainer(tmp_path: Path, model, shapes):
    """OneTrainer: ``lora_transformer_<diffusers path with _>.lora_down/lora_up.weight`` + ``alpha``.

    diffusers reads OneTrainer keys only for FLUX.1; the reference is the diffusers-keyed file with
    ``alpha / rank`` baked into ``lora_A`` (the same ΔW).
    """
    file, factors = _diffusers_file(tmp_path, shapes, scale=ALPHA / RANK, seed=9)
    reference = diffusers_deltas(_mixin(), model, file)
    tensors = {}
    for name, (down, up) in factors.items():
        key = "lora_transformer_" + _underscored(name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    onetrainer = save_safetensors(tmp_path / "onetrainer.safetensors", tensors)
    assert_same_deltas(onetrainer, reference, "flux2")


def test_diffsynth(tmp_path: Path, model, shapes):
    """DiffSynth-Studio: diffusers module paths, no prefix, ``.lora_A.default.weight`` (PEFT's adapter name kept).

    diffusers reads them once ``transformer.`` is prepended and ``.default`` dropped: that file is the reference.
    """
    file, factors = _diffusers_file(tmp_path, shapes, seed=10)
    reference = diffusers_deltas(_mixin(), model, file)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{name}.lora_A.default.weight"] = down
        tensors[f"{name}.lora_B.default.weight"] = up
    diffsynth = save_safetensors(tmp_path / "diffsynth.safetensors", tensors)
    assert_same_deltas(diffsynth, reference, "flux2")


def test_lycoris_lokr(tmp_path: Path, model, shapes):
    """SimpleTuner LyCORIS LoKr: ``lycoris_transformer_blocks_0_attn_to_q.lokr_w1``.

    diffusers reads it (``_convert_lycoris_flux2_lokr_to_diffusers``).
    """
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for name in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.ff.linear_in",
        "single_transformer_blocks.0.attn.to_out",
    ):
        out, inp = shapes[name]
        key = "lycoris_" + _underscored(name)
        tensors[f"{key}.lokr_w1"] = torch.randn(2, 2, generator=g)
        tensors[f"{key}.lokr_w2"] = torch.randn(out // 2, inp // 2, generator=g) * 0.1
    file = save_safetensors(tmp_path / "lokr.safetensors", tensors)
    reference = diffusers_deltas(_mixin(), model, file)
    assert_same_deltas(file, reference, "flux2")


# --- family decision and errors -----------------------------------------------------------------------


def _meta(shape: tuple[int, int]) -> ModuleWeights:
    down, up = torch.empty(RANK, shape[1], device="meta"), torch.empty(shape[0], RANK, device="meta")
    return ModuleWeights("lora", {"down": down, "up": up}, shape, RANK, None, 1.0)


def _full_size(hidden: int) -> dict:
    """A FLUX.2 file's modules at full size (mlp_ratio 3, SwiGLU), no metadata: names fit FLUX.1 too."""
    return {
        ("double_blocks.0.img_attn.qkv", False): _meta((3 * hidden, hidden)),
        ("double_blocks.0.img_mlp.0", False): _meta((6 * hidden, hidden)),
        ("double_blocks.0.img_mlp.2", False): _meta((hidden, 3 * hidden)),
        ("single_blocks.0.linear1", False): _meta((9 * hidden, hidden)),
        ("single_blocks.0.linear2", False): _meta((hidden, 4 * hidden)),
    }


@pytest.mark.parametrize("hidden", [6144, 4096], ids=["dev", "klein-9b"])
def test_full_size_without_metadata_by_width(hidden):
    res = resolve(_full_size(hidden), metadata={}, path="x")
    assert res.family == "flux2" and res.source == "keys+shapes", (res.family, res.source)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in res.modules


def test_klein_4b_without_metadata_by_shape():
    """klein 4B is 3072 wide like FLUX.1: the MLP / single-block widths decide (``Family.fits``)."""
    res = resolve(_full_size(3072), metadata={}, path="x")
    assert res.family == "flux2", (res.family, res.source)


def test_fits_shapes():
    assert fits_shapes({n: m.shape for (n, _), m in _full_size(3072).items()}) is True
    flux1 = {"double_blocks_0_img_mlp_0": (4 * 3072, 3072), "single_blocks_0_linear1": (7 * 3072, 3072)}
    assert fits_shapes(flux1) is False
    assert fits_shapes({"double_blocks.0.img_attn.qkv": (9216, 3072)}) is None


def test_unknown_module_is_named(tmp_path: Path, shapes):
    factors = native_factors(NATIVE_AI_TOOLKIT_ONLY, shapes, seed=12)
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    tensors["diffusion_model.double_blocks.0.img_attn.bogus.lora_A.weight"] = torch.zeros(RANK, 16)
    tensors["diffusion_model.double_blocks.0.img_attn.bogus.lora_B.weight"] = torch.zeros(16, RANK)
    file = save_safetensors(tmp_path / "bad.safetensors", tensors, {"ss_base_model_version": "flux2"})
    with pytest.raises(FormatError, match=r"double_blocks\.0\.img_attn\.bogus"):
        wsa.load_adapter(file)


def test_ai_toolkit_lokr_on_fused_qkv(tmp_path: Path, shapes):
    """ai-toolkit LoKr on ``double_blocks.0.img_attn.qkv``: diffusers keeps it fused (``attn.to_qkv``, after
    ``fuse_qkv_projections``; a Kronecker ΔW has no exact factor split); wsa splits its dense ΔW by rows."""
    g = torch.Generator().manual_seed(13)
    tensors = {}
    for name, (rows, cols) in {
        "double_blocks.0.img_attn.qkv": (48, 16),
        "double_blocks.0.txt_attn.qkv": (48, 16),
    }.items():
        tensors[f"diffusion_model.{name}.lokr_w1"] = torch.randn(2, 2, generator=g)
        tensors[f"diffusion_model.{name}.lokr_w2"] = torch.randn(rows // 2, cols // 2, generator=g) * 0.1
    file = save_safetensors(tmp_path / "aitk_lokr.safetensors", tensors, {"ss_base_model_version": "flux2"})
    fused = make_model()
    fused.fuse_qkv_projections()
    reference = diffusers_deltas(_mixin(), fused, file)
    assert set(reference) == {"transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv"}
    adapter = wsa.load_adapter(file)
    assert adapter.family == "flux2"
    for fused_name, parts in {
        "transformer_blocks.0.attn.to_qkv": ["to_q", "to_k", "to_v"],
        "transformer_blocks.0.attn.to_added_qkv": ["add_q_proj", "add_k_proj", "add_v_proj"],
    }.items():
        ours = torch.cat([adapter.delta(f"transformer_blocks.0.attn.{p}") for p in parts])
        assert relative_error(ours, reference[fused_name]) < 1e-5


def test_diffusers_fused_spelling_splits():
    """``transformer_blocks.0.attn.to_qkv`` (diffusers' fused projection) is canonical q, k, v."""
    from wsa.families import FAMILIES

    mapped = FAMILIES.get("flux2").map("transformer_blocks_0_attn_to_added_qkv", (48, 16), True)
    assert [n for n, _ in mapped.targets] == [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"]
    assert [r for _, r in mapped.targets] == [[(0, 16)], [(16, 32)], [(32, 48)]]
