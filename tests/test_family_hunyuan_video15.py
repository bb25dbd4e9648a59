"""HunyuanVideo 1.5 files of every trainer convention give diffusers' own ΔW on a one-layer
HunyuanVideo15Transformer3DModel.

The reference is diffusers' ``load_lora_adapter`` (``PeftAdapterMixin``) + PEFT's merge on a
``transformer.``-keyed file. diffusers has no HunyuanVideo 1.5 LoRA loader (no pipeline LoRA mixin, no
converter), so it reads only that file; every other convention is derived from it by re-keying with the
independent tables below (from Tencent's checkpoint names in diffusers' ``convert_hunyuan_video1_5_to_diffusers.py``
and ComfyUI's Flux-style names), keeping ΔW exactly:

* musubi-tuner ``lora_unet_<Tencent name with _>`` with ``lora_down``/``lora_up``/``alpha``:
  ``lora_up = B · rank / alpha``;
* diffusion-pipe ``diffusion_model.<ComfyUI name>`` (``lora_A``/``lora_B``, no alpha) and musubi's ComfyUI converter
  (``lora_unet_…_img_attn_qkv``, alpha × 3): q, k, v fused as ``A = [A_q; A_k; A_v]``, ``B = diag(B_q, B_k, B_v)``;
* Tencent's fused token-refiner ``self_attn_qkv`` likewise, and ``final_layer.adaLN_modulation.1`` with ``B``'s
  halves swapped (Tencent orders shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, random_lora
from wsa.errors import FormatError
from wsa.families import family_from_metadata

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402

D = 16  # hidden width of the tiny model (2 heads of 8)
MUSUBI_META = {"ss_base_model_version": "hunyuan_video_1_5", "modelspec.architecture": "hunyuan-video-1.5/lora"}


class _SavedAsIs:
    """diffusers has no HunyuanVideo 1.5 LoRA mixin: the state dict as saved goes to ``load_lora_adapter``."""

    @staticmethod
    def lora_state_dict(path: str) -> dict[str, torch.Tensor]:
        return load_file(path)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        use_meanflow=True,
        patch_size=2,  # PEFT cannot merge a 1×1×1 Conv3d LoRA (the full model's patch), it takes it for a 1×1 Conv2d
    )


# diffusers leaf in a double block -> Tencent's name (musubi) and ComfyUI's (diffusion-pipe); q/k/v fuse in ComfyUI.
DOUBLE = {
    "attn.to_q": ("img_attn_q", "img_attn.qkv"),
    "attn.to_k": ("img_attn_k", "img_attn.qkv"),
    "attn.to_v": ("img_attn_v", "img_attn.qkv"),
    "attn.to_out.0": ("img_attn_proj", "img_attn.proj"),
    "attn.add_q_proj": ("txt_attn_q", "txt_attn.qkv"),
    "attn.add_k_proj": ("txt_attn_k", "txt_attn.qkv"),
    "attn.add_v_proj": ("txt_attn_v", "txt_attn.qkv"),
    "attn.to_add_out": ("txt_attn_proj", "txt_attn.proj"),
    "norm1.linear": ("img_mod.linear", "img_mod.lin"),
    "norm1_context.linear": ("txt_mod.linear", "txt_mod.lin"),
    "ff.net.0.proj": ("img_mlp.fc1", "img_mlp.0"),
    "ff.net.2": ("img_mlp.fc2", "img_mlp.2"),
    "ff_context.net.0.proj": ("txt_mlp.fc1", "txt_mlp.0"),
    "ff_context.net.2": ("txt_mlp.fc2", "txt_mlp.2"),
}
_R = "context_embedder.token_refiner.refiner_blocks.0"
_TR = "txt_in.individual_token_refiner.blocks.0"
# Everything else: diffusers path -> Tencent's name (the refiner's q/k/v fuse into self_attn_qkv).
TOP = {
    "x_embedder.proj": "img_in.proj",
    "image_embedder.linear_1": "vision_in.proj.1",
    "image_embedder.linear_2": "vision_in.proj.3",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "context_embedder.proj_in": "txt_in.input_embedder",
    f"{_R}.attn.to_q": f"{_TR}.self_attn_qkv",
    f"{_R}.attn.to_k": f"{_TR}.self_attn_qkv",
    f"{_R}.attn.to_v": f"{_TR}.self_attn_qkv",
    f"{_R}.attn.to_out.0": f"{_TR}.self_attn_proj",
    f"{_R}.ff.net.0.proj": f"{_TR}.mlp.fc1",
    f"{_R}.ff.net.2": f"{_TR}.mlp.fc2",
    f"{_R}.norm_out.linear": f"{_TR}.adaLN_modulation.1",
    "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2",
    "context_embedder_2.linear_3": "byt5_in.fc3",
    "time_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_embed.timestep_embedder_r.linear_1": "time_r_in.mlp.0",
    "time_embed.timestep_embedder_r.linear_2": "time_r_in.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = {"norm_out.linear"}  # shift/scale order differs between Tencent and diffusers


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))}


def _factors(model, seed, names=None, rank=None):
    """``{diffusers path: (A, B)}``: random LoRA factors (ranks 1-5 unless ``rank``), conv factors for the Conv3d."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, mod) in enumerate(sorted(_targets(model).items())):
        if names is not None and name not in names:
            continue
        r = rank or 1 + i % 5
        w = mod.weight
        if w.ndim == 2:
            out[name] = random_lora(w.shape[0], w.shape[1], r, g)
        else:
            out[name] = (
                torch.randn(r, *w.shape[1:], generator=g) / 4,
                torch.randn(w.shape[0], r, 1, 1, 1, generator=g),
            )
    return out


