"""Images and [−1, 1] tensors: saving samples as PNG (grids, atomic writes, and the settings a PNG carries in its
metadata: a measurement's task, seeds and σ_y, read back by ``diffsolve restore``) and reading 8-bit image files
(PNG, JPEG, …) with an optional center-crop-and-resize."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps, PngImagePlugin

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


def png_settings(image: str | Path | Image.Image) -> dict:
    """The settings :func:`save_png` stored in a PNG (a path or an image :func:`read_image` decoded); {} for an
    image without them."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as img:
            return png_settings(img)
    text = image.info.get(_SETTINGS_KEY)
    if text is None:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{image.filename or 'the image'}: its diffsolve metadata is not valid JSON") from None
    return settings if isinstance(settings, dict) else {}


#: PIL modes that only encode grey or colour differently: decoded to L / RGB (a palette with transparency to RGBA)
_DECODED = {"1": "L", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
#: the modes read as they are, by channel count
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def read_image(path: str | Path) -> Image.Image:
    """Decode an 8-bit image file (PNG, JPEG, …: what PIL reads) to a grey, grey+alpha, RGB or RGBA image,
    upright (a JPEG's EXIF orientation applied, as viewers show it)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        elif img.mode in _DECODED:
            img = img.convert(_DECODED[img.mode])
        elif img.mode not in _MODES.values():
            raise ValueError(f"{path}: a {img.mode} image (16-bit or floating-point); expected an 8-bit grey or "
                             "colour image: save it as an 8-bit PNG or JPEG")
        img.load()
        return img


def image_to_tensor(img: Image.Image, *, size: tuple[int, int] | None = None,
                    channels: int | None = None) -> torch.Tensor:
    """A (1, C, H, W) float tensor in [−1, 1] (0 ↔ −1, 255 ↔ 1). ``channels`` (1 or 3) converts to grey or RGB
    first (dropping an alpha channel); ``size`` (H, W) center-crops the image to the aspect ratio of H×W and
    resizes it to H×W with PIL's antialiased bicubic (``ImageOps.fit``)."""
    if channels is not None:
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
        img = img.convert(_MODES[channels])
    if size is not None:
        h, w = (int(s) for s in size)
        if h < 1 or w < 1:
            raise ValueError(f"size: expected a positive (height, width), got {size!r}")
        img = ImageOps.fit(img, (w, h), method=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def load_image(path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None) -> torch.Tensor:
    """:func:`read_image` then :func:`image_to_tensor`: ``load_image("photo.jpg", size=(256, 256), channels=3)``
    is a photo center-cropped and resized for a 256×256 RGB model."""
    return image_to_tensor(read_image(path), size=size, channels=channels)
