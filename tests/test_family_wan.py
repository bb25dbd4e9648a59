"""Wan 2.1 / Wan 2.2 LoRA files of every trainer, read by wsa and checked against diffusers' own loader.

Each test builds a tiny ``WanTransformer3DModel`` (two blocks, width 16; the I2V one with the image
cross-attention ``add_k_proj``/``add_v_proj`` and ``condition_embedder.image_embedder``), writes a LoRA file
in one trainer's key convention, loads it with ``WanLoraLoaderMixin.lora_state_dict`` (which runs
``_convert_musubi_wan_lora_to_diffusers`` / ``_convert_non_diffusers_wan_lora_to_diffusers``) and
``load_lora_adapter``, and compares PEFT's merged ΔW (and bias change) per module with ``wsa.load_adapter``.

Where diffusers reads a convention but drops part of it, the dropped part's expectation is computed
independently and said so: ``_convert_non_diffusers_wan_lora_to_diffusers`` discards every ``.diff`` /
``.diff_b`` of a norm ("norm layer diff keys are just zeroed values") and every ``.diff`` it has no rule for
(``modulation``, ``img_emb.proj.0``); ComfyUI adds them to the weight, so ΔW = ``diff`` and the bias change
= ``diff_b``. Conventions diffusers cannot read at all (DiffSynth, Wan-Fun, OneTrainer, single-file PEFT)
are re-keyed from a file it can read, with the tables below written from Wan's ``model.py`` module names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import wsa
from tests.tiny import reference_deltas, relative_error, save_safetensors, tuner_layers
from wsa.errors import FormatError

RANK = 4
ALPHA = 2.0  # ≠ rank: the scale alpha/r = 0.5 is visible in ΔW
WIDTH = 16  # 2 heads × 8

# diffusers module (leaf inside a block / top level) -> Wan-native name (Wan-Video wan/modules/model.py).
NATIVE_LEAF = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",  # the affine cross-attention LayerNorm
    "scale_shift_table": "modulation",
}
NATIVE_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
BLOCK_LINEAR = tuple(k for k in NATIVE_LEAF if "norm" not in k and k != "scale_shift_table" and "add_" not in k)
I2V_LINEAR = ("attn2.add_k_proj", "attn2.add_v_proj")
TOP_LINEAR = tuple(k for k in NATIVE_TOP if "image_embedder" not in k and k != "scale_shift_table")
I2V_TOP_LINEAR = ("condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2")


def to_native(name: str) -> str:
    if name.startswith("blocks."):
        _, i, leaf = name.split(".", 2)
        return f"blocks.{i}.{NATIVE_LEAF[leaf]}"
    return NATIVE_TOP[name]


def tiny_wan(i2v: bool, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=12,
        freq_dim=8,
        ffn_dim=24,
        num_layers=2,
        image_dim=10 if i2v else None,
        added_kv_proj_dim=WIDTH if i2v else None,
        rope_max_seq_len=32,
    ).eval()


@pytest.fixture(scope="module")
def t2v():
    return tiny_wan(i2v=False)


@pytest.fixture(scope="module")
def i2v():
    return tiny_wan(i2v=True)


def linears(model, *, i2v: bool, top: bool = True) -> list[str]:
    leaves = BLOCK_LINEAR + (I2V_LINEAR if i2v else ())
    names = [f"blocks.{i}.{leaf}" for i in range(len(model.blocks)) for leaf in leaves]
    if top:
        names += list(TOP_LINEAR) + (list(I2V_TOP_LINEAR) if i2v else [])
    return names


def factors(model, names: list[str], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(down, up)`` per module: down ``r × in…``, up ``out × r (× 1…)`` (a conv's kernel in down)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight
        down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, *([1] * (w.dim() - 2)), generator=g) * 0.3
        out[n] = (down, up)
    return out


@torch.no_grad()
def bias_deltas(model) -> dict[str, torch.Tensor]:
    """Bias change per module with a ``lora_B.bias`` (diffusers' reading of ``diff_b``): merged minus base."""
    out = {}
    for name, layer in tuner_layers(model).items():
        if not layer.lora_bias.get("default", False):
            continue
        base = layer.get_base_layer()
        saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        layer.to(torch.float64)
        before = base.bias.detach().clone()
        layer.merge(adapter_names=["default"])
        delta = (base.bias.detach() - before).float()
        if bool(delta.ne(0).any()):  # with one lora_B.bias PEFT gives every layer one (zero where the file has none)
            out[name] = delta
        layer.unmerge()
        layer.to(torch.float32)
        layer.load_state_dict(saved)
    return out


def diffusers_reference(model, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ΔW, bias change) per module as diffusers loads ``file`` into ``model`` (left unloaded again)."""
    from diffusers.loaders import WanLoraLoaderMixin

    sd, meta = WanLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="default", metadata=meta)
    try:
        return reference_deltas(model), bias_deltas(model)
    finally:
        model.unload_lora()


def check(adapter, weights, biases=None, *, family: str = "wan21") -> None:
    assert sorted(adapter.modules) == sorted(weights), sorted(set(adapter.modules) ^ set(weights))[:6]
    for name, ref in weights.items():
        got = adapter.delta(name)
        assert tuple(got.shape) == tuple(ref.shape), (name, tuple(got.shape), tuple(ref.shape))
        assert relative_error(got, ref) < 1e-5, name
    for name, ref in (biases or {}).items():
        got = adapter.bias_delta(name)
        assert got is not None, name
        assert relative_error(got, ref) < 1e-5, name
    assert adapter.family == family, (adapter.family, adapter.family_source)


def header(file: Path) -> dict[str, str]:
    with safe_open(str(file), "pt") as f:
        return dict(f.metadata() or {})


def tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


# --- diffusers / PEFT: transformer.blocks.0.attn1.to_q.lora_A.weight --------------------------------------


def write_diffusers(model, tmp_path: Path, names: list[str], seed: int, metadata: dict[str, str] | None = None) -> Path:
    """diffusers' own writer (``save_lora_weights``) with a LoraConfig header: r = 4, lora_alpha = 2."""
    from diffusers.loaders import WanLoraLoaderMixin

    layers = {}
    for n, (down, up) in factors(model, names, seed).items():
        layers[f"{n}.lora_A.weight"], layers[f"{n}.lora_B.weight"] = down, up
    config = {"r": RANK, "lora_alpha": ALPHA, "target_modules": names}
    WanLoraLoaderMixin.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    if metadata:  # the family fields a trainer adds (ai-toolkit ss_base_model_version, CivitAI baseModel)
        save_safetensors(file, tensors_of(file), {**header(file), **metadata})
    return file


@pytest.mark.parametrize(
    ("metadata", "family"),
    [
        ({}, "wan21"),
        ({"ss_base_model_version": "wan_2.1"}, "wan21"),
        ({"ss_base_model_version": "wan_2.2_14b"}, "wan22"),
        ({"baseModel": "Wan Video 2.2 TI2V-5B"}, "wan22"),
    ],
)
def test_diffusers_file(t2v, tmp_path, metadata, family):
    file = write_diffusers(t2v, tmp_path, linears(t2v, i2v=False), seed=1, metadata=metadata)
    weights, _ = diffusers_reference(t2v, file)
    assert len(weights) == 2 * len(BLOCK_LINEAR) + len(TOP_LINEAR)
    adapter = wsa.load_adapter(file)
    check(adapter, weights, family=family)
    if not metadata:
        assert adapter.family_source == "keys (also fit: wan22)"


def test_diffusers_fused_projections(tmp_path):
    """LoRA on diffusers' ``fuse_qkv_projections`` layers: rows split exactly into to_q/to_k/to_v (and add_k/add_v)."""
    model = tiny_wan(i2v=True, seed=3)
    model.fuse_qkv_projections()
    fused = ["blocks.0.attn1.to_qkv", "blocks.1.attn2.to_kv", "blocks.1.attn2.to_added_kv"]
    file = write_diffusers(model, tmp_path, fused, seed=2)
    weights, _ = diffusers_reference(model, file)
    d = WIDTH
    expected = {
        "blocks.0.attn1.to_q": weights[fused[0]][:d],
        "blocks.0.attn1.to_k": weights[fused[0]][d : 2 * d],
        "blocks.0.attn1.to_v": weights[fused[0]][2 * d :],
        "blocks.1.attn2.to_k": weights[fused[1]][:d],
        "blocks.1.attn2.to_v": weights[fused[1]][d:],
        "blocks.1.attn2.add_k_proj": weights[fused[2]][:d],
        "blocks.1.attn2.add_v_proj": weights[fused[2]][d:],
    }
    adapter = wsa.load_adapter(file)
    check(adapter, expected)
    assert any("to_qkv" in n for n in adapter.notes)


def test_diffusers_patch_embedding_conv3d(t2v, tmp_path):
    file = write_diffusers(t2v, tmp_path, ["patch_embedding", "blocks.0.attn1.to_q"], seed=4)
    weights, _ = diffusers_reference(t2v, file)
    assert tuple(weights["patch_embedding"].shape) == (WIDTH, 4, 1, 2, 2)
    check(wsa.load_adapter(file), weights)


# --- musubi-tuner: lora_unet_blocks_0_self_attn_q.lora_down.weight + alpha ---------------------------------

#: What musubi-tuner writes for every Wan model, 2.1 and 2.2 alike (trainer_base.py, sai_model_spec.ARCH_WAN).
MUSUBI_METADATA = {"ss_base_model_version": "wan", "modelspec.architecture": "wan2.1/lora", "ss_network_dim": "4"}


def write_musubi(model, file: Path, seed: int, prefix: str = "lora_unet_") -> Path:
    """Every block module (musubi's converter in diffusers requires all of them), I2V image attention included."""
    tensors = {}
    for n, (down, up) in factors(model, linears(model, i2v=True, top=False), seed).items():
        key = prefix + to_native(n).replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return save_safetensors(file, tensors, MUSUBI_METADATA)


def test_musubi_i2v(i2v, tmp_path):
    file = write_musubi(i2v, tmp_path / "musubi.safetensors", seed=5)
    weights, _ = diffusers_reference(i2v, file)
    assert "blocks.1.attn2.add_v_proj" in weights
    adapter = wsa.load_adapter(file)
    check(adapter, weights)
    assert "wan22" in adapter.family_source  # musubi's metadata does not say 2.1 or 2.2


# --- ComfyUI / diffusion-pipe / ai-toolkit / lightx2v: diffusion_model.blocks.0.self_attn.q.lora_A.weight ------


def test_comfyui_lora_ab_with_diffs(i2v, tmp_path):
    """lora_A/lora_B (no alpha) on every block and top-level Linear, ``.diff_b`` bias deltas and ``.diff`` norms.

    diffusers turns ``diff_b`` into ``lora_B.bias`` (checked against PEFT's merge); it drops the norm diffs
    and the ``modulation`` / ``img_emb.proj.0`` diffs, whose expected ΔW is the stored ``diff`` itself.
    """
    names = linears(i2v, i2v=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, (down, up) in factors(i2v, names, seed=6).items():
        key = "diffusion_model." + to_native(n)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    g = torch.Generator().manual_seed(7)
    with_bias = ["blocks.0.attn1.to_q", "blocks.1.attn2.add_k_proj", "blocks.0.ffn.net.0.proj", "proj_out"]
    with_bias += ["condition_embedder.time_proj", "condition_embedder.image_embedder.ff.net.0.proj"]
    params = dict(i2v.named_parameters())
    for n in with_bias:
        tensors[f"diffusion_model.{to_native(n)}.diff_b"] = torch.randn(params[n + ".bias"].shape, generator=g)
    full = [
        "blocks.0.attn1.norm_q",
        "blocks.1.attn2.norm_added_k",
        "blocks.1.norm2",
        "condition_embedder.image_embedder.norm1",
    ]
    diffs, diff_bs = {}, {}
    for n in full:
        diffs[n] = torch.randn(params[n + ".weight"].shape, generator=g)
        tensors[f"diffusion_model.{to_native(n)}.diff"] = diffs[n]
        if n + ".bias" in params:  # LayerNorms: weight and bias
            diff_bs[n] = torch.randn(params[n + ".bias"].shape, generator=g)
            tensors[f"diffusion_model.{to_native(n)}.diff_b"] = diff_bs[n]
    for n in ("blocks.0.scale_shift_table", "scale_shift_table"):
        diffs[n] = torch.randn(params[n].shape, generator=g)
        tensors[f"diffusion_model.{to_native(n)}.diff"] = diffs[n]
    file = save_safetensors(tmp_path / "comfy.safetensors", tensors)

    weights, biases = diffusers_reference(i2v, file)
    assert sorted(biases) == sorted(with_bias)  # diffusers read every diff_b of a Linear …
    assert not set(diffs) & set(weights)  # … and none of the .diff tensors (computed independently here)
    adapter = wsa.load_adapter(file)
    check(adapter, {**weights, **diffs}, {**biases, **diff_bs})


def write_comfy_alpha(model, file: Path, seed: int, bias: tuple[str, ...] = ()) -> Path:
    """``lora_down``/``lora_up``/``alpha`` (lightx2v, ComfyUI extracts), block modules only: diffusers' converter
    applies alpha to block modules alone (it leaves a top-level module's alpha unconsumed and fails)."""
    tensors = {}
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed + 100)
    for n, (down, up) in factors(model, linears(model, i2v=False, top=False), seed).items():
        key = "diffusion_model." + to_native(n)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        if n in bias:
            tensors[f"{key}.diff_b"] = torch.randn(params[n + ".bias"].shape, generator=g)
    return save_safetensors(file, tensors)


def test_comfyui_lora_down_alpha(t2v, tmp_path):
    file = write_comfy_alpha(t2v, tmp_path / "lightx2v.safetensors", seed=8)
    weights, _ = diffusers_reference(t2v, file)
    check(wsa.load_adapter(file), weights)


def test_comfyui_diff_b_not_scaled_by_alpha(t2v, tmp_path):
    bias = ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2")
    file = write_comfy_alpha(t2v, tmp_path / "lightx2v_b.safetensors", seed=9, bias=bias)
    weights, biases = diffusers_reference(t2v, file)
    assert sorted(biases) == sorted(bias)
    check(wsa.load_adapter(file), weights, biases)


# --- conventions diffusers cannot read: re-keyed from a file it can ----------------------------------------


def _peft_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers file -> single-file PEFT ``base_model.model.<path>``: no alpha there, so alpha/r goes into lora_B."""
    out = {}
    for k, v in tensors.items():
        k = k.removeprefix("transformer.")
        out["base_model.model." + k] = v * (ALPHA / RANK) if k.endswith("lora_B.weight") else v
    return out


def _onetrainer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers file -> OneTrainer ``lora_transformer_<path with _>.lora_down/lora_up`` + alpha."""
    out = {}
    for k, v in tensors.items():
        path, part = k.removeprefix("transformer.").rsplit(".lora_", 1)
        key = "lora_transformer_" + path.replace(".", "_")
        out[f"{key}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        out[f"{key}.alpha"] = torch.tensor(ALPHA)
    return out


def _diffsynth(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI lora_A/B file -> DiffSynth-Studio ``<native path>.lora_A.default.weight`` (no prefix)."""
    return {
        k.removeprefix("diffusion_model.").removesuffix(".weight") + ".default.weight": v for k, v in tensors.items()
    }


def test_peft_file_and_onetrainer(t2v, tmp_path):
    source = write_diffusers(t2v, tmp_path, linears(t2v, i2v=False), seed=10)
    weights, _ = diffusers_reference(t2v, source)
    tensors = tensors_of(source)
    for name, rekey in (("peft-file", _peft_file), ("onetrainer", _onetrainer)):
        file = save_safetensors(tmp_path / f"{name}.safetensors", rekey(tensors))
        check(wsa.load_adapter(file), weights)


def test_diffsynth(i2v, tmp_path):
    tensors = {}
    for n, (down, up) in factors(i2v, linears(i2v, i2v=True), seed=11).items():
        key = "diffusion_model." + to_native(n)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    source = save_safetensors(tmp_path / "comfy.safetensors", tensors)
    weights, _ = diffusers_reference(i2v, source)
    file = save_safetensors(tmp_path / "diffsynth.safetensors", _diffsynth(tensors))
    check(wsa.load_adapter(file), weights)


def test_wan_fun_double_underscore(i2v, tmp_path):
    """Wan-Fun keys = musubi keys with ``lora_unet__``; the reference is diffusers on the musubi spelling."""
    weights, _ = diffusers_reference(i2v, write_musubi(i2v, tmp_path / "musubi.safetensors", seed=12))
    file = write_musubi(i2v, tmp_path / "wan_fun.safetensors", seed=12, prefix="lora_unet__")
    check(wsa.load_adapter(file), weights)


# --- the family: metadata, and shapes where metadata says nothing ---------------------------------------------


@pytest.mark.parametrize(
    ("width", "metadata", "family", "source"),
    [
        (1536, MUSUBI_METADATA, "wan21", "keys+shapes"),  # 2.1 1.3B
        (3072, MUSUBI_METADATA, "wan22", "keys+shapes"),  # 2.2 TI2V-5B: musubi says "wan2.1", the shape says 2.2
        (5120, MUSUBI_METADATA, "wan21", "keys (also fit: wan22)"),  # 14B: 2.1 and 2.2 A14B are the same
        (5120, {"ss_base_model_version": "wan_2.2_14b"}, "wan22", "keys+metadata"),
        (5120, {"baseModel": "Wan Video 14B i2v 720p"}, "wan21", "keys+metadata"),
    ],
)
def test_family_from_shapes_and_metadata(tmp_path, width, metadata, family, source):
    g = torch.Generator().manual_seed(width)
    tensors = {}
    for key in ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_o"):
        tensors[f"{key}.lora_down.weight"] = torch.randn(1, width, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(width, 1, generator=g)
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "full.safetensors", tensors, metadata))
    assert adapter.family == family
    assert adapter.family_source.startswith(source), adapter.family_source
    assert sorted(adapter.modules) == ["blocks.0.attn1.to_q", "blocks.0.attn2.to_out.0"]


def test_unknown_module_is_named(tmp_path):
    tensors = {}
    for key in ("diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.self_attn.qkv_gate"):
        tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, WIDTH)
        tensors[f"{key}.lora_B.weight"] = torch.randn(WIDTH, RANK)
    file = save_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(FormatError, match=r"blocks\.0\.self_attn\.qkv_gate"):
        wsa.load_adapter(file)


def test_metadata_header_is_loraconfig(t2v, tmp_path):
    """The diffusers file's scale comes from its LoraConfig header (alpha 2 / r 4), as diffusers reads it."""
    file = write_diffusers(t2v, tmp_path, ["blocks.0.attn1.to_q"], seed=13)
    config = json.loads(header(file)["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == ALPHA
    assert wsa.load_adapter(file).modules["blocks.0.attn1.to_q"].scale == ALPHA / RANK
