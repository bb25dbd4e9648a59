"""Qwen-Image LoRAs in every trainer's key convention, checked against diffusers' own loader.

Each file is read twice: by diffusers (``QwenImageLoraLoaderMixin.lora_state_dict``, whose
``_convert_non_diffusers_qwen_lora_to_diffusers`` handles ``diffusion_model.``, ``lora_unet_`` and
DiffSynth's ``.default.``), loaded into a tiny ``QwenImageTransformer2DModel`` whose merged-minus-base
weights are the reference ΔW; and by ``wsa.load_adapter``, which must name the same modules and give
the same ΔW. Qwen-Image has no fused layers: its checkpoint is in diffusers' layout already.
"""

from __future__ import annotations

import pytest
import torch

import wsa
from tests.tiny import reference_deltas, relative_error, save_safetensors
from wsa.adapter import ModuleWeights
from wsa.errors import FormatError
from wsa.families import resolve

RANK = 4

#: Every Linear of one block a LoRA may target, and the top-level ones (musubi/ai-toolkit "all linear").
BLOCK = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mod.1",
    "txt_mod.1",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
TOP = (
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)
TARGETS = tuple(f"transformer_blocks.{i}.{m}" for i in range(2) for m in BLOCK) + TOP


@pytest.fixture(scope="module")
def model():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def _shapes(model) -> dict[str, tuple[int, int]]:
    mods = dict(model.named_modules())
    return {t: tuple(mods[t].weight.shape) for t in TARGETS}


def _factors(model, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Random (down, up, alpha) per target; alphas differ per module so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, (name, (n_out, n_in)) in enumerate(_shapes(model).items()):
        down = torch.randn(RANK, n_in, generator=g) / n_in**0.5
        up = torch.randn(n_out, RANK, generator=g)
        out[name] = (down, up, 1.0 + j % 7)
    return out


def _diffusers_reference(model, file) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    sd, meta = QwenImageLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="default", metadata=meta)
    try:
        return reference_deltas(model)
    finally:
        model.unload_lora()


def _check(file, reference: dict[str, torch.Tensor], family: str = "qwen_image") -> wsa.Adapter:
    adapter = wsa.load_adapter(file)
    assert adapter.family == family, (adapter.family, adapter.family_source)
    assert sorted(adapter.modules) == sorted(reference), sorted(set(adapter.modules) ^ set(reference))[:6]
    for name, ref in reference.items():
        err = relative_error(adapter.delta(name), ref)
        assert err < 1e-5, f"{name}: relative error {err:.3g}"
    return adapter


def _underscored(name: str) -> str:
    return name.replace(".", "_")


# --- diffusers / PEFT --------------------------------------------------------------------------------


def test_diffusers_peft_writer(model, tmp_path):
    """``transformer.<path>.lora_A.weight`` as diffusers' ``save_lora_weights`` writes it (alpha in its metadata)."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=6, target_modules=list(TARGETS), init_lora_weights=False)
    torch.manual_seed(2)
    model.add_adapter(config, adapter_name="default")
    try:
        layers = get_peft_model_state_dict(model, adapter_name="default")
    finally:
        model.unload_lora()
    QwenImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        assert "transformer.transformer_blocks.1.img_mod.1.lora_A.weight" in set(f.keys())
    _check(file, _diffusers_reference(model, file))


# --- ai-toolkit / ComfyUI / diffusion-pipe: ``diffusion_model.`` ------------------------------------------


@pytest.mark.parametrize("style", ["lora_A", "lora_A+alpha", "lora_down+alpha"])
def test_diffusion_model_prefix(model, tmp_path, style):
    """ai-toolkit ``diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight`` (no alpha: scale 1);
    ComfyUI's ``.lora_down/.lora_up/.alpha`` and ``lora_A`` with ``.alpha``."""
    tensors = {}
    for name, (down, up, alpha) in _factors(model).items():
        a, b = ("lora_down", "lora_up") if style.startswith("lora_down") else ("lora_A", "lora_B")
        tensors[f"diffusion_model.{name}.{a}.weight"] = down
        tensors[f"diffusion_model.{name}.{b}.weight"] = up
        if style.endswith("alpha"):
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    file = save_safetensors(tmp_path / f"aitk_{style}.safetensors", tensors, {"ss_base_model_version": "qwen_image"})
    adapter = _check(file, _diffusers_reference(model, file))
    assert adapter.family_source.startswith("keys")


# --- musubi-tuner / kohya: ``lora_unet_`` ---------------------------------------------------------------


