"""Euler–Maruyama on the reverse-time SDE (Song et al., ICLR 2021; arXiv 2011.13456, eq. 6).

    dx = [f(t) x − g(t)² ∇log p_t(x)] dt + g(t) dw̄,   ∇log p_t(x) = −ε̂/σ_t

stepped from t_i to t_{i+1} < t_i with Δt = t_{i+1} − t_i:

    x_{i+1} = x_i + (f x_i + g² ε̂/σ_i) Δt + g √(−Δt) z.

f = d log α/dt and g² = −2σ² dλ/dt come from the schedule (VP: f = −β/2, g² = β). The common final
Tweedie step x̂0 = E[x_0 | x_{t_end}] (``denoise_final``, one extra evaluation) removes the residual noise.
"""

from __future__ import annotations

import math

from ..registry import register_sampler


@register_sampler("euler_maruyama", default_grid="time_uniform")
def euler_maruyama(run, x, *, denoise_final: bool = True):
    """Euler–Maruyama on the reverse SDE (Song et al. 2021), optional final Tweedie denoising."""
    g = run.grid
    f, g2 = (c.numpy() for c in g.schedule.sde_coefficients(g.t))
    for i in run.steps("euler_maruyama"):
        pred = run.predict(x, i)
        dt = float(g.t[i + 1] - g.t[i])
        x = x + (f[i] * x + (g2[i] / g.sigma[i]) * pred.eps) * dt + math.sqrt(g2[i] * -dt) * run.randn_like(x, step=i)
        run.step_done(i, x, pred.x0)
    if denoise_final and g.sigma[-1] > 0:
        x = run.predict(x, g.steps).x0
    return x
