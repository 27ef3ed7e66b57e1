"""Dense matrices on flat vectors (the Gaussian-mixture oracle's linear-Gaussian measurements)."""

from __future__ import annotations

import torch

from .base import F64, Operator, _cast


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
