"""SD3 / SD3.5 (``wsa.families.sd3``): every trainer's spelling gives diffusers' own ΔW per module.

The tiny ``SD3Transformer2DModel`` has two joint blocks: block 0 has SD3.5-medium's second image
attention (``attn2``), block 1 is the last one, whose context stream is pre-only (no ``to_add_out``,
no ``ff_context``, a 2×width ``norm1_context.linear`` that ``convert_sd3_transformer_checkpoint_to_diffusers``
fills with its halves swapped). Every Linear/Conv of the model carries a LoRA, q/k/v of one attention
share their down factor so the fused native ``qkv`` exists exactly.

diffusers' ``SD3LoraLoaderMixin`` reads only diffusers-keyed files (it has no converter from kohya,
ComfyUI or OneTrainer keys for SD3). So, as the shared brief says, every native-keyed file here is
*derived*: the diffusers-keyed file is written and loaded with diffusers (with the per-module alphas
passed as ``network_alphas``) for the reference ΔW, then re-keyed to the trainer's convention with
this test's own table (:func:`native_rows`, written from the single-file converter's statements,
not from ``wsa.families.sd3``), and wsa reads the re-keyed file.
"""

from __future__ import annotations

import pytest
import torch

import wsa
from tests.tiny import assert_deltas_match, reference_deltas, save_safetensors
from wsa.adapter import ModuleWeights
from wsa.errors import FormatError
from wsa.families import resolve

N_LAYERS = 2
DUAL = (0,)
CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=N_LAYERS,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    pos_embed_max_size=16,
    dual_attention_layers=DUAL,
    qk_norm="rms_norm",
)
ALPHAS = (2.0, 3.0, 8.0, 1.0, 5.0)
TE_ALPHA = 3.0
CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_TARGETS = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wo",
)


