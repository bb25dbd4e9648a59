"""HunyuanVideo files of every trainer convention give diffusers' own ΔW on a one-layer HunyuanVideoTransformer3DModel.

The reference is diffusers' ``HunyuanVideoLoraLoaderMixin.lora_state_dict`` (its
``_convert_hunyuan_video_lora_to_diffusers``) + ``load_lora_adapter`` + PEFT's merge. That converter reads
Tencent's names under ``transformer.`` (diffusion-pipe) or ``diffusion_model.`` (ComfyUI), with
``lora_A``/``lora_B`` and no alpha. Documented exceptions:

* musubi-tuner (``lora_unet_…`` with ``lora_down``/``lora_up``/``alpha``) and ComfyUI files with alpha are not
  read by diffusers' HunyuanVideo loader; they are derived from the diffusion-pipe file by re-keying
  (``transformer.<native>.lora_A`` -> ``<prefix><native>.lora_down``, ``lora_B`` -> ``lora_up`` times
  ``rank / alpha``, plus ``.alpha``), which keeps ΔW, and checked against the diffusion-pipe file's reference;
* single blocks' fused ``linear1``: the converter hard-codes the full model's width (3072 rows each for q, k,
  v), so it is checked at that width against the converter's own output (``B_part @ A``), no model needed;
* the token refiner's ``self_attn_qkv``: the converter chunks ``lora_A`` into three as well as ``lora_B``
  (``remap_txt_in_``), which breaks any LoRA, so it is checked against the row thirds of ``B·A``;
* ``final_layer.adaLN_modulation.1``: the converter swaps the halves of ``lora_A`` (its rank rows) as well as
  ``lora_B``'s output rows (``remap_norm_scale_shift_``); that is the identity only when ``A``'s two halves are
  equal, so the diffusers-read files use such an ``A``, and a general one is checked against ``B·A`` with its
  output halves swapped (as the dense-weight converter does).
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
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.loaders import HunyuanVideoLoraLoaderMixin  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)
RANK = 4
FINAL = "final_layer.adaLN_modulation.1"
R = "txt_in.individual_token_refiner.blocks.0"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )


# Tencent's names on the tiny model, with their (out, in); every Linear a LoRA may target but the three
# exceptions of the module docstring (single_blocks.0.linear1, the refiner's self_attn_qkv, FINAL's A).
NATIVE = {
    "double_blocks.0.img_attn_qkv": (3 * D, D),
    "double_blocks.0.img_attn_proj": (D, D),
    "double_blocks.0.img_mod.linear": (6 * D, D),
    "double_blocks.0.img_mlp.fc1": (4 * D, D),
    "double_blocks.0.img_mlp.fc2": (D, 4 * D),
    "double_blocks.0.txt_attn_qkv": (3 * D, D),
    "double_blocks.0.txt_attn_proj": (D, D),
    "double_blocks.0.txt_mod.linear": (6 * D, D),
    "double_blocks.0.txt_mlp.fc1": (4 * D, D),
    "double_blocks.0.txt_mlp.fc2": (D, 4 * D),
    "single_blocks.0.linear2": (D, 5 * D),
    "single_blocks.0.modulation.linear": (3 * D, D),
    f"{R}.self_attn_proj": (D, D),
    f"{R}.mlp.fc1": (4 * D, D),
    f"{R}.mlp.fc2": (D, 4 * D),
    f"{R}.adaLN_modulation.1": (2 * D, D),
    "txt_in.input_embedder": (D, 16),
    "txt_in.t_embedder.mlp.0": (D, 256),
    "txt_in.t_embedder.mlp.2": (D, D),
    "txt_in.c_embedder.linear_1": (D, 16),
    "txt_in.c_embedder.linear_2": (D, D),
    "time_in.mlp.0": (D, 256),
    "time_in.mlp.2": (D, D),
    "vector_in.in_layer": (D, 8),
    "vector_in.out_layer": (D, D),
    "guidance_in.mlp.0": (D, 256),
    "guidance_in.mlp.2": (D, D),
    "final_layer.linear": (16, D),
    FINAL: (2 * D, D),
}


def _native_factors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    factors = {name: random_lora(out, inp, RANK, g) for name, (out, inp) in NATIVE.items()}
    down, up = factors[FINAL]
    half = down[: RANK // 2]
    factors[FINAL] = (torch.cat([half, half]), up)  # diffusers also swaps A's halves: the identity only here
    return factors


def _peft_file(tmp_path, prefix: str, factors, name: str = "f.safetensors"):
    tensors = {}
    for native, (down, up) in factors.items():
        tensors[f"{prefix}{native}.lora_A.weight"] = down
        tensors[f"{prefix}{native}.lora_B.weight"] = up
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def _rekey_with_alpha(tmp_path, factors, spell, alpha: float, name: str):
    """The same ΔW as the PEFT file: ``lora_up = B · rank / alpha`` under ``spell(native)``, with ``.alpha``."""
    tensors = {}
    for native, (down, up) in factors.items():
        key = spell(native)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up * (RANK / alpha)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."], ids=["diffusion-pipe", "comfyui"])
def test_native_keys_match_diffusers(model, tmp_path, prefix):
    path = _peft_file(tmp_path, prefix, _native_factors())
    reference = diffusers_deltas(HunyuanVideoLoraLoaderMixin, model, path)
    adapter = assert_same_deltas(path, reference, "hunyuan_video")
    assert adapter.format == ("diffusers" if prefix == "transformer." else "comfyui")
    assert any("split double_blocks.0.img_attn_qkv" in n for n in adapter.notes)
    assert any(f"reordered rows of {FINAL}" in n for n in adapter.notes)


def _musubi(native: str) -> str:
    return "lora_unet_" + native.replace(".", "_")


def _comfy(native: str) -> str:
    return "diffusion_model." + native


@pytest.mark.parametrize("spell", [_musubi, _comfy], ids=["musubi", "comfyui-alpha"])
def test_kohya_style_keys_with_alpha_match_diffusers(model, tmp_path, spell):
    factors = _native_factors(1)
    reference = diffusers_deltas(HunyuanVideoLoraLoaderMixin, model, _peft_file(tmp_path, "transformer.", factors))
    path = _rekey_with_alpha(tmp_path, factors, spell, alpha=3.0, name="k.safetensors")
    adapter = assert_same_deltas(path, reference, "hunyuan_video")
    assert adapter.format == ("kohya" if spell is _musubi else "comfyui")
    assert adapter.modules["transformer_blocks.0.attn.to_q"].alpha == 3.0


H = 3072  # the full model's width, which diffusers' converter assumes for linear1


@pytest.mark.parametrize("spell", [_musubi, lambda n: "transformer." + n], ids=["musubi", "diffusion-pipe"])
def test_single_block_linear1_at_full_width_matches_diffusers_converter(tmp_path, spell):
    g = torch.Generator().manual_seed(2)
    mlp = 16  # the converter splits off "the rest" after 3·3072 rows; its width does not matter
    down, up = random_lora(3 * H + mlp, H, 2, g)
    qkv_down, qkv_up = random_lora(3 * D, D, 2, g)  # the converter only runs on files with an img_attn_qkv
    peft = {
        "transformer.single_blocks.0.linear1.lora_A.weight": down,
        "transformer.single_blocks.0.linear1.lora_B.weight": up,
        "transformer.double_blocks.0.img_attn_qkv.lora_A.weight": qkv_down,
        "transformer.double_blocks.0.img_attn_qkv.lora_B.weight": qkv_up,
    }
    converted = HunyuanVideoLoraLoaderMixin.lora_state_dict(dict(peft))
    metadata = None
    tensors = peft
    if spell is _musubi:
        # musubi spells these two like FLUX.1's sd-scripts names; its header says which model (as musubi writes)
        metadata = {"modelspec.architecture": "hunyuan-video/lora"}
        alpha = 1.0
        tensors = {}
        for native, (a, b) in (
            ("single_blocks.0.linear1", (down, up)),
            ("double_blocks.0.img_attn_qkv", (qkv_down, qkv_up)),
        ):
            tensors[f"{_musubi(native)}.lora_down.weight"] = a
            tensors[f"{_musubi(native)}.lora_up.weight"] = b * (2 / alpha)
            tensors[f"{_musubi(native)}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "wide.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hunyuan_video"
    for leaf in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        key = f"transformer.single_transformer_blocks.0.{leaf}"
        expected = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        got = adapter.delta(f"single_transformer_blocks.0.{leaf}")
        assert got.shape == expected.shape, leaf
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), leaf


def test_token_refiner_qkv_and_final_layer_rows(tmp_path):
    """The two modules diffusers' converter mishandles (module docstring): rows of ``scale · B · A``."""
    g = torch.Generator().manual_seed(3)
    qkv = random_lora(3 * D, D, RANK, g)
    final = random_lora(2 * D, D, RANK, g)
    alpha = 2.0
    tensors = {}
    for native, (down, up) in {f"{R}.self_attn_qkv": qkv, FINAL: final}.items():
        tensors[f"{_musubi(native)}.lora_down.weight"] = down
        tensors[f"{_musubi(native)}.lora_up.weight"] = up
        tensors[f"{_musubi(native)}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "rows.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.architecture": "hunyuan-video/lora"})
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hunyuan_video"
    full = (alpha / RANK) * qkv[1] @ qkv[0]
    refiner = "context_embedder.token_refiner.refiner_blocks.0.attn"
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        assert relative_error(adapter.delta(f"{refiner}.{leaf}"), full[j * D : (j + 1) * D]) < 1e-6, leaf
    full = (alpha / RANK) * final[1] @ final[0]
    assert relative_error(adapter.delta("norm_out.linear"), torch.cat([full[D:], full[:D]])) < 1e-6


def test_diffusers_keys_match_diffusers(model, tmp_path):
    """diffusers / finetrainers: every Linear of the tiny model under its diffusers path, ranks 1-5."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for i, (name, (out, inp)) in enumerate(sorted(linear_shapes(model).items())):
        down, up = random_lora(out, inp, 1 + i % 5, g)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    reference = diffusers_deltas(HunyuanVideoLoraLoaderMixin, model, path)
    adapter = assert_same_deltas(path, reference, "hunyuan_video")
    assert adapter.format == "diffusers"


def test_full_weight_diffs_of_norms(tmp_path):
    """ComfyUI ``.diff`` on the q/k RMSNorms and the refiner's LayerNorm: ΔW is the stored tensor."""
    g = torch.Generator().manual_seed(5)
    diffs = {
        "double_blocks.0.img_attn_q_norm": ("transformer_blocks.0.attn.norm_q", 8),
        "double_blocks.0.txt_attn_k_norm": ("transformer_blocks.0.attn.norm_added_k", 8),
        "single_blocks.0.k_norm": ("single_transformer_blocks.0.attn.norm_k", 8),
        f"{R}.norm1": ("context_embedder.token_refiner.refiner_blocks.0.norm1", D),
    }
    tensors = {f"diffusion_model.{n}.diff": torch.randn(width, generator=g) for n, (_, width) in diffs.items()}
    down, up = random_lora(3 * D, D, 2, g)
    tensors["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"] = down
    tensors["diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"] = up
    path = tmp_path / "diff.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hunyuan_video"
    for native, (name, _) in diffs.items():
        assert torch.equal(adapter.delta(name), tensors[f"diffusion_model.{native}.diff"]), name


def test_attention_only_file_needs_metadata_to_beat_flux(tmp_path):
    """Double-block attention alone has the same names and widths in FLUX.1: metadata decides."""
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for native in ("double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj"):
        down, up = random_lora(*NATIVE[native], 2, g)
        tensors[f"{_musubi(native)}.lora_down.weight"] = down
        tensors[f"{_musubi(native)}.lora_up.weight"] = up
    bare, tagged = tmp_path / "bare.safetensors", tmp_path / "tagged.safetensors"
    save_file(tensors, str(bare))
    save_file(tensors, str(tagged), metadata={"modelspec.architecture": "hunyuan-video/lora"})
    a = wsa.load_adapter(bare)
    assert a.family == "flux1"
    assert "hunyuan_video" in a.family_source
    b = wsa.load_adapter(tagged)
    assert b.family == "hunyuan_video"
    assert b.family_source.startswith("keys+metadata")
    assert sorted(a.modules) == sorted(b.modules)


def test_unknown_module_in_a_hunyuan_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for native in ("double_blocks.0.img_attn_qkv", "double_blocks.0.img_mlp.fc1", "double_blocks.0.img_mlp.fc9"):
        down, up = random_lora(4 * D, D, 2, g)
        tensors[f"transformer.{native}.lora_A.weight"] = down
        tensors[f"transformer.{native}.lora_B.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'double_blocks\.0\.img_mlp\.fc9'.*HunyuanVideo"):
        wsa.load_adapter(path)


@pytest.mark.parametrize(
    "spelling",
    [
        ("transformer.", "x_embedder.proj", "context_embedder.proj_in"),
        ("diffusion_model.", "img_in.proj", "txt_in.input_embedder"),
    ],
    ids=["diffusers", "comfyui"],
)
def test_conv3d_patch_embedder(model, tmp_path, spelling):
    """The Conv3d patch embedder: ``lora_A`` is ``r × in × kt × kh × kw``, ``lora_B`` is ``out × r × 1 × 1 × 1``."""
    g = torch.Generator().manual_seed(8)
    factors = {
        "x_embedder.proj": (torch.randn(2, 4, 1, 2, 2, generator=g), torch.randn(D, 2, 1, 1, 1, generator=g)),
        "context_embedder.proj_in": random_lora(D, 16, 2, g),
    }
    reference = diffusers_deltas(
        HunyuanVideoLoraLoaderMixin, model, _peft_file(tmp_path, "transformer.", factors, "d.safetensors")
    )
    prefix, conv, linear = spelling
    path = _peft_file(tmp_path, prefix, dict(zip((conv, linear), factors.values(), strict=True)))
    assert_same_deltas(path, reference, "hunyuan_video")
