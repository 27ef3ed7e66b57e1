"""BDIA: bi-directional integration approximation (Zhang, Lewis, Kleijn, ECCV 2024; arXiv 2307.10829),
the exactly invertible DDIM (BDIA-DDIM for VP schedules, BDIA-EDM for σ-parameterised ones: both are the
same update in (α, σ) form).

With D(x_i; t_i → s) = α_s x̂0(x_i, t_i) + σ_s ε̂(x_i, t_i) the DDIM map of the prediction at x_i, the
paper's update (Section 4) uses that one evaluation both forward (t_i → t_{i+1}) and backward
(t_i → t_{i−1}) and mixes in the state before it with weight γ:

    x_{i+1} = γ (x_{i−1} − D(x_i; t_i → t_{i−1})) + D(x_i; t_i → t_{i+1}),

the first step being a plain DDIM step (there is no x_{−1}); γ = 0 is DDIM. Because x_{i−1} appears
linearly, the chain runs backwards exactly (γ > 0):

    x_{i−1} = (x_{i+1} − D(x_i; t_i → t_{i+1})) / γ + D(x_i; t_i → t_{i−1}).

The state of the chain is a pair of consecutive points, so an inversion returns two: x at t_0 and at t_1.
Paper settings: γ = 0.5 at 10 steps, γ = 1.0 at 40 steps. The default is 0.5 up to 10 steps and 1.0 above:
the inversion divides by γ at every step, so γ = 0.5 over 20 steps already grows round-off 5·10⁵-fold
(float32 round trip 5e-2 on digits16, against 4e-6 with γ = 1; benchmarks/RESULTS.md).
(The authors' Stable Diffusion script stores a blended state 0.5 (x_{i−1} − D(x_i; t_i → t_{i−1})) + x_i
in place of x_i for its next step; diffsolve follows the paper's equation.)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ..registry import register_inversion, register_sampler
from .ddim import ddim_transfer

if TYPE_CHECKING:
    from torch import Tensor


def _gamma(gamma: float | None, steps: int) -> float:
    if gamma is None:
        return 0.5 if steps <= 10 else 1.0
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma: expected a value in [0, 1], got {gamma}")
    return float(gamma)


def _check_pair(x, x_next):
    if x_next is not None and x_next.shape != x.shape:
        raise ValueError(f"x_next: expected the shape of x_T {tuple(x.shape)}, got {tuple(x_next.shape)}")


@register_sampler("bdia", default_grid="time_uniform")
def bdia(run, x, *, gamma: float | None = None, x_next: Tensor | None = None):
    """BDIA-DDIM / BDIA-EDM (Zhang et al. 2024): exactly invertible DDIM; x_next = the state at t_1 (from invert)."""
    g = run.grid
    gamma = _gamma(gamma, g.steps)
    _check_pair(x, x_next)
    prev = None
    if x_next is not None:  # resume the chain from the pair (x at t_0, x at t_1)
        prev, x = x, x_next.to(x.dtype)
    for i in run.steps("bdia"):
        if i == 0 and prev is not None:
            continue
        pred = run.predict(x, i)
        forward = ddim_transfer(pred, g.alpha[i + 1], g.sigma[i + 1])
        new = forward if prev is None else gamma * (prev - ddim_transfer(pred, g.alpha[i - 1], g.sigma[i - 1])) + forward
        prev, x = x, new
        run.step_done(i, x, pred.x0)
    return x


@register_inversion("bdia")
def bdia_invert(run, x, *, gamma: float | None = None, x_next: Tensor | None = None):
    """Exact inversion: one DDIM inversion step t_N → t_{N−1} (nothing else determines x_{N−1}: any choice
    is regenerated exactly), then the BDIA recursion backwards to the pair (x_0, x_1)."""
    g = run.grid
    gamma = _gamma(gamma, g.steps)
    if gamma == 0.0:
        raise ValueError("gamma=0 makes BDIA plain DDIM, which is not exactly invertible: use gamma > 0, or "
                         "sampler='ddim' for the approximate DDIM inversion")
    if x_next is not None:
        raise ValueError("x_next is an input of sampling (from invert), not of invert")
    if g.steps < 2:
        raise ValueError(f"steps: BDIA inversion needs at least 2 steps (one DDIM step then BDIA), got {g.steps}")
    growth = (1.0 / gamma) ** (g.steps - 1)
    if growth > 1e4:
        warnings.warn(f"BDIA inversion divides by gamma={gamma} at each of {g.steps - 1} steps: round-off grows "
                      f"up to {growth:.1e}×; use gamma closer to 1 or float64 for an exact round trip", stacklevel=4)
    later = None
    for i in run.steps("bdia inversion", reverse=True):  # t_{i+1} → t_i, with x = x_{i+1} and later = x_{i+2}
        pred = run.predict(x, i + 1)
        earlier = ddim_transfer(pred, g.alpha[i], g.sigma[i])
        if later is not None:
            earlier = earlier + (later - ddim_transfer(pred, g.alpha[i + 2], g.sigma[i + 2])) / gamma
        later, x = x, earlier
        run.step_done(i, x, pred.x0)
    return x, {"x_next": later, "gamma": gamma}
