"""Tiny real models and reference ΔWs for loader tests.

Why real models: the adapter files in the tests are written by the libraries' own writers
(PEFT ``save_pretrained``, diffusers ``save_lora_weights``, diffusers' converters), so a reader
bug cannot hide behind a hand-made fixture that shares the reader's assumptions. The models are
built from configs (nothing downloaded) and are small enough that building one takes milliseconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

#: Every module of the tiny UNet that an adapter may target in the tests, by kind.
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # 1×1 conv (use_linear_projection=False, as SD 1.5)
CONV1 = "down_blocks.0.resnets.0.conv1"  # 3×3 conv
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def tiny_unet(seed: int = 0, layers_per_block: int = 1) -> nn.Module:
    """A UNet2DConditionModel with SD 1.5's block types, 8/16 channels, cross-attention width 12."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def tiny_text_encoder(seed: int = 1) -> nn.Module:
    """A 2-layer CLIPTextModel with hidden size 16 (vocab 100)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def canonical_te(path: str) -> str:
    """transformers ≥ 5 dropped ``CLIPTextModel.text_model``; canonical names keep it (kohya spelling)."""
    if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT tuner layers by module path, without the ``base_model.model.`` wrapper prefix."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            out[name.removeprefix("base_model.model.")] = module
    return out


@torch.no_grad()
def reference_deltas(model: nn.Module, prefix: str = "", adapter_name: str = "default") -> dict[str, Tensor]:
    """ΔW per canonical module as PEFT itself computes it: merged weight minus base weight.

    Merging (rather than ``get_delta_weight``) also covers DoRA, whose ΔW includes the magnitude
    rescaling. Each layer is unmerged again, so the model is left as it was.
    """
    out: dict[str, Tensor] = {}
    for name, layer in tuner_layers(model).items():
        base = layer.get_base_layer()
        saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        layer.to(torch.float64)  # merge in float64: merged − base in float32 loses small ΔWs
        before = base.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge(adapter_names=[adapter_name])
        out[prefix + (canonical_te(name) if prefix else name)] = (base.weight.detach() - before).float()
        layer.unmerge()
        layer.to(torch.float32)
        layer.load_state_dict(saved)  # bit-exact restore of the float32 weights
    return out


@torch.no_grad()
def peft_delta_weights(model: nn.Module, prefix: str = "", adapter_name: str = "default") -> dict[str, Tensor]:
    """ΔW per canonical module from PEFT's ``get_delta_weight`` (no DoRA), in float64 then float32."""
    out: dict[str, Tensor] = {}
    for name, layer in tuner_layers(model).items():
        out[prefix + (canonical_te(name) if prefix else name)] = layer.get_delta_weight(adapter_name).float()
    return out


def base_weights(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Base weight per canonical module (for DoRA's base-dependent ΔW)."""
    return {
        prefix + (canonical_te(n) if prefix else n): layer.get_base_layer().weight.detach().clone()
        for n, layer in tuner_layers(model).items()
    }


def assert_deltas_match(adapter, reference: Mapping[str, Tensor], rtol: float = 1e-5) -> None:
    """Same module set and, per module, ΔW equal to the reference within ``rtol`` of its scale."""
    assert sorted(adapter.modules) == sorted(reference), (sorted(set(adapter.modules) ^ set(reference))[:6],)
    for name, ref in reference.items():
        got = adapter.delta(name)
        assert got.dtype == torch.float32
        assert tuple(got.shape) == tuple(ref.shape), (name, tuple(got.shape), tuple(ref.shape))
        tol = rtol * max(float(ref.abs().max()), 1e-12)
        err = float((got - ref).abs().max())
        assert err <= tol, f"{name}: max |ΔW - ref| = {err:.3g} > {tol:.3g}"


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def save_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def tiny_clip_tokenizer() -> object:
    """A CLIPTokenizer over single byte-level characters (no merges): the real class, nothing fetched."""
    from transformers import CLIPTokenizer

    # The 256 byte-level characters of GPT-2/CLIP BPE: printable bytes map to themselves, the rest
    # to code points from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=16)


def tiny_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline of random tiny parts (UNet, CLIP text encoder, VAE, DDIM) saved to ``folder``.

    The same classes and file layout as a real SD 1.5 folder, so loading, adapter hooks and sampling
    run the real code paths; images are 16×16 noise-like pictures.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            projection_dim=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
