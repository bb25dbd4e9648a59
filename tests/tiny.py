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


def _unet_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, object]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel keys → original (LDM) ``model.diffusion_model.*`` keys.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for any ``layers_per_block``, so a
    single-file checkpoint of a tiny UNet can be written and read back by ``from_single_file``.
    """
    lpb = int(config["layers_per_block"])  # type: ignore[arg-type]
    n_blocks = len(config["block_out_channels"])  # type: ignore[arg-type]
    resnet = [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ]
    prefixes: list[tuple[str, str, bool]] = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    up_types = config["up_block_types"]
    for i in range(n_blocks):
        for j in range(lpb):
            k = i * (lpb + 1) + j + 1
            prefixes += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False),
            ]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", False))
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            prefixes += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False),
            ]
        has_attention = "CrossAttn" in str(up_types[i])  # type: ignore[index]
        prefixes.append(
            (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attention else 1}.", False)
        )
    out = {}
    for key, value in state.items():
        for ours, theirs, is_resnet in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if is_resnet:
                    for a, b in resnet:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                out["model.diffusion_model." + theirs + rest] = value
                break
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


def _vae_to_ldm(state: Mapping[str, Tensor], n_blocks: int) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys → ``first_stage_model.*`` (attention projections as 1×1 convs)."""
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            k = k.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            k = k.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
        k = (
            k.replace("attn_1.group_norm.", "attn_1.norm.")
            .replace("attn_1.to_q.", "attn_1.q.")
            .replace("attn_1.to_k.", "attn_1.k.")
            .replace("attn_1.to_v.", "attn_1.v.")
            .replace("attn_1.to_out.0.", "attn_1.proj_out.")
        )
        for i in range(n_blocks):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n_blocks - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n_blocks - 1 - i}.upsample.")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def write_single_file_checkpoint(pipeline_dir: Path, out: Path) -> Path:
    """The tiny pipeline as one original-format ``.safetensors`` (UNet, VAE, CLIP), as SD 1.5 ships."""
    import json

    from diffusers import StableDiffusionPipeline

    from wsa.families.names import canonical_text_encoder_path

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    tensors = _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    vae_blocks = len(json.loads((pipeline_dir / "vae" / "config.json").read_text())["block_out_channels"])
    tensors.update(_vae_to_ldm(pipe.vae.state_dict(), vae_blocks))
    for key, value in pipe.text_encoder.state_dict().items():
        tensors["cond_stage_model.transformer." + canonical_text_encoder_path(key)] = value
    return save_safetensors(out, {k: v.contiguous() for k, v in tensors.items()})
