"""SD 1.x / SD 2.x / SDXL (``wsa.families.sd``): every trainer's spelling gives diffusers' own ΔW per module.

Tiny ``UNet2DConditionModel``s from configs, all with ``layers_per_block = 2`` (the real models' value,
which the LDM block arithmetic assumes):

* SD1-like (``tests.tiny.tiny_unet``): SD 1.5's block kinds (attention in the down blocks but the last and
  the up blocks but the first), 1×1-conv ``proj_in``/``proj_out``, cross-attention width 12;
* SD2-like: the same blocks with linear projections and SD 2's cross-attention width 1024, which decides
  the family when nothing else does;
* SDXL-like: a first down block without attention, ``transformer_layers_per_block = (1, 1, 2)``, attention
  in ``up_blocks.0``, ``addition_embed_type = "text_time"`` (``add_embedding``), cross-attention width 24.

Every Linear and Conv2d of a model carries a factor pair (LoCon on the convs), ranks and alphas varying
per module. The references:

* kohya / A1111 ``lora_unet_…`` — diffusers paths (SD 1.x/2.x; SDXL from diffusers' own
  ``convert_state_dict_to_kohya``) or LDM/SGM paths (sd-scripts' SDXL): diffusers'
  ``StableDiffusionLoraLoaderMixin.lora_state_dict`` / ``StableDiffusionXLLoraLoaderMixin.lora_state_dict``
  (with ``unet_config``, as SDXL's ``load_lora_weights`` passes it, so ``_maybe_map_sgm_blocks_to_diffusers``
  runs before ``_convert_non_diffusers_lora_to_diffusers``), then ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder`` and PEFT's merge (``tests.tiny.reference_deltas``).
* diffusers ``unet.<path>.lora_A.weight``: written by the mixins' ``save_lora_weights`` with the adapter
  metadata, read back by the same mixins.
* ComfyUI ``diffusion_model.<LDM path>`` (its LoRA extract/save nodes): diffusers reads no such SD file
  (``lora_state_dict`` passes the keys through and ``load_lora_adapter(prefix="unet")`` keeps none of them)
  and no ``.diff``/``.diff_b``. So these files are *derived*: the kohya file diffusers read is re-keyed with
  this file's own diffusers -> LDM table (:func:`ldm_name`, written from the ``unet_conversion_map`` of
  diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` / ``…_sdxl.py``, not from
  ``wsa.families.names``). Extract-style files carry no alpha (``alpha / rank`` folded into ``lora_up``),
  saved-style ones keep ``.alpha``; ``.diff`` (1-D norm weights) and ``.diff_b`` (biases) are what ComfyUI
  adds unscaled, so they are checked against themselves.
* LyCORIS LoHa on convs: diffusers has no LoHa reader. PEFT's ``LoHaConfig`` on the tiny model (LyCORIS's
  factor layout — ``w1_a`` out × r, ``w1_b`` r × in·kh·kw — and scale alpha / r) is the reference; its
  factors are written under kohya LDM names with ``.alpha``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import wsa
from tests.tiny import canonical_te, reference_deltas, relative_error, save_safetensors, tiny_unet
from wsa.adapter import ModuleWeights
from wsa.errors import FormatError
from wsa.families import family_from_metadata, resolve

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from peft import LoHaConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

RANKS = (2, 3, 4)
ALPHAS = (1.0, 3.0, 8.0, 0.5)


def sd1_unet() -> nn.Module:
    return tiny_unet(seed=0, layers_per_block=2)


def sd2_unet() -> nn.Module:
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
    ).eval()


def sdxl_unet() -> nn.Module:
    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 8),
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=24 + 6 * 4,
    ).eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], type]] = {
    "sd15": (sd1_unet, StableDiffusionLoraLoaderMixin),
    "sd2": (sd2_unet, StableDiffusionLoraLoaderMixin),
    "sdxl": (sdxl_unet, StableDiffusionXLLoraLoaderMixin),
}

# ------------------------------------------------------------------------------------------------
# diffusers -> LDM names (unet_conversion_map of convert_diffusers_to_original_stable_diffusion.py)

_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def ldm_name(unet: nn.Module, name: str) -> str:
    """The LDM/SGM checkpoint path of diffusers module ``name`` (``layers_per_block = 2``)."""
    if name in _LDM_TOP:
        return _LDM_TOP[name]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        n = 3 * int(m[1]) + int(m[3]) + 1
        return f"input_blocks.{n}.0.{_LDM_RESNET[m[4]]}" if m[2] == "resnets" else f"input_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[2])}.{_LDM_RESNET[m[3]]}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        n = 3 * int(m[1]) + int(m[3])
        return f"output_blocks.{n}.0.{_LDM_RESNET[m[4]]}" if m[2] == "resnets" else f"output_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
        i = int(m[1])
        sub = 2 if hasattr(unet.up_blocks[i], "attentions") else 1  # after the attention, if the block has one
        return f"output_blocks.{3 * i + 2}.{sub}.conv"
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# files and references

Factors = dict[str, tuple[Tensor, Tensor, float]]


def adapted(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{path: weight shape}`` of every Linear and Conv2d (what LoRA + LoCon train)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def norms(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, nn.GroupNorm | nn.LayerNorm)}


_ATTENTION = re.compile(r"attn[12]\.to_(q|k|v|out\.0)$")
#: One alpha for every attention projection (sd-scripts writes one --network_alpha for all modules). diffusers'
#: ``_get_alpha_name`` keys their alphas ``…attn1.processor.to_q_lora.down.weight.alpha``, which matches no PEFT
#: module, so diffusers gives them the file's most common alpha instead of their own; per-module alphas are
#: checked on every other module against diffusers and on all of them against ``alpha / rank · up @ down``.
ATTENTION_ALPHA = 3.0


def random_factors(shapes: dict[str, tuple[int, ...]], seed: int, alpha: float | None = None) -> Factors:
    """LoRA (Linear) / LoCon (conv: down r×in×kh×kw, up out×r×1×1) factors, ranks (and alphas) cycling."""
    g = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for i, (name, (o, inp, *kernel)) in enumerate(sorted(shapes.items())):
        r = RANKS[i % len(RANKS)]
        fan_in = inp * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn(r, inp, *kernel, generator=g) / fan_in**0.5
        up = torch.randn(o, r, *([1, 1] if kernel else []), generator=g) / r**0.5
        if alpha is None:
            out[name] = (down, up, ATTENTION_ALPHA if _ATTENTION.search(name) else ALPHAS[i % len(ALPHAS)])
        else:
            out[name] = (down, up, alpha)
    return out


def formula_delta(down: Tensor, up: Tensor, alpha: float) -> Tensor:
    """kohya / ComfyUI / A1111: ΔW = alpha / rank · up @ down (convs flattened, then the kernel's shape)."""
    delta = (alpha / down.shape[0]) * (up.flatten(1).double() @ down.flatten(1).double())
    return delta.reshape(up.shape[0], *down.shape[1:]).float()


def kohya_tensors(factors: Factors, spell: Callable[[str], str]) -> dict[str, Tensor]:
    tensors = {}
    for name, (down, up, alpha) in factors.items():
        key = spell(name)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def diffusers_reference(
    mixin: type, unet: nn.Module, path: Path, text_encoders: dict[str, nn.Module] | None = None
) -> dict[str, Tensor]:
    """ΔW per module as diffusers loads ``path`` into ``unet`` (and ``{component: text encoder}``)."""
    kwargs = {"unet_config": unet.config} if mixin is StableDiffusionXLLoraLoaderMixin else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas, metadata = mixin.lora_state_dict(str(path), return_lora_metadata=True, **kwargs)
        mixin.load_lora_into_unet(state, alphas, unet, adapter_name="default", metadata=metadata)
        for component, te in (text_encoders or {}).items():
            mixin.load_lora_into_text_encoder(
                state, alphas, te, prefix=component, adapter_name="default", metadata=metadata
            )
    ref = reference_deltas(unet)
    for component, te in (text_encoders or {}).items():
        ref.update(reference_deltas(te, f"{component}."))
    return ref


def assert_deltas(adapter: wsa.Adapter, reference: dict[str, Tensor], extra: set[str] = frozenset()) -> None:
    assert set(adapter.modules) == set(reference) | extra, sorted(set(adapter.modules) ^ (set(reference) | extra))[:6]
    for name, expected in reference.items():
        got = adapter.delta(name)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        assert relative_error(got, expected) < 1e-5, (name, relative_error(got, expected))


def kohya_diffusers(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


#: Modules diffusers' kohya converter loses: ``_convert_unet_lora_key`` maps ``lora_unet_add_embedding_linear_1``
#: (diffusers-path spelling) to ``add.embedding.linear`` (its "SDXL specific" ``emb`` rule drops the index), which
#: ``load_lora_adapter`` then silently skips. Those two are checked against ``alpha / rank · up @ down`` only.
DIFFUSERS_DROPS = {"sdxl": {"add_embedding.linear_1", "add_embedding.linear_2"}}


@pytest.fixture(scope="module")
def kohya_cases(tmp_path_factory):
    """``case -> (unet, factors, diffusers' ΔW, kohya file)``, each read by diffusers once per module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            family, _, spelling = case.partition("-")
            build, mixin = MODELS[family]
            unet = build()
            factors = random_factors(adapted(unet), seed=len(cache))
            spell = (
                (lambda n: "lora_unet_" + ldm_name(unet, n).replace(".", "_")) if spelling == "ldm" else kohya_diffusers
            )
            path = save_safetensors(tmp_path_factory.mktemp(case) / "kohya.safetensors", kohya_tensors(factors, spell))
            ref = diffusers_reference(mixin, unet, path)
            assert set(ref) == set(factors) - DIFFUSERS_DROPS.get(case, set())  # diffusers loaded every module
            cache[case] = (unet, factors, ref, path)
        return cache[case]

    return get


# ------------------------------------------------------------------------------------------------
# kohya / A1111 / LoCon


@pytest.mark.parametrize(
    ("case", "family", "source"),
    [
        ("sd15", "sd15", "keys (also fit: sd2, sdxl)"),
        ("sd2", "sd2", "keys+shapes"),
        ("sdxl-ldm", "sdxl", "keys (structure)"),
        ("sdxl", "sdxl", "keys (structure)"),
    ],
    ids=["sd15-diffusers-paths", "sd2-diffusers-paths", "sdxl-ldm-paths", "sdxl-diffusers-paths"],
)
def test_kohya_lora_and_locon_match_diffusers(kohya_cases, case, family, source):
    """``lora_unet_down_blocks_0_…`` (SD 1.x/2.x) and ``lora_unet_input_blocks_4_1_…`` (SDXL), LoCon convs."""
    _, _, ref, path = kohya_cases(case)
    if case == "sdxl-ldm":
        assert (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
            in wsa.formats.TensorFile(path).keys
        )
    adapter = wsa.load_adapter(path)
    assert (adapter.family, adapter.format) == (family, "kohya")
    assert adapter.family_source.startswith(source), adapter.family_source
    assert_deltas(adapter, ref, extra=DIFFUSERS_DROPS.get(case, set()))
    assert any(len(adapter.delta(n).shape) == 4 for n in ref)  # the LoCon convs
    _, factors, _, _ = kohya_cases(case)
    assert len({alpha for _, _, alpha in factors.values()}) == len(ALPHAS)
    for name, (down, up, alpha) in factors.items():
        assert relative_error(adapter.delta(name), formula_delta(down, up, alpha)) < 1e-6, name


# ------------------------------------------------------------------------------------------------
# ComfyUI extract / save: diffusion_model.<LDM path>


@pytest.mark.parametrize("style", ["extract", "saved"])
@pytest.mark.parametrize("case", ["sd15", "sdxl-ldm"])
def test_comfyui_ldm_keys_with_diff_and_diff_b(kohya_cases, case, style, tmp_path):
    """``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight`` + ``.diff``/``.diff_b``.

    Derived from the kohya file diffusers read (see the module docstring): same factors under LDM names,
    alpha/rank folded into ``lora_up`` (extract) or kept as ``.alpha`` (saved).
    """
    unet, factors, ref, _ = kohya_cases(case)
    g = torch.Generator().manual_seed(7)
    tensors: dict[str, Tensor] = {}
    biases: dict[str, Tensor] = {}
    for i, (name, (down, up, alpha)) in enumerate(factors.items()):
        key = "diffusion_model." + ldm_name(unet, name)
        tensors[f"{key}.lora_down.weight"] = down
        if style == "extract":
            tensors[f"{key}.lora_up.weight"] = up * (alpha / down.shape[0])
        else:
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        if i % 3 == 0:
            biases[name] = tensors[f"{key}.diff_b"] = torch.randn(up.shape[0], generator=g)
    diffs = {}
    for name, width in norms(unet).items():
        key = "diffusion_model." + ldm_name(unet, name)
        diffs[name] = tensors[f"{key}.diff"] = torch.randn(width, generator=g)
        biases[name] = tensors[f"{key}.diff_b"] = torch.randn(width, generator=g)
    path = save_safetensors(tmp_path / "comfy.safetensors", tensors)
    if case == "sdxl-ldm":
        assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight" in tensors
        assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.norm1.diff" in tensors
    adapter = wsa.load_adapter(path)
    family = case.split("-")[0]
    assert (adapter.family, adapter.format) == (family, "comfyui")
    assert_deltas(adapter, ref, extra=set(diffs))
    for name, diff in diffs.items():
        assert torch.equal(adapter.delta(name), diff), name
    for name, bias in biases.items():
        assert relative_error(adapter.bias_delta(name), bias) < 1e-6, name
    assert adapter.modules["conv_norm_out"].kind == "full"


# ------------------------------------------------------------------------------------------------
# LyCORIS LoHa on convs


def test_lycoris_loha_on_convs_with_ldm_names(tmp_path):
    """``lora_unet_input_blocks_1_0_in_layers_2.hada_w1_a`` …: PEFT's LoHa merge is the reference."""
    config = LoHaConfig(
        r=2,
        alpha=5,
        init_weights=False,
        target_modules=["conv1", "conv2", "conv_shortcut", "conv", "conv_in", "time_emb_proj", "to_q", "proj_in"],
    )
    unet = sdxl_unet()
    model = get_peft_model(unet, config)
    ref = reference_deltas(model)
    tensors = {}
    for name, layer in model.base_model.model.named_modules():
        if not hasattr(layer, "hada_w1_a") or "default" not in getattr(layer, "hada_w1_a", {}):
            continue
        key = "lora_unet_" + ldm_name(unet, name).replace(".", "_")
        for part in ("w1_a", "w1_b", "w2_a", "w2_b"):
            tensors[f"{key}.hada_{part}"] = getattr(layer, f"hada_{part}")["default"].detach().clone()
        tensors[f"{key}.alpha"] = torch.tensor(5.0)
    assert "lora_unet_input_blocks_1_0_in_layers_2.hada_w1_a" in tensors
    assert "lora_unet_output_blocks_2_2_conv.hada_w1_a" in tensors  # SDXL's upsampler after up_blocks.0's attention
    adapter = wsa.load_adapter(save_safetensors(tmp_path / "loha.safetensors", tensors))
    assert (adapter.family, adapter.format) == ("sdxl", "lycoris")
    assert_deltas(adapter, ref)
    assert adapter.delta("down_blocks.0.resnets.0.conv1").shape == (8, 8, 3, 3)
    assert adapter.delta("down_blocks.1.resnets.0.conv_shortcut").shape == (16, 8, 1, 1)


# ------------------------------------------------------------------------------------------------
# diffusers / PEFT unet.<path>.lora_A.weight


def _clip(with_projection: bool, hidden: int, seed: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
    "linear_1",
    "linear_2",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_peft_keys_match_diffusers(family, tmp_path):
    """``save_lora_weights``: ``unet.down_blocks.…lora_A.weight`` (+ ``text_encoder(_2).…``), alphas in metadata."""
    build, mixin = MODELS[family]
    unet = build()
    ucfg = LoraConfig(
        r=4, lora_alpha=6, init_lora_weights=False, target_modules=UNET_TARGETS, alpha_pattern={"conv1": 2}
    )
    unet.add_adapter(ucfg)
    tes = {"text_encoder": _clip(False, 16, 3)} | ({"text_encoder_2": _clip(True, 24, 4)} if family == "sdxl" else {})
    tcfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=TE_TARGETS)
    layers, meta = {"unet_lora_layers": get_peft_model_state_dict(unet)}, {"unet_lora_adapter_metadata": ucfg.to_dict()}
    for component, te in tes.items():
        # transformers' own add_adapter wants peft >= 0.22; get_peft_model gives the same layers
        tuned = get_peft_model(te, tcfg)
        layers[f"{component}_lora_layers"] = {
            k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(tuned).items()
        }
        meta[f"{component}_lora_adapter_metadata"] = tcfg.to_dict()
    mixin.save_lora_weights(tmp_path, **layers, **meta)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    keys = wsa.formats.TensorFile(path).keys
    block = {"sd15": "down_blocks.0", "sdxl": "down_blocks.1"}[family]
    assert f"unet.{block}.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    fresh = {c: _clip(c == "text_encoder_2", 16 if c == "text_encoder" else 24, 9) for c in tes}
    ref = diffusers_reference(mixin, build(), path, fresh)
    adapter = wsa.load_adapter(path)
    assert (adapter.family, adapter.format) == (family, "diffusers")
    assert_deltas(adapter, ref)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in adapter.modules
    if family == "sdxl":
        assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2" in adapter.modules
        assert "add_embedding.linear_1" in adapter.modules


# ------------------------------------------------------------------------------------------------
# text encoders: lora_te_ (SD 1.x/2.x), lora_te1_ / lora_te2_ (SDXL)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_text_encoders_match_diffusers(family, tmp_path):
    """``lora_te_…`` / ``lora_te1_…`` -> ``text_encoder.…``, ``lora_te2_…`` -> ``text_encoder_2.…``; also alone."""
    build, mixin = MODELS[family]
    unet = build()
    prefixes = (
        {"lora_te_": "text_encoder"}
        if family == "sd15"
        else {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    )
    tes = {c: _clip(c == "text_encoder_2", 16 if c == "text_encoder" else 24, 5) for c in prefixes.values()}
    te_tensors = {}
    for prefix, component in prefixes.items():
        shapes = {canonical_te(n): s for n, s in adapted(tes[component]).items() if ".layers." in n}
        factors = random_factors(shapes, seed=11, alpha=5.0)  # one alpha: see ATTENTION_ALPHA
        te_tensors.update(kohya_tensors(factors, lambda n, p=prefix: p + n.replace(".", "_")))
    unet_factors = dict(list(random_factors(adapted(unet), seed=12).items())[:6])
    spell = (lambda n: "lora_unet_" + ldm_name(unet, n).replace(".", "_")) if family == "sdxl" else kohya_diffusers
    path = save_safetensors(tmp_path / "k.safetensors", {**kohya_tensors(unet_factors, spell), **te_tensors})
    if family == "sdxl":
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te_tensors
    ref = diffusers_reference(mixin, unet, path, tes)
    te_ref = {k: v for k, v in ref.items() if k.startswith("text_encoder")}
    assert {k.split(".")[0] for k in te_ref} == set(prefixes.values()) and len(te_ref) == 12 * len(prefixes)
    adapter = wsa.load_adapter(path)
    assert adapter.family == family
    assert_deltas(adapter, ref)
    # the same text-encoder modules alone (a text-encoder-only file): same names and ΔW, family from metadata
    version = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    for metadata in ({}, {"ss_base_model_version": version}):
        alone = wsa.load_adapter(save_safetensors(tmp_path / f"te{len(metadata)}.safetensors", te_tensors, metadata))
        assert_deltas(alone, te_ref)
        if metadata:
            assert alone.family == family


# ------------------------------------------------------------------------------------------------
# family detection at full widths (header-only: meta tensors) and from metadata


def _fake(shapes: dict[str, tuple[int, ...]], underscored: bool) -> dict[tuple[str, bool], ModuleWeights]:
    out = {}
    for name, (o, i, *k) in shapes.items():
        tensors = {
            "down": torch.empty(4, i, *k, device="meta"),
            "up": torch.empty(o, 4, *([1, 1] if k else []), device="meta"),
        }
        out[(name, underscored)] = ModuleWeights("lora", tensors, (o, i, *k), 4, 4.0, 1.0)
    return out


def _sd_full(cross: int) -> dict[str, tuple[int, ...]]:
    """SD 1.x / 2.x modules at full width, kohya spelling (diffusers paths)."""
    t = "transformer_blocks_0"
    return {
        f"down_blocks_0_attentions_0_{t}_attn1_to_q": (320, 320),
        f"down_blocks_0_attentions_0_{t}_attn2_to_k": (320, cross),
        f"down_blocks_0_attentions_0_{t}_attn2_to_v": (320, cross),
        f"down_blocks_0_attentions_0_{t}_ff_net_0_proj": (2560, 320),
        f"mid_block_attentions_0_{t}_attn2_to_k": (1280, cross),
        f"up_blocks_3_attentions_2_{t}_attn2_to_v": (320, cross),
        "down_blocks_0_resnets_0_conv1": (320, 320, 3, 3),
        "up_blocks_0_upsamplers_0_conv": (1280, 1280, 3, 3),
    }


SDXL_FULL = {  # SDXL at full width, LDM paths (ComfyUI's spelling; sd-scripts' with '_')
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k": (640, 2048),
    "input_blocks.7.1.transformer_blocks.9.attn2.to_v": (1280, 2048),
    "middle_block.1.transformer_blocks.0.attn2.to_k": (1280, 2048),
    "output_blocks.0.1.transformer_blocks.0.attn1.to_q": (1280, 1280),
    "input_blocks.1.0.in_layers.2": (320, 320, 3, 3),
    "output_blocks.2.2.conv": (1280, 1280, 3, 3),
    "label_emb.0.0": (1280, 2816),
}


def _kohya(dotted: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k.replace(".", "_"): v for k, v in dotted.items()}


@pytest.mark.parametrize(
    ("shapes", "underscored", "family", "renamed"),
    [
        (_sd_full(768), True, "sd15", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        (_sd_full(1024), True, "sd2", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
        (_kohya(SDXL_FULL), True, "sdxl", "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_v"),
        (SDXL_FULL, False, "sdxl", "up_blocks.0.upsamplers.0.conv"),
        # SDXL by width alone: down-block attention only, transformer_blocks 0/1 (no structure evidence)
        ({"input_blocks_4_1_transformer_blocks_1_attn2_to_k": (640, 2048)}, True, "sdxl", None),
        # SDXL by structure alone: self-attention in up_blocks.0 (no cross-attention width)
        ({"output_blocks_1_1_transformer_blocks_0_attn1_to_q": (1280, 1280)}, True, "sdxl", None),
        # SD 1.x in ComfyUI's LDM spelling: output_blocks.2.1 is the upsampler (up_blocks.0 has no attention)
        (
            {
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
                "output_blocks.2.1.conv": (1280, 1280, 3, 3),
            },
            False,
            "sd15",
            "up_blocks.0.upsamplers.0.conv",
        ),
    ],
    ids=["sd15", "sd2", "sdxl-kohya", "sdxl-comfyui", "sdxl-width", "sdxl-structure", "sd15-comfyui"],
)
def test_family_from_full_width_keys(shapes, underscored, family, renamed):
    res = resolve(_fake(shapes, underscored), metadata={}, path="x")
    assert res.family == family, (res.family, res.source)
    assert res.source != "keys (also fit: sd2, sdxl)"  # decided, not a tie
    if renamed:
        assert renamed in res.modules
    if shapes in (SDXL_FULL, _kohya(SDXL_FULL)):
        assert {
            "add_embedding.linear_1",
            "down_blocks.0.resnets.0.conv1",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        } <= set(res.modules)


METADATA = [
    ({"ss_base_model_version": "sd_v1"}, "sd15"),
    ({"ss_base_model_version": "sd_v1_v"}, "sd15"),
    ({"ss_base_model_version": "sd_v2"}, "sd2"),
    ({"ss_base_model_version": "sd_v2_v"}, "sd2"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_base_model_version": "sdxl_base_v0-9"}, "sdxl"),
    ({"ss_base_model_version": "Pony"}, "sdxl"),
    ({"ss_base_model_version": "Illustrious"}, "sdxl"),
    ({"ss_base_model_version": "NoobAI"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd15"),
    ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"baseModel": "SD 1.5"}, "sd15"),
    ({"baseModel": "SD 1.4"}, "sd15"),
    ({"baseModel": "SD 2.1 768"}, "sd2"),
    ({"baseModel": "SDXL 1.0"}, "sdxl"),
    ({"baseModel": "SDXL Lightning"}, "sdxl"),
    ({"baseModel": "Pony"}, "sdxl"),
    ({"baseModel": "Illustrious"}, "sdxl"),
    ({"baseModel": "NoobAI"}, "sdxl"),
    ({"baseModel": "Playground v2"}, "sdxl"),
    ({"baseModel": "Pony V7"}, None),  # AuraFlow, not SDXL
    ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),  # not an SD UNet family
    ({"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
]


@pytest.mark.parametrize(("metadata", "family"), METADATA, ids=[next(iter(m.values())) for m, _ in METADATA])
def test_metadata_names_the_family(metadata, family):
    assert family_from_metadata(metadata)[0] == family
    # keys every SD family fits (self-attention only: no width, no SDXL structure): metadata decides
    ambiguous = {"down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640)}
    res = resolve(_fake(ambiguous, True), metadata=metadata, path="x")
    if family in ("sd15", "sd2", "sdxl"):
        assert (res.family, res.source) == (family, "keys+metadata")
    else:
        assert res.family == "sd15" and res.notes  # the tie-break, and the header's name in the notes


# ------------------------------------------------------------------------------------------------
# unknown modules


@pytest.mark.parametrize(
    ("key", "spelled"),
    [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_z",
            "input_blocks_4_1_transformer_blocks_0_attn1_to_z",
        ),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn3_to_q", "attn3_to_q"),
        (
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.1",
            "input_blocks.4.1.transformer_blocks.0.ff.net.1",
        ),
    ],
)
def test_unknown_module_fails_naming_it(tmp_path, key, spelled):
    unet = sdxl_unet()
    factors = dict(list(random_factors(adapted(unet), seed=13).items())[:8])
    comfy = key.startswith("diffusion_model.")
    spell = (
        (lambda n: "diffusion_model." + ldm_name(unet, n))
        if comfy
        else (lambda n: "lora_unet_" + ldm_name(unet, n).replace(".", "_"))
    )
    tensors = kohya_tensors(factors, spell)
    tensors[f"{key}.lora_down.weight"] = torch.randn(2, 32)
    tensors[f"{key}.lora_up.weight"] = torch.randn(32, 2)
    path = save_safetensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(FormatError, match=re.escape(spelled)):
        wsa.load_adapter(path)


@pytest.mark.parametrize(
    ("shapes", "metadata", "family"),
    [(SDXL_FULL, "sd_v1", "sdxl"), (_sd_full(768), "sdxl_base_v1-0", "sd15")],
    ids=["sdxl-widths-sd1-header", "sd1-widths-sdxl-header"],
)
def test_widths_beat_a_header_they_rule_out(shapes, metadata, family):
    """A wrong ``ss_base_model_version`` (common on re-uploads) cannot move a file to a family whose widths it lacks."""
    underscored = shapes is not SDXL_FULL
    res = resolve(_fake(shapes, underscored), metadata={"ss_base_model_version": metadata}, path="x")
    assert res.family == family, (res.family, res.source)
    assert any(f"metadata says {metadata!r}" in n for n in res.notes)
