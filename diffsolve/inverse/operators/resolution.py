"""Super-resolution: separable downsampling (antialiased bicubic or block average)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import F64, Operator, Tensor, _cast, _shape


def _resize_matrix(n: int, factor: int, kernel: str) -> Tensor:
    """The (n/factor, n) matrix of a 1-D downsampling by ``factor`` (float64)."""
    if kernel == "avg":
        return torch.kron(torch.eye(n // factor, dtype=F64), torch.full((1, factor), 1.0 / factor, dtype=F64))
    eye = torch.eye(n, dtype=F64).reshape(n, 1, 1, n)
    out = F.interpolate(eye, size=(1, n // factor), mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(n, n // factor).T.contiguous()


class SuperResolution(Operator):
    """Downsampling by an integer ``factor`` over the last two dimensions of ``shape`` (…, H, W).

    ``kernel="bicubic"``: antialiased bicubic, equal to ``F.interpolate(x, scale_factor=1/factor,
    mode="bicubic", antialias=True)`` and to PIL's ``resize(BICUBIC)`` (the kernel with a = −0.5 stretched by
    the factor, weights renormalised at the borders; the papers' MATLAB-style resizer pads symmetrically
    instead, which differs only within two low-resolution pixels of the border). ``kernel="avg"``: average
    pooling over factor×factor blocks. The operator is separable, y = D_h x D_wᵀ, so its adjoint is
    D_hᵀ y D_w and its Moore–Penrose pseudo-inverse D_h⁺ y D_w⁺ᵀ (exact, from the small 1-D matrices)."""

    def __init__(self, factor: int, kernel: str = "bicubic", *, shape):
        shape = _shape(shape)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
        if kernel not in ("bicubic", "avg"):
            raise ValueError(f"kernel: expected 'bicubic' or 'avg', got {kernel!r}")
        if len(shape) < 2 or shape[-1] % factor or shape[-2] % factor:
            raise ValueError(f"shape: expected (..., H, W) with H and W divisible by {factor}, got {shape}")
        self.factor, self.kernel = factor, kernel
        self.shape_in = shape
        self.shape_out = (*shape[:-2], shape[-2] // factor, shape[-1] // factor)
        self.Dh, self.Dw = _resize_matrix(shape[-2], factor, kernel), _resize_matrix(shape[-1], factor, kernel)
        self.Dh_pinv, self.Dw_pinv = torch.linalg.pinv(self.Dh), torch.linalg.pinv(self.Dw)

    @staticmethod
    def _apply(Mh: Tensor, x: Tensor, Mw: Tensor) -> Tensor:
        Mh, Mw = _cast(Mh, x), _cast(Mw, x)
        if x.is_complex():
            Mh, Mw = Mh.to(x.dtype), Mw.to(x.dtype)
        return torch.einsum("ih,...hw,jw->...ij", Mh, x, Mw)

    def _forward(self, x):
        return self._apply(self.Dh, x, self.Dw)

    def _adjoint(self, y):
        return self._apply(self.Dh.T, y, self.Dw.T)

    def _pinv(self, y):
        return self._apply(self.Dh_pinv, y, self.Dw_pinv)

    def __repr__(self):
        return f"SuperResolution(factor={self.factor}, kernel={self.kernel!r}, shape={self.shape_in})"
