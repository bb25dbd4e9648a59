"""Exporters: every format reads back with the same ΔW, and the libraries' own loaders agree.

Tiny models are built here from configs (nothing downloaded, nothing shared with other test files),
so each adapter is a real PEFT save with ``alpha != r`` and a per-module rank pattern.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wsa
from wsa import Adapter, ConfigError, ModuleWeights, load_adapter
from wsa.export import write_adapter

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
TEXT = {
    "vocab_size": 64,
    "hidden_size": 12,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def make_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def make_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(**TEXT)).eval()


def base_weights() -> dict[str, torch.Tensor]:
    """Canonical module name -> base weight, for DoRA deltas and merge checks."""
    out = {n.removesuffix(".weight"): w for n, w in make_unet().state_dict().items()}
    out.update({f"text_encoder.{n.removesuffix('.weight')}": w for n, w in make_text_encoder().state_dict().items()})
    return out


def lora_config(**kw: object) -> LoraConfig:
    kw.setdefault("target_modules", UNET_TARGETS)
    return LoraConfig(init_lora_weights=False, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    """A pipeline folder saved by PEFT itself: UNet (rank pattern, alpha pattern) + text encoder."""
    src = tmp_path_factory.mktemp("src")
    torch.manual_seed(2)
    cfg = lora_config(r=4, lora_alpha=2, rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3})
    get_peft_model(make_unet(), cfg).save_pretrained(src / "unet")
    te_cfg = lora_config(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc1"])
    get_peft_model(make_text_encoder(), te_cfg).save_pretrained(src / "text_encoder")
    adapter = load_adapter(src)
    assert any(n.startswith("text_encoder.") for n in adapter.modules)
    assert {m.scale for m in adapter.modules.values()} >= {0.5, 0.75, 2.5}
    return adapter


@pytest.fixture(scope="module")
def dora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    src = tmp_path_factory.mktemp("dora")
    torch.manual_seed(3)
    model = get_peft_model(make_unet(), lora_config(r=2, lora_alpha=6, use_dora=True))
    with torch.no_grad():  # move the magnitudes off their initial norms so DoRA matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    model.save_pretrained(src)
    return load_adapter(src)


def assert_same_deltas(a: Adapter, b: Adapter, atol: float = 1e-6) -> None:
    assert set(a.modules) == set(b.modules)
    bases = base_weights()
    for name, m in a.modules.items():
        base = bases.get(name) if m.is_dora else None
        if m.is_dora and (base is None or tuple(base.shape) != m.shape):
            base = torch.randn(m.shape, generator=torch.Generator().manual_seed(len(name)))
        expected, got = a.delta(name, base), b.delta(name, base)
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=atol), name
        ea, eb = a.bias_delta(name), b.bias_delta(name)
        assert (ea is None) == (eb is None), name
        if ea is not None:
            assert torch.allclose(ea, eb, atol=atol), name  # type: ignore[arg-type]


def out_path(tmp_path, fmt: str):  # type: ignore[no-untyped-def]
    return tmp_path / ("adapter.safetensors" if fmt == "kohya" else "adapter")


# ---------------------------------------------------------------- round trips through wsa's readers


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_lora_round_trip(lora_adapter: Adapter, tmp_path, fmt: str) -> None:
    written = write_adapter(lora_adapter, out_path(tmp_path, fmt), fmt, metadata={"note": "hi"})
    back = load_adapter(written)
    assert_same_deltas(lora_adapter, back)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")]  # atomic writes leave no temp files
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(tmp_path / f, "pt") as fh:
                info = json.loads(fh.metadata()["wsa"])
            assert info["wsa_version"] == wsa.__version__
            assert info["format"] == fmt
            assert info["source"] == lora_adapter.path
            assert info["note"] == "hi"


def test_peft_layouts(lora_adapter: Adapter, tmp_path) -> None:
    """Text-encoder modules give a pipeline folder; a denoiser-only adapter gives a plain folder."""
    write_adapter(lora_adapter, tmp_path / "pipe", "peft")
    assert (tmp_path / "pipe/unet/adapter_config.json").is_file()
    assert (tmp_path / "pipe/text_encoder/adapter_model.safetensors").is_file()
    unet_only = Adapter("x", "peft", {k: v for k, v in lora_adapter.modules.items() if "text_encoder" not in k})
    write_adapter(unet_only, tmp_path / "flat", "peft")
    config = json.loads((tmp_path / "flat/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 2)
    assert config["rank_pattern"]
    assert config["alpha_pattern"]
    keys = load_file(tmp_path / "flat/adapter_model.safetensors")
    assert f"base_model.model.{ATTN}.to_q.lora_A.weight" in keys


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_dora_round_trip(dora_adapter: Adapter, tmp_path, fmt: str) -> None:
    back = load_adapter(write_adapter(dora_adapter, out_path(tmp_path, fmt), fmt))
    assert all(m.is_dora for m in back.modules.values())
    assert_same_deltas(dora_adapter, back)


def _module(kind: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], rank: int, scale: float, **kw):  # type: ignore[no-untyped-def]
    return ModuleWeights(kind, tensors, shape, rank, scale * rank if rank else None, scale, **kw)  # type: ignore[arg-type]


def lycoris_modules() -> dict[str, ModuleWeights]:
    g = torch.Generator().manual_seed(4)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    res = "down_blocks.0.resnets.0"
    return {
        f"{ATTN}.to_q": _module(
            "loha", {"w1_a": r(8, 3), "w1_b": r(3, 8), "w2_a": r(8, 3), "w2_b": r(3, 8)}, (8, 8), 3, 0.5
        ),
        f"{res}.conv1": _module(
            "loha", {"w1_a": r(8, 2), "w1_b": r(2, 36), "w2_a": r(8, 2), "w2_b": r(2, 36)}, (8, 4, 3, 3), 2, 1.5
        ),
        f"{res}.conv2": _module(
            "loha",
            {
                "t1": r(2, 2, 3, 3),
                "w1_a": r(2, 8),
                "w1_b": r(2, 8),
                "t2": r(2, 2, 3, 3),
                "w2_a": r(2, 8),
                "w2_b": r(2, 8),
            },
            (8, 8, 3, 3),
            2,
            0.25,
        ),
        f"{ATTN}.to_k": _module("lokr", {"w1": r(2, 2), "w2_a": r(4, 2), "w2_b": r(2, 4)}, (8, 8), 2, 3.0),
        f"{ATTN}.to_v": _module("lokr", {"w1": r(2, 2), "w2": r(4, 4)}, (8, 8), 0, 2.0),
        f"{ATTN}.to_out.0": _module("lokr", {"w1_a": r(2, 1), "w1_b": r(1, 2), "w2": r(4, 4)}, (8, 8), 1, 0.5),
        f"{res}.time_emb_proj": _module("full", {"diff": r(8, 32), "bias": r(8)}, (8, 32), 0, 1.0),
        "up_blocks.1.resnets.0.conv1": _module(
            "lora", {"down": r(3, 24, 1, 1), "mid": r(3, 3, 3, 3), "up": r(8, 3, 1, 1)}, (8, 24, 3, 3), 3, 0.75
        ),
        "mid_block.attentions.0.proj_in": _module(
            "lora", {"down": r(2, 16), "up": r(16, 2), "magnitude": r(16).abs() + 1}, (16, 16), 2, 2.0, dora_axis="in"
        ),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": _module(
            "lora", {"down": r(2, 12), "up": r(16, 2), "bias": r(16)}, (16, 12), 2, 1.25
        ),
    }


def test_lycoris_round_trip_kohya(tmp_path) -> None:
    adapter = Adapter("made", "lycoris", lycoris_modules())
    path = write_adapter(adapter, tmp_path / "ly.safetensors", "kohya")
    back = load_adapter(path)
    assert back.format == "lycoris"
    assert_same_deltas(adapter, back)
    keys = set(load_file(path))
    assert "lora_unet_down_blocks_0_resnets_0_conv2.hada_t1" in keys
    assert "lora_unet_up_blocks_1_resnets_0_conv1.lora_mid.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.dora_scale" in keys
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.diff_b" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    # LoKr with both factors full: no alpha (LyCORIS ignores it); the scale went into w1.
    assert f"lora_unet_{ATTN.replace('.', '_')}_to_v.alpha" not in keys


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_lycoris_types(tmp_path, kind: str) -> None:
    """An all-LoHa or all-LoKr adapter becomes PEFT LOHA / LOKR and reads back the same."""
    adapter = Adapter("made", "lycoris", {k: m for k, m in lycoris_modules().items() if m.kind == kind})
    back = load_adapter(write_adapter(adapter, tmp_path / "p", "peft"))
    assert json.loads((tmp_path / "p/adapter_config.json").read_text())["peft_type"] == kind.upper()
    assert_same_deltas(adapter, back)


def test_fp16_and_float32_alpha(lora_adapter: Adapter, tmp_path) -> None:
    path = write_adapter(lora_adapter, tmp_path / "h.safetensors", "kohya", dtype=torch.float16)
    tensors = load_file(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    back = load_adapter(path)
    for name in lora_adapter.modules:
        assert torch.allclose(back.delta(name), lora_adapter.delta(name), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- interop with diffusers and PEFT


def canonical(name: str, text_encoder: bool) -> str:
    """Live module name -> wsa's name (transformers 5 dropped CLIP's ``text_model.`` level)."""
    name = name.removeprefix("base_model.model.")
    if not text_encoder:
        return name
    return "text_encoder." + (name if name.startswith("text_model.") else "text_model." + name)


def merged_deltas(model: torch.nn.Module, text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Merge every injected LoRA layer and return merged weight minus the base weight."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer().weight.detach().clone()
            module.merge()
            out[canonical(name, text_encoder)] = module.get_base_layer().weight.detach() - base
    return out


def load_with_diffusers(folder, weight_name: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    mixin = StableDiffusionLoraLoaderMixin
    sd, alphas, meta = mixin.lora_state_dict(str(folder), weight_name=weight_name, return_lora_metadata=True)
    unet, te = make_unet(), make_text_encoder()
    mixin.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=meta)
    mixin.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder", adapter_name="x", metadata=meta)
    return {**merged_deltas(unet), **merged_deltas(te, text_encoder=True)}


@pytest.mark.parametrize(
    ("fmt", "name"), [("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "k.safetensors")]
)
def test_diffusers_loads_exports(lora_adapter: Adapter, tmp_path, fmt: str, name: str) -> None:
    write_adapter(lora_adapter, tmp_path / name if fmt == "kohya" else tmp_path, fmt)
    merged = load_with_diffusers(tmp_path, name)
    expected = set(lora_adapter.modules)
    if fmt == "kohya":
        # Upstream, not ours: diffusers 0.42 + transformers 5 turns kohya ``lora_te_…self_attn_q_proj``
        # into ``encoder.layers.N.self_attn.to_q_lora`` and then drops it (fc1/fc2 still load).
        expected -= {n for n in expected if ".self_attn." in n}
    assert set(merged) == expected
    for module, delta in merged.items():
        if fmt == "kohya" and module.endswith(".to_k"):
            # Upstream too: diffusers 0.42 renames kohya attention keys to ``processor.to_k_lora`` but
            # not their alphas, so a non-default attention alpha is dropped ("alpha_pattern keys did not
            # match"). The file is right: wsa, ComfyUI and A1111 read alpha per module.
            continue
        assert torch.allclose(delta, lora_adapter.delta(module), atol=1e-6), module


def test_peft_loads_export(lora_adapter: Adapter, tmp_path) -> None:
    write_adapter(lora_adapter, tmp_path / "p", "peft")
    for model, sub, te in ((make_unet(), "unet", False), (make_text_encoder(), "text_encoder", True)):
        loaded = PeftModel.from_pretrained(model, tmp_path / "p" / sub)
        deltas = {
            canonical(n, te): m.get_delta_weight("default")
            for n, m in loaded.named_modules()
            if isinstance(m, BaseTunerLayer)
        }
        assert set(deltas) == {k for k in lora_adapter.modules if k.startswith("text_encoder.") == te}
        for module, delta in deltas.items():
            assert torch.allclose(delta, lora_adapter.delta(module), atol=1e-6), module


def test_peft_loads_dora_export(dora_adapter: Adapter, tmp_path) -> None:
    write_adapter(dora_adapter, tmp_path / "d", "peft")
    merged = merged_deltas(PeftModel.from_pretrained(make_unet(), tmp_path / "d").base_model.model)
    bases = base_weights()
    assert set(merged) == set(dora_adapter.modules)
    for module, delta in merged.items():
        assert torch.allclose(delta, dora_adapter.delta(module, bases[module]), atol=1e-5), module


# ---------------------------------------------------------------- negative controls


def test_non_lora_refused_by_lora_formats(tmp_path) -> None:
    mixed = Adapter("made", "lycoris", lycoris_modules())
    for fmt in ("peft", "diffusers"):
        with pytest.raises(ConfigError, match="kohya"):
            write_adapter(mixed, tmp_path / fmt, fmt)
    loha = Adapter("made", "lycoris", {k: m for k, m in lycoris_modules().items() if m.kind == "loha"})
    with pytest.raises(ConfigError, match="kohya"):
        write_adapter(loha, tmp_path / "d", "diffusers")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_wrong_alpha_changes_delta(lora_adapter: Adapter, tmp_path) -> None:
    """The alpha really carries the scale: doubling one makes that module's ΔW differ."""
    path = write_adapter(lora_adapter, tmp_path / "k.safetensors", "kohya")
    tensors = load_file(path)
    key = f"lora_unet_{ATTN.replace('.', '_')}_to_q.alpha"
    tensors[key] = tensors[key] * 2
    save_file(tensors, tmp_path / "bad.safetensors")
    bad = load_adapter(tmp_path / "bad.safetensors")
    name = f"{ATTN}.to_q"
    assert not torch.allclose(bad.delta(name), lora_adapter.delta(name), atol=1e-6)
    assert torch.allclose(bad.delta(name), 2 * lora_adapter.delta(name), atol=1e-6)


def test_bad_arguments(lora_adapter: Adapter, tmp_path) -> None:
    with pytest.raises(ConfigError, match="choices"):
        write_adapter(lora_adapter, tmp_path / "x", "comfy")
    with pytest.raises(ConfigError, match="safetensors"):
        write_adapter(lora_adapter, tmp_path, "kohya")
    with pytest.raises(ConfigError, match="dtype"):
        write_adapter(lora_adapter, tmp_path / "x", "peft", dtype=torch.int8)
