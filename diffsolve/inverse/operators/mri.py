"""Cartesian MRI, single- and multi-coil."""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import F64, Operator, Tensor, _cast, _complex_dtype, _shape, fft2c, ifft2c


class MRI(Operator):
    """Cartesian MRI: y_c = M ⊙ F(S_c x) for coils c (single-coil: S = 1), F the centred orthonormal FFT.

    ``mask`` (H, W) of 0/1 sampled k-space locations; ``coil_maps`` (C, H, W) complex sensitivities or None.
    x has shape (1, H, W) (one image channel) and is complex when ``complex_input`` (default), else real
    (then Aᴴ y is the real part, the exact adjoint of the real-domain map). y has shape (C, H, W) (C = 1
    single-coil), zero where the mask is 0. A⁺: single-coil complex images: Aᴴ y, exact (A Aᴴ = M is a
    projector); otherwise least squares by the complex CG. ``MRI.cartesian_mask`` and
    ``MRI.simulated_coil_maps`` build test inputs."""

    complex_output = True

    def __init__(self, mask, coil_maps=None, *, complex_input: bool = True):
        mask = torch.as_tensor(mask).detach().to(F64)
        if mask.ndim != 2:
            raise ValueError(f"mask: expected a 2-D k-space mask (H, W), got shape {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected 0/1 values")
        h, w = mask.shape
        if coil_maps is not None:
            coil_maps = torch.as_tensor(coil_maps).detach().to(torch.complex128)
            if coil_maps.ndim != 3 or tuple(coil_maps.shape[1:]) != (h, w):
                raise ValueError(f"coil_maps: expected shape (coils, {h}, {w}), got {tuple(coil_maps.shape)}")
        self.mask, self.coil_maps, self.complex_input = mask, coil_maps, bool(complex_input)
        self.shape_in = (1, h, w)
        self.shape_out = (1 if coil_maps is None else coil_maps.shape[0], h, w)

    @staticmethod
    def cartesian_mask(shape, acceleration: int = 4, center_fraction: float = 0.08, seed: int = 0) -> Tensor:
        """fastMRI-style random 1-D Cartesian mask (H, W): all rows, columns kept with probability chosen so
        that about W/acceleration are sampled, including a fully sampled centre of round(center_fraction·W)."""
        h, w = _shape(shape)
        rng = np.random.default_rng(seed)
        center = int(round(center_fraction * w))
        prob = (w / acceleration - center) / max(w - center, 1)
        cols = rng.uniform(size=w) < prob
        start = (w - center + 1) // 2
        cols[start:start + center] = True
        return torch.from_numpy(np.broadcast_to(cols, (h, w)).astype(np.float64).copy())

    @staticmethod
    def simulated_coil_maps(coils: int, shape) -> Tensor:
        """Smooth complex sensitivities (coils, H, W): Gaussian bumps centred on a circle around the image with
        a linear phase each, normalised so that Σ_c |S_c|² = 1 everywhere (float64 complex)."""
        h, w = _shape(shape)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=F64), torch.linspace(-1, 1, w, dtype=F64), indexing="ij")
        maps = []
        for c in range(coils):
            a = 2 * math.pi * c / coils
            mag = torch.exp(-((xx - 1.2 * math.cos(a)) ** 2 + (yy - 1.2 * math.sin(a)) ** 2) / 1.5)
            maps.append(mag * torch.exp(1j * (math.pi * (xx * math.cos(a) - yy * math.sin(a)) + a)))
        maps = torch.stack(maps)
        return maps / (maps.abs() ** 2).sum(0, keepdim=True).sqrt()

    def _forward(self, x):
        xc = x if x.is_complex() else x.to(_complex_dtype(x))
        img = xc[:, 0]
        coils = img[:, None] if self.coil_maps is None else _cast(self.coil_maps, xc)[None] * img[:, None]
        return _cast(self.mask, xc) * fft2c(coils)

    def _adjoint(self, y):
        yc = y if y.is_complex() else y.to(_complex_dtype(y))
        imgs = ifft2c(_cast(self.mask, yc) * yc)
        img = imgs[:, 0] if self.coil_maps is None else (_cast(self.coil_maps, yc).conj()[None] * imgs).sum(1)
        return img[:, None]

    def _pinv(self, y):
        if self.coil_maps is None and self.complex_input:
            return self.A_adjoint(y)
        return super()._pinv(y)

    def lipschitz(self, iters: int = 50) -> float:
        if self.coil_maps is None:
            return 1.0
        return super().lipschitz(iters)
