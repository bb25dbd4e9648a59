"""Chroma LoRAs from every trainer convention: wsa's ΔW per diffusers module equals diffusers' own.

ChromaPipeline loads LoRAs with ``FluxLoraLoaderMixin``: the reference is its ``lora_state_dict`` (for
``lora_unet_`` keys ``_convert_kohya_flux_lora_to_diffusers``) and ``load_lora_adapter`` on a tiny
``ChromaTransformer2DModel``, then PEFT's merge. That loader cannot read ai-toolkit's ``diffusion_model.``
keys, OneTrainer's keys, or a single block's ``linear1`` at other than full size (the kohya converter
splits it as ``[3072] * 3 + [12288]``); for those the reference is a diffusers-keyed file made from the
same factors by the re-keying :data:`NATIVE` writes out (fused up factors split by rows, down shared).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import wsa
from tests.family_harness import assert_same_deltas, diffusers_deltas, linear_shapes, random_lora
from tests.tiny import save_safetensors
from wsa.errors import FormatError

RANK = 4
ALPHA = 2.0
_D, _S, _G = "transformer_blocks.0", "single_transformer_blocks.0", "distilled_guidance_layer"

#: BFL/Chroma native module -> diffusers modules, whose rows it stacks in this order.
NATIVE = {
    "double_blocks.0.img_attn.qkv": [f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"],
    "double_blocks.0.img_attn.proj": [f"{_D}.attn.to_out.0"],
    "double_blocks.0.txt_attn.qkv": [f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj"],
    "double_blocks.0.txt_attn.proj": [f"{_D}.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": [f"{_D}.ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": [f"{_D}.ff.net.2"],
    "double_blocks.0.txt_mlp.0": [f"{_D}.ff_context.net.0.proj"],
    "double_blocks.0.txt_mlp.2": [f"{_D}.ff_context.net.2"],
    "single_blocks.0.linear1": [f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp"],
    "single_blocks.0.linear2": [f"{_S}.proj_out"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "final_layer.linear": ["proj_out"],
    f"{_G}.in_proj": [f"{_G}.in_proj"],
    f"{_G}.layers.1.in_layer": [f"{_G}.layers.1.linear_1"],
    f"{_G}.layers.1.out_layer": [f"{_G}.layers.1.linear_2"],
    f"{_G}.out_proj": [f"{_G}.out_proj"],
}
#: What diffusers' kohya FLUX.1 converter reads at any size (double blocks; ``linear2``).
KOHYA_READABLE = [n for n in NATIVE if n.startswith("double_blocks.") or n.endswith("linear2")]
ATTENTION_ONLY = [n for n in NATIVE if "_attn." in n]
DIFFUSERS = [t for n in NATIVE for t in NATIVE[n]]


def make_model():
    """A fresh tiny Chroma (diffusers' ``delete_adapters`` leaves PEFT wrappers behind, so one per load)."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=24,
        approximator_layers=2,
    ).eval()


@pytest.fixture(scope="module")
def shapes():
    return linear_shapes(make_model())


def _mixin():
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    return FluxLoraLoaderMixin


