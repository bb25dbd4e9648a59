"""Every adapter format loads to the ΔW its reference library computes.

Files are written with the real writers (PEFT ``save_pretrained``, diffusers ``save_lora_weights``
and converters) from tiny models; the reference ΔW is what PEFT (merged minus base weight) or
diffusers' own loader gives. Hand-made files are used only where no writer exists here (kohya,
LyCORIS), and then the expected ΔW is computed in the test with an independently written formula.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

import wsa
from tests.tiny import (
    ATTN_TARGETS,
    CONV1,
    PROJ_IN,
    TE_Q,
    TE_TARGETS,
    Q,
    assert_deltas_match,
    base_weights,
    peft_delta_weights,
    reference_deltas,
    relative_error,
    save_safetensors,
    tiny_text_encoder,
    tiny_unet,
    tuner_layers,
)
from wsa.families.names import kohya_module_to_canonical, kohya_name, ldm_to_diffusers

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import (  # noqa: E402
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
)
from diffusers.utils.state_dict_utils import StateDictType, convert_unet_state_dict_to_peft  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


def strip_wrapper(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in sd.items()}


def lora_config(**kw) -> LoraConfig:
    kw.setdefault("init_lora_weights", False)  # B != 0, so ΔW is not trivially zero
    return LoraConfig(**kw)


# ------------------------------------------------------------------------------------------------
# Shared models: built once per module (milliseconds each, but references need merging)


@pytest.fixture(scope="module")
def peft_unet():
    """PEFT LoRA with alpha != r, rsLoRA, rank/alpha patterns, 1×1 and 3×3 conv targets."""
    config = lora_config(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=[*ATTN_TARGETS, "proj_in", "conv1", "ff.net.2"],
        rank_pattern={Q: 2, "conv1": 3},
        alpha_pattern={"to_k": 11},
    )
    model = get_peft_model(tiny_unet(), config)
    return model, reference_deltas(model)


@pytest.fixture(scope="module")
def peft_folder(peft_unet, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    peft_unet[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scale_one_models():
    """UNet + text encoder with lora_alpha == r: what files without alpha mean (diffusers, kohya)."""
    unet = tiny_unet(seed=3)
    unet.add_adapter(lora_config(r=4, lora_alpha=4, target_modules=[*ATTN_TARGETS, "proj_in", "conv1"]))
    te = get_peft_model(tiny_text_encoder(), lora_config(r=2, lora_alpha=2, target_modules=TE_TARGETS))
    usd = get_peft_model_state_dict(unet)
    tsd = strip_wrapper(get_peft_model_state_dict(te))
    ref = {**reference_deltas(unet), **reference_deltas(te, "text_encoder.")}
    return usd, tsd, ref


# ------------------------------------------------------------------------------------------------
# PEFT folders


def test_peft_folder_matches_peft(peft_unet, peft_folder: Path) -> None:
    """rsLoRA scale alpha/√r and per-module rank/alpha patterns are applied as PEFT applies them."""
    _, ref = peft_unet
    adapter = wsa.load_adapter(peft_folder)
    assert adapter.format == "peft"
    assert_deltas_match(adapter, ref)
    assert adapter.modules[Q].rank == 2
    assert adapter.modules[Q].scale == pytest.approx(6 / math.sqrt(2))
    assert adapter.modules[TO_K].scale == pytest.approx(11 / 2)
    assert adapter.delta(PROJ_IN).shape == (8, 8, 1, 1)
    assert adapter.delta(CONV1).shape == (8, 8, 3, 3)
    assert adapter.modules[CONV1].rank == 3


def test_peft_weights_file_path_reads_its_folder(peft_unet, peft_folder: Path) -> None:
    adapter = wsa.load_adapter(peft_folder / "adapter_model.safetensors")
    assert_deltas_match(adapter, peft_unet[1])


def test_peft_wrong_scale_is_detected(peft_unet, peft_folder: Path, tmp_path: Path) -> None:
    """Negative control: the same weights with use_rslora=False must give a different ΔW."""
    folder = tmp_path / "norslora"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((peft_folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    config["use_rslora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = wsa.load_adapter(folder)
    ref = peft_unet[1][Q]
    assert relative_error(adapter.delta(Q), ref) > 0.1
    assert torch.allclose(adapter.delta(Q), ref * math.sqrt(2) / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(AssertionError):
        assert_deltas_match(adapter, peft_unet[1])


def test_w2w_layout_and_in_memory_names(peft_unet, peft_folder: Path, tmp_path: Path) -> None:
    """w2w: ``models/0/unet/`` folders, and exported keys carrying the adapter name (``identity1``)."""
    unet_dir = tmp_path / "models" / "0" / "unet"
    unet_dir.mkdir(parents=True)
    (unet_dir / "adapter_config.json").write_text((peft_folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    sd = load_file(str(peft_folder / "adapter_model.safetensors"))
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.identity1.weight").replace(".lora_B.weight", ".lora_B.identity1.weight"): v
        for k, v in sd.items()
    }
    assert any(".identity1." in k for k in renamed)
    save_safetensors(unet_dir / "adapter_model.safetensors", renamed)
    for path in (unet_dir, tmp_path / "models" / "0"):
        adapter = wsa.load_adapter(path)
        assert_deltas_match(adapter, peft_unet[1])  # folder named unet: denoiser names stay bare


def test_pipeline_folder_of_peft_components(tmp_path: Path) -> None:
    """``unet/`` + ``text_encoder/`` PEFT folders: text-encoder modules get their component prefix."""
    unet = get_peft_model(tiny_unet(seed=5), lora_config(r=2, lora_alpha=3, target_modules=ATTN_TARGETS))
    te = get_peft_model(tiny_text_encoder(seed=6), lora_config(r=3, lora_alpha=1, target_modules=TE_TARGETS))
    unet.save_pretrained(tmp_path / "unet")
    te.save_pretrained(tmp_path / "text_encoder")
    ref = {**reference_deltas(unet), **reference_deltas(te, "text_encoder.")}
    adapter = wsa.load_adapter(tmp_path)
    assert TE_Q in adapter.modules  # transformers 5 spelling normalised to ``text_model.``
    assert_deltas_match(adapter, ref)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            LoHaConfig(r=2, alpha=5, target_modules=["to_q", "to_k", "proj_in", "conv1", "ff.net.0.proj"]), id="loha"
        ),
        pytest.param(
            LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=["to_q", "proj_in", "conv1"]),
            id="loha-tucker",
        ),
        pytest.param(
            LoKrConfig(r=2, alpha=5, target_modules=["to_q", "to_k", "proj_in", "conv1", "ff.net.0.proj"]), id="lokr"
        ),
        pytest.param(
            LoKrConfig(r=2, alpha=5, decompose_both=True, target_modules=["to_q", "proj_in", "conv1", "ff.net.0.proj"]),
            id="lokr-both",
        ),
        pytest.param(
            LoKrConfig(r=2, alpha=7, decompose_both=True, use_effective_conv2d=True, target_modules=["to_q", "conv1"]),
            id="lokr-tucker",
        ),
        pytest.param(LoKrConfig(r=16, alpha=5, target_modules=["to_q", "conv1"]), id="lokr-full"),
    ],
)
def test_peft_loha_lokr_match_peft(config, tmp_path: Path) -> None:
    """PEFT LoHa/LoKr: ΔW equals PEFT's merged − base (PEFT scale alpha/r even for full LoKr factors)."""
    config.init_weights = False
    model = get_peft_model(tiny_unet(seed=7), config)
    model.save_pretrained(tmp_path)
    ref = reference_deltas(model)
    shapes = {name: tuple(layer.get_base_layer().weight.shape) for name, layer in tuner_layers(model).items()}
    assert_deltas_match(wsa.load_adapter(tmp_path, base_shapes=shapes), ref)
    # Without base shapes, 1×1 convs come back as the equal 2-D matrix (proj_in is ambiguous).
    plain = wsa.load_adapter(tmp_path)
    for name, delta in ref.items():
        assert torch.allclose(plain.delta(name).reshape(delta.shape), delta, rtol=1e-5, atol=1e-7), name
    assert plain.delta(CONV1).shape == (8, 8, 3, 3)


