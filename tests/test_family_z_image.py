"""Z-Image LoRAs in every trainer's key convention, checked against diffusers' own loader.

Each file is read twice: by diffusers (``ZImageLoraLoaderMixin.lora_state_dict``, whose
``_convert_non_diffusers_z_image_lora_to_diffusers`` handles ``diffusion_model.``, ``lora_unet_``,
DiffSynth's ``.default.`` and the original checkpoint's fused ``attention.qkv`` / ``attention.out``),
loaded into a tiny ``ZImageTransformer2DModel`` whose merged-minus-base weights are the reference ΔW;
and by ``wsa.load_adapter``, which must name the same modules and give the same ΔW.
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
DIM = 32

#: The Linears of a ``ZImageTransformerBlock`` (the context refiner has no ``adaLN_modulation``).
ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
MOD = ("adaLN_modulation.0",)
BLOCKS = (
    *(f"layers.{i}.{m}" for i in range(2) for m in ATTN + FF + MOD),
    *(f"noise_refiner.0.{m}" for m in ATTN + FF + MOD),
    *(f"context_refiner.0.{m}" for m in ATTN + FF),
)
TOP = (
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.1",
)
OMNI = (*(f"siglip_refiner.0.{m}" for m in ATTN + FF), "siglip_embedder.1")


@pytest.fixture(scope="module")
def model():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=DIM,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        siglip_feat_dim=12,  # Omni's SigLIP embedder and refiner
        axes_dims=[4, 6, 6],
        axes_lens=[16, 16, 16],
    ).eval()


def _factors(model, names, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Random (down, up, alpha) per module; alphas differ per module so a misplaced one shows."""
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, name in enumerate(names):
        n_out, n_in = mods[name].weight.shape
        out[name] = (
            torch.randn(RANK, n_in, generator=g) / n_in**0.5,
            torch.randn(n_out, RANK, generator=g),
            1.0 + j % 7,
        )
    return out


def _diffusers_reference(model, file) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    sd, meta = ZImageLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="default", metadata=meta)
    try:
        return reference_deltas(model)
    finally:
        model.unload_lora()


def _check(file, reference: dict[str, torch.Tensor]) -> wsa.Adapter:
    adapter = wsa.load_adapter(file)
    assert adapter.family == "z_image", (adapter.family, adapter.family_source)
    assert sorted(adapter.modules) == sorted(reference), sorted(set(adapter.modules) ^ set(reference))[:6]
    for name, ref in reference.items():
        err = relative_error(adapter.delta(name), ref)
        assert err < 1e-5, f"{name}: relative error {err:.3g}"
    return adapter


