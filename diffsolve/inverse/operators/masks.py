"""Pixel masks: inpainting (the papers' box and random masks) and denoising (the identity, every pixel observed)."""

from __future__ import annotations

import numpy as np
import torch

from .base import F64, Operator, _cast, _shape


class Inpainting(Operator):
    """y = m ⊙ x with a mask m ≥ 0 of the sample's full shape (1 = observed, 0 = missing; other
    non-negative values weight the pixel). y keeps the input's shape, with zeros where m = 0 (the papers' and
    deepinv's convention). A⁺ y = y / m where m > 0, else 0 (the exact pseudo-inverse of the diagonal map).

    ``Inpainting.box(shape, size, ...)`` and ``Inpainting.random(shape, missing, ...)`` build the papers'
    masks from a seed."""

    def __init__(self, mask):
        mask = torch.as_tensor(mask).detach().to(F64)
        if mask.ndim == 0:
            raise ValueError("mask: expected the shape of one sample, e.g. (C, H, W), got a scalar")
        if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
            raise ValueError("mask: expected finite values >= 0 (1 observed, 0 missing)")
        self.mask = mask
        self.shape_in = self.shape_out = tuple(mask.shape)

    @classmethod
    def box(cls, shape, size, *, position: tuple[int, int] | None = None, margin: int = 0,
            seed: int = 0) -> "Inpainting":
        """A missing size×size box (``size`` an int or (h, w)) in every channel of ``shape`` (…, H, W), at
        ``position`` (top, left) or, when None, uniformly at random from ``seed`` with at least ``margin``
        pixels to each border (the official DPS/DAPS code draws the 128×128 box with margin 16 at 256²)."""
        shape = _shape(shape)
        h_img, w_img = shape[-2:]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if not (0 < h <= h_img - 2 * margin and 0 < w <= w_img - 2 * margin):
            raise ValueError(f"size: a {h}×{w} box with margin {margin} does not fit a {h_img}×{w_img} image")
        if position is None:
            rng = np.random.default_rng(seed)
            top = int(rng.integers(margin, h_img - margin - h + 1))
            left = int(rng.integers(margin, w_img - margin - w + 1))
        else:
            top, left = (int(p) for p in position)
            if not (0 <= top <= h_img - h and 0 <= left <= w_img - w):
                raise ValueError(f"position: a {h}×{w} box at {position} leaves the {h_img}×{w_img} image")
        mask = torch.ones(shape, dtype=F64)
        mask[..., top:top + h, left:left + w] = 0
        op = cls(mask)
        op.box_position = (top, left)
        return op

    @classmethod
    def random(cls, shape, missing: float = 0.7, *, seed: int = 0) -> "Inpainting":
        """round(missing · H · W) pixels missing, drawn without replacement from ``seed``, the same in every
        channel (as the official code)."""
        shape = _shape(shape)
        if not 0 <= missing <= 1:
            raise ValueError(f"missing: expected a fraction in [0, 1], got {missing}")
        h, w = shape[-2:] if len(shape) >= 2 else (1, shape[-1])
        rng = np.random.default_rng(seed)
        flat = np.ones(h * w)
        flat[rng.choice(h * w, int(round(missing * h * w)), replace=False)] = 0
        mask = torch.from_numpy(flat).reshape((h, w) if len(shape) >= 2 else (w,)).expand(shape).clone()
        return cls(mask)

    def _forward(self, x):
        return _cast(self.mask, x) * x

    def _adjoint(self, y):
        return _cast(self.mask, y) * y

    def _pinv(self, y):
        m = _cast(self.mask, y)
        return torch.where(m > 0, y / torch.where(m > 0, m, 1.0), torch.zeros_like(y))

    def lipschitz(self, iters: int = 0) -> float:
        return float(self.mask.max()) ** 2

    def __repr__(self):
        return f"Inpainting(shape={self.shape_in}, observed={float((self.mask > 0).double().mean()):.3f})"


class Denoising(Operator):
    """The identity: y = x (noise comes from the noise model)."""

    def __init__(self, shape):
        self.shape_in = self.shape_out = _shape(shape)

    def _forward(self, x):
        return x

    _adjoint = _pinv = _forward

    def lipschitz(self, iters: int = 0) -> float:
        return 1.0
