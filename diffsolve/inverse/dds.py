"""DDS, decomposed diffusion sampling (Chung, Lee, Ye; ICLR 2024; arXiv 2303.05754), Alg. 1/3.

No back-propagation through the network. At every DDIM step, with Tweedie's x̂0 = E[x_0 | x_t]:

1. data consistency by M conjugate-gradient steps in the Krylov space around x̂0 (:mod:`.cg`, batched per
   sample, complex-safe):
   - noisy form (γ < ∞): (I + γ AᴴA) x = x̂0 + γ Aᴴ y, i.e. argmin_x γ/2 ‖y − A x‖² + 1/2 ‖x − x̂0‖²;
   - noiseless form (γ = ∞): AᴴA x = Aᴴ y started at x̂0;
   ``gamma`` is a constant γ (the official code: ``--gamma 1.0`` whenever ``--sigma_y > 0``, the noiseless
   form otherwise), ``float("inf")`` for the noiseless form, or None (default): the noiseless form when
   σ_y = 0, else the γ matched to the noise, γ_t = r_t²/σ_y² with r_t² = s²/(1 + s²), s = σ_t/α_t, the
   variance of x_0 given x_t for unit-variance data. Then x̂0* is the MAP of N(x; x̂0, r_t²) · N(y; Ax, σ_y²).
   A constant γ = 1 is scale-dependent: it trusts x̂0 as much as y whatever σ_y is (fine for CT, where
   ‖A‖² is in the hundreds, but it under-fits ‖A‖ ≈ 1 operators at σ_y = 0.05 and over-fits them at
   σ_y = 0.3); on the Gaussian-mixture oracle the matched γ_t halves the error of the posterior mean;
2. re-noising to the next time: x_s = α_s x̂0* + σ_s (η z + √(1 − η²) ε̂) with fresh z ~ N(0, I) and the
   model's ε̂; η is the fraction of fresh noise (the paper's 0.85), not DDIM's η. The last step (σ_s = 0)
   returns x̂0* itself.

Where A Aᴴ is a projector (single-coil Cartesian MRI, inpainting) CG reaches the exact projection
x̂0 − A⁺(A x̂0 − y) in one step, which is what the official code special-cases. Under Poisson noise AᴴA and
Aᴴy carry the relative inverse-variance weights W (Aᴴ W A, Aᴴ W y).

Where DDS is weak: the paper's case for skipping the manifold-constrained gradient is that the CG update
stays on the clean-data manifold when the Krylov subspace K_M(AᴴA, Aᴴ(y − A x̂0)) lies in the manifold's
tangent space at x̂0. That is plausible for blur, super-resolution, MRI and CT, and fails for two operators:
for a mask the subspace is spanned by the observed pixels alone, so the update overwrites them and never
moves a missing one (the hole hears of y only through later denoiser calls); for A = I it is span{y − x̂0},
mostly measurement noise, so every step pulls x̂0 a fraction γ/(1 + γ) toward the noisy y. DPS moves the
missing pixels with the observed ones through the denoiser's Jacobian. The same holds, in k-space, for
single-coil Cartesian MRI (A Aᴴ is a projector: the update rewrites the sampled lines and leaves the others
to the denoiser), and for sparse-view CT the Krylov space lies in the range of Aᴴ, back-projections along
4 directions, while more than half the image is in A's null space. On digits16 DDS matches 1000-step DPS on
SR, both blurs and CT (a tie on held-out digits, 1.4 dB behind on training digits) and trails it on
inpainting (3–4 dB), denoising (≈ 0.8 dB) and MRI (3.4 dB: the papers' home ground, at 16²;
benchmarks/RESULTS.md), with more steps, other γ or η, and averaged samples alike
(``benchmarks/inverse_tuning.py dds-gap``).
"""

from __future__ import annotations

import math

import torch

from .cg import conjugate_gradient
from ..core import per_sample
from .registry import check_number, register_solver
from .solve import initial_noise


def _validate(options, problem) -> None:
    check_number(options, "gamma", low=0.0, allow_none=True)
    check_number(options, "cg_steps", low=0, integer=True)
    check_number(options, "eta", low=0.0, high=1.0)
    if not isinstance(options["clip_x0"], bool):
        raise ValueError(f"clip_x0: expected True or False, got {options['clip_x0']!r}")


def data_consistency(problem, x0: torch.Tensor, gamma: float | torch.Tensor, cg_steps: int) -> torch.Tensor:
    """M CG steps on the DDS data-consistency problem around x0 (γ = ∞: the noiseless form; a tensor γ is one
    per sample, shaped to broadcast against x0)."""
    op, w = problem.operator, problem.weight

    def normal(v):
        r = op.A(v)
        return op.A_adjoint(r if w is None else w * r)

    rhs = op.A_adjoint(problem.y if w is None else w * problem.y)
    if not isinstance(gamma, torch.Tensor):
        if math.isinf(gamma):
            return conjugate_gradient(normal, rhs, x0, iters=cg_steps)
        if gamma == 0:
            return x0
    return conjugate_gradient(lambda v: v + gamma * normal(v), x0 + gamma * rhs, x0, iters=cg_steps)


@register_solver("dds", default_steps=50, steps_meaning="DDIM steps (= NFE)", linear_only=True, validate=_validate)
def dds(run, problem, *, gamma: float | None = None, cg_steps: int = 5, eta: float = 0.85, clip_x0: bool = False):
    """DDS (Chung et al. 2024): DDIM + M conjugate-gradient steps at Tweedie's estimate; no backprop."""
    g = run.grid
    x = initial_noise(run)
    c_fresh, c_model = float(eta), math.sqrt(max(1.0 - float(eta) ** 2, 0.0))
    for i in run.steps("dds"):
        pred = run.predict(x, i)
        x0 = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
        if gamma is None:
            s2 = (g.sigma[i] / g.alpha[i]) ** 2
            gi = math.inf if problem.noiseless else s2 / (1 + s2) / per_sample(problem.sigma_y, x.ndim) ** 2
        else:
            gi = float(gamma)
        x0 = data_consistency(problem, x0, gi, int(cg_steps)).to(x.dtype)
        sigma_next = float(g.sigma[i + 1])
        if sigma_next == 0.0:
            x = x0
        else:
            noise = run.randn_like(x, step=i) if c_fresh > 0 else 0.0
            x = g.alpha[i + 1] * x0 + sigma_next * (c_fresh * noise + c_model * pred.eps)
        run.step_done(i, x, x0)
    return x
