"""One conjugate-gradient solver, batched per sample and complex-safe; DDS and the CG-based pseudo-inverses
both use it.

For a Hermitian positive (semi-)definite operator ``apply`` acting on a batch (B, ...), CG solves
``apply(x) = b`` for every sample independently: each sample has its own step sizes, from its own inner
products ⟨u, v⟩ = Σ conj(u) v over the non-batch dimensions. For a Hermitian operator ⟨r, r⟩ and ⟨p, Ap⟩ are
real; their real parts are taken, so the iteration runs unchanged on complex data. (DDS's official ``CG``
takes ``r·rᵀ`` without the conjugate over the whole batch at once: wrong for complex data, and every sample's
step depends on the others.)

No host synchronisation: a sample whose residual fell below ``tol`` (relative to ‖b‖), or whose ⟨p, Ap⟩ is
0, keeps its x (its step is set to 0 on the device) while the others continue; ``iters`` is a fixed count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core import per_sample

Tensor = torch.Tensor


def batch_dot(u: Tensor, v: Tensor) -> Tensor:
    """Re⟨u, v⟩ = Re Σ conj(u) v per sample: shape (B,), real."""
    prod = u.conj() * v if u.is_complex() else u * v
    return (prod.real if prod.is_complex() else prod).flatten(1).sum(1)


@dataclass
class CGResult:
    """x, and per sample the final residual norm ‖b − apply(x)‖ (recursively updated) and ‖b‖."""

    x: Tensor
    residual_norm: Tensor
    rhs_norm: Tensor


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, iters: int = 5,
                       tol: float = 0.0, return_info: bool = False) -> Tensor | CGResult:
    """``iters`` CG steps on ``apply(x) = b`` from ``x0`` (zeros if None), per sample.

    ``apply`` must be Hermitian positive semi-definite on the batch (e.g. I + γ AᴴA, or AᴴA), mapping (B, ...)
    to the same shape; ``b`` and ``x0`` may be real or complex. With ``x0`` the iterate stays in the Krylov
    space x0 + span{r0, A r0, …} (DDS's "Krylov subspace around Tweedie's estimate"). ``tol`` > 0 freezes a
    sample once ‖r‖ ≤ tol·‖b‖.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters: expected an integer >= 0, got {iters!r}")
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        if x0.shape != b.shape:
            raise ValueError(f"x0: expected the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
        x = x0.to(torch.result_type(x0, b)) if x0.is_complex() != b.is_complex() else x0
        r = b - apply(x)
    if r.is_complex() and not x.is_complex():
        x = x.to(r.dtype)
    p = r
    rr = batch_dot(r, r)
    b_norm = batch_dot(b, b).sqrt()
    threshold = (tol * b_norm) ** 2
    zero = torch.zeros_like(rr)
    for _ in range(iters):
        ap = apply(p)
        pap = batch_dot(p, ap)
        active = (pap > 0) & (rr > threshold)
        alpha = torch.where(active, rr / torch.where(active, pap, 1.0), zero)
        x = x + per_sample(alpha, x.ndim).to(x.dtype) * p
        r = r - per_sample(alpha, r.ndim).to(r.dtype) * ap
        rr_new = batch_dot(r, r)
        beta = torch.where(active & (rr > 0), rr_new / torch.where(rr > 0, rr, 1.0), zero)
        p = r + per_sample(beta, p.ndim).to(p.dtype) * p
        rr = torch.where(active, rr_new, rr)
    if return_info:
        return CGResult(x, rr.clamp_min(0).sqrt(), b_norm)
    return x
