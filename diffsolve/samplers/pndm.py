"""PNDM: pseudo numerical methods for diffusion models (Liu, Ren, Lin, Zhao, ICLR 2022; arXiv 2202.09778).

A classical ODE method (the "gradient part") estimates a noise direction e′ over the step, and the
"transfer part" φ, the DDIM step of eq. (9), moves x with it from t to s < t:

    φ(x_t, e, t, s) = √ᾱ_s/√ᾱ_t · x_t − (ᾱ_s − ᾱ_t) / (√ᾱ_t (√((1−ᾱ_s) ᾱ_t) + √((1−ᾱ_t) ᾱ_s))) e
                    = α_s x̂0 + σ_s e,   x̂0 = (x_t − σ_t e)/α_t                      (ᾱ = α² for VP)

The right-hand form holds for any (α, σ) schedule (VP or not); it is computed as
(α_s/α_t) x_t − σ_s expm1(λ_s − λ_t) e with λ = log(α/σ) (no cancellation for small steps), and as
(α_s/α_t)(x_t − σ_t e) on a step onto σ_s = 0. In y = x/α and ρ = σ/α = e^{−λ} it reads
y_s = y_t + (ρ_s − ρ_t) e: the Euler step of the probability-flow ODE dy/dρ = ε̂(x, t).

Gradient parts, for a step from t to t − δ (ε̂ the model's noise estimate, from any prediction type;
equation numbers as diffusers' PNDMScheduler cites them):

- PRK, pseudo Runge–Kutta (eq. 12):  e1 = ε̂(x_t, t),        x1 = φ(x_t, e1, t, t − δ/2),
                                     e2 = ε̂(x1, t − δ/2),   x2 = φ(x_t, e2, t, t − δ/2),
                                     e3 = ε̂(x2, t − δ/2),   x3 = φ(x_t, e3, t, t − δ),
                                     e4 = ε̂(x3, t − δ),     e′ = (e1 + 2 e2 + 2 e3 + e4)/6;
- PLMS, pseudo linear multistep (eq. 13): e_t = ε̂(x_t, t),
                                     e′ = (55 e_t − 59 e_{t+δ} + 37 e_{t+2δ} − 9 e_{t+3δ})/24;
- pseudo improved Euler:             e1 = ε̂(x_t, t),        e2 = ε̂(φ(x_t, e1, t, t − δ), t − δ),
                                     e′ = (e1 + e2)/2;

then x_{t−δ} = φ(x_t, e′, t, t − δ). The multistep history holds ε̂ at the grid points only (e1 of a
PRK step, never its stage values). t − δ/2 is the midpoint in t, as in the paper and diffusers; here it
is exact, where diffusers, for an odd timestep spacing r, transfers x1 to timestep T − ⌊r/2⌋ and then
evaluates the network on it at T − ⌈r/2⌉ (even spacings, e.g. 10, 20 or 50 of 1000 steps, agree).

Methods (``method``):
- ``"f_pndm"`` (Algorithm 2): 3 PRK steps, then PLMS; NFE = steps + 9 (4 per PRK step, 1 per PLMS
  step); needs steps ≥ 4.
- ``"s_pndm"``: one pseudo-improved-Euler step, then the pseudo 2-step multistep
  e′ = (3 e_t − e_{t+δ})/2; NFE = steps + 1.
- ``skip_prk=True`` with ``"f_pndm"``: diffusers' ``skip_prk_steps=True`` (crowsonkb's PLMS): the first
  step is the pseudo improved Euler step, then PLMS of order 2, 3 and from the fourth step on 4
  (Adams–Bashforth weights (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24); NFE = steps + 1.
A pseudo-improved-Euler step that lands on σ = 0 (a single step onto t = 0) would evaluate the network
at σ = 0; it is the plain DDIM step there, as diffusers does.

``v_conversion`` (v-prediction networks only): ``"exact"`` turns each network output into ε̂ at the point
where it was evaluated before the gradient part combines them (the method above). diffusers'
``PNDMScheduler`` instead combines the raw v outputs and converts the combination with the step's start,
e′ = α_t Σ w_j v̂_j + σ_t x_t, which is not the noise estimate of any evaluation point once stages or history
lie elsewhere; ``"diffusers"`` reproduces that (tests/test_scheduler_contract.py: equal to diffusers; on the
Gaussian-mixture oracle its error is 3.3× the exact rule's at 20 steps).

Which code this follows: the paper's equations and diffusers' ``PNDMScheduler`` (matched step by step in
tests/test_pndm.py): the transfer uses α, σ at exactly the times the network is evaluated at. The
official code (luping-liu/PNDM, ``runner/method.py``) reads ᾱ at index t + 1 of the unpadded cumulative
product for a network called at timestep t — one training step off from the first step on — and ends
at ᾱ_0 instead of 1; that shift is not reproduced.

Convergence order (derived here, measured on the Gaussian-mixture oracle in tests/test_pndm.py). The
gradient parts are classical methods for dy/dρ = ε̂ only where their assumptions hold in ρ = σ/α:
PLMS's fixed weights assume equal steps in ρ, and PRK's stage at the t-midpoint is the ρ-midpoint only
where ρ is linear in t. Hence F-PNDM is of order 4 (RK4 warm-up + AB4) where ρ is linear in t and the
grid uniform in t (EDM, σ = t, time-uniform grid); order 3 on a grid uniform in ρ of a VP schedule (the
three PRK warm-up steps have stage abscissa ½ + O(δ), a local error O(δ³) each); and order 2 on
time-uniform or logSNR grids, the usual case (diffusers' timesteps included): AB weights on steps whose
ratio is 1 + O(δ) leave a local error O(δ³) at every step. S-PNDM is of order 2 on any grid;
``skip_prk`` of order 3 on ρ-uniform grids (its improved-Euler and AB2 warm-up steps) and 2 otherwise.
On the grids PNDM is normally run with, F-PNDM is thus a second-order method: below the classical orders of
its gradient parts and below the paper's convergence claim for PNDM.
"""

