"""What real trainers put in files beside plain LoRA factors, as found by trying their conventions.

Each case comes from a trainer's save code (sd-scripts, OneTrainer, ComfyUI, LyCORIS): bundled
embeddings, DoRA magnitudes on fused layers, text-encoder-only files, ComfyUI's text-encoder names,
LoHa/LoKr on fused layers read from the header alone.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import wsa
from tests.tiny import relative_error
from wsa.errors import FormatError
from wsa.formats._tensorfile import header_only

D = 16


def _lora(out: int, inp: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def test_bundled_embeddings_are_noted_and_the_lora_is_read(tmp_path):
    down, up = _lora(D, D, 2, 0)
    key = "lora_unet_double_blocks_0_img_attn_proj"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    tensors |= {"bundle_emb.ohwx.clip_l": torch.randn(2, 8), "bundle_emb.ohwx.t5": torch.randn(2, 12)}
    path = tmp_path / "emb.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert list(adapter.modules) == ["transformer_blocks.0.attn.to_out.0"]
    assert any("1 bundled embedding(s) (ohwx)" in n for n in adapter.notes)


def test_dora_on_a_fused_layer_normalised_over_inputs_is_refused_naming_it(tmp_path):
    """kohya's ``dora_scale`` of shape (1, in) normalises the whole fused qkv's columns: no split is exact."""
    down, up = _lora(3 * D, D, 2, 1)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.dora_scale": torch.ones(1, D)}
    path = tmp_path / "dora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=r"dora\.safetensors: module 'double_blocks_0_img_attn_qkv' is fused.*DoRA"):
        wsa.load_adapter(path)


@pytest.mark.parametrize("suffix", [".dora_scale", ".lora_magnitude_vector.weight"])
def test_diffusers_keyed_dora_magnitudes_are_read(tmp_path, suffix):
    """OneTrainer writes diffusers-keyed DoRA with ``dora_scale`` (kohya's shape) or PEFT's magnitude vector."""
    down, up = _lora(D, D, 2, 2)
    base = "transformer.transformer_blocks.0.attn.to_q"
    magnitude = torch.rand(1, D) + 0.5 if suffix == ".dora_scale" else torch.rand(D) + 0.5
    tensors = {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up, f"{base}{suffix}": magnitude}
    path = tmp_path / "dora.safetensors"
    save_file(tensors, str(path))
    mod = wsa.load_adapter(path).modules["transformer_blocks.0.attn.to_q"]
    assert mod.is_dora and mod.dora_axis == ("in" if suffix == ".dora_scale" else "out")


def test_text_encoder_only_file_without_metadata(tmp_path):
    down, up = _lora(D, D, 2, 3)
    key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(tmp_path / "te.safetensors"))
    adapter = wsa.load_adapter(tmp_path / "te.safetensors")
    assert adapter.family == ""
    assert list(adapter.modules) == ["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"]


def test_comfyui_text_encoder_names_of_any_encoder(tmp_path):
    """ComfyUI writes ``text_encoders.<name>.transformer.<path>``: umt5xxl for Wan, t5xxl and clip_l for Flux."""
    tensors = {}
    for i, name in enumerate(("blocks.0.self_attn.q", "blocks.0.self_attn.k")):
        down, up = _lora(D, D, 2, 10 + i)
        tensors |= {f"diffusion_model.{name}.lora_up.weight": up, f"diffusion_model.{name}.lora_down.weight": down}
    down, up = _lora(D, D, 2, 12)
    te = "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    tensors |= {f"{te}.lora_up.weight": up, f"{te}.lora_down.weight": down}
    path = tmp_path / "wan.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "wan21"
    assert "text_encoder.encoder.block.0.layer.0.SelfAttention.q" in adapter.modules
    assert relative_error(adapter.delta("text_encoder.encoder.block.0.layer.0.SelfAttention.q"), up @ down) < 1e-6


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_on_a_fused_layer_splits_its_dense_delta_also_from_the_header(tmp_path, algo):
    g = torch.Generator().manual_seed(4)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    if algo == "loha":
        parts = {f"hada_{p}": torch.randn(*s, generator=g) for p, s in (("w1_a", (3 * D, 2)), ("w1_b", (2, D)))}
        parts |= {f"hada_{p}": torch.randn(*s, generator=g) for p, s in (("w2_a", (3 * D, 2)), ("w2_b", (2, D)))}
        full = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
    else:
        parts = {"lokr_w1": torch.randn(3, 2, generator=g), "lokr_w2": torch.randn(D, D // 2, generator=g)}
        full = torch.kron(parts["lokr_w1"], parts["lokr_w2"])
    tensors = {f"{key}.{p}": t for p, t in parts.items()}
    path = tmp_path / f"{algo}.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    for j, leaf in enumerate(("to_q", "to_k", "to_v")):
        got = adapter.delta(f"transformer_blocks.0.attn.{leaf}")
        assert relative_error(got, full[j * D : (j + 1) * D]) < 1e-5, leaf
    with header_only():
        shapes = {n: m.shape for n, m in wsa.load_adapter(path).modules.items()}
    assert shapes == {n: m.shape for n, m in adapter.modules.items()}


@pytest.mark.parametrize(
    ("wrapper", "module", "family", "canonical"),
    [
        ("diffusion_model.", "blocks.0.self_attn.q", "wan21", "blocks.0.attn1.to_q"),
        ("transformer.", "double_blocks.0.img_attn_proj", "hunyuan_video", "transformer_blocks.0.attn.to_out.0"),
    ],
)
def test_diffusion_pipe_peft_folders_with_a_wrapper_prefix(tmp_path, wrapper, module, family, canonical):
    """diffusion-pipe saves PEFT folders whose module names keep the wrapped model's attribute."""
    import json

    folder = tmp_path / "epoch1"
    folder.mkdir()
    down, up = _lora(D, D, 4, 5)
    prefix = f"base_model.model.{wrapper}{module}"
    save_file(
        {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}, str(folder / "adapter_model.safetensors")
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = wsa.load_adapter(folder)
    assert adapter.family == family and list(adapter.modules) == [canonical]


def test_sd3_text_encoder_3_keys_in_a_diffusers_file(tmp_path):
    tensors = {}
    for i, name in enumerate(
        ("transformer.transformer_blocks.0.attn.to_q", "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q")
    ):
        down, up = _lora(D, D, 2, 20 + i)
        tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    path = tmp_path / "sd3.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.architecture": "stable-diffusion-v3-medium/lora"})
    adapter = wsa.load_adapter(path)
    assert adapter.format == "diffusers" and adapter.family == "sd3"
    assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q" in adapter.modules


