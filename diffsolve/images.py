"""Saving samples as PNG: [−1, 1] tensors to 8-bit images, grids, atomic writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from .files import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [−1, 1] → (B, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "b c h w -> b h w c").numpy()


def make_grid(x: torch.Tensor, per_row: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile a batch into one (H, W, C) image, ``per_row`` samples a row (default √batch), ``pad`` white
    pixels between them, each sample enlarged ``scale``× (nearest neighbour)."""
    b = x.shape[0]
    per_row = per_row or math.ceil(math.sqrt(b))
    rows = math.ceil(b / per_row)
    if scale > 1:
        x = F.interpolate(x.float(), scale_factor=scale, mode="nearest")
    x = torch.cat([x, torch.ones(rows * per_row - b, *x.shape[1:], dtype=x.dtype, device=x.device)])
    x = F.pad(x, (pad, pad, pad, pad), value=1.0)
    return to_uint8(rearrange(x, "(r c) ch h w -> 1 ch (r h) (c w)", r=rows, c=per_row))[0]


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write atomically (:func:`diffsolve.files.atomic_write`)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def load_png(path: str | Path) -> torch.Tensor:
    """A PNG as a (1, C, H, W) float tensor in [−1, 1]."""
    arr = np.asarray(Image.open(path))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
