"""Saving samples as PNG: [−1, 1] tensors to 8-bit images, grids, atomic writes, and the settings a PNG
carries in its metadata (a measurement's task, seeds and σ_y, read back by ``diffsolve restore``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, PngImagePlugin

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


#: the PNG text chunk that holds diffsolve's settings (JSON)
_SETTINGS_KEY = "diffsolve"


def save_png(image: np.ndarray, path: str | Path, settings: dict | None = None) -> None:
    """Write atomically (:func:`diffsolve.files.atomic_write`); ``settings`` (JSON-able) go into a text chunk
    that :func:`png_settings` reads back."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    info = None
    if settings is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(_SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


def png_settings(path: str | Path) -> dict:
    """The settings :func:`save_png` stored in a PNG; {} for a PNG without them (any other image)."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(_SETTINGS_KEY)
    if text is None:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its diffsolve metadata is not valid JSON") from None
    return settings if isinstance(settings, dict) else {}


def load_png(path: str | Path) -> torch.Tensor:
    """A PNG as a (1, C, H, W) float tensor in [−1, 1]."""
    arr = np.asarray(Image.open(path))
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