def test_comfyui_hunyuan_video_spells_modules_the_flux_way(tmp_path):
    """ComfyUI's HunyuanVideo reuses its Flux layers: ``img_attn.qkv``, the refiner's ``self_attn.qkv``, ``mlp.0``."""
    tensors = {}
    shapes = {
        "double_blocks.0.img_attn.qkv": (3 * D, D),
        "double_blocks.0.img_mod.lin": (6 * D, D),
        "txt_in.individual_token_refiner.blocks.0.self_attn.qkv": (3 * D, D),
        "txt_in.individual_token_refiner.blocks.0.mlp.0": (4 * D, D),
    }
    for i, (name, (o, n)) in enumerate(shapes.items()):
        down, up = _lora(o, n, 2, 30 + i)
        tensors |= {f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up}
    path = tmp_path / "hv.safetensors"
    save_file(tensors, str(path))
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hunyuan_video"
    assert "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj" in adapter.modules
    assert "transformer_blocks.0.attn.to_v" in adapter.modules


def test_rank_above_a_modules_width_in_canonical(tmp_path):
    """ComfyUI trains rank 128 on Flux's img_in (64 inputs): the gauge-fixed form keeps only the real components."""
    for n in range(3):
        down, up = _lora(D, 4, 8, 40 + n)  # 4 inputs, rank 8
        key = "diffusion_model.img_in"
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(tmp_path / f"r{n}.safetensors"))
    store = wsa.ingest([tmp_path], tmp_path / "s", repr="canonical", progress=False)
    for row_id in store.ids:
        original = wsa.load_adapter(tmp_path / f"{row_id}.safetensors")
        back = store.to_adapter(row_id)
        assert relative_error(back.delta("x_embedder"), original.delta("x_embedder")) < 1e-5


def test_family_option_reads_files_whose_names_also_fit_it(tmp_path):
    """ComfyUI-trained HunyuanVideo files with Flux-style names, no metadata, guess FLUX.1: --family corrects it."""
    for n in range(3):
        down, up = _lora(3 * D, D, 2, 50 + n)
        key = "diffusion_model.double_blocks.0.img_attn.qkv"
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(tmp_path / f"hv{n}.safetensors"))
    assert wsa.load_adapter(tmp_path / "hv0.safetensors").family == "flux1"
    assert "hunyuan_video" in wsa.load_adapter(tmp_path / "hv0.safetensors").family_candidates
    store = wsa.ingest([tmp_path], tmp_path / "s", family="hunyuan_video", repr="canonical", progress=False)
    assert len(store) == 3 and store.manifest["family"] == "hunyuan_video"
    assert not store.manifest["left_out"]