def native_rows() -> list[tuple[str, tuple[str, ...], bool]]:
    """``(SAI name, diffusers modules in row order, halves swapped?)`` for the tiny model."""
    rows: list[tuple[str, tuple[str, ...], bool]] = []
    for i in range(N_LAYERS):
        j, b = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == N_LAYERS - 1
        rows += [
            (f"{j}.x_block.attn.qkv", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"), False),
            (f"{j}.x_block.attn.proj", (f"{b}.attn.to_out.0",), False),
            (f"{j}.x_block.mlp.fc1", (f"{b}.ff.net.0.proj",), False),
            (f"{j}.x_block.mlp.fc2", (f"{b}.ff.net.2",), False),
            (f"{j}.x_block.adaLN_modulation.1", (f"{b}.norm1.linear",), False),
            (
                f"{j}.context_block.attn.qkv",
                (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"),
                False,
            ),
            (f"{j}.context_block.adaLN_modulation.1", (f"{b}.norm1_context.linear",), last),
        ]
        if not last:
            rows += [
                (f"{j}.context_block.attn.proj", (f"{b}.attn.to_add_out",), False),
                (f"{j}.context_block.mlp.fc1", (f"{b}.ff_context.net.0.proj",), False),
                (f"{j}.context_block.mlp.fc2", (f"{b}.ff_context.net.2",), False),
            ]
        if i in DUAL:
            rows += [
                (f"{j}.x_block.attn2.qkv", (f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"), False),
                (f"{j}.x_block.attn2.proj", (f"{b}.attn2.to_out.0",), False),
            ]
    rows += [
        ("x_embedder.proj", ("pos_embed.proj",), False),
        ("context_embedder", ("context_embedder",), False),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
        ("final_layer.linear", ("proj_out",), False),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
    ]
    return rows


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


@pytest.fixture(scope="module")
def model():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**CONFIG).eval()


@pytest.fixture(scope="module")
def lora(model):
    """Per native module: down factor, diffusers-order up factor per target, alpha, swap flag."""
    gen = torch.Generator().manual_seed(1)
    out = []
    all_linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    covered = set()
    for k, (name, targets, swap) in enumerate(native_rows()):
        rank = 4 if name.startswith("joint_blocks") else 2  # two ranks: diffusers needs a rank_pattern
        w = model.get_submodule(targets[0]).weight
        down_shape = (rank, *w.shape[1:])
        down = torch.randn(down_shape, generator=gen) * 0.3
        ups = []
        for t in targets:
            wt = model.get_submodule(t).weight
            up_shape = (wt.shape[0], rank) + ((1, 1) if wt.ndim == 4 else ())
            ups.append(torch.randn(up_shape, generator=gen) * 0.3)
        out.append((name, targets, swap, down, ups, ALPHAS[k % len(ALPHAS)]))
        covered.update(targets)
    assert covered == all_linear, sorted(all_linear ^ covered)  # the table covers the whole model
    return out


def _diffusers_keys(lora) -> dict[str, torch.Tensor]:
    sd = {}
    for _, targets, _, down, ups, _ in lora:
        for t, up in zip(targets, ups, strict=True):
            sd[f"transformer.{t}.lora_A.weight"] = down
            sd[f"transformer.{t}.lora_B.weight"] = up
    return sd


def _native_up(targets, ups, swap) -> torch.Tensor:
    up = torch.cat(ups)
    return _swap(up) if swap else up


def _reference(model, folder, lora, *, alphas: bool) -> dict[str, torch.Tensor]:
    """Load the diffusers-keyed file with diffusers' SD3 loader; PEFT's merged-minus-base ΔW per module."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

    file = save_safetensors(folder / f"diffusers_ref_{alphas}.safetensors", _diffusers_keys(lora))
    sd = SD3LoraLoaderMixin.lora_state_dict(str(file))
    network_alphas = None
    if alphas:
        network_alphas = {f"transformer.{t}.alpha": a for _, targets, _, _, _, a in lora for t in targets}
    model.load_lora_adapter(sd, network_alphas=network_alphas, prefix="transformer", adapter_name="default")
    try:
        return reference_deltas(model)
    finally:
        model.unload_lora()


@pytest.fixture(scope="module")
def ref_plain(model, lora, tmp_path_factory):
    """Reference ΔW of the diffusers-keyed file as diffusers loads it (scale 1)."""
    return _reference(model, tmp_path_factory.mktemp("ref"), lora, alphas=False)


@pytest.fixture(scope="module")
def ref_alpha(model, lora, tmp_path_factory):
    """Reference ΔW with each native module's alpha given to diffusers as ``network_alphas``."""
    return _reference(model, tmp_path_factory.mktemp("ref"), lora, alphas=True)


# --- text encoders (kohya lora_te1_/lora_te2_ = CLIP-L/G, lora_te3_ = T5-XXL) ------------------------


def _tiny_clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=8,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    cfg = T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"
    )
    return T5EncoderModel(cfg).eval()


def _te_factors(te, paths, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        w = te.get_submodule(p).weight
        out[p] = (torch.randn(3, w.shape[1], generator=gen) * 0.3, torch.randn(w.shape[0], 3, generator=gen) * 0.3)
    return out


def _clip_reference(prefix: str, seed: int):
    """A CLIP text-encoder LoRA loaded by diffusers' SD3 text-encoder loader; (factors, reference ΔW)."""
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

    te = _tiny_clip(seed)
    paths = [f"text_model.encoder.layers.0.{t}" for t in CLIP_TARGETS]
    factors = _te_factors(te, paths, seed)
    sd = {}
    for p, (down, up) in factors.items():
        sd[f"{prefix}.{p}.lora_A.weight"] = down
        sd[f"{prefix}.{p}.lora_B.weight"] = up
    alphas = {f"{prefix}.{p}.alpha": TE_ALPHA for p in paths}
    SD3LoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, te, prefix=prefix, adapter_name="default")
    return factors, reference_deltas(te, prefix=f"{prefix}.")


def _t5_reference():
    """A T5 LoRA: diffusers' SD3 loader has no T5 component, so PEFT injects and merges it directly."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    te = _tiny_t5()
    paths = [f"encoder.block.0.{t}" for t in T5_TARGETS]
    factors = _te_factors(te, paths, 3)
    te = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=TE_ALPHA, target_modules=paths), te)
    sd = {}
    for p, (down, up) in factors.items():
        sd[f"{p}.lora_A.weight"] = down
        sd[f"{p}.lora_B.weight"] = up
    result = set_peft_model_state_dict(te, sd)
    assert not result.unexpected_keys
    ref = {f"text_encoder_3.{k}": v for k, v in reference_deltas(te).items()}
    return factors, ref


# --- the conventions ------------------------------------------------------------------------------


def test_diffusers_peft(lora, tmp_path, ref_plain):
    """diffusers / SimpleTuner: ``transformer.<diffusers path>.lora_A.weight`` (no alpha: scale 1)."""
    ref = dict(ref_plain)
    file = save_safetensors(tmp_path / "sd3_diffusers.safetensors", _diffusers_keys(lora))
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


def _kohya_denoiser(lora) -> dict[str, torch.Tensor]:
    sd = {}
    for name, targets, swap, down, ups, alpha in lora:
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = _native_up(targets, ups, swap)
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def _kohya_te(sd, kohya_prefix, factors) -> None:
    for p, (down, up) in factors.items():
        key = kohya_prefix + p.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(TE_ALPHA)


def test_kohya_sd_scripts(lora, tmp_path, ref_alpha):
    """sd-scripts ``lora_sd3.py``: ``lora_unet_joint_blocks_0_x_block_attn_qkv`` (fused) + ``emb_dims``
    embedders, alpha per module, and the CLIP text encoders ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G)."""
    ref = dict(ref_alpha)
    sd = _kohya_denoiser(lora)
    for kohya, component, seed in (("lora_te1_", "text_encoder", 4), ("lora_te2_", "text_encoder_2", 5)):
        factors, te_ref = _clip_reference(component, seed)
        ref.update(te_ref)
        _kohya_te(sd, kohya, factors)
    file = save_safetensors(tmp_path / "sd3_kohya.safetensors", sd, {"ss_network_module": "networks.lora_sd3"})
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


def test_kohya_t5_text_encoder(lora, tmp_path, ref_alpha):
    """sd-scripts ``train_t5xxl``: T5-XXL as ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``.

    Canonical name: ``text_encoder_3.encoder.block.0.layer.0.SelfAttention.q`` (T5EncoderModel's own path).
    """
    ref = dict(ref_alpha)
    sd = _kohya_denoiser(lora)
    factors, te_ref = _t5_reference()
    ref.update(te_ref)
    _kohya_te(sd, "lora_te3_", factors)
    file = save_safetensors(tmp_path / "sd3_kohya_t5.safetensors", sd)
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


def test_comfyui_native(lora, tmp_path, ref_alpha):
    """ComfyUI / SwarmUI extracts: ``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight`` +
    ``.alpha``, and ``.diff`` for the RMS norms (``ln_q`` -> ``attn.norm_q``: the converter's rename)."""
    ref = dict(ref_alpha)
    sd = {}
    for name, targets, swap, down, ups, alpha in lora:
        sd[f"diffusion_model.{name}.lora_down.weight"] = down
        sd[f"diffusion_model.{name}.lora_up.weight"] = _native_up(targets, ups, swap)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    norms = {
        "joint_blocks.0.x_block.attn.ln_q": "transformer_blocks.0.attn.norm_q",
        "joint_blocks.1.context_block.attn.ln_k": "transformer_blocks.1.attn.norm_added_k",
        "joint_blocks.0.x_block.attn2.ln_k": "transformer_blocks.0.attn2.norm_k",
    }
    gen = torch.Generator().manual_seed(6)
    for name, target in norms.items():
        diff = torch.randn(8, generator=gen) * 0.01
        sd[f"diffusion_model.{name}.diff"] = diff
        ref[target] = diff
    file = save_safetensors(tmp_path / "sd3_comfy.safetensors", sd)
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


def test_comfyui_diffusers_paths(lora, tmp_path, ref_plain):
    """ai-toolkit (``transformer.`` -> ``diffusion_model.`` on save): diffusers paths with lora_A/lora_B."""
    ref = dict(ref_plain)
    sd = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in _diffusers_keys(lora).items()}
    file = save_safetensors(tmp_path / "sd3_aitk.safetensors", sd)
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


def test_onetrainer(lora, tmp_path, ref_alpha):
    """OneTrainer ``convert_sd3_lora.py``: ``lora_transformer_<diffusers path with _>`` + alpha, split q/k/v."""
    ref = dict(ref_alpha)
    sd = {}
    for _, targets, _, down, ups, alpha in lora:
        for t, up in zip(targets, ups, strict=True):
            key = "lora_transformer_" + t.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    file = save_safetensors(tmp_path / "sd3_onetrainer.safetensors", sd)
    adapter = wsa.load_adapter(file)
    assert adapter.family == "sd3"
    assert_deltas_match(adapter, ref)


# --- family decisions -----------------------------------------------------------------------------


def _lora_module(out: int, inp: int) -> ModuleWeights:
    t = {"down": torch.zeros(2, inp), "up": torch.zeros(out, 2)}
    return ModuleWeights("lora", t, (out, inp), 2, None, 1.0)


def test_attention_only_names_fit_flux_too():
    """Attention-only diffusers names are Flux's as well: SD3's widths (1536, 2432) or metadata decide."""
    names = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_add_out",
    ]
    for width in (1536, 2432):
        res = resolve({(n, False): _lora_module(width, width) for n in names}, metadata={}, path="x")
        assert res.family == "sd3" and "flux1" in res.candidates
    tiny = {(n, False): _lora_module(16, 16) for n in names}
    values = ("sd3", "stable-diffusion-3-medium/lora", "stable-diffusion-3-5-large/lora", "sd3.5_large", "SD 3.5")
    for value in values:
        res = resolve(tiny, metadata={"modelspec.architecture": value}, path="x")
        assert res.family == "sd3", value


def test_last_context_modulation_swaps_only_when_pre_only():
    """``context_block.adaLN_modulation.1``: rows as is for 6×width, halves swapped for the last block's 2×width."""
    for out, swapped in ((96, False), (32, True)):
        mod = ModuleWeights("lora", {"down": torch.randn(2, 16), "up": torch.randn(out, 2)}, (out, 16), 2, None, 1.0)
        res = resolve({("joint_blocks_3_context_block_adaLN_modulation_1", True): mod}, metadata={}, path="x")
        assert res.family == "sd3"
        got = res.modules["transformer_blocks.3.norm1_context.linear"].tensors["up"]
        want = _swap(mod.tensors["up"]) if swapped else mod.tensors["up"]
        assert torch.equal(got, want)


def test_unknown_module_is_named(lora, tmp_path):
    sd = _kohya_denoiser(lora[:3])
    down, up = lora[0][3], torch.cat(lora[0][4])
    sd["lora_unet_joint_blocks_0_x_block_attn_qkv_bogus.lora_down.weight"] = down
    sd["lora_unet_joint_blocks_0_x_block_attn_qkv_bogus.lora_up.weight"] = up
    file = save_safetensors(tmp_path / "sd3_bad.safetensors", sd)
    with pytest.raises(FormatError, match="joint_blocks_0_x_block_attn_qkv_bogus"):
        wsa.load_adapter(file)
