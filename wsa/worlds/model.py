"""The embedded world's base model: a small pixel-space, text-conditioned diffusers UNet (a miniature SD).

Why this shape
--------------
weights2weights fine-tunes rank-1 LoRAs on Stable Diffusion's attention projections; the world must
offer the same targets under the same names, so the denoiser is diffusers' own
``UNet2DConditionModel`` with ``CrossAttn*`` blocks (``down_blocks.1.attentions.0.transformer_blocks.0
.attn1.to_q`` …) and peft / ``wsa.load_adapter`` / ``load_lora_weights`` treat it exactly like SD.
It works on 32×32 RGB pixels (no VAE: a family's images are flat-shaded shapes, and a latent
autoencoder would be one more model to train and ship). Measured on a 2-core CPU (batch 32, fp32):
the layout with attention only at 16×16 and 8×8 and channels (32, 64, 96) is 2.7 M parameters
(5.5 MB in fp16) at ≈ 2.5–3.5 s per training step, where (64, 128, 128) was 6.7 M at ≈ 4.5–9 s.

The text side is a word-level tokenizer over the family's vocabulary plus :class:`PromptEncoder`
(token + position embeddings and one transformer layer), not CLIP: the prompts are a handful of words
from a closed vocabulary ("a face, smiling, on blue"), so a 60 k-parameter encoder suffices. The empty
prompt (all padding) is the unconditional input for classifier-free guidance.

Sampling
--------
:meth:`BaseModel.sample` is an explicit DDIM loop over diffusers' ``DDIMScheduler`` (one CPU
``torch.Generator`` per image, so a batch equals its images one at a time). The same UNet, scheduler and
embeddings also run in a stock ``StableDiffusionPipeline`` (:meth:`BaseModel.pipeline`, with a 1-block
dummy VAE only so the pipeline's ``vae_scale_factor`` is 1, ``output_type="latent"`` and
``prompt_embeds=``); the scheduler config is chosen so the pipeline does not rewrite it
(``steps_offset=1``, ``clip_sample=False``; dynamic thresholding keeps pixels in range instead), and a
test checks both paths give the same images. The own loop stays the main path because it needs no
dummy VAE and no pipeline state.

On disk (a *base folder*)
-------------------------
``model.safetensors`` (``unet.*`` and ``text_encoder.*`` tensors, fp16 for shipping) and ``model.json``
(format version, family, vocabulary, every config needed to rebuild, the training record and the
sha256 of the weights file, which :meth:`BaseModel.load` checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsa.atomic import write_json, write_with
from wsa.errors import ConfigError, StoreError

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
PAD = "<pad>"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a base model; every field goes to ``model.json`` and rebuilds the same modules.

    Defaults: the measured fast layout (see the module docstring). ``attention_heads`` is passed as
    diffusers' ``attention_head_dim``, which UNet2DConditionModel reads as the *number* of heads.
    """

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_heads: int = 4
    # 8 groups, not diffusers' 32: with 32 channels at the first level, 32 groups normalise every channel
    # on its own and erase each image's mean colour (samples then came out hue-shifted; measured on H100).
    norm_num_groups: int = 8
    max_tokens: int = 8
    text_layers: int = 1
    text_heads: int = 4
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def unet_kwargs(self) -> dict[str, Any]:
        return {
            "sample_size": self.image_size,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": tuple(self.block_out_channels),
            "down_block_types": tuple(self.down_block_types),
            "up_block_types": tuple(self.up_block_types),
            "layers_per_block": self.layers_per_block,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.attention_heads,
            "norm_num_groups": self.norm_num_groups,
        }

    def train_scheduler_config(self) -> dict[str, Any]:
        """DDPM, epsilon prediction: the training noise schedule."""
        return {
            "num_train_timesteps": self.train_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": False,
        }

    def sample_scheduler_config(self) -> dict[str, Any]:
        """DDIM over the same betas; ``trailing`` spacing starts at the last (pure-noise) timestep.

        ``steps_offset=1`` and ``clip_sample=False`` are what ``StableDiffusionPipeline`` would force
        anyway; dynamic thresholding (Imagen) keeps predicted pixels in [-1, 1] instead of clipping.
        """
        return {
            **self.train_scheduler_config(),
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "set_alpha_to_one": True,
            "thresholding": True,
            "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class WordTokenizer:
    """Prompt → fixed-length token ids over a closed vocabulary (id 0 is padding; unknown words fail).

    Words are split on whitespace and commas, as :meth:`wsa.worlds.family.Family.tokenize` does.
    """

    vocabulary: tuple[str, ...]
    max_tokens: int = 8
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {w: i + 1 for i, w in enumerate(self.vocabulary)})

    @property
    def size(self) -> int:
        return len(self.vocabulary) + 1

    def ids(self, prompt: str) -> list[int]:
        words = [w for w in re.split(r"[\s,]+", prompt) if w]
        if len(words) > self.max_tokens:
            raise ConfigError(f"prompt {prompt!r} has {len(words)} words; the model takes at most {self.max_tokens}")
        out = []
        for word in words:
            if word not in self._index:
                raise ConfigError(
                    f"word {word!r} of prompt {prompt!r} is not in the vocabulary {list(self.vocabulary)}"
                )
            out.append(self._index[word])
        return out + [0] * (self.max_tokens - len(out))

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """``(B, max_tokens)`` int64 ids; ``""`` is all padding (the unconditional prompt)."""
        if isinstance(prompts, str):
            raise ConfigError("prompts must be a list of strings, not one string")
        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long).reshape(len(prompts), self.max_tokens)


