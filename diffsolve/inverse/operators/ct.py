"""Parallel-beam CT (the Radon transform as an explicit sparse matrix) and its filtered back-projection."""

from __future__ import annotations

import math
import warnings

import torch

from .base import F64, Operator, Tensor, _cast, _real_dtype


class CT(Operator):
    """Parallel-beam CT: y(θ, s) = ∫ x along the line at angle θ and signed offset s (the Radon transform).

    ``angles``: a number n of angles uniformly in [0, π), or a sequence of angles in radians; ``size``: the
    image is (1, size, size), pixel size 1, centred. ``detectors`` (default ⌈size·√2⌉, which covers the
    whole square) bins of width 1. y has shape (1, n_angles, detectors).

    The projector is an explicit sparse matrix (ray-driven: 2 samples per pixel length along each ray,
    bilinear interpolation, weight 0.5 each), built once in float64; Aᴴ is its transpose, so the adjoint is
    exact. A⁺ is filtered back-projection (``fbp``): the Ram-Lak filter in its discrete spatial form
    (h[0] = 1/4, h[n odd] = −1/(π n)², zero-padded to avoid wrap-around; Kak & Slaney eq. 3.61), then
    π/n_angles · Aᵀ. ``least_squares(y)`` gives the CG least-squares solution instead."""

    def __init__(self, angles, size: int, *, detectors: int | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"size: expected an integer >= 2, got {size!r}")
        if isinstance(angles, int) and not isinstance(angles, bool):
            if angles < 1:
                raise ValueError(f"angles: expected a positive number of angles, got {angles}")
            theta = torch.arange(angles, dtype=F64) * math.pi / angles
        else:
            theta = torch.as_tensor(angles, dtype=F64).reshape(-1)
            if len(theta) == 0 or not bool(torch.isfinite(theta).all()):
                raise ValueError("angles: expected a non-empty sequence of finite angles (radians)")
        n_det = math.ceil(size * math.sqrt(2)) if detectors is None else int(detectors)
        if n_det < 1:
            raise ValueError(f"detectors: expected a positive integer, got {detectors}")
        self.theta, self.size, self.n_det = theta, size, n_det
        self.shape_in = (1, size, size)
        self.shape_out = (1, len(theta), n_det)
        self.matrix = self._build()
        self._cache: dict = {}

    def _build(self) -> Tensor:
        n, n_det = self.size, self.n_det
        step = 0.5
        half_len = math.sqrt(2) * n / 2 + 1
        u = torch.arange(-half_len, half_len + step / 2, step, dtype=F64)  # samples along a ray
        s = torch.arange(n_det, dtype=F64) - (n_det - 1) / 2
        rows, cols, vals = [], [], []
        for a, th in enumerate(self.theta.tolist()):  # host-side construction, once per operator
            c, sn = math.cos(th), math.sin(th)
            px = s[:, None] * c - u[None, :] * sn  # (n_det, n_u) sample coordinates, x to the right
            py = s[:, None] * sn + u[None, :] * c  # y up
            col = px + (n - 1) / 2
            row = (n - 1) / 2 - py
            c0, r0 = torch.floor(col), torch.floor(row)
            fc, fr = col - c0, row - r0
            ray = (a * n_det + torch.arange(n_det))[:, None].expand_as(px)
            corners = ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc))
            for dr, dc, w in corners:
                rr, cc = (r0 + dr).long(), (c0 + dc).long()
                ok = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n) & (w > 0)
                rows.append(ray[ok])
                cols.append((rr * n + cc)[ok])
                vals.append(step * w[ok])
        idx = torch.stack([torch.cat(rows), torch.cat(cols)])
        with warnings.catch_warnings():  # torch's notes on its beta sparse support
            warnings.simplefilter("ignore")
            m = torch.sparse_coo_tensor(idx, torch.cat(vals), (len(self.theta) * n_det, n * n), dtype=F64)
            return m.coalesce().to_sparse_csr()

    def _mat(self, x: Tensor, transpose: bool) -> Tensor:
        key = (x.device, _real_dtype(x), transpose)
        if key not in self._cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = self.matrix.to_sparse_coo()
                m = m.t() if transpose else m
                self._cache[key] = m.coalesce().to_sparse_csr().to(device=x.device, dtype=_real_dtype(x))
        return self._cache[key]

    def _apply(self, x: Tensor, transpose: bool, out_shape) -> Tensor:
        if x.is_complex():
            return torch.complex(self._apply(x.real, transpose, out_shape), self._apply(x.imag, transpose, out_shape))
        flat = x.reshape(x.shape[0], -1).T
        return (self._mat(x, transpose) @ flat).T.reshape(x.shape[0], *out_shape)

    def _forward(self, x):
        return self._apply(x, False, self.shape_out)

    def _adjoint(self, y):
        return self._apply(y, True, self.shape_in)

    def ramp_filter(self, y: Tensor) -> Tensor:
        """Ram-Lak-filtered projections (same shape as y)."""
        n = self.n_det
        size = 1 << math.ceil(math.log2(2 * n))
        k = torch.arange(size, dtype=F64)
        k = torch.minimum(k, size - k)
        h = torch.where(k == 0, 0.25, torch.where(k % 2 == 1, -1.0 / (math.pi * k) ** 2, 0.0))
        H = _cast(torch.fft.fft(h).real, y)
        out = torch.fft.ifft(torch.fft.fft(y, n=size, dim=-1) * H, dim=-1)[..., :n]
        return out if y.is_complex() else out.real

    def fbp(self, y: Tensor) -> Tensor:
        """Filtered back-projection π/n_angles · Aᵀ(h ∗ y)."""
        self._check(y, self.shape_out, "y")
        return math.pi / len(self.theta) * self._adjoint(self.ramp_filter(y))

    def least_squares(self, y: Tensor) -> Tensor:
        return Operator._pinv(self, y)

    def _pinv(self, y):
        return self.fbp(y)

    def __repr__(self):
        return f"CT(angles={len(self.theta)}, size={self.size}, detectors={self.n_det})"