def _peft_file(path, factors, prefix="transformer.", metadata=None):
    tensors = {}
    for name, (down, up) in factors.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path), metadata=metadata)
    return path


def _kohya_file(path, factors, alpha, metadata=None, alpha_per_part=False):
    """``lora_unet_<native with _>``: ``lora_up = B · rank / alpha`` (ΔW unchanged), alpha per module.

    ``alpha_per_part``: a fused module's alpha is ``alpha`` × its parts (musubi's ComfyUI converter keeps α/r).
    """
    tensors = {}
    for native, (down, up, parts) in factors.items():
        a = alpha * parts if alpha_per_part else alpha
        key = "lora_unet_" + native.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * (down.shape[0] / a)).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(a)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _rekey(factors, name_of: dict[str, str], swapped=()):
    """Diffusers-keyed factors -> ``{native: (A, B, parts)}``; modules sharing a native name are fused as a
    block-diagonal LoRA (``parts`` of them)."""
    groups: dict[str, list[str]] = {}
    for name in name_of:  # the table's order: q, k, v
        if name in factors:
            groups.setdefault(name_of[name], []).append(name)
    out = {}
    for native, names in groups.items():
        if len(names) == 1:
            down, up = factors[names[0]]
            if names[0] in swapped:
                h = up.shape[0] // 2
                up = torch.cat([up[h:], up[:h]])
            out[native] = (down, up, 1)
        else:
            parts = [factors[n] for n in names]  # q, k, v in DOUBLE's / TOP's order
            out[native] = (torch.cat([a for a, _ in parts]), torch.block_diag(*[b for _, b in parts]), len(parts))
    return out


MUSUBI = {f"transformer_blocks.0.{leaf}": f"double_blocks.0.{musubi}" for leaf, (musubi, _) in DOUBLE.items()}
COMFY = {f"transformer_blocks.0.{leaf}": f"double_blocks.0.{comfy}" for leaf, (_, comfy) in DOUBLE.items()}


def test_diffusers_keys_match_diffusers(model, tmp_path):
    """diffusers / SimpleTuner: every Linear and the Conv3d patch embedder, ranks 1-5; the keys alone decide."""
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", _factors(model, 0))
    reference = diffusers_deltas(_SavedAsIs, model, path)
    assert len(reference) == len(_targets(model))
    adapter = assert_same_deltas(path, reference, "hunyuan_video15")
    assert adapter.format == "diffusers"
    assert adapter.family_source == "keys"


