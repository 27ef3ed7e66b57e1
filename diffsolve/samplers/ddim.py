"""DDIM (Song, Meng, Ermon, ICLR 2021; arXiv 2010.02502), eq. (12).

    x_s = α_s x̂0 + √(σ_s² − c²) ε̂ + c z,   c = η σ_s σ_{t|s} / σ_t,   σ²_{t|s} = σ_t² − (α_t/α_s)² σ_s²

from t to s < t, with x̂0, ε̂ the model's predictions at (x_t, t) and z ~ N(0, I). η = 0 is the
deterministic DDIM (the first-order exponential integrator of the probability-flow ODE), η = 1 is
ancestral DDPM sampling. c is written for any (α, σ) schedule; for VP it is diffusers' η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s).

``step_to`` reproduces diffusers' DDIMScheduler where it is not this rule: diffusers steps from timestep n to
n − N // steps whatever timestep it evaluates next, so with trailing / linspace spacing at step counts that do
not divide N the step ends at s_i ≠ t_{i+1}, and the next evaluation feeds the network at t_{i+1} a sample that
sits at s_i (part of the trajectory is skipped). Off by default: each step ends at the next grid point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..core import TimeGrid
from ..model import Prediction
from ..registry import register_inversion, register_sampler


def ddim_transfer(pred: Prediction, alpha: float, sigma: float):
    """The deterministic DDIM map of a prediction made at (x_t, t) to the time with (α, σ):
    α x̂0 + σ ε̂ (the "transfer part" that PNDM and BDIA build on)."""
    return alpha * pred.x0 + sigma * pred.eps


def ddim_noise_scale(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, eta: float) -> float:
    """c of eq. (12): η times the std of the DDPM posterior q(x_s | x_t, x0)."""
    if eta == 0.0 or sigma_s == 0.0:
        return 0.0
    var_ts = max(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0)
    return eta * sigma_s * math.sqrt(var_ts) / sigma_t


@register_sampler("ddim", default_grid="time_uniform")
def ddim(run, x, *, eta: float = 0.0, step_to: Sequence[float] | None = None):
    """DDIM (Song et al. 2021, eq. 12); eta = 0 deterministic, eta = 1 ancestral DDPM. ``step_to``: the time
    each step ends at, one per step (diffusers' DDIMScheduler rule where it skips; see the module docstring);
    None: the next grid point."""
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    g = run.grid
    if step_to is None:
        alpha_to, sigma_to = g.alpha[1:], g.sigma[1:]
    else:
        ends = np.asarray(step_to, dtype=np.float64)
        if ends.shape != (g.steps,) or not ((ends >= 0) & (ends < g.t[:-1])).all():
            raise ValueError(f"step_to: expected {g.steps} times, each in [0, t_i) of its step's start t_i "
                             f"({g.t[:-1].tolist()}), got {np.asarray(step_to).tolist()}")
        ends_grid = TimeGrid(g.schedule, ends)
        alpha_to, sigma_to = ends_grid.alpha, ends_grid.sigma
    # (α_s, √(σ_s² − c²), c) of every step, on the host before the loop
    coefficients = []
    for i in range(g.steps):
        c = ddim_noise_scale(float(g.alpha[i]), float(g.sigma[i]), float(alpha_to[i]), float(sigma_to[i]), eta)
        coefficients.append((float(alpha_to[i]), math.sqrt(float(sigma_to[i]) ** 2 - c**2), c))
    for i in run.steps("ddim"):
        pred = run.predict(x, i)
        alpha_s, eps_coef, c = coefficients[i]
        x = alpha_s * pred.x0 + eps_coef * pred.eps
        if c > 0:
            x = x + c * run.randn_like(x, step=i)
        run.step_done(i, x, pred.x0)
    return x


@register_inversion("ddim")
def ddim_invert(run, x, *, eta: float = 0.0):
    """Naive DDIM inversion t_{i+1} → t_i: x_i = α_i x̂0 + σ_i ε̂ with the prediction made at (x_{i+1}, t_{i+1}),
    the less noisy point, standing in for the unknown one at (x_i, t_i). Approximate: O(h) per step."""
    if eta != 0.0:
        raise ValueError(f"eta: DDIM inversion inverts the deterministic sampler and needs eta=0, got {eta}")
    g = run.grid
    for i in run.steps("ddim inversion", reverse=True):
        pred = run.predict(x, i + 1)
        x = ddim_transfer(pred, g.alpha[i], g.sigma[i])
        run.step_done(i, x, pred.x0)
    return x, {}