class PromptEncoder(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm transformer layers, a final LayerNorm.

    Output ``(B, max_tokens, dim)`` is the UNet's ``encoder_hidden_states``. Padding is embedded (not
    masked), as CLIP embeds its padding, so a stock pipeline that passes no attention mask sees the
    same inputs as training.
    """

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.5)
        nn.init.normal_(self.position_embedding, std=0.1)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)


class BaseModel(nn.Module):
    """UNet + prompt encoder + tokenizer + scheduler configs of one family; builds, samples, saves, loads.

    Attributes
    ----------
    unet : diffusers.UNet2DConditionModel
    text_encoder : PromptEncoder
    tokenizer : WordTokenizer
    config : ModelConfig
    family : str
        Name of the concept family the model was (or will be) trained on.
    info : dict
        Training record kept in ``model.json`` (empty for an untrained model).
    """

    def __init__(self, config: ModelConfig, vocabulary: Sequence[str], family: str, seed: int = 0) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        self.family = family
        self.tokenizer = WordTokenizer(tuple(vocabulary), config.max_tokens)
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**config.unet_kwargs())
        self.text_encoder = PromptEncoder(
            self.tokenizer.size, config.max_tokens, config.cross_attention_dim, config.text_layers, config.text_heads
        )
        self.info: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """``(B, max_tokens, cross_attention_dim)`` embeddings on the model's device and dtype."""
        ids = self.tokenizer(prompts).to(self.text_encoder.token_embedding.weight.device)
        return self.text_encoder(ids)

    def forward(self, noisy: Tensor, timesteps: Tensor, ids: Tensor) -> Tensor:
        """Predicted noise for ``noisy`` (B, 3, H, W) at ``timesteps`` (B,) under token ``ids`` (B, L)."""
        return self.unet(noisy, timesteps, self.text_encoder(ids)).sample

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 25,
        guidance: float = 3.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        lora: Any = None,
        assignment: Sequence[int] | None = None,
        inject_after: int = 0,
        assignment_before: Sequence[int] | None = None,
    ) -> Tensor:
        """Images for ``prompts`` by DDIM (eta 0) with classifier-free guidance.

        Parameters
        ----------
        prompts : list of str, one per image
        seeds : list of int, one per image; image ``b`` depends only on ``prompts[b]`` and ``seeds[b]``
            (its initial noise comes from its own CPU generator), so batching does not change it.
        steps : int, default=25
        guidance : float, default=3.0
            1.0 turns guidance off (one UNet pass per step).
        device, dtype : where to run; default the model's current device, float32.
        lora : :class:`wsa.decoding.BatchedLoRA` on this model's UNet, or None (the base model).
        assignment : adapter index of each image (``-1``: none); required with ``lora``. The adapter
            applies to the unconditional pass too, as a loaded LoRA does in a pipeline.
        inject_after, assignment_before : w2w's delayed injection — the first ``inject_after`` DDIM
            steps use ``assignment_before`` (e.g. the unedited model; default: no adapter), the rest
            ``assignment``, so coarse layout comes from the original and details from the edit.

        Returns
        -------
        Tensor of shape (B, 3, image_size, image_size), float32 in [0, 1], on CPU.
        """
        from diffusers import DDIMScheduler

        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        device = torch.device(device) if device is not None else self.unet.device
        was = (self.unet.device, self.unet.dtype, self.training)
        self.to(device=device, dtype=dtype).eval()
        try:
            x = initial_noise(seeds, self.config.image_size).to(device, dtype)
            cond = self.encode_prompts(list(prompts))
            guided = guidance != 1.0
            if guided:
                cond = torch.cat([self.encode_prompts([""] * len(prompts)), cond])
            scheduler = DDIMScheduler.from_config(self.config.sample_scheduler_config())
            scheduler.set_timesteps(steps, device=device)
            active: Any
            if lora is not None:
                if assignment is None or len(assignment) != len(prompts):
                    raise ConfigError("with lora=, give assignment= with one adapter index per prompt")
                lora = lora.to(device)

                before = list(assignment_before) if assignment_before is not None else [-1] * len(prompts)
                active = lora.active(before if inject_after > 0 else list(assignment))
            else:
                active = contextlib.nullcontext()
            with active:
                for i, t in enumerate(scheduler.timesteps):
                    if lora is not None and i == inject_after and inject_after > 0:
                        lora.switch(list(assignment))  # w2w's delayed injection
                    eps = self.unet(torch.cat([x, x]) if guided else x, t, cond).sample
                    if guided:
                        uncond, conditional = eps.chunk(2)
                        eps = uncond + guidance * (conditional - uncond)
                    x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        finally:
            self.to(device=was[0], dtype=was[1]).train(was[2])
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)

    def pipeline(self) -> Any:
        """A stock diffusers ``StableDiffusionPipeline`` over this UNet (pixel space; see module docstring).

        Call it with ``prompt_embeds=model.encode_prompts(prompts)``,
        ``negative_prompt_embeds=model.encode_prompts([""] * B)``, ``height=width=image_size``,
        ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` and ``output_type="latent"``;
        the result ``.images`` is in [-1, 1]. ``pipe.load_lora_weights`` works on it as on SD.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

        # A 1-block VAE only makes vae_scale_factor 1; with output_type="latent" it is never called.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=3,
            block_out_channels=(8,),
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
        )
        return StableDiffusionPipeline(
            vae=vae.to(self.unet.device),
            text_encoder=None,
            tokenizer=None,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.config.sample_scheduler_config()),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # ---------------------------------------------------------------------------------------------
    def weights(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """All tensors under ``unet.`` / ``text_encoder.`` prefixes (sorted, contiguous, on CPU)."""
        state = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        state.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        return {
            k: (state[k].to(dtype) if dtype is not None and state[k].is_floating_point() else state[k])
            .detach()
            .cpu()
            .contiguous()
            for k in sorted(state)
        }

    def describe(self) -> dict[str, Any]:
        """The JSON record of the model (without the weights' checksum)."""
        return {
            "wsa_format_version": FORMAT_VERSION,
            "kind": "wsa_world_base",
            "family": self.family,
            "vocabulary": list(self.tokenizer.vocabulary),
            "model": asdict(self.config),
            "train_scheduler": self.config.train_scheduler_config(),
            "sample_scheduler": self.config.sample_scheduler_config(),
            "parameters": sum(p.numel() for p in self.parameters()),
            "training": self.info,
        }

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``model.safetensors`` (in ``dtype``; fp16 for shipping) and ``model.json`` with its sha256."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = self.weights(dtype)
        write_with(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        record = self.describe()
        record["weights"] = {
            "file": WEIGHTS_FILE,
            "dtype": str(dtype).removeprefix("torch."),
            "sha256": sha256_file(folder / WEIGHTS_FILE),
            "bytes": (folder / WEIGHTS_FILE).stat().st_size,
        }
        write_json(folder / CONFIG_FILE, record)
        return folder

    @classmethod
    def load(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> BaseModel:
        """Rebuild a saved model; the weights file must match the sha256 in ``model.json``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise StoreError(f"not a base model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})", folder)
        record = json.loads(config_path.read_text())
        if record.get("wsa_format_version") != FORMAT_VERSION or record.get("kind") != "wsa_world_base":
            raise StoreError(
                f"format {record.get('kind')!r} version {record.get('wsa_format_version')!r}; "
                f"this wsa reads wsa_world_base version {FORMAT_VERSION}",
                config_path,
            )
        expected, actual = record["weights"]["sha256"], sha256_file(weights_path)
        if expected != actual:
            raise StoreError(
                f"sha256 {actual} does not match {expected} recorded in {CONFIG_FILE}; "
                "the weights are corrupt or were replaced — re-download or retrain them",
                weights_path,
            )
        model = cls(ModelConfig.from_dict(record["model"]), record["vocabulary"], record["family"])
        tensors = load_file(weights_path)
        model.load_weights(tensors, str(weights_path))
        model.info = record.get("training", {})
        return model.to(device=device, dtype=dtype).eval()

    def load_weights(self, tensors: dict[str, Tensor], source: str = "weights") -> None:
        """Copy ``unet.*`` / ``text_encoder.*`` tensors in; missing or extra keys are an error."""
        parts: dict[str, dict[str, Tensor]] = {"unet": {}, "text_encoder": {}}
        for key, value in tensors.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise StoreError(f"unexpected tensor {key!r}", source)
            parts[prefix][rest] = value
        for prefix, state in parts.items():
            module: nn.Module = getattr(self, prefix)
            own = module.state_dict()
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            if missing or extra:
                raise StoreError(f"{prefix} tensors do not fit: missing {missing[:3]}, extra {extra[:3]}", source)
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def initial_noise(seeds: Sequence[int], image_size: int) -> Tensor:
    """``(B, 3, S, S)`` Gaussian noise, image ``b`` from ``torch.Generator().manual_seed(seeds[b])``.

    The same numbers diffusers' ``randn_tensor`` draws for a list of CPU generators, so the stock
    pipeline starts from the same noise.
    """
    return torch.cat(
        [torch.randn((1, 3, image_size, image_size), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
