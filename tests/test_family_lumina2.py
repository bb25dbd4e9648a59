"""Lumina-Image 2.0 files of every trainer convention give diffusers' own ΔW on a one-layer Lumina2Transformer2DModel.

The reference is diffusers' ``Lumina2LoraLoaderMixin.lora_state_dict`` + ``load_lora_adapter`` + PEFT's merge.
diffusers reads native names only as ``diffusion_model.`` files, through
``_convert_non_diffusers_lumina2_lora_to_diffusers``, which hard-codes the full model's q/k/v split of the
fused ``attention.qkv`` (``[2304, 768, 768]``) and knows the blocks' modules only. Documented re-keyings:

* native files on the tiny model (diffusion-pipe ``diffusion_model.layers.0.attention.qkv``, sd-scripts
  ``lora_unet_layers_0_attention_qkv`` with alpha) are checked against the diffusers-named file that the
  converter would make of them (written out independently below: ``qkv``'s ``lora_A`` shared, ``lora_B`` rows
  q = the model width, then k, v halves; the embedders and final layer renamed as
  ``single_file_utils.convert_lumina2_to_diffusers`` does; sd-scripts' ``lora_up`` is ``B · rank / alpha``);
* the split itself is checked at the full model's width against the converter's own output;
* ai-toolkit's files (diffusers names under ``diffusion_model.``, which the converter cannot read) against
  the same file under ``transformer.``.
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
from diffusers import Lumina2Transformer2DModel  # noqa: E402
from diffusers.loaders import Lumina2LoraLoaderMixin  # noqa: E402

D, KV = 32, 16  # tiny model: 4 query heads of 8, 2 key/value heads of 8
RANK = 4


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=D,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(8, 8, 8),
        cap_feat_dim=12,
    )


def _block(prefix: str, modulated: bool) -> dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]]:
    """Native module -> ((out, in), {diffusers module: output rows}) for one block of the tiny model."""
    rules = {
        f"{prefix}.attention.qkv": (
            (D + 2 * KV, D),
            {
                f"{prefix}.attn.to_q": (0, D),
                f"{prefix}.attn.to_k": (D, D + KV),
                f"{prefix}.attn.to_v": (D + KV, D + 2 * KV),
            },
        ),
        f"{prefix}.attention.out": ((D, D), {f"{prefix}.attn.to_out.0": (0, D)}),
        f"{prefix}.feed_forward.w1": ((4 * D, D), {f"{prefix}.feed_forward.linear_1": (0, 4 * D)}),
        f"{prefix}.feed_forward.w2": ((D, 4 * D), {f"{prefix}.feed_forward.linear_2": (0, D)}),
        f"{prefix}.feed_forward.w3": ((4 * D, D), {f"{prefix}.feed_forward.linear_3": (0, 4 * D)}),
    }
    if modulated:
        rules[f"{prefix}.adaLN_modulation.1"] = ((4 * D, D), {f"{prefix}.norm1.linear": (0, 4 * D)})
    return rules


#: The test's own native -> diffusers table (what diffusers' converters do), for the tiny model.
NATIVE = {
    **_block("layers.0", True),
    **_block("noise_refiner.0", True),
    **_block("context_refiner.0", False),
    "x_embedder": ((D, 16), {"x_embedder": (0, D)}),
    "t_embedder.mlp.0": ((D, 256), {"time_caption_embed.timestep_embedder.linear_1": (0, D)}),
    "t_embedder.mlp.2": ((D, D), {"time_caption_embed.timestep_embedder.linear_2": (0, D)}),
    "cap_embedder.1": ((D, 12), {"time_caption_embed.caption_embedder.1": (0, D)}),
    "final_layer.adaLN_modulation.1": ((D, D), {"norm_out.linear_1": (0, D)}),
    "final_layer.linear": ((16, D), {"norm_out.linear_2": (0, 16)}),
}


def _files(tmp_path, spell, *, alpha=None, seed=0):
    """``(native file, diffusers-named file)`` with the same ΔW."""
    g = torch.Generator().manual_seed(seed)
    native, split = {}, {}
    for name, ((out, inp), targets) in NATIVE.items():
        down, up = random_lora(out, inp, RANK, g)
        key = spell(name)
        if alpha is None:
            native[f"{key}.lora_A.weight"], native[f"{key}.lora_B.weight"] = down, up
        else:
            native[f"{key}.lora_down.weight"] = down
            native[f"{key}.lora_up.weight"] = up * (RANK / alpha)
            native[f"{key}.alpha"] = torch.tensor(alpha)
        for target, (a, b) in targets.items():
            split[f"transformer.{target}.lora_A.weight"] = down.clone()
            split[f"transformer.{target}.lora_B.weight"] = up[a:b].clone()
    paths = tmp_path / "native.safetensors", tmp_path / "diffusers.safetensors"
    save_file(native, str(paths[0]))
    save_file(split, str(paths[1]))
    return paths


def _sd_scripts(native: str) -> str:
    return "lora_unet_" + native.replace(".", "_")


@pytest.mark.parametrize(
    ("spell", "alpha"),
    [(lambda n: "diffusion_model." + n, None), (_sd_scripts, 2.0)],
    ids=["diffusion-pipe", "sd-scripts"],
)
def test_native_keys_match_diffusers(model, tmp_path, spell, alpha):
    path, diffusers_file = _files(tmp_path, spell, alpha=alpha)
    reference = diffusers_deltas(Lumina2LoraLoaderMixin, model, diffusers_file)
    adapter = assert_same_deltas(path, reference, "lumina2")
    assert adapter.format == ("kohya" if alpha else "comfyui")
    assert any("split layers.0.attention.qkv" in n for n in adapter.notes)
    assert adapter.modules["layers.0.attn.to_k"].rank == RANK


W, WKV = 2304, 768  # the full model's widths, which diffusers' converter assumes


@pytest.mark.parametrize("spell", ["diffusion-pipe", "sd-scripts"])
def test_qkv_split_at_full_width_matches_diffusers_converter(tmp_path, spell):
    g = torch.Generator().manual_seed(1)
    factors = {"layers.0.attention.qkv": random_lora(W + 2 * WKV, W, 2, g)}
    # the converter pops every block module; their widths do not matter to it
    for leaf in ("attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1"):
        factors[f"layers.0.{leaf}"] = random_lora(8, 8, 2, g)
    peft = {}
    for name, (down, up) in factors.items():
        peft[f"diffusion_model.{name}.lora_A.weight"] = down
        peft[f"diffusion_model.{name}.lora_B.weight"] = up
    converted = Lumina2LoraLoaderMixin.lora_state_dict(dict(peft))
    tensors, metadata = peft, None
    if spell == "sd-scripts":
        tensors, metadata = {}, {"ss_base_model_version": "lumina2"}
        for name, (down, up) in factors.items():
            tensors[f"{_sd_scripts(name)}.lora_down.weight"] = down
            tensors[f"{_sd_scripts(name)}.lora_up.weight"] = up * 2  # alpha 1, rank 2: the same ΔW
            tensors[f"{_sd_scripts(name)}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "wide.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    adapter = wsa.load_adapter(path)
    assert adapter.family == "lumina2"
    for leaf in ("to_q", "to_k", "to_v"):
        key = f"transformer.layers.0.attn.{leaf}"
        expected = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        got = adapter.delta(f"layers.0.attn.{leaf}")
        assert got.shape == expected.shape, leaf
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), leaf


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."], ids=["diffusers", "ai-toolkit"])
def test_diffusers_names_match_diffusers(model, tmp_path, prefix):
    """Every Linear under its diffusers path, ranks 1-5; ai-toolkit writes them under ``diffusion_model.``."""
    g = torch.Generator().manual_seed(2)
    diffusers_keyed, tensors = {}, {}
    for i, (name, (out, inp)) in enumerate(sorted(linear_shapes(model).items())):
        down, up = random_lora(out, inp, 1 + i % 5, g)
        for store, p in ((diffusers_keyed, "transformer."), (tensors, prefix)):
            store[f"{p}{name}.lora_A.weight"] = down
            store[f"{p}{name}.lora_B.weight"] = up
    reference_file, path = tmp_path / "d.safetensors", tmp_path / "f.safetensors"
    save_file(diffusers_keyed, str(reference_file))
    save_file(tensors, str(path))
    reference = diffusers_deltas(Lumina2LoraLoaderMixin, model, reference_file)
    adapter = assert_same_deltas(path, reference, "lumina2")
    assert adapter.format == ("diffusers" if prefix == "transformer." else "comfyui")


def test_full_weight_diffs_of_norms(tmp_path):
    """ComfyUI ``.diff`` on norms, whose diffusers names differ between modulated blocks and the context refiner."""
    g = torch.Generator().manual_seed(3)
    names = {
        "layers.0.attention_norm1": "layers.0.norm1.norm",
        "layers.0.attention_norm2": "layers.0.norm2",
        "context_refiner.0.attention_norm1": "context_refiner.0.norm1",
        "noise_refiner.0.ffn_norm2": "noise_refiner.0.ffn_norm2",
        "layers.0.attention.q_norm": "layers.0.attn.norm_q",
        "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    }
    tensors = {f"diffusion_model.{n}.diff": torch.randn(D, generator=g) for n in names}
    for name, shape in (("layers.0.attention.qkv", (D + 2 * KV, D)), ("layers.0.adaLN_modulation.1", (4 * D, D))):
        down, up = random_lora(*shape, 2, g)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    path = tmp_path / "diff.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "lumina2"
    for native, name in names.items():
        assert torch.equal(adapter.delta(name), tensors[f"diffusion_model.{native}.diff"]), name


@pytest.mark.parametrize("value", ["lumina-2", "lumina2", "Lumina-Image-2.0/lora", "neta-lumina-v1"])
def test_metadata_names(value):
    assert family_from_metadata({"modelspec.architecture": value})[0] == "lumina2"


def test_unknown_module_in_a_lumina2_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name in (
        "layers.0.attention.qkv",
        "layers.0.adaLN_modulation.1",
        "layers.0.attn.to_q",
        "layers.0.attention.proj",
    ):
        down, up = random_lora(D + 2 * KV, D, 2, g)
        tensors[f"{_sd_scripts(name)}.lora_down.weight"] = down
        tensors[f"{_sd_scripts(name)}.lora_up.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'layers_0_attention_proj'.*Lumina"):
        wsa.load_adapter(path)


def _attention_only(tmp_path, metadata, width=D, kv=KV):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, shape in (
        ("layers.0.attention.qkv", (width + 2 * kv, width)),
        ("layers.0.attention.out", (width, width)),
    ):
        down, up = random_lora(*shape, 2, g)
        tensors[f"{_sd_scripts(name)}.lora_down.weight"] = down
        tensors[f"{_sd_scripts(name)}.lora_up.weight"] = up
    path = tmp_path / "attn.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_attention_only_file_with_metadata(tmp_path):
    """Z-Image shares Lumina 2's native block names (``attention.qkv``, ``attention.out``): metadata decides."""
    adapter = wsa.load_adapter(_attention_only(tmp_path, {"ss_base_model_version": "lumina2"}))
    assert adapter.family == "lumina2"
    assert adapter.delta("layers.0.attn.to_k").shape == (KV, D)


