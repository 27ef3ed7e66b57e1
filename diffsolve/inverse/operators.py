"""Measurement operators y = A(x) for inverse problems, batched over a leading sample dimension.

Every operator has ``A(x)``, ``A_adjoint(y)``, ``A_pinv(y)``, ``shape_in`` and ``shape_out`` (the shape of one
sample, without the batch dimension), ``linear``, ``complex_input`` (the domain is complex: x may be complex
and the adjoint returns complex values) and ``complex_output`` (measurements are complex). The adjoint is
with respect to Re⟨u, v⟩ = Re Σ conj(u) v; for a real domain and complex measurements (MRI of a real image)
that makes Aᴴ y the real part of the complex adjoint, which is the exact adjoint of the map ℝⁿ → ℂᵐ.

Operators keep their parameters in float64 and cast them to the input's precision and device at each call;
x may therefore be float32 or float64, on any device. Data of any shape works: images (C, H, W) and flat
vectors (D,) (``MatrixOperator``, the Gaussian-mixture oracle).

Conventions (stated once here; the classes repeat what is specific to them):
- FFTs are centred and orthonormal (fastMRI's ``fft2c``: ifftshift → fft2(norm="ortho") → fftshift).
- Convolution is true convolution (the kernel is flipped), kernel centre at index (kh // 2, kw // 2), as
  ``scipy.ndimage.convolve``; the boundary condition is chosen per operator (``padding``).
- Bicubic resizing is torch's / PIL's antialiased bicubic (a = −0.5, the kernel stretched by the factor,
  weights renormalised at the border); see :class:`SuperResolution`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .cg import batch_dot, conjugate_gradient

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
            raise ValueError(f"{name}: expected shape (batch, {', '.join(map(str, shape))}), got {tuple(t.shape)}")


# ---- inpainting, denoising, dense matrices ----------------------------------------------------------


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


class MatrixOperator(Operator):
    """y = A x for a dense (M, D) matrix on flat vectors x of shape (D,). A may be complex; then
    ``complex_input`` (default: whether A is complex) says whether x is complex too. A⁺ is the
    Moore–Penrose pseudo-inverse (``torch.linalg.pinv``; for a complex A on a real domain, that of the real
    stacked matrix [Re A; Im A])."""

    def __init__(self, A, *, complex_input: bool | None = None):
        A = torch.as_tensor(A).detach()
        if A.ndim != 2:
            raise ValueError(f"A: expected a matrix (M, D), got shape {tuple(A.shape)}")
        A = A.to(torch.complex128 if A.is_complex() else F64)
        if not bool(torch.isfinite(A).all()):
            raise ValueError("A: expected finite entries")
        self.matrix = A
        self.complex_output = A.is_complex()
        self.complex_input = A.is_complex() if complex_input is None else bool(complex_input)
        self.shape_in, self.shape_out = (A.shape[1],), (A.shape[0],)
        self._pinv_matrix = None

    def _common(self, v):
        """The matrix and ``v`` in one dtype (complex if either is), for a matmul."""
        A = _cast(self.matrix, v)
        dtype = torch.promote_types(A.dtype, v.dtype)
        return A.to(dtype), v.to(dtype)

    def _forward(self, x):
        A, x = self._common(x)
        return x @ A.T

    def _adjoint(self, y):
        A, y = self._common(y)
        return y @ A.conj()

    def _pinv(self, y):
        if self._pinv_matrix is None:
            A = self.matrix
            if A.is_complex() and not self.complex_input:
                self._pinv_matrix = torch.linalg.pinv(torch.cat([A.real, A.imag]))  # (D, 2M)
            else:
                self._pinv_matrix = torch.linalg.pinv(A)
        P = _cast(self._pinv_matrix, y)
        if self.matrix.is_complex() and not self.complex_input:
            y = torch.cat([y.real, y.imag], dim=1) if y.is_complex() else torch.cat([y, torch.zeros_like(y)], dim=1)
            return y @ P.T
        if P.is_complex() and not y.is_complex():
            y = y.to(P.dtype)
        return y @ P.T


# ---- super-resolution and blur -------------------------------------------------------------------------


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


# ---- MRI, CT, phase retrieval ------------------------------------------------------------------------


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


# ---- deepinv --------------------------------------------------------------------------------------------


class DeepInvPhysics(Operator):
    """A deepinv ``Physics`` object as a diffsolve operator (deepinv is an optional extra:
    ``pip install 'diffsolve[deepinv]'``). ``shape`` is one sample's input shape; the output shape is read
    from one call of ``physics.A`` on zeros. A = ``physics.A`` (noiseless), Aᴴ = ``physics.A_adjoint`` and
    A⁺ = ``physics.A_dagger`` for a ``LinearPhysics``; other physics are nonlinear. Inputs are cast to the
    precision of the physics' floating buffers and parameters (deepinv builds masks and kernels in float32, which
    its convolutions and products refuse to mix with float64 input) and results back to the input's, as
    diffsolve's own operators do."""

    def __init__(self, physics, *, shape):
        try:
            import deepinv
        except ImportError as err:
            raise ImportError("DeepInvPhysics needs deepinv, an optional extra: "
                              "pip install 'diffsolve[deepinv]'") from err
        if not isinstance(physics, deepinv.physics.Physics):
            raise TypeError(f"physics: expected a deepinv.physics.Physics, got {type(physics).__name__}")
        self.physics = physics
        self.linear = isinstance(physics, deepinv.physics.LinearPhysics)
        self.shape_in = _shape(shape)
        tensors = [*physics.parameters(), *physics.buffers()] if isinstance(physics, torch.nn.Module) else []
        #: a tensor of the physics' precision and device (None: the physics has no floating state to match)
        self._precision = next((t.detach().new_empty(()) for t in tensors if t.is_floating_point()), None)
        with torch.no_grad():
            probe = self._call(physics.A, torch.zeros(1, *self.shape_in))
        self.shape_out = tuple(probe.shape[1:])
        self.complex_output = probe.is_complex()

    def _call(self, fn, v):
        """fn(v) in the physics' precision and on its device, returned in v's."""
        return fn(v) if self._precision is None else _cast(fn(_cast(v, self._precision)), v)

    def _forward(self, x):
        return self._call(self.physics.A, x)

    def _adjoint(self, y):
        return self._call(self.physics.A_adjoint, y)

    def _pinv(self, y):
        return self._call(self.physics.A_dagger, y)

    def __repr__(self):
        return f"DeepInvPhysics({type(self.physics).__name__}, shape_in={self.shape_in}, shape_out={self.shape_out})"