from __future__ import annotations

import math

import torch

from ..core import TimeGrid, adams_bashforth_weights
from ..registry import register_sampler

METHODS = ("f_pndm", "s_pndm")
#: how a v-prediction network's outputs become the noise estimate e′ of a gradient part (module docstring)
V_CONVERSIONS = ("exact", "diffusers")
_PRK_STEPS = 3


def transfer_coefficients(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float) -> tuple[float, float]:
    """(a, b) with φ(x, e, t, s) = a x + b e, the DDIM step x_s = α_s x̂0 + σ_s e, x̂0 = (x − σ_t e)/α_t:
    a = α_s/α_t and b = σ_s − α_s σ_t/α_t = −σ_s expm1(λ_s − λ_t) (= −α_s σ_t/α_t when σ_s = 0)."""
    a = alpha_s / alpha_t
    if sigma_s == 0.0:
        return a, -a * sigma_t
    h = (math.log(alpha_s) - math.log(sigma_s)) - (math.log(alpha_t) - math.log(sigma_t))
    return a, -sigma_s * math.expm1(h)


@register_sampler("pndm", default_grid="time_uniform")
def pndm(run, x, *, method: str = "f_pndm", skip_prk: bool = False, v_conversion: str = "exact"):
    """PNDM (Liu et al. 2022): DDIM transfer with pseudo Runge–Kutta / linear multistep gradients; f_pndm, s_pndm."""
    if v_conversion not in V_CONVERSIONS:
        raise ValueError(f"v_conversion: expected one of {list(V_CONVERSIONS)}, got {v_conversion!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if not isinstance(skip_prk, bool):
        raise ValueError(f"skip_prk: expected True or False, got {skip_prk!r}")
    if skip_prk and method != "f_pndm":
        raise ValueError(f"skip_prk: only method='f_pndm' has pseudo Runge–Kutta steps to skip, got "
                         f"skip_prk=True with method={method!r}")
    g = run.grid
    prk = method == "f_pndm" and not skip_prk
    if prk and g.steps <= _PRK_STEPS:
        raise ValueError(f"steps: method='f_pndm' needs more than {_PRK_STEPS} steps ({_PRK_STEPS} pseudo "
                         f"Runge–Kutta warm-up steps, then pseudo linear multistep), got {g.steps}; use "
                         "skip_prk=True or method='s_pndm' for fewer steps")
    max_order = 2 if method == "s_pndm" else 4
    weights = {p: adams_bashforth_weights(p) for p in range(1, max_order + 1)}
    # step coefficients, once per run on the host in float64
    full = [transfer_coefficients(g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]) for i in range(g.steps)]
    if prk:
        mid = TimeGrid(g.schedule, (g.t[:_PRK_STEPS] + g.t[1 : _PRK_STEPS + 1]) / 2)
        half = [transfer_coefficients(g.alpha[i], g.sigma[i], mid.alpha[i], mid.sigma[i]) for i in range(_PRK_STEPS)]
        mid_points = run.points_at(mid, x.dtype, x.shape[0])

    def gradient(parts, i, x_start):
        """e′ = Σ w ε̂_j over (w, prediction, α_j, σ_j); diffusers' v rule: α_i Σ w v̂_j + σ_i x_start instead."""
        if not diffusers_v:
            e = parts[0][0] * parts[0][1].eps
            for w, p, _, _ in parts[1:]:
                e = e + w * p.eps
            return e
        v = sum(w * (aj * p.eps - sj * p.x0) for w, p, aj, sj in parts)
        return g.alpha[i] * v + g.sigma[i] * x_start

    diffusers_v = v_conversion == "diffusers" and run.model.prediction == "v"
    hist: list[tuple] = []  # (prediction, α, σ) at the last grid points, newest first
    for i in run.steps("pndm"):
        a, b = full[i]
        pred = run.predict(x, i)
        hist.insert(0, (pred, g.alpha[i], g.sigma[i]))
        del hist[max_order:]
        first = (1.0, pred, g.alpha[i], g.sigma[i])
        if prk and i < _PRK_STEPS:
            ah, bh = half[i]
            am, sm = mid.alpha[i], mid.sigma[i]
            p2 = run.predict_at(ah * x + bh * gradient([first], i, x), *mid_points[i])
            p3 = run.predict_at(ah * x + bh * gradient([(1.0, p2, am, sm)], i, x), *mid_points[i])
            p4 = run.predict(a * x + b * gradient([(1.0, p3, am, sm)], i, x), i + 1)
            e = gradient([(1 / 6, pred, g.alpha[i], g.sigma[i]), (1 / 3, p2, am, sm), (1 / 3, p3, am, sm),
                          (1 / 6, p4, g.alpha[i + 1], g.sigma[i + 1])], i, x)
        elif i == 0:  # pseudo improved Euler (S-PNDM, skip_prk); plain DDIM onto σ = 0
            e = gradient([first], i, x)
            if g.sigma[1] > 0:
                p2 = run.predict(a * x + b * e, 1)
                e = gradient([(0.5, pred, g.alpha[0], g.sigma[0]), (0.5, p2, g.alpha[1], g.sigma[1])], i, x)
        else:  # PLMS of order min(history, max_order)
            e = gradient([(w, *h) for w, h in zip(weights[len(hist)], hist)], i, x)
        x = torch.add(a * x, e, alpha=b)
        run.step_done(i, x, pred)
    return x