@pytest.mark.parametrize(("width", "kv"), [(D, KV), (W, WKV)], ids=["tiny", "full-width"])
def test_attention_only_grouped_query_file_without_metadata_is_lumina2(tmp_path, width, kv):
    """At full width today's result is silently wrong: Z-Image's equal thirds give q, k, v 1280 rows each."""
    adapter = wsa.load_adapter(_attention_only(tmp_path, None, width, kv))
    assert adapter.family == "lumina2"
    assert adapter.modules["layers.0.attn.to_q"].shape == (width, width)


def test_sd_scripts_gemma2_text_encoder(tmp_path):
    """sd-scripts' ``lora_te_`` is the Gemma-2 text encoder (a ``Gemma2Model``, as diffusers' ``text_encoder``)."""
    g = torch.Generator().manual_seed(6)
    tensors, factors = {}, {}
    for key, shape in (
        ("lora_unet_layers_0_attention_qkv", (D + 2 * KV, D)),
        ("lora_unet_layers_0_adaLN_modulation_1", (4 * D, D)),
        ("lora_te_layers_0_self_attn_q_proj", (8, 8)),
        ("lora_te_layers_0_mlp_gate_proj", (16, 8)),
    ):
        factors[key] = random_lora(*shape, 2, g)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = factors[key]
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "te.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "lumina2"
    for key, name in (
        ("lora_te_layers_0_self_attn_q_proj", "text_encoder.layers.0.self_attn.q_proj"),
        ("lora_te_layers_0_mlp_gate_proj", "text_encoder.layers.0.mlp.gate_proj"),
    ):
        down, up = factors[key]
        assert torch.allclose(adapter.delta(name), 0.5 * up @ down, rtol=1e-6, atol=0), name
