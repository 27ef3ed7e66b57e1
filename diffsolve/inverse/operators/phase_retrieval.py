"""Fourier phase retrieval (nonlinear: magnitudes of the oversampled Fourier transform)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Operator, Tensor, _complex_dtype, _shape, fft2c, ifft2c


class PhaseRetrieval(Operator):
    """Fourier phase retrieval as the DPS/DAPS code defines it: y = |F(pad(u))| with u = (x + 1)/2 (images in
    [−1, 1] mapped to [0, 1]), zero-padded by ⌊oversampling/8 · H⌋ pixels on each side (H/4 for the usual
    oversampling 2.0, so 1.5H × 1.5W), F the centred orthonormal FFT. Nonlinear: no adjoint (solvers
    differentiate through A). y is invariant to the trivial ambiguities: global sign of u, translation of u
    inside the padded frame, and the 180° rotation (conjugate reflection).

    A⁺ is Fienup's error reduction (``pinv_iters`` = 200 iterations from zero phase, support = the unpadded
    box, u ≥ 0); it recovers u only up to those ambiguities."""

    linear = False

    def __init__(self, oversampling: float = 2.0, *, shape):
        shape = _shape(shape)
        if len(shape) < 2:
            raise ValueError(f"shape: expected (..., H, W), got {shape}")
        if not (math.isfinite(oversampling) and oversampling >= 0):
            raise ValueError(f"oversampling: expected a finite value >= 0, got {oversampling}")
        self.oversampling = float(oversampling)
        self.pad = (int(oversampling / 8.0 * shape[-2]), int(oversampling / 8.0 * shape[-1]))
        self.shape_in = shape
        self.shape_out = (*shape[:-2], shape[-2] + 2 * self.pad[0], shape[-1] + 2 * self.pad[1])
        self.pinv_iters = 200

    def _padded(self, x: Tensor) -> Tensor:
        u = (x + 1) / 2
        ph, pw = self.pad
        return F.pad(u, (pw, pw, ph, ph))

    def _forward(self, x):
        return fft2c(self._padded(x).to(_complex_dtype(x))).abs()

    def _pinv(self, y):
        ph, pw = self.pad
        h, w = self.shape_in[-2:]
        support = torch.zeros(self.shape_out[-2:], dtype=torch.bool, device=y.device)
        support[ph:ph + h, pw:pw + w] = True
        yc = y.to(_complex_dtype(y))
        v = ifft2c(yc).real
        for _ in range(self.pinv_iters):
            v = torch.where(support, v.clamp_min(0), torch.zeros_like(v))
            k = fft2c(v.to(yc.dtype))
            v = ifft2c(yc * torch.exp(1j * torch.angle(k))).real
        v = torch.where(support, v.clamp_min(0), torch.zeros_like(v))
        return 2 * v[..., ph:ph + h, pw:pw + w] - 1

    def __repr__(self):
        return f"PhaseRetrieval(oversampling={self.oversampling}, shape={self.shape_in})"
