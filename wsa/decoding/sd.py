"""A user's own Stable Diffusion base (a local diffusers folder or one checkpoint file) as a decoding base.

Why the stock pipeline: users' bases are SD 1.5 / SDXL checkpoints, and the pipeline already knows
their text encoders, schedulers, VAEs and SDXL's extra conditioning. wsa only adds per-sample
adapters: :class:`~wsa.decoding.BatchedLoRA` hooks are installed on the UNet and text encoders under
wsa's canonical module names (``down_blocks.…`` for the UNet, ``text_encoder.…`` /
``text_encoder_2.…``), and the pipeline is called once for the whole batch. The text encoders see the
batch once for the prompts and once for the negative prompts, the UNet sees it doubled by
classifier-free guidance; the hooks tile the assignment for both.

Nothing is fetched: folders load with ``local_files_only=True``; a single ``.safetensors``/``.ckpt``
file needs ``config=`` (a diffusers folder of the same model type, whose configs it is read with),
because inferring configs would download them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsa.errors import ConfigError


class SDBase:
    """A diffusers Stable Diffusion (1.x/2.x or XL) pipeline wrapped for :class:`~wsa.decoding.decoder.Decoder`."""

    family: str | None = None
    default_guidance = 7.5

    def __init__(self, pipe: Any, reference: str) -> None:
        self.pipe = pipe
        self.reference = reference
        self.unet = pipe.unet
        self.kind = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
        pipe.set_progress_bar_config(disable=True)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, reference: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.float32):
        """From a diffusers folder (``model_index.json``) or a single checkpoint file (with ``config``)."""
        import diffusers

        path = Path(reference)
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                raise ConfigError("not a diffusers pipeline folder (no model_index.json)", path)
            import json

            class_name = json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline")
            pipeline_cls = getattr(diffusers, class_name, None)
            if pipeline_cls is None or "StableDiffusion" not in class_name:
                raise ConfigError(f"pipeline class {class_name!r} is not a Stable Diffusion pipeline", path)
            try:
                pipe = (
                    pipeline_cls.from_pretrained(
                        path,
                        torch_dtype=dtype,
                        local_files_only=True,
                        safety_checker=None,
                        requires_safety_checker=False,
                    )
                    if class_name == "StableDiffusionPipeline"
                    else pipeline_cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load the pipeline ({exc})", path) from None
            return cls(pipe, str(path))
        if path.is_file():
            if config is None:
                raise ConfigError(
                    "a single-file checkpoint needs --base-config FOLDER (a diffusers folder of the same model "
                    "type: its configs are used; nothing is downloaded)",
                    path,
                )
            config_path = Path(config)
            import json

            if not (config_path / "model_index.json").is_file():
                raise ConfigError(
                    f"--base-config {config_path} is not a diffusers pipeline folder (no model_index.json)"
                )

            class_name = json.loads((config_path / "model_index.json").read_text()).get("_class_name")
            pipeline_cls = getattr(diffusers, class_name or "StableDiffusionPipeline")
            try:
                extra = {"torch_dtype": dtype} if dtype != torch.float32 else {}
                pipe = pipeline_cls.from_single_file(str(path), config=str(config_path), local_files_only=True, **extra)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"cannot load the checkpoint with configs from {config_path} ({exc})", path) from None
            return cls(pipe, str(path))
        raise ConfigError("no such base model file or folder", path)

    # ---------------------------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, nn.Module]:
        """Every layer an adapter may target, under wsa's canonical names (``text_model.`` spelling)."""
        from wsa.families.names import canonical_text_encoder_path

        named: dict[str, nn.Module] = dict(self.pipe.unet.named_modules())
        for component in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, component, None)
            if encoder is not None:
                named.update(
                    {f"{component}.{canonical_text_encoder_path(n)}": m for n, m in encoder.named_modules() if n}
                )
        return named

    @property
    def tokenizer(self) -> Any:
        return lambda prompts: None  # any text is a valid Stable Diffusion prompt

    @property
    def config(self) -> Any:
        class _Config:
            image_size = int(self.pipe.unet.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))

        return _Config()

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 25,
        guidance: float = 7.5,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        lora: Any = None,
        assignment: Sequence[int] | None = None,
        inject_after: int = 0,
        assignment_before: Sequence[int] | None = None,
        negative_prompt: str = "",
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the stock pipeline, with per-sample adapters when given."""
        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        device = torch.device(device) if device is not None else self.pipe.unet.device
        self.pipe.to(device)
        if dtype is not None and device.type == "cuda":
            self.pipe.to(dtype=dtype)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "negative_prompt": [negative_prompt] * len(prompts),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": generators,
            "output_type": "pt",
        }
        if lora is None:
            return self.pipe(**kwargs).images.float().cpu().clamp(0, 1)
        if assignment is None or len(assignment) != len(prompts):
            raise ConfigError("with lora=, give assignment= with one adapter index per prompt")
        lora = lora.to(device)
        first = list(assignment_before) if (inject_after > 0 and assignment_before is not None) else None
        if inject_after > 0 and first is None:
            first = [-1] * len(prompts)

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if inject_after > 0 and step + 1 == inject_after:
                lora.switch(list(assignment))  # w2w's delayed injection
            return callback_kwargs

        with lora.active(first if first is not None else list(assignment)):
            if inject_after > 0:
                # The prompts are encoded before the first step: under the final adapters, as w2w does.
                lora.switch(list(assignment))
                embeds = self.pipe.encode_prompt(
                    list(prompts), device, 1, guidance > 1, negative_prompt=[negative_prompt] * len(prompts)
                )
                lora.switch(first)
                kwargs.pop("prompt"), kwargs.pop("negative_prompt")
                if self.kind == "sdxl":
                    kwargs.update(
                        prompt_embeds=embeds[0],
                        negative_prompt_embeds=embeds[1],
                        pooled_prompt_embeds=embeds[2],
                        negative_pooled_prompt_embeds=embeds[3],
                    )
                else:
                    kwargs.update(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
                kwargs["callback_on_step_end"] = on_step_end
            images = self.pipe(**kwargs).images
        return images.float().cpu().clamp(0, 1)