def test_peft_dora_needs_base_weight(tmp_path: Path) -> None:
    model = get_peft_model(
        tiny_unet(seed=8), lora_config(r=2, lora_alpha=5, use_dora=True, target_modules=["to_q", "proj_in", "conv1"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts m at ‖W + ΔW‖ (DoRA = plain LoRA); move it off that point
        for layer in tuner_layers(model).values():
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.5 * torch.rand(magnitude.shape, generator=g))
    model.save_pretrained(tmp_path)
    ref, base = reference_deltas(model), base_weights(model)
    adapter = wsa.load_adapter(tmp_path)
    assert adapter.kinds == ["lora+dora"]
    for name, delta in ref.items():
        got = adapter.delta(name, base_weight=base[name])
        assert relative_error(got, delta) < 1e-5, name
        # Negative control: the direction alone (no magnitude rescaling) is not DoRA's ΔW.
        assert relative_error(adapter.modules[name].direction_delta(), delta) > 1e-3, name
    with pytest.raises(wsa.FormatError, match=r"DoRA.*base_weight") as err:
        adapter.delta(Q)
    assert "\n" not in str(err.value)


def test_peft_lora_bias_is_scaled(tmp_path: Path) -> None:
    """``lora_bias=True``: the bias change is ``scale · lora_B.bias`` (PEFT merge adds it scaled)."""
    model = get_peft_model(
        tiny_unet(seed=9), lora_config(r=2, lora_alpha=6, lora_bias=True, target_modules=["proj_in", "time_emb_proj"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
    adapter = wsa.load_adapter(tmp_path)
    for name, layer in tuner_layers(model).items():
        base = layer.get_base_layer()
        w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        with torch.no_grad():
            layer.merge()
        dw, db = base.weight.detach() - w0, base.bias.detach() - b0
        layer.unmerge()
        assert relative_error(adapter.delta(name), dw) < 1e-5
        assert relative_error(adapter.bias_delta(name), db) < 1e-5
        assert adapter.modules[name].scale == 3.0


# ------------------------------------------------------------------------------------------------
# diffusers files


def _save_pipeline_lora(folder: Path, usd, tsd, **metadata) -> Path:
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=usd, text_encoder_lora_layers=tsd, **metadata)
    return folder / "pytorch_lora_weights.safetensors"


def _diffusers_loaded_unet(folder: Path, seed: int, weight_name: str = "pytorch_lora_weights.safetensors"):
    """What diffusers itself makes of the file: load it into a fresh UNet, take merged − base."""
    unet = tiny_unet(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet.load_lora_adapter(str(folder), weight_name=weight_name, prefix="unet", adapter_name="x")
    return reference_deltas(unet, adapter_name="x")


def test_diffusers_file_with_metadata(tmp_path: Path) -> None:
    """``save_lora_weights`` with ``*_lora_adapter_metadata``: alpha, patterns, rsLoRA come from the header."""
    unet = tiny_unet(seed=10)
    ucfg = lora_config(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=[*ATTN_TARGETS, "proj_in", "conv1"],
        rank_pattern={"conv1": 2},
        alpha_pattern={"to_k": 3},
    )
    unet.add_adapter(ucfg)
    tcfg = lora_config(r=2, lora_alpha=5, target_modules=TE_TARGETS)
    te = get_peft_model(tiny_text_encoder(), tcfg)
    path = _save_pipeline_lora(
        tmp_path,
        get_peft_model_state_dict(unet),
        strip_wrapper(get_peft_model_state_dict(te)),
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    header = wsa.formats.TensorFile(path).metadata
    flat = json.loads(header["lora_adapter_metadata"])
    assert flat["unet.lora_alpha"] == 6
    assert flat["text_encoder.r"] == 2
    adapter = wsa.load_adapter(path)
    assert adapter.format == "diffusers"
    assert_deltas_match(adapter, {**reference_deltas(unet), **reference_deltas(te, "text_encoder.")})
    # diffusers' own loader agrees on the UNet part.
    for name, delta in _diffusers_loaded_unet(tmp_path, seed=11).items():
        assert relative_error(adapter.delta(name), delta) < 1e-5, name


def test_diffusers_file_without_alpha_means_scale_one(tmp_path: Path) -> None:
    """No metadata, no alphas: diffusers loads with scale 1 whatever alpha the trainer used."""
    unet = tiny_unet(seed=12)
    unet.add_adapter(lora_config(r=4, lora_alpha=12, target_modules=[*ATTN_TARGETS, "conv1"]))
    _save_pipeline_lora(tmp_path, get_peft_model_state_dict(unet), None)
    adapter = wsa.load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    loaded = _diffusers_loaded_unet(tmp_path, seed=13)
    assert_deltas_match(adapter, loaded)
    trained = reference_deltas(unet)
    assert torch.allclose(adapter.delta(Q) * 3, trained[Q], rtol=1e-5, atol=1e-7)  # alpha/r = 3 is lost


def test_diffusers_save_lora_adapter_file(tmp_path: Path) -> None:
    """``unet.save_lora_adapter``: PEFT names without ``unet.`` and the bare LoraConfig as metadata."""
    unet = tiny_unet(seed=14)
    unet.add_adapter(lora_config(r=2, lora_alpha=7, target_modules=ATTN_TARGETS))
    unet.save_lora_adapter(str(tmp_path))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert not any(k.startswith("unet.") for k in wsa.formats.TensorFile(path).keys)
    assert_deltas_match(wsa.load_adapter(path), reference_deltas(unet))


def test_diffusers_intermediate_names(scale_one_models, tmp_path: Path) -> None:
    """``convert_state_dict_to_diffusers``: ``.lora.down`` / ``.lora_linear_layer.down`` names."""
    usd, tsd, ref = scale_one_models
    path = _save_pipeline_lora(tmp_path, convert_state_dict_to_diffusers(usd), convert_state_dict_to_diffusers(tsd))
    keys = wsa.formats.TensorFile(path).keys
    assert any(k.endswith(".to_q.lora.down.weight") for k in keys)
    assert any(k.endswith(".q_proj.lora_linear_layer.down.weight") for k in keys)
    assert any(k.endswith(".proj_in.lora_A.weight") for k in keys)
    adapter = wsa.load_adapter(path)
    assert_deltas_match(adapter, ref)
    loaded = _diffusers_loaded_unet(tmp_path, seed=15)
    for name, delta in loaded.items():
        assert relative_error(adapter.delta(name), delta) < 1e-5, name
    # and back to PEFT names with the component prefix (``unet.<path>.lora_A.weight``)
    # (convert_state_dict_to_peft maps the text encoder's names; the UNet has its own converter)
    te_back = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tsd), original_type=StateDictType.DIFFUSERS)
    back = {
        **{f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(convert_state_dict_to_diffusers(usd)).items()},
        **{f"text_encoder.{k}": v for k, v in te_back.items()},
    }
    assert f"unet.{Q}.lora_A.weight" in back
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in back
    assert_deltas_match(wsa.load_adapter(save_safetensors(tmp_path / "peft" / "lora.safetensors", back)), ref)


def _old_processor_dict(usd: dict[str, Tensor], tsd: dict[str, Tensor], unet_prefix: str) -> dict[str, Tensor]:
    """Hand-made diffusers ≈0.14 attention-processor keys from the same tensors (attention modules only)."""
    out = {}
    for key, value in usd.items():
        module, _, part = key.rpartition(".lora_")
        head, _, leaf = module.rpartition(".")
        if leaf == "0":  # to_out.0
            head, _, leaf = head.rpartition(".")
        if leaf not in ("to_q", "to_k", "to_v", "to_out"):
            continue
        updown = "down" if part.startswith("A") else "up"
        out[f"{unet_prefix}{head}.processor.{leaf}_lora.{updown}.weight"] = value
    clip = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    for key, value in tsd.items():
        module, _, part = key.rpartition(".lora_")
        head, _, leaf = module.rpartition(".")
        updown = "down" if part.startswith("A") else "up"
        out[f"text_encoder.text_model.{head}.{clip[leaf]}_lora.{updown}.weight"] = value
    return out


@pytest.mark.parametrize("unet_prefix", ["", "unet."])
def test_diffusers_old_processor_names(scale_one_models, unet_prefix: str, tmp_path: Path) -> None:
    usd, tsd, ref = scale_one_models
    sd = _old_processor_dict(usd, tsd, unet_prefix)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in {
        k.removeprefix("unet.") for k in sd
    }
    path = save_safetensors(tmp_path / "pytorch_lora_weights.safetensors", sd)
    adapter = wsa.load_adapter(path)
    expected = {k: v for k, v in ref.items() if not k.endswith(("proj_in", "conv1"))}
    assert_deltas_match(adapter, expected)
    if unet_prefix:  # diffusers' own conversion of old UNet names gives the same ΔW
        peft_sd = convert_unet_state_dict_to_peft({k: v for k, v in sd.items() if k.startswith("unet.")})
        assert any(k.startswith("unet.") and k.endswith(".to_q.lora_A.weight") for k in peft_sd)
        converted = wsa.load_adapter(save_safetensors(tmp_path / "peft" / "lora.safetensors", peft_sd))
        assert_deltas_match(converted, {k: v for k, v in expected.items() if not k.startswith("text_encoder.")})


# ------------------------------------------------------------------------------------------------
# kohya files


def test_kohya_from_diffusers_converter(scale_one_models, tmp_path: Path) -> None:
    """``convert_state_dict_to_kohya``: ``lora_unet_``/``lora_te1_`` names, ``alpha = rank`` (scale 1)."""
    usd, tsd, ref = scale_one_models
    sd = convert_state_dict_to_kohya(
        {**{f"unet.{k}": v for k, v in usd.items()}, **{f"text_encoder.{k}": v for k, v in tsd.items()}}
    )
    assert any(k.startswith("lora_te1_") for k in sd)
    assert any(k.endswith(".alpha") for k in sd)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "k.safetensors", sd))
    assert adapter.format == "kohya"
    assert_deltas_match(adapter, ref)


def _kohya_dict(model_ref_layers, name_fn, alphas, dtype=torch.float32) -> dict[str, Tensor]:
    out = {}
    for name, layer in model_ref_layers.items():
        kname = name_fn(name)
        out[f"{kname}.lora_down.weight"] = layer.lora_A["default"].weight.detach().to(dtype)
        out[f"{kname}.lora_up.weight"] = layer.lora_B["default"].weight.detach().to(dtype)
        if alphas is not None:
            out[f"{kname}.alpha"] = torch.tensor(alphas(name)).to(dtype)
    return out


@pytest.fixture(scope="module")
def kohya_source():
    model = get_peft_model(
        tiny_unet(seed=16, layers_per_block=2),
        lora_config(r=4, lora_alpha=4, target_modules=[*ATTN_TARGETS, "proj_in", "conv1", "conv"]),
    )
    return tuner_layers(model), peft_delta_weights(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_alpha", [True, False])
def test_kohya_alpha_and_dtypes(kohya_source, dtype, with_alpha: bool, tmp_path: Path) -> None:
    """alpha != rank gives alpha/rank; missing alpha gives 1; fp16/bf16 values are read exactly."""
    layers, _ = kohya_source
    alphas = (lambda n: 1.0 if "conv" in n else 3.0) if with_alpha else None
    sd = _kohya_dict(layers, kohya_name, alphas, dtype)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "k.safetensors", sd))
    for name in layers:
        kname = kohya_name(name)
        down = sd[f"{kname}.lora_down.weight"].float()
        up = sd[f"{kname}.lora_up.weight"].float()
        scale = (alphas(name) / 4) if alphas else 1.0
        expected = torch.einsum("or,ri...->oi...", up.flatten(1), down).reshape(adapter.modules[name].shape) * scale
        got = adapter.delta(name)
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), name
        assert adapter.modules[name].tensors["down"].dtype == dtype  # stored dtype kept
        if with_alpha:  # negative control: ignoring alpha would be caught
            assert not torch.allclose(got, expected / scale, rtol=1e-3)


