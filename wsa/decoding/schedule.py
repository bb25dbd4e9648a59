"""The noise schedule a base was trained with: what inversion and zoo training add noise by.

Why here and not with the world: inversion (``wsa.inversion``) needs it for any base, and sits below
the embedded world in the layers.
"""

from __future__ import annotations

from typing import Any

import torch


def alphas_cumprod(model_config: Any) -> torch.Tensor:
    """ᾱ_t of the base model's DDPM training schedule (float32, CPU), from ``model_config.train_scheduler_config()``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model_config.train_scheduler_config()).alphas_cumprod.float()