def _kohya(factors, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (down, up, alpha) in factors.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def _fused(model, blocks, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Original-checkpoint modules: ``{block}.attention.qkv`` (3·dim rows) and ``{block}.attention.out``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, b in enumerate(blocks):
        out[f"{b}.attention.qkv"] = (
            torch.randn(RANK, DIM, generator=g),
            torch.randn(3 * DIM, RANK, generator=g),
            2.0 + j,
        )
        out[f"{b}.attention.out"] = (torch.randn(RANK, DIM, generator=g), torch.randn(DIM, RANK, generator=g), 3.0 + j)
    return out


# --- diffusers / PEFT --------------------------------------------------------------------------------


def test_diffusers_peft_writer(model, tmp_path):
    """``transformer.layers.0.attention.to_q.lora_A.weight`` as diffusers' ``save_lora_weights`` writes it,
    covering every block kind and the top-level modules (Omni's SigLIP ones too)."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=6, target_modules=list(BLOCKS + TOP + OMNI), init_lora_weights=False)
    torch.manual_seed(2)
    model.add_adapter(config, adapter_name="default")
    try:
        layers = get_peft_model_state_dict(model, adapter_name="default")
    finally:
        model.unload_lora()
    ZImagePipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    _check(file, _diffusers_reference(model, file))


# --- ai-toolkit / ComfyUI: ``diffusion_model.`` -------------------------------------------------------------


@pytest.mark.parametrize("style", ["lora_A", "lora_A+alpha", "lora_down+alpha"])
def test_diffusion_model_prefix(model, tmp_path, style):
    """ai-toolkit ``diffusion_model.layers.0.attention.to_q.lora_A.weight`` (no alpha: scale 1), and the same
    names with ``.alpha`` or as ``.lora_down/.lora_up``."""
    tensors = {}
    for name, (down, up, alpha) in _factors(model, BLOCKS + TOP).items():
        a, b = ("lora_down", "lora_up") if style.startswith("lora_down") else ("lora_A", "lora_B")
        tensors[f"diffusion_model.{name}.{a}.weight"] = down
        tensors[f"diffusion_model.{name}.{b}.weight"] = up
        if style.endswith("alpha"):
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    file = save_safetensors(tmp_path / f"aitk_{style}.safetensors", tensors, {"ss_base_model_version": "zimage"})
    _check(file, _diffusers_reference(model, file))


# --- musubi-tuner: ``lora_unet_`` + diffusers path with ``_`` ------------------------------------------------------


def test_musubi_lora_unet(model, tmp_path):
    """musubi ``lora_unet_layers_0_attention_to_q``, ``…_attention_to_out_0``, ``…_feed_forward_w1``,
    ``…_adaLN_modulation_0``, ``lora_unet_noise_refiner_0_…``, ``lora_unet_context_refiner_0_…`` (+ ``.alpha``)."""
    tensors = _kohya(_factors(model, BLOCKS, seed=3), "lora_unet_")
    meta = {"modelspec.architecture": "Z-Image/lora", "ss_network_module": "networks.lora_zimage"}
    file = save_safetensors(tmp_path / "musubi.safetensors", tensors, meta)
    _check(file, _diffusers_reference(model, file))


# --- original-checkpoint names: fused ``attention.qkv`` ------------------------------------------------------


def test_kohya_fused_qkv(model, tmp_path):
    """sd-scripts-style trainers on the original module tree: ``lora_unet_layers_0_attention_qkv`` (split into
    to_q/to_k/to_v, the down factor shared) and ``lora_unet_layers_0_attention_out`` (-> ``to_out.0``)."""
    fused = _fused(model, ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"), seed=4)
    rest = _factors(model, [n for n in BLOCKS if ".attention." not in n], seed=5)
    file = save_safetensors(tmp_path / "kohya_qkv.safetensors", _kohya({**fused, **rest}, "lora_unet_"))
    reference = _diffusers_reference(model, file)
    assert "layers.1.attention.to_v" in reference
    adapter = _check(file, reference)
    assert any("split layers.0.attention.qkv" in n for n in adapter.notes)


def test_comfyui_fused_qkv_rekeyed(model, tmp_path):
    """ComfyUI's ``diffusion_model.layers.0.attention.qkv.lora_up.weight`` (its NextDiT keeps the fused layer):
    diffusers reads fused ``qkv`` only under ``lora_unet_``, so the file is the kohya one re-keyed
    (``lora_unet_<path with _>`` -> ``diffusion_model.<dotted path>``, written out below, not derived) and the
    reference is diffusers' reading of the kohya file."""
    fused = _fused(model, ("layers.0", "layers.1", "noise_refiner.0"), seed=6)
    rest = _factors(model, ("layers.0.feed_forward.w2", "layers.1.adaLN_modulation.0"), seed=7)
    kohya = save_safetensors(tmp_path / "kohya.safetensors", _kohya({**fused, **rest}, "lora_unet_"))
    comfy = {}
    for name, (down, up, alpha) in {**fused, **rest}.items():
        comfy[f"diffusion_model.{name}.lora_down.weight"] = down
        comfy[f"diffusion_model.{name}.lora_up.weight"] = up
        comfy[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    file = save_safetensors(tmp_path / "comfy.safetensors", comfy)
    _check(file, _diffusers_reference(model, kohya))


# --- DiffSynth-Studio -------------------------------------------------------------------------------------


def test_diffsynth_default(model, tmp_path):
    """DiffSynth ``layers.0.attention.to_q.lora_A.default.weight`` (no prefix, no alpha)."""
    tensors = {}
    for name, (down, up, _) in _factors(model, BLOCKS, seed=8).items():
        tensors[f"{name}.lora_A.default.weight"] = down
        tensors[f"{name}.lora_B.default.weight"] = up
    file = save_safetensors(tmp_path / "diffsynth.safetensors", tensors)
    _check(file, _diffusers_reference(model, file))


# --- ComfyUI extracts: ``.diff`` for norms ---------------------------------------------------------------------


def test_comfyui_diff_for_native_norms(model, tmp_path):
    """ComfyUI's extracts store RMSNorm scales as ``.diff`` under the original names (``attention.q_norm`` ->
    ``attention.norm_q``); diffusers' converter rejects ``.diff``, so the LoRA part is checked against diffusers
    reading the file without them and each ``.diff`` is its own ΔW."""
    lora = {}
    for name, (down, up, alpha) in _factors(
        model, ("layers.0.attention.to_q", "layers.0.feed_forward.w1"), seed=9
    ).items():
        lora[f"diffusion_model.{name}.lora_down.weight"] = down
        lora[f"diffusion_model.{name}.lora_up.weight"] = up
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    g = torch.Generator().manual_seed(10)
    diffs = {
        "layers.0.attention.q_norm": ("layers.0.attention.norm_q", torch.randn(16, generator=g)),
        "layers.1.attention.k_norm": ("layers.1.attention.norm_k", torch.randn(16, generator=g)),
        "layers.0.ffn_norm1": ("layers.0.ffn_norm1", torch.randn(DIM, generator=g)),
    }
    reference = _diffusers_reference(model, save_safetensors(tmp_path / "lora_only.safetensors", lora))
    file = save_safetensors(
        tmp_path / "extract.safetensors", {**lora, **{f"diffusion_model.{n}.diff": d for n, (_, d) in diffs.items()}}
    )
    _check(file, {**reference, **dict(diffs.values())})


# --- family decision -------------------------------------------------------------------------------------


def _mods(names, width: int = 16) -> dict[tuple[str, bool], ModuleWeights]:
    t = {"down": torch.zeros(2, width), "up": torch.zeros(3 * width, 2)}
    return {(n, u): ModuleWeights("lora", t, (3 * width, width), 2, None, 1.0) for n, u in names}


def test_names_and_metadata():
    """Both spellings of the diffusers names and the native fused names are Z-Image's; metadata names it."""
    res = resolve(
        _mods([("layers_3_attention_qkv", True), ("noise_refiner.1.attention.qkv", False)]), metadata={}, path="x"
    )
    assert res.family == "z_image"
    assert sorted(res.modules) == sorted(
        f"{b}.attention.to_{p}" for b in ("layers.3", "noise_refiner.1") for p in "qkv"
    )
    for value in ("zimage", "Z-Image/lora", "z_image_turbo", "z-image-base"):
        assert (
            resolve(
                _mods([("layers.0.attention.qkv", False)]), metadata={"ss_base_model_version": value}, path="x"
            ).source
            == "keys+metadata"
        )


def test_unknown_module_names_it(model, tmp_path):
    tensors = _kohya(_factors(model, BLOCKS[:3]), "lora_unet_")
    tensors["lora_unet_layers_0_feed_forward_w9.lora_down.weight"] = torch.zeros(RANK, DIM)
    tensors["lora_unet_layers_0_feed_forward_w9.lora_up.weight"] = torch.zeros(DIM, RANK)
    file = save_safetensors(tmp_path / "bad.safetensors", tensors, {"modelspec.architecture": "Z-Image/lora"})
    with pytest.raises(FormatError, match="feed_forward_w9"):
        wsa.load_adapter(file)