def _ldm_name(diffusers_path: str) -> str:
    """Test-side inverse of the SD 1.5 block table (formats.md §4.2), for layers_per_block = 2."""
    import re

    subs = [
        (r"^down_blocks\.(\d)\.attentions\.(\d)\.", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1."),
        (
            r"^down_blocks\.(\d)\.resnets\.(\d)\.conv1",
            lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.in_layers.2",
        ),
        (r"^down_blocks\.(\d)\.downsamplers\.0\.conv", lambda m: f"input_blocks.{3 * int(m[1]) + 3}.0.op"),
        (r"^up_blocks\.(\d)\.attentions\.(\d)\.", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1."),
        (
            r"^up_blocks\.(\d)\.resnets\.(\d)\.conv1",
            lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.in_layers.2",
        ),
        (r"^up_blocks\.0\.upsamplers\.0\.conv", lambda m: "output_blocks.2.1.conv"),
        (r"^up_blocks\.(\d)\.upsamplers\.0\.conv", lambda m: f"output_blocks.{3 * int(m[1]) + 2}.2.conv"),
        (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"^mid_block\.resnets\.(\d)\.conv1", lambda m: f"middle_block.{2 * int(m[1])}.in_layers.2"),
    ]
    for pattern, repl in subs:
        new = re.sub(pattern, repl, diffusers_path)
        if new != diffusers_path:
            return new
    raise AssertionError(f"no LDM name for {diffusers_path}")


def test_kohya_ldm_names(kohya_source, tmp_path: Path) -> None:
    """SDXL-style kohya keys over LDM paths land on the same canonical modules and ΔW."""
    layers, ref = kohya_source
    sd = _kohya_dict(layers, lambda n: "lora_unet_" + _ldm_name(n).replace(".", "_"), lambda n: 2.0)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "k.safetensors", sd))
    assert_deltas_match(adapter, {k: v * 0.5 for k, v in ref.items()})