@pytest.mark.parametrize("metadata", [MUSUBI_META, None], ids=["with-metadata", "keys-only"])
def test_musubi_keys_match_diffusers(model, tmp_path, metadata):
    """musubi-tuner's double-block Linears (``lora_unet_double_blocks_0_img_attn_q``, separate q/k/v), alpha 3."""
    factors = _factors(model, 1, names=set(MUSUBI))
    reference = diffusers_deltas(_SavedAsIs, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "musubi.safetensors", _rekey(factors, MUSUBI), 3.0, metadata)
    adapter = assert_same_deltas(path, reference, "hunyuan_video15")
    assert adapter.format == "kohya"
    assert adapter.family_source == ("keys+metadata" if metadata else "keys")
    assert adapter.modules["transformer_blocks.0.attn.to_q"].alpha == 3.0


def test_tencent_names_of_every_module_match_diffusers(model, tmp_path):
    """Tencent's names of the refiner, embedders and final layer (fused refiner qkv, swapped final AdaLN)."""
    factors = _factors(model, 2, names=set(TOP), rank=2)
    reference = diffusers_deltas(_SavedAsIs, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "native.safetensors", _rekey(factors, TOP, SWAPPED), 2.0, MUSUBI_META)
    adapter = assert_same_deltas(path, reference, "hunyuan_video15")
    assert any(n.startswith(f"split {_TR}.self_attn_qkv into to_q") for n in adapter.notes)
    assert "reordered rows of final_layer.adaLN_modulation.1 for norm_out.linear" in adapter.notes
    assert adapter.modules[f"{_R}.attn.to_k"].rank == 2  # the block-diagonal fused LoRA keeps each part's rank


def test_diffusion_pipe_comfy_keys_match_diffusers(model, tmp_path):
    """diffusion-pipe: ComfyUI's model, ``diffusion_model.double_blocks.0.img_attn.qkv`` fused, no alpha, no header.

    These are FLUX.1's (and HunyuanVideo 1.0's ComfyUI) names too, with the same diffusers targets and splits; with
    no header only the width (2048; FLUX.1's and 1.0's are 3072) tells them apart, which a tiny model cannot show:
    here FLUX.1 wins the tie (same ΔW), and :func:`test_diffusion_pipe_file_at_full_width_is_hunyuan_video15`
    checks the width.
    """
    factors = _factors(model, 3, names=set(MUSUBI), rank=2)
    reference = diffusers_deltas(_SavedAsIs, model, _peft_file(tmp_path / "d.safetensors", factors))
    fused = {native: (down, up) for native, (down, up, _) in _rekey(factors, COMFY).items()}
    path = _peft_file(tmp_path / "adapter_model.safetensors", fused, prefix="diffusion_model.")
    adapter = assert_same_deltas(path, reference, "flux1")
    assert adapter.format == "comfyui"
    assert "hunyuan_video" in adapter.family_source
    assert adapter.modules["transformer_blocks.0.attn.add_k_proj"].rank == 2


def test_diffusion_pipe_file_at_full_width_is_hunyuan_video15(tmp_path):
    """The same names at the full model's width (2048): the widths decide for 1.5 (FLUX.1 and 1.0 are 3072)."""
    g = torch.Generator().manual_seed(8)
    w = 2048
    tensors = {}
    for native, out in (("img_attn.qkv", 3 * w), ("img_mod.lin", 6 * w)):
        down, up = random_lora(out, w, 1, g)
        tensors[f"diffusion_model.double_blocks.0.{native}.lora_A.weight"] = down
        tensors[f"diffusion_model.double_blocks.0.{native}.lora_B.weight"] = up
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    adapter = wsa.load_adapter(path)
    assert adapter.family == "hunyuan_video15"
    assert adapter.family_source.startswith("keys+shapes")
    assert adapter.modules["transformer_blocks.0.attn.to_v"].shape == (w, w)


