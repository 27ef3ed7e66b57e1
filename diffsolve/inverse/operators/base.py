"""The shared base class :class:`Operator` (the interface every measurement operator implements) and the helpers
the operator families share: shape checks, casting float64 parameters to the input's precision, centred FFTs."""

from __future__ import annotations

import torch

from ..cg import batch_dot, conjugate_gradient

Tensor = torch.Tensor
F64 = torch.float64


def _shape(shape, name: str = "shape") -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive integers, got {shape!r}") from None
    if not out or any(s < 1 for s in out):
        raise ValueError(f"{name}: expected a non-empty sequence of positive integers, got {shape!r}")
    return out


def _real_dtype(x: Tensor) -> torch.dtype:
    return x.real.dtype if x.is_complex() else x.dtype


def _complex_dtype(x: Tensor) -> torch.dtype:
    return torch.complex128 if _real_dtype(x) == torch.float64 else torch.complex64


def _cast(t: Tensor, like: Tensor) -> Tensor:
    """A parameter in the precision (complex if it is complex) and on the device of ``like``."""
    return t.to(device=like.device, dtype=_complex_dtype(like) if t.is_complex() else _real_dtype(like))


def image_resize_hint(shape: tuple[int, ...], t: Tensor) -> str:
    """For an image of another size or channel count than ``shape`` (C, H, W): how to load one that fits."""
    if len(shape) != 3 or t.ndim != 4:
        return ""
    c, h, w = shape
    return (f"; an image file loads at {c}×{h}×{w}, center-cropped and resized, with "
            f"diffsolve.images.load_image(path, size=({h}, {w}), channels={c})")


def fft2c(x: Tensor) -> Tensor:
    """Centred orthonormal 2-D FFT over the last two dimensions."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def ifft2c(k: Tensor) -> Tensor:
    """Inverse of :func:`fft2c` (its adjoint: the transform is unitary)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), norm="ortho"), dim=dims)


class Operator:
    """Base class: subclasses set ``shape_in``/``shape_out`` and implement ``_forward``, ``_adjoint`` (linear
    operators) and optionally ``_pinv`` (default: least squares by CG on the normal equations)."""

    linear: bool = True
    complex_input: bool = False
    complex_output: bool = False
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    #: CG iterations of the default least-squares pseudo-inverse
    pinv_iters: int = 300

    # ---- public -----------------------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        """y = A(x) for x of shape (B, *shape_in)."""
        self._check(x, self.shape_in, "x")
        return self._forward(x)

    __call__ = A

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Aᴴ y for y of shape (B, *shape_out); real for a real domain."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is nonlinear and has no adjoint (solvers differentiate "
                            "through A instead)")
        self._check(y, self.shape_out, "y")
        out = self._adjoint(y)
        return out.real if (out.is_complex() and not self.complex_input) else out

    def A_pinv(self, y: Tensor) -> Tensor:
        """A pseudo-inverse A⁺ y (see each operator for which one: closed form where there is one)."""
        self._check(y, self.shape_out, "y")
        return self._pinv(y)

    def normal(self, x: Tensor) -> Tensor:
        """AᴴA x."""
        return self.A_adjoint(self.A(x))

    def data_grad(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """∇_x ½ Σ w |A(x) − y|² per sample (w = 1 when ``weight`` is None): Aᴴ(w ⊙ (A x − y)) for linear
        operators, autograd through A otherwise."""
        if self.linear:
            r = self.A(x) - y
            return self.A_adjoint(r if weight is None else weight * r)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            r = self.A(xg) - y
            sq = r.abs() ** 2 if r.is_complex() else r**2
            loss = 0.5 * (sq if weight is None else weight * sq).sum()
            return torch.autograd.grad(loss, xg)[0]

    def lipschitz(self, iters: int = 50) -> float:
        """‖A‖² = the largest eigenvalue of AᴴA (linear operators; power iteration from a seeded start in float64,
        computed once and cached), times 1.02 to cover the power iteration's under-estimate."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is nonlinear: no operator norm")
        if getattr(self, "_lipschitz", None) is None:
            g = torch.Generator().manual_seed(0)
            v = torch.randn(1, *self.shape_in, generator=g, dtype=F64)
            if self.complex_input:
                v = torch.complex(v, torch.randn(1, *self.shape_in, generator=g, dtype=F64))
            lam = 0.0
            for _ in range(iters):
                v = v / batch_dot(v, v).sqrt()
                w = self.normal(v)
                lam = float(batch_dot(v, w))
                v = w
            self._lipschitz = 1.02 * lam
        return self._lipschitz

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape_in={self.shape_in}, shape_out={self.shape_out})"

    # ---- for subclasses ---------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _pinv(self, y: Tensor) -> Tensor:
        """Minimum-norm least squares: CG on AᴴA x = Aᴴ y from 0 (the iterates stay in the range of Aᴴ), with
        ``pinv_iters`` steps (early termination by tolerance 1e-10 per sample)."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} has no least-squares pseudo-inverse")
        return conjugate_gradient(self.normal, self.A_adjoint(y), None, iters=self.pinv_iters, tol=1e-10)

    @staticmethod
    def _check(t: Tensor, shape: tuple[int, ...], name: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor of shape (batch, {', '.join(map(str, shape))}), got "
                            f"{type(t).__name__}")
        if tuple(t.shape[1:]) != tuple(shape):
            raise ValueError(f"{name}: expected shape (batch, {', '.join(map(str, shape))}), got {tuple(t.shape)}"
                             f"{image_resize_hint(shape, t)}")