def test_musubi_lora_unet(model, tmp_path):
    """musubi ``lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight`` + ``.alpha`` (and top-level
    ``lora_unet_norm_out_linear``, ``lora_unet_time_text_embed_timestep_embedder_linear_1``)."""
    tensors = {}
    for name, (down, up, alpha) in _factors(model, seed=3).items():
        key = "lora_unet_" + _underscored(name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    meta = {"modelspec.architecture": "Qwen-Image/lora", "ss_network_module": "networks.lora_qwen_image"}
    file = save_safetensors(tmp_path / "musubi.safetensors", tensors, meta)
    _check(file, _diffusers_reference(model, file))


def test_onetrainer_rekeyed_from_musubi(model, tmp_path):
    """OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``: diffusers has no reader for it, so the
    file is the musubi file with ``lora_unet_`` re-keyed to ``lora_transformer_`` (the same ``_`` spelling of
    the diffusers path) and the reference is diffusers' reading of the musubi file."""
    tensors = {}
    for name, (down, up, alpha) in _factors(model, seed=4).items():
        key = _underscored(name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    musubi = save_safetensors(tmp_path / "musubi.safetensors", {"lora_unet_" + k: v for k, v in tensors.items()})
    onetrainer = save_safetensors(
        tmp_path / "onetrainer.safetensors", {"lora_transformer_" + k: v for k, v in tensors.items()}
    )
    _check(onetrainer, _diffusers_reference(model, musubi))


# --- DiffSynth-Studio: no prefix, PEFT adapter name in the key ------------------------------------------------


def test_diffsynth_default(model, tmp_path):
    """DiffSynth ``transformer_blocks.0.attn.to_q.lora_A.default.weight`` (no prefix, no alpha)."""
    tensors = {}
    for name, (down, up, _) in _factors(model, seed=5).items():
        tensors[f"{name}.lora_A.default.weight"] = down
        tensors[f"{name}.lora_B.default.weight"] = up
    file = save_safetensors(tmp_path / "diffsynth.safetensors", tensors)
    _check(file, _diffusers_reference(model, file))


# --- ComfyUI extracts: ``.diff`` for norms next to the LoRA factors ------------------------------------------


def test_comfyui_diff_for_norms(model, tmp_path):
    """ComfyUI's extracted LoRAs store 1-D weights (RMSNorm scales) as ``.diff``; diffusers' Qwen converter
    rejects them, so the LoRA part is checked against diffusers reading the file without them and each
    ``.diff`` is its own ΔW."""
    lora = {}
    for name, (down, up, alpha) in _factors(model, seed=6).items():
        lora[f"diffusion_model.{name}.lora_down.weight"] = down
        lora[f"diffusion_model.{name}.lora_up.weight"] = up
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    g = torch.Generator().manual_seed(7)
    norms = {f"transformer_blocks.0.attn.{n}": torch.randn(8, generator=g) for n in ("norm_q", "norm_added_k")}
    norms["txt_norm"] = torch.randn(12, generator=g)
    lora_only = save_safetensors(tmp_path / "lora_only.safetensors", lora)
    reference = _diffusers_reference(model, lora_only)
    file = save_safetensors(
        tmp_path / "extract.safetensors", {**lora, **{f"diffusion_model.{n}.diff": d for n, d in norms.items()}}
    )
    _check(file, {**reference, **norms})


# --- family decision -------------------------------------------------------------------------------------


def _mods(names, width: int = 16) -> dict[tuple[str, bool], ModuleWeights]:
    t = {"down": torch.zeros(2, width), "up": torch.zeros(width, 2)}
    return {(n, False): ModuleWeights("lora", t, (width, width), 2, None, 1.0) for n in names}


def test_attention_only_file_is_told_from_flux():
    """Only ``attn.to_q/k/v`` fits Flux.1's diffusers names too: blocks past SD3.5's 38 prove Qwen-Image, else
    the file's metadata decides, else it stays Flux.1 with Qwen-Image recorded as also fitting."""
    attn = [f"transformer_blocks.{i}.attn.{m}" for i in (0, 45) for m in ("to_q", "to_k", "to_v")]
    res = resolve(_mods(attn, 3072), metadata={}, path="x")  # Qwen-Image's real width, also Flux.1's
    assert (res.family, res.source) == ("qwen_image", "keys (structure)")
    early = [n for n in attn if ".0." in n]
    res = resolve(_mods(early, 3072), metadata={}, path="x")
    assert res.family == "flux1" and "qwen_image" in res.candidates
    for value in ("qwen_image", "Qwen-Image/lora", "Qwen-Image-Edit-Plus/lora", "qwen-image-layered"):
        assert resolve(_mods(early), metadata={"ss_base_model_version": value}, path="x").family == "qwen_image"
    mlp = resolve(_mods(["transformer_blocks.0.img_mlp.net.0.proj"]), metadata={}, path="x")
    assert mlp.family == "qwen_image" and mlp.candidates == ()


def test_unknown_module_names_it(model, tmp_path):
    tensors = {}
    for name, (down, up, _) in list(_factors(model).items())[:3]:
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    tensors["diffusion_model.transformer_blocks.0.img_mlp.bogus_proj.lora_A.weight"] = torch.zeros(RANK, 16)
    tensors["diffusion_model.transformer_blocks.0.img_mlp.bogus_proj.lora_B.weight"] = torch.zeros(16, RANK)
    file = save_safetensors(tmp_path / "bad.safetensors", tensors, {"ss_base_model_version": "qwen_image"})
    with pytest.raises(FormatError, match="bogus_proj"):
        wsa.load_adapter(file)