def test_extra_modules_are_a_mismatch_in_exact_mode(tmp_path):
    """Two I2V files among T2V ones: their extra image-attention modules must not be dropped silently."""
    for n in range(4):
        tensors = {}
        names = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k"] + (["blocks.0.cross_attn.k_img"] if n >= 3 else [])
        for i, name in enumerate(names):
            down, up = _lora(D, D, 2, 60 + 10 * n + i)
            tensors |= {f"lora_unet_{name.replace('.', '_')}.lora_down.weight": down}
            tensors |= {f"lora_unet_{name.replace('.', '_')}.lora_up.weight": up}
        save_file(tensors, str(tmp_path / f"w{n}.safetensors"))
    with pytest.raises(wsa.errors.CollectionError, match=r"add_k_proj.* is not in the collection.s layout"):
        wsa.ingest([tmp_path], tmp_path / "s", progress=False)
    store = wsa.ingest([tmp_path], tmp_path / "i", modules="intersect", progress=False)
    assert len(store) == 4


def test_comfyui_linear_shaped_conv_lora_equals_kohya_locon(tmp_path):
    """ComfyUI's trainer stores a 3×3 conv LoRA as r × (in·9); kohya LoCon as r × in × 3 × 3: one module."""
    g = torch.Generator().manual_seed(70)
    down4, up4 = torch.randn(2, D, 3, 3, generator=g), torch.randn(D, 2, 1, 1, generator=g)
    key = "input_blocks.1.0.in_layers.2"
    comfy = {
        f"diffusion_model.{key}.lora_down.weight": down4.reshape(2, -1),
        f"diffusion_model.{key}.lora_up.weight": up4[:, :, 0, 0],
    }
    kohya = {
        f"lora_unet_{key.replace('.', '_')}.lora_down.weight": down4,
        f"lora_unet_{key.replace('.', '_')}.lora_up.weight": up4,
    }
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    a, b = wsa.load_adapter(tmp_path / "comfy.safetensors"), wsa.load_adapter(tmp_path / "kohya.safetensors")
    name = "down_blocks.0.resnets.0.conv1"
    assert a.modules[name].shape == b.modules[name].shape == (D, D, 3, 3)
    assert relative_error(a.delta(name), b.delta(name)) < 1e-7


def test_a_conversion_beside_its_original_gets_its_own_id(tmp_path):
    down, up = _lora(D, D, 2, 80)
    key = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(tmp_path / "a.safetensors"))
    torch.save({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, tmp_path / "a.pt")
    from wsa.store.discover import discover

    assert sorted(s.id for s in discover([tmp_path])) == ["a", "a.safetensors"]


@pytest.mark.parametrize(
    ("value", "family"),
    [("wan-i2v-14b-2.2-high/lora", "wan22"), ("wan-t2v-480p-14b-2.1/lora", "wan21"), ("medium", None)],
)
def test_simpletuner_and_kohya_sd3_metadata_values(value, family):
    """SimpleTuner writes ``<family>-<flavour>/lora``; kohya SD3 writes ``medium`` in ss_base_model_version."""
    from wsa.families import family_from_metadata

    assert family_from_metadata({"modelspec.architecture": value})[0] == family
    header = {"ss_base_model_version": "medium", "modelspec.architecture": "stable-diffusion-3-medium/lora"}
    assert family_from_metadata(header)[0] == "sd3"


def test_block_indices_past_flux1s_rule_it_out(tmp_path):
    """ComfyUI-trained HunyuanVideo on the blocks only (Flux-style names) has double_blocks.19, which FLUX.1 lacks."""
    tensors = {}
    for i, name in enumerate(("double_blocks.0.img_attn.qkv", "double_blocks.19.img_attn.qkv")):
        down, up = _lora(3 * D, D, 2, 90 + i)
        tensors |= {f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up}
    save_file(tensors, str(tmp_path / "hv.safetensors"))
    assert wsa.load_adapter(tmp_path / "hv.safetensors").family == "hunyuan_video"


def test_embedded_world_zoos_are_their_own_family(tmp_path):
    """`wsa world zoo` adapters carry SD's module names; their config's ``builtin:faces`` names the family."""
    import json

    folder = tmp_path / "id_0"
    folder.mkdir()
    down, up = _lora(D, D, 1, 99)
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "base_model_name_or_path": "builtin:faces"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert wsa.load_adapter(folder).family == "world"
    del config["base_model_name_or_path"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = wsa.load_adapter(folder)
    assert adapter.family == "sd15" and "world" not in adapter.family_source