def test_musubi_comfy_converter_keys_match_diffusers(model, tmp_path):
    """musubi's ``convert_hunyuan_video_1_5_lora_to_comfy``: ``lora_unet_…_img_attn_qkv`` rank ×3 with alpha ×3."""
    factors = _factors(model, 4, names=set(MUSUBI), rank=2)
    reference = diffusers_deltas(_SavedAsIs, model, _peft_file(tmp_path / "d.safetensors", factors))
    path = _kohya_file(tmp_path / "comfy.safetensors", _rekey(factors, COMFY), 1.5, MUSUBI_META, True)
    adapter = assert_same_deltas(path, reference, "hunyuan_video15")
    assert adapter.family_source.startswith("keys+metadata")
    q = adapter.modules["transformer_blocks.0.attn.to_q"]
    assert (q.rank, q.alpha) == (2, 1.5)


@pytest.mark.parametrize(
    ("metadata", "family"),
    [
        ({"ss_base_model_version": "hunyuan_video_1_5"}, "hunyuan_video15"),
        ({"modelspec.architecture": "hunyuan-video-1.5/lora"}, "hunyuan_video15"),
        ({"ss_base_model_version": "hunyuan_video"}, "hunyuan_video"),
        ({"modelspec.architecture": "hunyuan-video/lora"}, "hunyuan_video"),
        ({}, "flux1"),
    ],
    ids=["musubi-ss", "musubi-modelspec", "hv1-ss", "hv1-modelspec", "none"],
)
def test_attention_only_file_is_decided_by_metadata(tmp_path, metadata, family):
    """Double-block attention under diffusers names fits FLUX.1, HunyuanVideo 1.0 and 1.5: the header decides, and
    HunyuanVideo 1.0's metadata name ``hunyuan-video`` does not swallow 1.5's ``hunyuan-video-1.5``. Without a header
    (and not at 1.5's width) the older families keep the tie."""
    assert family_from_metadata(metadata)[0] == (family if metadata else None)
    g = torch.Generator().manual_seed(5)
    factors = {f"transformer_blocks.0.attn.{leaf}": random_lora(D, D, 2, g) for leaf in ("to_q", "to_k", "to_out.0")}
    path = _peft_file(tmp_path / "a.safetensors", factors, metadata=metadata)
    adapter = wsa.load_adapter(path)
    assert adapter.family == family
    assert adapter.family_source.startswith("keys+metadata" if metadata else "keys (also fit:")


@pytest.mark.parametrize(
    ("metadata", "family", "source"),
    [
        ({"ss_base_model_version": "hunyuan_video"}, "hunyuan_video", "keys+metadata"),
        ({}, "hunyuan_video", "keys+shapes"),
        (MUSUBI_META, "hunyuan_video15", "keys+metadata"),
    ],
    ids=["hv1-header", "no-header", "hv15-header"],
)
def test_names_shared_with_hunyuan_video_1(tmp_path, metadata, family, source):
    """Double-block names of both versions (a 1.0 musubi file's fused ``img_attn_qkv`` is also ComfyUI's 1.5 name
    with ``_``): the header decides; without one the older 1.0 keeps the tie (1.5's ``fits``: not at its width)."""
    g = torch.Generator().manual_seed(6)
    tensors = {}
    shapes = {"img_attn_qkv": (3 * D, D), "img_mod_linear": (6 * D, D), "img_mlp_fc1": (4 * D, D)}
    for native, (out, inp) in shapes.items():
        down, up = random_lora(out, inp, 2, g)
        tensors[f"lora_unet_double_blocks_0_{native}.lora_down.weight"] = down
        tensors[f"lora_unet_double_blocks_0_{native}.lora_up.weight"] = up
    path = tmp_path / "shared.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    adapter = wsa.load_adapter(path)
    assert adapter.family == family
    assert adapter.family_source.startswith(source)
    assert "transformer_blocks.0.attn.to_k" in adapter.modules


def test_unknown_module_in_a_hunyuan_video15_file_is_named(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for native in ("double_blocks_0_img_attn_q", "double_blocks_0_img_attn_k", "double_blocks_0_img_attn_w"):
        down, up = random_lora(D, D, 2, g)
        tensors[f"lora_unet_{native}.lora_down.weight"] = down
        tensors[f"lora_unet_{native}.lora_up.weight"] = up
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=MUSUBI_META)
    with pytest.raises(FormatError, match=r"bad\.safetensors: module 'double_blocks_0_img_attn_w'.*HunyuanVideo 1\.5"):
        wsa.load_adapter(path)
