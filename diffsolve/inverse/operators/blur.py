"""Blur: convolution with a Gaussian or camera-shake kernel, periodic (FFT) or spatial boundary."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import F64, Operator, Tensor, _cast, _shape


def gaussian_kernel(sigma: float, size: int | None = None) -> Tensor:
    """A normalised, sampled isotropic Gaussian (float64), size×size (default 2⌈3σ⌉ + 1, odd). Equal to
    ``scipy.ndimage.gaussian_filter`` of a centred delta (what the DPS/DAPS code uses) when the kernel
    covers scipy's truncation radius 4σ."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a finite value > 0, got {sigma}")
    size = 2 * math.ceil(3 * sigma) + 1 if size is None else int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: expected an odd kernel size >= 1, got {size}")
    r = torch.arange(size, dtype=F64) - size // 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    k = torch.outer(g, g)
    return k / k.sum()


def motion_kernel(size: int, intensity: float = 0.5, seed: int = 0) -> Tensor:
    """A random camera-shake kernel (float64, size×size, sums to 1), reproducible from ``seed``.

    A random smooth path in the spirit of Boracchi & Foi (2012) and of the ``motionblur`` package the papers
    use (not bit-identical to it): the direction starts uniformly at random and turns along the path like
    θ(s) = θ0 + π·intensity·W(s) (W a Brownian motion over the path length s ∈ [0, 1], so ``intensity`` 0 is a
    straight line and 1 a strongly curved path), with a sharp turn of ±π/2 at a random point with
    probability ``intensity``/2. Its length is 0.6–0.8 × size; it is centred on its centroid, shrunk if it
    would not fit, and splatted bilinearly with 400 points."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 3 or size % 2 == 0:
        raise ValueError(f"size: expected an odd integer >= 3, got {size!r}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"intensity: expected a value in [0, 1], got {intensity}")
    rng = np.random.default_rng(seed)
    n = 400
    length = size * rng.uniform(0.6, 0.8)
    theta = rng.uniform(0, 2 * np.pi) + np.pi * intensity * np.concatenate(
        [[0.0], np.cumsum(rng.standard_normal(n - 2) * np.sqrt(1.0 / (n - 2)))])
    if rng.uniform() < intensity / 2:
        theta[rng.integers(n // 4, 3 * n // 4):] += rng.choice([-1.0, 1.0]) * np.pi / 2
    path = np.concatenate([[0.0], np.cumsum(np.exp(1j * theta) * length / (n - 1))])
    path -= path.mean()
    half = (size - 1) / 2 - 0.5
    radius = max(np.abs(path.real).max(), np.abs(path.imag).max())
    if radius > half:
        path *= half / radius
    xs, ys = path.real + (size - 1) / 2, path.imag + (size - 1) / 2
    k = np.zeros((size, size))
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (np.clip(y0 + dy, 0, size - 1), np.clip(x0 + dx, 0, size - 1)), w)
    return torch.from_numpy(k / k.sum())


class Blur(Operator):
    """y = k ∗ x (true convolution, per channel) over the last two dimensions of ``shape`` (…, H, W), with
    the boundary condition ``padding``:

    - ``"circular"`` (default): periodic, computed by FFT. A⁺ is the truncated pseudo-inverse: Fourier
      coefficients divided by the kernel's transform K where |K| > ``rcond``·max|K|, else 0 (the
      Moore–Penrose inverse of the circulant with singular values below the cut-off treated as 0, as
      ``numpy.linalg.pinv``'s rcond). A blur's smallest singular values are ~0, so a small rcond amplifies
      noise without bound; the default 0.1 caps the amplification at 10× (on noisy 16×16 digits at
      σ_y = 0.05 it gives the best PSNR of 0.01, 0.03, 0.1, 0.2 for the Gaussian blur: 23.9 dB vs 8.7 dB at
      0.01).
    - ``"reflect"`` (torch's reflect = scipy's "mirror", the papers' ``ReflectionPad2d``) and ``"zeros"``
      (scipy's "constant"): spatial convolution; the adjoint is its exact transpose (autograd's
      vector-Jacobian product of the linear map); A⁺ is least squares by CG.

    ``Blur.gaussian(sigma, shape=...)`` and ``Blur.motion(size, shape=..., seed=...)`` build the papers'
    kernels."""

    PADDINGS = ("circular", "reflect", "zeros")

    def __init__(self, kernel, *, shape, padding: str = "circular", rcond: float = 0.1):
        shape = _shape(shape)
        kernel = torch.as_tensor(kernel).detach().to(F64)
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel: expected a 2-D kernel with odd sizes, got shape {tuple(kernel.shape)}")
        if not bool(torch.isfinite(kernel).all()):
            raise ValueError("kernel: expected finite values")
        if padding not in self.PADDINGS:
            raise ValueError(f"padding: expected one of {list(self.PADDINGS)}, got {padding!r}")
        if len(shape) < 2:
            raise ValueError(f"shape: expected (..., H, W), got {shape}")
        h, w = shape[-2:]
        kh, kw = kernel.shape
        limit = (h, w) if padding != "reflect" else (2 * h - 1, 2 * w - 1)
        if kh > limit[0] or kw > limit[1] or (padding == "reflect" and (kh // 2 >= h or kw // 2 >= w)):
            raise ValueError(f"kernel: a {kh}×{kw} kernel does not fit a {h}×{w} image with padding {padding!r}")
        if not (0 <= rcond < 1):
            raise ValueError(f"rcond: expected a value in [0, 1), got {rcond}")
        self.kernel, self.padding, self.rcond = kernel, padding, float(rcond)
        self.shape_in = self.shape_out = shape
        if padding == "circular":
            full = torch.zeros(h, w, dtype=F64)
            full[:kh, :kw] = kernel
            full = torch.roll(full, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
            self.transfer = torch.fft.fft2(full)  # K; A x = ifft2(K · fft2(x))
            mag = self.transfer.abs()
            keep = mag > self.rcond * mag.max()
            self.inverse_transfer = torch.where(keep, 1.0 / torch.where(keep, self.transfer, 1.0), 0.0)

    @classmethod
    def gaussian(cls, sigma: float, *, shape, size: int | None = None, **kwargs) -> "Blur":
        return cls(gaussian_kernel(sigma, size), shape=shape, **kwargs)

    @classmethod
    def motion(cls, size: int, *, shape, intensity: float = 0.5, seed: int = 0, **kwargs) -> "Blur":
        return cls(motion_kernel(size, intensity, seed), shape=shape, **kwargs)

    def _fourier(self, x: Tensor, transfer: Tensor) -> Tensor:
        out = torch.fft.ifft2(torch.fft.fft2(x) * _cast(transfer, x))
        return out if x.is_complex() else out.real

    def _conv(self, x: Tensor) -> Tensor:
        if x.is_complex():
            return torch.complex(self._conv(x.real), self._conv(x.imag))
        kh, kw = self.kernel.shape
        flat = x.reshape(-1, 1, *x.shape[-2:])
        pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        flat = F.pad(flat, pad, mode="reflect") if self.padding == "reflect" else F.pad(flat, pad)
        weight = _cast(self.kernel, x).flip(0, 1)[None, None]  # conv2d correlates: flip for a convolution
        return F.conv2d(flat, weight).reshape(x.shape)

    def _forward(self, x):
        return self._fourier(x, self.transfer) if self.padding == "circular" else self._conv(x)

    def _adjoint(self, y):
        if self.padding == "circular":
            return self._fourier(y, self.transfer.conj())
        if y.is_complex():
            return torch.complex(self._adjoint(y.real), self._adjoint(y.imag))
        with torch.enable_grad():
            z = torch.zeros_like(y, requires_grad=True)
            return torch.autograd.grad(self._conv(z), z, grad_outputs=y)[0]

    def _pinv(self, y):
        if self.padding == "circular":
            return self._fourier(y, self.inverse_transfer)
        return super()._pinv(y)

    def __repr__(self):
        return f"Blur(kernel={tuple(self.kernel.shape)}, padding={self.padding!r}, shape={self.shape_in})"