def native_factors(names, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        targets = NATIVE[name]
        out[name] = random_lora(sum(shapes[t][0] for t in targets), shapes[targets[0]][1], RANK, g)
    return out


def rekeyed_to_diffusers(tmp_path: Path, factors, shapes, scale: float = 1.0) -> Path:
    """The same LoRA keyed ``transformer.<diffusers path>``: each target gets the shared down factor
    (times ``scale``, the trainer's ``alpha / rank``) and its block of the up factor's rows."""
    tensors = {}
    for name, (down, up) in factors.items():
        start = 0
        for target in NATIVE[name]:
            rows = shapes[target][0]
            tensors[f"transformer.{target}.lora_A.weight"] = down * scale
            tensors[f"transformer.{target}.lora_B.weight"] = up[start : start + rows]
            start += rows
        assert start == up.shape[0]
    return save_safetensors(tmp_path / "rekeyed_diffusers.safetensors", tensors)


def _write(tmp_path: Path, name: str, factors, prefix: str, sep: str, kohya: bool, metadata=None) -> Path:
    tensors = {}
    for module, (down, up) in factors.items():
        key = prefix + (module.replace(".", "_") if sep == "_" else module)
        if kohya:
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        else:
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
    return save_safetensors(tmp_path / name, tensors, metadata)


def test_sd_scripts(tmp_path: Path, shapes):
    """sd-scripts ``--model_type chroma``: ``lora_unet_double_blocks_0_img_attn_qkv`` + ``alpha``, read by
    diffusers' kohya converter; every name also fits FLUX.1, so the metadata sd-scripts writes decides."""
    factors = native_factors(KOHYA_READABLE, shapes, seed=0)
    file = _write(tmp_path, "kohya.safetensors", factors, "lora_unet_", "_", True, {"ss_base_model_version": "chroma"})
    reference = diffusers_deltas(_mixin(), make_model(), file)
    assert len(reference) == sum(len(NATIVE[n]) for n in KOHYA_READABLE) == 13
    adapter = assert_same_deltas(file, reference, "chroma")
    assert adapter.family_source.startswith("keys+metadata"), adapter.family_source


def test_sd_scripts_single_blocks_and_guidance(tmp_path: Path, shapes):
    """``lora_unet_single_blocks_0_linear1`` (q, k, v, proj_mlp fused) and the approximator, with ``alpha``;
    reference: the re-keyed diffusers file with ``alpha / rank`` in ``lora_A``. No metadata: the
    ``distilled_guidance_layer`` modules prove Chroma."""
    names = [n for n in NATIVE if n not in KOHYA_READABLE]
    factors = native_factors(names, shapes, seed=1)
    file = _write(tmp_path, "kohya.safetensors", factors, "lora_unet_", "_", True)
    reference = diffusers_deltas(_mixin(), make_model(), rekeyed_to_diffusers(tmp_path, factors, shapes, ALPHA / RANK))
    adapter = assert_same_deltas(file, reference, "chroma")
    assert adapter.family_source == "keys"
    assert any("split single_blocks.0.linear1" in n for n in adapter.notes)


def test_ai_toolkit(tmp_path: Path, shapes):
    """ai-toolkit: ``diffusion_model.<native name>.lora_A/lora_B.weight``, no alpha, metadata ``chroma``."""
    factors = native_factors(list(NATIVE), shapes, seed=2)
    file = _write(
        tmp_path, "aitk.safetensors", factors, "diffusion_model.", ".", False, {"ss_base_model_version": "chroma"}
    )
    reference = diffusers_deltas(_mixin(), make_model(), rekeyed_to_diffusers(tmp_path, factors, shapes))
    assert len(reference) == len(DIFFUSERS) == 24
    assert_same_deltas(file, reference, "chroma")


def test_attention_only_is_flux1_unless_metadata(tmp_path: Path, shapes):
    """Only attention layers: the names are FLUX.1's too. Without metadata FLUX.1 wins (Chroma listed as
    also fitting); with ai-toolkit's or sd-scripts' ``chroma`` it is Chroma. Same ΔW either way."""
    factors = native_factors(ATTENTION_ONLY, shapes, seed=3)
    reference = diffusers_deltas(_mixin(), make_model(), rekeyed_to_diffusers(tmp_path, factors, shapes))
    bare = _write(tmp_path, "bare.safetensors", factors, "diffusion_model.", ".", False)
    adapter = assert_same_deltas(bare, reference, "flux1")
    assert "chroma" in adapter.family_source, adapter.family_source
    for field in ("ss_base_model_version", "modelspec.architecture"):
        tagged = _write(tmp_path, f"{field}.safetensors", factors, "diffusion_model.", ".", False, {field: "chroma"})
        assert_same_deltas(tagged, reference, "chroma")


def test_diffusers(tmp_path: Path, shapes):
    """diffusers / SimpleTuner: ``transformer.<diffusers path>.lora_A/lora_B.weight``, approximator included."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name in DIFFUSERS:
        down, up = random_lora(*shapes[name], RANK, g)
        tensors[f"transformer.{name}.lora_A.weight"] = down
        tensors[f"transformer.{name}.lora_B.weight"] = up
    file = save_safetensors(tmp_path / "diffusers.safetensors", tensors)
    reference = diffusers_deltas(_mixin(), make_model(), file)
    assert len(reference) == len(DIFFUSERS)
    assert_same_deltas(file, reference, "chroma")


def test_onetrainer(tmp_path: Path, shapes):
    """OneTrainer: ``lora_transformer_<diffusers path with _>`` + ``alpha``; diffusers' reader of those keys
    knows FLUX.1's modules only, so the reference is the diffusers-keyed file with ``alpha / rank`` in ``lora_A``."""
    g = torch.Generator().manual_seed(5)
    factors = {n: random_lora(*shapes[n], RANK, g) for n in DIFFUSERS}
    ours, theirs = {}, {}
    for name, (down, up) in factors.items():
        key = "lora_transformer_" + name.replace(".", "_")
        ours |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
        theirs |= {f"transformer.{name}.lora_A.weight": down * (ALPHA / RANK), f"transformer.{name}.lora_B.weight": up}
    reference = diffusers_deltas(_mixin(), make_model(), save_safetensors(tmp_path / "d.safetensors", theirs))
    assert_same_deltas(save_safetensors(tmp_path / "onetrainer.safetensors", ours), reference, "chroma")


def test_unknown_module_is_named(tmp_path: Path, shapes):
    factors = native_factors([f"{_G}.in_proj", f"{_G}.out_proj"], shapes, seed=6)
    factors["distilled_guidance_layer.bogus"] = (torch.zeros(RANK, 24), torch.zeros(24, RANK))
    file = _write(
        tmp_path, "bad.safetensors", factors, "diffusion_model.", ".", False, {"ss_base_model_version": "chroma"}
    )
    with pytest.raises(FormatError, match=r"distilled_guidance_layer\.bogus"):
        wsa.load_adapter(file)


def test_flux1_modulation_is_not_chroma():
    """A per-block modulation layer (``img_mod.lin``) is FLUX.1-only: Chroma pruned it."""
    from wsa.families import FAMILIES

    assert FAMILIES.get("flux1").knows("double_blocks_0_img_mod_lin", True)
    assert not FAMILIES.get("chroma").knows("double_blocks_0_img_mod_lin", True)
    assert not FAMILIES.get("chroma").knows("single_blocks.0.modulation.lin", False)
