"""DAPS, decoupled annealing posterior sampling (Zhang, Chu, Berner, Meng, Anandkumar, Song; CVPR 2025;
arXiv 2407.01521), Alg. 1, in the variance-exploding coordinates x_σ = x_0 + σ ε of the paper (a VP model
is evaluated at α·x_σ with σ = σ_t/α_t, i.e. λ = −log σ).

For each σ_i of the annealing schedule (σ_max → σ_min, EDM's ρ = 7 polynomial, then 0):

1. x̂0 = the probability-flow ODE from x_{σ_i} to σ = 0 with ``ode_steps`` Euler steps on its own ρ = 7 grid
   from σ_i down to ``ode_sigma_min`` (the last step goes to 0, where Euler returns the denoiser's x̂0);
2. ``langevin_steps`` steps of unadjusted Langevin dynamics on x_0 targeting
   N(x_0; x̂0, σ_i² I) · exp(−‖A(x_0) − y‖²/(2τ²)):
   x ← x + ℓ (−Aᴴ(A x − y)/τ² + (x̂0 − x)/σ_i²) + √(2ℓ) z, with ℓ decaying linearly over the annealing from
   ``lr`` to ``lr · lr_min_ratio``. ``lr=None`` (default, linear operators) starts at ℓ = τ²/‖A‖², one unit
   of the data term's stiffness, so the step follows τ and the operator's scale; the official code's
   fixed ℓ (1e-4 or 5e-5) is tied to its τ = 0.01 on [−1, 1] images (ℓ‖A‖²·2/τ² = 1 or 2), and the
   image task presets set it;
3. x_{σ_{i+1}} = x_0 + σ_{i+1} z (σ = 0 after the last step: the result is the last Langevin state).

The official code's other Monte-Carlo variants (``cores/mcmc.py``), as options: ``mc="hmc"`` (its damped
Hamiltonian Monte Carlo: v ← m v + √ℓ s(x) + √(2(1 − m)) z, x ← x + √ℓ v, with v ~ N(0, I) at each annealing
step and m = ``momentum``), and ``prior="exact"`` (the prior term of p(x_0 | x_{σ_i}) from the network's score
at σ = ``prior_sigma_min`` instead of the Gaussian N(x̂0, σ_i²): s(x) = data term + (x_{σ_i} − x)/σ_i² +
(D(x, σ_min) − x)/σ_min², one network evaluation per Langevin step, counted in NFE). Neither is a preset
default (training digits, DAPS-100, benchmarks/RESULTS.md): HMC loses on 7 of 9 tasks (up to 8 dB on the
blurs); the exact prior gains 0.8–2.3 dB on inpainting, SR, the blurs and MRI but costs 51× the NFE (5100
per restoration for DAPS-100) and fails on denoising (13.5 against 22.9 dB).

Presets: ``daps`` = ``daps_1k`` (200 annealing × 5 ODE steps = 1000 NFE) and ``daps_100`` (50 × 2 = 100 NFE),
both with 100 Langevin steps. NFE counts network evaluations only; the Langevin steps cost operator
applications.

Choices and differences from the official code (zhangbingliang2019/DAPS), on purpose:
- the data term is the likelihood's own: τ defaults to σ_y, so that DAPS samples p(x_0 | y) (on the GMM
  oracle against its exact posterior). The official code uses loss ‖A(x) − y‖²/τ² (no ½) with τ = 0.01 for
  σ_y = 0.05: a likelihood of std τ/√2 = 0.0071. The task presets (:mod:`.tasks`) set that value.
- the step is capped at ℓ ≤ 1/L with L = ‖A‖² max(w)/τ² + 1/σ_i² (+ 1/σ_min² with ``prior="exact"``; linear
  operators; ‖A‖² by power
  iteration once per operator): unadjusted Langevin diverges for ℓ·L > 2, and the official SR setting
  (ℓ = 1e-4, L = 2·10⁴) sits exactly at that edge. ℓ = 1/L moves the stiff measured components to their
  conditional mean in one step.
- a chain that produces NaN/Inf raises (the core's non-finite check) instead of silently returning zeros.
- σ_max is capped at the model's largest noise level (σ_t/α_t at the end of its valid time range) and
  the ODE's σ's are kept at or above its smallest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core import per_sample
from .registry import check_number, register_solver


#: ``mc`` values: unadjusted Langevin (the paper's) and the official code's damped HMC
MC_ALGORITHMS = ("langevin", "hmc")
#: ``prior`` values: the Gaussian N(x̂0, σ_i²) (the paper's) and the official code's "exact" network score
PRIORS = ("gaussian", "exact")


def _poly(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n points from sigma_max to sigma_min, uniform in σ^(1/ρ) (EDM's schedule), float64."""
    r = np.linspace(0.0, 1.0, n)
    return (sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _ve_range(schedule) -> tuple[float, float]:
    """The smallest and largest σ_VE = σ/α the model was trained on."""
    lo, hi = schedule.valid_range
    lo = lo if lo > 0 else schedule.default_range[1]
    t = torch.tensor([lo, hi], dtype=torch.float64)
    s = (schedule.sigma(t) / schedule.alpha(t)).tolist()
    return s[0], s[1]


def annealing_sigmas(schedule, steps: int, options: dict) -> np.ndarray:
    """σ_0 … σ_{steps−1} (ρ = 7 from σ_max to σ_min, as the official scheduler's ``steps + 1`` points with
    the last dropped) and σ_steps = 0."""
    ve_min, ve_max = _ve_range(schedule)
    sigma_max = min(float(options["sigma_max"]), ve_max)
    sig = _poly(sigma_max, float(options["sigma_min"]), steps + 1)[:-1]
    return np.concatenate([sig, [0.0]])


def _times(schedule, sigmas: np.ndarray) -> torch.Tensor:
    """t with σ_t/α_t = σ (λ = −log σ), clamped to the schedule's valid range; σ = 0 → t = 0."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    lo, hi = schedule.valid_range
    t = schedule.t_from_lambda(-torch.log(s.clamp_min(1e-300))).clamp(max(lo, 0.0), hi)
    return torch.where(s > 0, t, torch.zeros_like(t))


def _grid(schedule, steps: int, options: dict) -> torch.Tensor:
    return _times(schedule, annealing_sigmas(schedule, steps, options))


def _validate(options, problem) -> None:
    for name in ("ode_steps", "langevin_steps"):
        check_number(options, name, low=1 if name == "ode_steps" else 0, integer=True)
    check_number(options, "lr", low=0.0, low_open=True, allow_none=True)
    if options["lr"] is None and not problem.operator.linear:
        raise ValueError(f"lr: {type(problem.operator).__name__} is nonlinear, so DAPS cannot derive its Langevin "
                         "step from ‖A‖: pass lr (the official code uses 5e-5 for phase retrieval)")
    check_number(options, "lr_min_ratio", low=0.0, high=1.0, low_open=True)
    check_number(options, "tau", low=0.0, low_open=True, allow_none=True)
    check_number(options, "sigma_max", low=0.0, low_open=True)
    check_number(options, "sigma_min", low=0.0, low_open=True)
    check_number(options, "ode_sigma_min", low=0.0, low_open=True)
    check_number(options, "momentum", low=0.0, high=1.0, low_open=False)
    check_number(options, "prior_sigma_min", low=0.0, low_open=True)
    if options["mc"] not in MC_ALGORITHMS:
        raise ValueError(f"mc: expected one of {list(MC_ALGORITHMS)}, got {options['mc']!r}")
    if options["prior"] not in PRIORS:
        raise ValueError(f"prior: expected one of {list(PRIORS)}, got {options['prior']!r}")
    if not options["sigma_max"] > options["sigma_min"]:
        raise ValueError(f"sigma_max must exceed sigma_min, got {options['sigma_max']} and {options['sigma_min']}")
    if options["tau"] is None and problem.noiseless:
        raise ValueError("tau: the measurement is noiseless (sigma_y = 0), so DAPS needs an explicit likelihood "
                         "width tau > 0 (the official code uses 0.01 on [-1, 1] images)")


@register_solver("daps", default_steps=200, steps_meaning="annealing steps", validate=_validate, grid=_grid)
def daps(run, problem, *, ode_steps: int = 5, langevin_steps: int = 100, lr: float | None = None,
         lr_min_ratio: float = 0.01, tau: float | None = None, sigma_max: float = 100.0, sigma_min: float = 0.1,
         ode_sigma_min: float = 0.01, mc: str = "langevin", momentum: float = 0.9, prior: str = "gaussian",
         prior_sigma_min: float = 0.01):
    """DAPS (Zhang et al. 2025): annealing; Euler PF-ODE for x̂0; Langevin on x0 with the likelihood; re-noise."""
    schedule = run.grid.schedule
    steps = run.grid.steps
    opts = dict(sigma_max=sigma_max, sigma_min=sigma_min)
    sig = annealing_sigmas(schedule, steps, opts)
    ve_min, _ = _ve_range(schedule)
    # the inner ODE grids, all on the host in float64 once: (steps, ode_steps + 1), last column σ = 0
    inner = np.stack([np.concatenate([_poly(s, min(ode_sigma_min, s), ode_steps + 1)[:-1], [0.0]]) for s in sig[:-1]])
    inner[:, :-1] = np.maximum(inner[:, :-1], ve_min)
    t_inner = _times(schedule, inner[:, :-1].reshape(-1)).reshape(steps, ode_steps)
    a_inner = schedule.alpha(t_inner).numpy()
    device = run.noise.device
    t_dev = t_inner.to(device=device, dtype=run.dtype)
    # the exact prior's score (D(x, σ_min) − x)/σ_min² adds up to 1/σ_min² to the step's stiffness (the
    # denoiser's Jacobian is ≤ 1)
    prior_stiffness = 0.0
    if prior == "exact":  # the network's denoiser at σ_min: D(x, σ) = x̂0 of α·x at the t where σ_t/α_t = σ
        prior_sigma = max(float(prior_sigma_min), ve_min)
        prior_stiffness = 1.0 / prior_sigma**2
        t_prior = _times(schedule, np.array([prior_sigma]))
        a_prior = float(schedule.alpha(t_prior))
        t_prior = t_prior.to(device=device, dtype=run.dtype)

    # under Poisson noise τ and the largest weight are per sample (shape (batch, 1, …)): so are lip and ℓ
    ndim = 1 + len(run.sample_shape)
    tau = per_sample(problem.sigma_y, ndim) if tau is None else float(tau)
    w_max = 1.0 if problem.weight is None else per_sample(problem.weight.flatten(1).amax(1), ndim)
    lip = problem.operator.lipschitz() * w_max / tau**2 if problem.operator.linear else None
    if lr is None:
        lr = 1.0 / lip
    root = torch.sqrt if isinstance(lip, torch.Tensor) else math.sqrt

    batch = len(run.noise)
    sample_size = math.prod(run.sample_shape)
    x = float(sig[0]) * run.noise.normal(run.sample_shape, step=-1, dtype=run.dtype)
    for i in run.steps("daps"):
        # 1. x̂0 by the Euler PF-ODE dx/dσ = (x − D(x, σ))/σ from σ_i to 0
        xv = x
        for j in range(ode_steps):
            s, s_next = inner[i, j], inner[i, j + 1]
            x0 = run.predict_at(float(a_inner[i, j]) * xv, t_dev[i, j].expand(batch)).x0
            xv = x0 if s_next == 0 else xv + (s_next - s) / s * (xv - x0)
        x0hat = xv
        # 2. Langevin on x0
        sigma = float(sig[i])
        ell = lr * (1.0 + i / steps * (lr_min_ratio - 1.0))
        if lip is not None:
            cap = 1.0 / (lip + 1.0 / sigma**2 + prior_stiffness)
            ell = torch.minimum(cap, torch.as_tensor(ell).to(cap)) if isinstance(cap, torch.Tensor) else min(ell, cap)
        sqrt_ell, sqrt_2ell = root(ell), root(2 * ell)
        xl = x0hat
        if mc == "hmc":
            velocity = run.noise.normal(run.sample_shape, step=i, sub=2, dtype=run.dtype)
        for k in range(langevin_steps):
            # one Langevin step's noise at a time (all of them at once is 100 images per sample at 256²)
            z = run.noise.normal(run.sample_shape, step=i, sub=0, dtype=run.dtype, offset=k * sample_size)
            if prior == "gaussian":
                prior_score = (x0hat - xl) / sigma**2
            else:
                denoised = run.predict_at(a_prior * xl, t_prior.expand(batch)).x0
                prior_score = (x - xl) / sigma**2 + (denoised - xl) * prior_stiffness
            score = -problem.data_grad(xl) / tau**2 + prior_score
            if mc == "langevin":
                xl = xl + ell * score + sqrt_2ell * z
            else:
                velocity = momentum * velocity + sqrt_ell * score + math.sqrt(2 * (1 - momentum)) * z
                xl = xl + sqrt_ell * velocity
        # 3. re-noise
        if sig[i + 1] > 0:
            x = xl + float(sig[i + 1]) * run.noise.normal(run.sample_shape, step=i, sub=1, dtype=run.dtype)
        else:
            x = xl
        run.step_done(i, x, x0hat)
    return x


register_solver("daps_1k", default_steps=200, steps_meaning="annealing steps", validate=_validate, grid=_grid,
                summary="DAPS-1K preset: 200 annealing steps × 5 Euler ODE steps (1000 NFE), 100 Langevin steps")(daps)
register_solver("daps_100", default_steps=50, steps_meaning="annealing steps", validate=_validate, grid=_grid,
                defaults={"ode_steps": 2},
                summary="DAPS-100 preset: 50 annealing steps × 2 Euler ODE steps (100 NFE), 100 Langevin steps")(daps)