LDM_TABLE = [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.2.1.proj_in", "down_blocks.0.attentions.1.proj_in"),
    ("input_blocks.4.1.proj_out", "down_blocks.1.attentions.0.proj_out"),
    ("input_blocks.8.1.transformer_blocks.0.ff.net.2", "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.5.0.out_layers.3", "down_blocks.1.resnets.1.conv2"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.11.0.emb_layers.1", "down_blocks.3.resnets.1.time_emb_proj"),
    ("input_blocks.0.0", "conv_in"),
    ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("middle_block.1.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("output_blocks.0.0.in_layers.2", "up_blocks.0.resnets.0.conv1"),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.3.1.proj_in", "up_blocks.1.attentions.0.proj_in"),
    (
        "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    ),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
    ("output_blocks.11.1.proj_out", "up_blocks.3.attentions.2.proj_out"),
    ("output_blocks.11.0.skip_connection", "up_blocks.3.resnets.2.conv_shortcut"),
    ("out.2", "conv_out"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),  # SDXL
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),  # SDXL: up_blocks.0 has attention
    ("output_blocks.2.1.transformer_blocks.9.attn1.to_q", "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q"),
]


@pytest.mark.parametrize(("ldm", "expected"), LDM_TABLE)
def test_ldm_to_diffusers_table(ldm: str, expected: str) -> None:
    assert ldm_to_diffusers(ldm) == expected
    assert kohya_module_to_canonical("lora_unet_" + ldm.replace(".", "_")) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", TE_Q),
        ("lora_te1_text_model_encoder_layers_11_mlp_fc1", "text_encoder.text_model.encoder.layers.11.mlp.fc1"),
        (
            "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
            "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
        ),
        ("lora_te1_encoder_layers_0_self_attn_q_proj", TE_Q),  # convert_state_dict_to_kohya on transformers 5
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        ),
        (
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
            "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
        ),
        ("lora_unet_mid_block_resnets_1_conv_shortcut", "mid_block.resnets.1.conv_shortcut"),
        ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "down_blocks.1.resnets.0.time_emb_proj"),
        ("lycoris_down_blocks_0_downsamplers_0_conv", "down_blocks.0.downsamplers.0.conv"),
        ("lora_xyz_foo", None),
    ],
)
def test_kohya_names(name: str, expected: str | None) -> None:
    assert kohya_module_to_canonical(name) == expected


