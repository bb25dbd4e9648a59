"""Image grids: many decoded pictures as one PNG, the form every gallery, sample sheet and world render takes.

Why its own module: the gallery, `wsa sample`/`edit`, the world's renders and trainers all tile images;
the helpers lived in ``wsa.worlds``, so analyzers and commands imported the embedded world to save a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def tile_images(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] as one grid picture, row-major, no gaps.

    Returns
    -------
    ndarray of shape (rows * H, columns * W, 3), uint8
        ``columns`` defaults to ``ceil(sqrt(B))``; missing tiles of the last row are black.
    """
    n, _, h, w = images.shape
    columns = max(1, columns or math.ceil(math.sqrt(max(n, 1))))
    rows = max(1, math.ceil(n / columns))
    pixels = np.zeros((rows * columns, h, w, 3), dtype=np.uint8)
    pixels[:n] = (images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    return pixels.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Write :func:`tile_images` of ``images`` as a PNG at ``path`` (atomically)."""
    from PIL import Image

    from wsa.atomic import write_with

    picture = Image.fromarray(tile_images(images, columns))
    return write_with(path, lambda tmp: picture.save(tmp, format="PNG"))


def image_grid(images: Tensor, columns: int = 8) -> Any:
    """``(B, 3, H, W)`` in [0, 1] → a PIL image with the tiles row-major (1-pixel white gutters)."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = (b + columns - 1) // columns
    canvas = torch.ones(3, rows * (h + 1) + 1, columns * (w + 1) + 1)
    for i in range(b):
        r, c = divmod(i, columns)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = images[i]
    array = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
