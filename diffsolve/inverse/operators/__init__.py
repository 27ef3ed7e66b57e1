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

One module per operator family, as deepinv's ``physics`` package: :mod:`.base` (the :class:`Operator` base class
and shared helpers), :mod:`.masks` (``Inpainting``, ``Denoising``), :mod:`.blur` (``Blur``, ``gaussian_kernel``,
``motion_kernel``), :mod:`.resolution` (``SuperResolution``), :mod:`.mri` (``MRI``), :mod:`.ct` (``CT``),
:mod:`.phase_retrieval` (``PhaseRetrieval``), :mod:`.dense` (``MatrixOperator``) and :mod:`.deepinv`
(``DeepInvPhysics``).
"""

from .base import Operator, fft2c, ifft2c
from .blur import Blur, gaussian_kernel, motion_kernel
from .ct import CT
from .deepinv import DeepInvPhysics
from .dense import MatrixOperator
from .masks import Denoising, Inpainting
from .mri import MRI
from .phase_retrieval import PhaseRetrieval
from .resolution import SuperResolution

__all__ = [
    "CT", "MRI", "Blur", "DeepInvPhysics", "Denoising", "Inpainting", "MatrixOperator", "Operator", "PhaseRetrieval",
    "SuperResolution", "fft2c", "gaussian_kernel", "ifft2c", "motion_kernel",
]