def test_kohya_dora_scale(tmp_path: Path) -> None:
    """kohya/LyCORIS ``dora_scale``: out-axis ``(out, 1)`` and in-axis ``(1, in)`` magnitudes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    down, up = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    m_out, m_in = torch.rand(6, 1, generator=g) + 0.5, torch.rand(1, 5, generator=g) + 0.5
    sd = {}
    for name, mag in (("a", m_out), ("b", m_in)):
        sd |= {
            f"lora_unet_{name}_to_q.lora_down.weight": down,
            f"lora_unet_{name}_to_q.lora_up.weight": up,
            f"lora_unet_{name}_to_q.alpha": torch.tensor(1.0),
            f"lora_unet_{name}_to_q.dora_scale": mag,
        }
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "d.safetensors", sd))
    merged = w + 0.5 * up @ down
    row_norm = torch.stack([merged[o].norm() for o in range(6)])[:, None]
    col_norm = torch.stack([merged[:, i].norm() for i in range(5)])[None, :]
    assert torch.allclose(adapter.delta("a.to_q", base_weight=w), m_out * merged / row_norm - w, atol=1e-6)
    assert torch.allclose(adapter.delta("b.to_q", base_weight=w), m_in * merged / col_norm - w, atol=1e-6)
    assert adapter.modules["a.to_q"].dora_axis == "out"
    assert adapter.modules["b.to_q"].dora_axis == "in"
    with pytest.raises(wsa.FormatError, match="base_weight"):
        adapter.delta("a.to_q")


# ------------------------------------------------------------------------------------------------
# LyCORIS files (hand-made; expected ΔW from explicit loops, not the reader's einsums)


def _rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop_matmul(a: Tensor, b: Tensor) -> Tensor:
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for k in range(a.shape[1]):
        out += torch.outer(a[:, k].double(), b[k].double())
    return out


def _loop_tucker(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """M[o,i,h,w] = Σ_a Σ_b core[a,b,h,w] · wa[a,o] · wb[b,i], summed one (a, b) pair at a time."""
    r, _, kh, kw = core.shape
    out = torch.zeros(wa.shape[1], wb.shape[1], kh, kw, dtype=torch.float64)
    for a in range(r):
        for b in range(r):
            out += torch.outer(wa[a].double(), wb[b].double())[:, :, None, None] * core[a, b].double()
    return out


def _block_kron(w1: Tensor, w2: Tensor) -> Tensor:
    """Kronecker product built block by block: block (p, q) is w1[p, q] · w2."""
    rows = [torch.cat([w1[p, q].double() * w2.double() for q in range(w1.shape[1])], dim=1) for p in range(w1.shape[0])]
    return torch.cat(rows, dim=0)


def _check(adapter, name: str, expected: Tensor) -> None:
    got = adapter.delta(name)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    assert relative_error(got, expected) < 1e-5, name


def test_lycoris_loha_plain_and_tucker(tmp_path: Path) -> None:
    r = 3
    lin = {
        p: _rand(*s, seed=i)
        for i, (p, s) in enumerate([("w1_a", (6, r)), ("w1_b", (r, 5)), ("w2_a", (6, r)), ("w2_b", (r, 5))])
    }
    conv = {
        p: _rand(*s, seed=10 + i)
        for i, (p, s) in enumerate([("w1_a", (4, r)), ("w1_b", (r, 2 * 9)), ("w2_a", (4, r)), ("w2_b", (r, 2 * 9))])
    }
    tuck = {
        p: _rand(*s, seed=20 + i)
        for i, (p, s) in enumerate(
            [
                ("t1", (r, r, 3, 3)),
                ("t2", (r, r, 3, 3)),
                ("w1_a", (r, 4)),
                ("w1_b", (r, 2)),
                ("w2_a", (r, 4)),
                ("w2_b", (r, 2)),
            ]
        )
    }
    sd = {}
    for mod, parts, alpha in (
        ("lin_to_q", lin, 1.5),
        ("down_blocks_0_resnets_0_conv1", conv, 6.0),
        ("tuck_conv", tuck, 3.0),
    ):
        sd |= {f"lora_unet_{mod}.hada_{p}": t for p, t in parts.items()}
        sd[f"lora_unet_{mod}.alpha"] = torch.tensor(alpha)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "loha.safetensors", sd))
    assert adapter.format == "lycoris"
    _check(adapter, "lin.to_q", 0.5 * _loop_matmul(lin["w1_a"], lin["w1_b"]) * _loop_matmul(lin["w2_a"], lin["w2_b"]))
    flat = _loop_matmul(conv["w1_a"], conv["w1_b"]) * _loop_matmul(conv["w2_a"], conv["w2_b"])
    _check(adapter, CONV1, 2.0 * flat.reshape(4, 2, 3, 3))
    expected = _loop_tucker(tuck["t1"], tuck["w1_a"], tuck["w1_b"]) * _loop_tucker(
        tuck["t2"], tuck["w2_a"], tuck["w2_b"]
    )
    _check(adapter, "tuck.conv", 1.0 * expected)
    assert adapter.kinds == ["loha"]


def test_lycoris_lokr(tmp_path: Path) -> None:
    """Full W1 and W2 ignore alpha (scale 1); a decomposed factor gives alpha / r."""
    full = {"w1": _rand(2, 3, seed=1), "w2": _rand(4, 2, seed=2)}
    dec = {"w1": _rand(2, 2, seed=3), "w2_a": _rand(4, 2, seed=4), "w2_b": _rand(2, 3, seed=5)}
    both = {
        "w1_a": _rand(2, 2, seed=6),
        "w1_b": _rand(2, 2, seed=7),
        "w2_a": _rand(4, 2, seed=8),
        "w2_b": _rand(2, 3, seed=9),
    }
    conv = {"w1": _rand(2, 2, seed=10), "w2_a": _rand(4, 2, seed=11), "w2_b": _rand(2, 3 * 9, seed=12)}
    tuck = {
        "w1": _rand(2, 2, seed=13),
        "w2_a": _rand(2, 4, seed=14),
        "w2_b": _rand(2, 3, seed=15),
        "t2": _rand(2, 2, 3, 3, seed=16),
    }
    sd = {}
    for mod, parts in (
        ("full_to_q", full),
        ("dec_to_q", dec),
        ("both_to_q", both),
        ("up_blocks_0_upsamplers_0_conv", conv),
        ("tuck_conv", tuck),
    ):
        sd |= {f"lora_unet_{mod}.lokr_{p}": t for p, t in parts.items()}
        sd[f"lora_unet_{mod}.alpha"] = torch.tensor(5.0)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "lokr.safetensors", sd))
    _check(adapter, "full.to_q", _block_kron(full["w1"], full["w2"]))  # alpha 5 ignored
    _check(adapter, "dec.to_q", 2.5 * _block_kron(dec["w1"], _loop_matmul(dec["w2_a"], dec["w2_b"])))
    w1 = _loop_matmul(both["w1_a"], both["w1_b"])
    _check(adapter, "both.to_q", 2.5 * _block_kron(w1, _loop_matmul(both["w2_a"], both["w2_b"])))
    # conv: W2 carries the kernel; ΔW[(p,o),(q,i),h,w] = W1[p,q] · W2[o,i,h,w]
    w2 = _loop_matmul(conv["w2_a"], conv["w2_b"]).reshape(4, 3, 3, 3)
    expected = torch.zeros(8, 6, 3, 3, dtype=torch.float64)
    for p in range(2):
        for q in range(2):
            expected[4 * p : 4 * p + 4, 3 * q : 3 * q + 3] = conv["w1"][p, q].double() * w2
    _check(adapter, "up_blocks.0.upsamplers.0.conv", 2.5 * expected)
    w2 = _loop_tucker(tuck["t2"], tuck["w2_a"], tuck["w2_b"])
    expected = torch.zeros(8, 6, 3, 3, dtype=torch.float64)
    for p in range(2):
        for q in range(2):
            expected[4 * p : 4 * p + 4, 3 * q : 3 * q + 3] = tuck["w1"][p, q].double() * w2
    _check(adapter, "tuck.conv", 2.5 * expected)
    assert adapter.modules["full.to_q"].scale == 1.0


def test_lycoris_locon_tucker_and_full(tmp_path: Path) -> None:
    """LoCon ``lora_mid`` (Tucker conv) and ``full`` ``diff``/``diff_b`` beside each other."""
    down, mid, up = _rand(2, 5, 1, 1, seed=1), _rand(2, 2, 3, 3, seed=2), _rand(4, 2, 1, 1, seed=3)
    diff, diff_b = _rand(4, 7, seed=4), _rand(4, seed=5)
    sd = {
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight": down,
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_mid.weight": mid,
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight": up,
        "lora_unet_down_blocks_0_resnets_0_conv2.alpha": torch.tensor(1.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.diff": diff,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b": diff_b,
    }
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "locon.safetensors", sd))
    expected = torch.zeros(4, 5, 3, 3, dtype=torch.float64)
    for o in range(4):
        for i in range(5):
            for a in range(2):
                for b in range(2):
                    expected[o, i] += up[o, a, 0, 0].double() * mid[a, b].double() * down[b, i, 0, 0].double()
    _check(adapter, "down_blocks.0.resnets.0.conv2", 0.5 * expected)
    fc1 = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    assert torch.equal(adapter.delta(fc1), diff)
    assert torch.equal(adapter.bias_delta(fc1), diff_b)
    assert sorted(adapter.kinds) == ["full", "lora"]


def test_peft_loha_renamed_to_kohya_keys(tmp_path: Path) -> None:
    """Cross-check: a PEFT LoHa's tensors under kohya ``hada_*`` keys with ``.alpha`` give PEFT's ΔW."""
    model = get_peft_model(
        tiny_unet(seed=17), LoHaConfig(r=2, alpha=5, init_weights=False, target_modules=["to_q", "to_v", "conv1"])
    )
    sd = {}
    for name, layer in tuner_layers(model).items():
        for part in ("w1_a", "w1_b", "w2_a", "w2_b"):
            sd[f"{kohya_name(name)}.hada_{part}"] = getattr(layer, f"hada_{part}")["default"].detach()
        sd[f"{kohya_name(name)}.alpha"] = torch.tensor(5.0)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "loha.safetensors", sd))
    assert_deltas_match(adapter, reference_deltas(model))


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_lokr_file(with_metadata: bool, tmp_path: Path) -> None:
    """diffusers 0.42 also saves/loads LoKr (``unet.<path>.lokr_w1``): metadata gives alpha/r, else 1."""
    config = LoKrConfig(r=2, alpha=5, init_weights=False, target_modules=["to_q", "to_k", "ff.net.0.proj"])
    model = get_peft_model(tiny_unet(seed=18), config)
    meta = {"unet_lora_adapter_metadata": config.to_dict()} if with_metadata else {}
    _save_pipeline_lora(tmp_path, strip_wrapper(get_peft_model_state_dict(model)), None, **meta)
    adapter = wsa.load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    ref = reference_deltas(model)
    assert_deltas_match(adapter, ref if with_metadata else {k: v / 2.5 for k, v in ref.items()})
    assert adapter.kinds == ["lokr"]
    for name, delta in _diffusers_loaded_unet(tmp_path, seed=19).items():  # diffusers' own reading
        assert relative_error(adapter.delta(name), delta) < 1e-5, name
