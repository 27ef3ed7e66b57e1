"""SA-Solver (Xue, Yi, Luo, Zhang, Sun, Li, Ma; NeurIPS 2023; arXiv 2309.05019): a stochastic Adams
predictor–corrector for the variance-controlled diffusion SDEs, in data-prediction form.

The SDE family of the paper (Section 3), indexed by the noise scale τ(t) ≥ 0,

    dx_t = [f(t) x_t − ½ (1 + τ²(t)) g²(t) ∇log p_t(x_t)] dt + τ(t) g(t) dw̄_t,

has the marginals p_t for every τ: τ = 0 is the probability-flow ODE, τ = 1 the reverse SDE of Song et al.
With λ = log(α/σ), the data prediction x_θ = x̂0 and τ constant on a step from t_i to t_{i+1}
(h_i = λ_{i+1} − λ_i, ν_i = 1 + τ_i²), variation of constants gives exactly (the paper's data-parameterised
solution; e^{νλ} integrated against x_θ)

    x_{i+1} = (σ_{i+1}/σ_i) e^{−τ_i² h_i} x_i + ν_i α_{i+1} ∫_0^{h_i} e^{−ν_i (h_i − u)} x_θ(λ_i + u) du
              + σ_{i+1} √(1 − e^{−2 τ_i² h_i}) ξ_i,    ξ_i ~ N(0, I).

SA-Solver replaces x_θ in the integral by its Lagrange interpolant through past model outputs
(θ-nodes (λ_j − λ_i)/h_i; weights b_j = ∫_0^h e^{−ν(h−u)} ℓ_j(u/h) du, :func:`diffsolve.core.exp_lagrange_weights`,
computed once per run on the host in float64 from local offsets — not from the absolute-λ monomial
expansion of the reference code, which cancels in float32 for small steps):

- SA-Predictor (stochastic Adams–Bashforth, eq. (15)), order p: nodes λ_i, λ_{i−1}, …, λ_{i−p+1} with the
  stored outputs x_θ(x̃_i, t_i), …; gives the predicted x̃_{i+1}.
- SA-Corrector (stochastic Adams–Moulton, eq. (18)), order c: after evaluating x_θ(x̃_{i+1}, t_{i+1}), the
  same update from x_i through the nodes λ_{i+1}, λ_i, …, λ_{i−c+2}, with the same noise ξ_i.

It is run in PEC mode (the official code's ``pc_mode="PEC"``, diffusers' ``SASolverScheduler``): the one
model evaluation per step, at the predicted x̃_{i+1}, serves the corrector of step i and the predictors that
follow; the last step is a predictor only, so NFE = steps exactly. (The official code's ``"more_steps"``
mode also corrects the last step and denoises to t = 0, NFE = steps + 2; a grid ending at t = 0 gives
the latter here: its last step, h = ∞, is first order and returns x̂0.) ``callback`` sees the predictor's
x̃_{i+1}, which is what diffusers' ``step`` returns; the corrected x_{i+1} replaces it after the next
evaluation.

Orders (as the official code and diffusers): warm-up p_i = min(p, i + 1) and c_i = min(c, i + 2) for the
corrector of step i; ``lower_order_final`` (default) lowers them towards the end at every step count,
p_i ≤ N − i and c_i ≤ N − i + 1, so the last step is a first-order predictor. That caps the global order
of the ODE solver at 2; pass ``lower_order_final=False`` to keep the full order, which for τ = 0 is p
(predictor only) and min(c, p + 1) with the corrector: in PEC mode the outputs at predicted points differ
by O(h^{min(p,c)+1}) from those at corrected points and enter with O(h) weights (tests/test_sa_solver.py
measures it on the Gaussian-mixture oracle). For τ > 0 the noise term is exact, but x_θ along a Brownian
path is only Hölder-½, so the scheme is a weak first-order SDE solver with higher-order drift.

Order-2 rescaling (``order2_rescaling``, Appendix D; the official code's ``"few_steps"`` mode and diffusers,
always on there): at order 2 (predictor or corrector) the moment M_1 = ∫_0^h e^{−ν(h−u)} (u/h) du = h φ2(−νh)
of the linear interpolation term is replaced by ∫_0^h (u/h) du = h/2. This changes the local error by
O(h³), so the order stays 2; the authors report better few-step samples.

Special cases: p = 1 without corrector is DDIM at τ = 0 and DDPM ancestral sampling (DDIM η = 1) at τ = 1.

τ is evaluated at the start t_i of each step, for the predictor and the corrector of that step (as
diffusers; the official code evaluates it at the step's end t_{i+1} and sets τ = 0 on the last step —
with the paper's interval the two differ only at grid points on the interval's ends).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core import History, exp_lagrange_weights, exp_moments
from ..registry import register_sampler
from ..schedules import DiscreteVP, NoiseSchedule

Tensor = torch.Tensor


def paper_tau_interval(schedule: NoiseSchedule) -> tuple[float, float]:
    """The paper's default τ = 1 region, "timesteps 200 … 800 of 1000", in ``schedule``'s own time t.

    - :class:`DiscreteVP` (N training steps): timesteps 0.2 N … 0.8 N, i.e. t = (0.2 N + 1)/N … (0.8 N + 1)/N
      (0.201 … 0.801 for N = 1000: exactly diffusers' default ``tau_func``, which tests integer timesteps);
    - other VP schedules (t ∈ [0, 1]): t = 0.2 … 0.8 (the official code's ``0.2 <= t <= 0.8``);
    - σ-parameterised schedules (EDM, t = σ): the same noise levels σ/α as the paper's reference DDPM
      (linear β from 1e-4 to 0.02, N = 1000) at timesteps 200 and 800: σ ≈ 0.72 … 25.6.
    """
    if isinstance(schedule, DiscreteVP):
        n = schedule.num_train_timesteps
        lo, hi = schedule.timestep_to_t(torch.tensor([0.2 * n, 0.8 * n], dtype=torch.float64)).tolist()
        return lo, hi
    if schedule.is_vp:
        return 0.2, 0.8
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    ratio = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return float(ratio[200]), float(ratio[800])


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def resolve_tau(tau, schedule: NoiseSchedule, times: Sequence[float]) -> list[float]:
    """τ at each of ``times`` (host floats), from the ``tau`` option; raises ValueError on bad input."""
    if isinstance(tau, str):
        if tau != "paper":
            raise ValueError(f"tau: expected 'paper', a number >= 0, a tuple (t_lo, t_hi, value) or a callable "
                             f"tau(t), got {tau!r}")
        tau = (*paper_tau_interval(schedule), 1.0)
    if callable(tau):
        values = []
        for t in times:
            v = tau(float(t))
            if isinstance(v, Tensor) and v.numel() == 1:
                v = float(v)
            if not (_real(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"tau: the callable returned {v!r} at t={float(t):.6g}; expected a finite "
                                 "number >= 0")
            values.append(float(v))
        return values
    if isinstance(tau, (tuple, list)):
        if len(tau) != 3 or not all(_real(v) for v in tau):
            raise ValueError(f"tau: an interval is a tuple (t_lo, t_hi, value) of three numbers, got {tau!r}")
        t_lo, t_hi, value = (float(v) for v in tau)
        if not t_lo < t_hi:
            raise ValueError(f"tau: the interval (t_lo, t_hi, value) needs t_lo < t_hi, got {tau!r}")
        lo, hi = schedule.valid_range
        for name, v in (("t_lo", t_lo), ("t_hi", t_hi)):
            if not (v == 0 or lo <= v <= hi):
                raise ValueError(f"tau: the interval's {name}={v} lies outside {schedule.name}'s time range "
                                 f"[{lo}, {hi}] (times are the schedule's t, as for grid=/t_start/t_end)")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"tau: the interval's value must be a finite number >= 0, got {value}")
        return [value if t_lo <= float(t) <= t_hi else 0.0 for t in times]
    if _real(tau):
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau: expected a finite number >= 0, got {tau}")
        return [float(tau)] * len(times)
    raise ValueError(f"tau: expected 'paper', a number >= 0, a tuple (t_lo, t_hi, value) or a callable tau(t), "
                     f"got {type(tau).__name__}")


def _check_order(name: str, value, allowed: Sequence[int], note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in allowed:
        raise ValueError(f"{name}: expected an integer in {min(allowed)}–{max(allowed)}{note}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SAUpdate:
    """x_{i+1} = x_coef · x_i + Σ_j weights[j] · x_θ[j] + noise_coef · ξ_i, newest model output first."""

    order: int
    x_coef: float
    weights: tuple[float, ...]
    noise_coef: float


def sa_update_coefficients(grid, i: int, tau: float, nodes: Sequence[float], rescale_order2: bool) -> SAUpdate:
    """Coefficients of the stochastic Adams step t_i → t_{i+1} with Lagrange ``nodes`` θ = (λ − λ_i)/h."""
    h = grid.h(i)
    nu = 1.0 + tau * tau
    moments = exp_moments(len(nodes), h, nu)
    if len(nodes) == 2 and rescale_order2:
        moments[1] = 0.5 * h  # Appendix D: ∫_0^h (u/h) du in place of h φ2(−νh)
    w = exp_lagrange_weights(nodes, h, nu, moments)
    sigma_s, sigma_t, alpha_t = float(grid.sigma[i]), float(grid.sigma[i + 1]), float(grid.alpha[i + 1])
    decay = 1.0 if tau == 0 else math.exp(-tau * tau * h)  # e^{−τ²h}; 0 for h = ∞ and τ > 0
    noise = 0.0 if tau == 0 or sigma_t == 0 else sigma_t * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
    return SAUpdate(len(nodes), (sigma_t / sigma_s) * decay, tuple(nu * alpha_t * wj for wj in w), noise)


def sa_plan(grid, taus: Sequence[float], predictor_order: int, corrector_order: int, lower_order_final: bool,
            rescale_order2: bool) -> tuple[list[SAUpdate], list[SAUpdate | None]]:
    """Predictor and corrector updates of every step (host float64, once per run). ``corrector[i]`` corrects
    the predictor of step i once x_θ at t_{i+1} is known (None: not corrected, e.g. the last step)."""
    n, lam = grid.steps, grid.lam
    predictors, correctors = [], []
    for i in range(n):
        h = grid.h(i)
        p = min(predictor_order, i + 1)
        if lower_order_final:
            p = min(p, n - i)
        if grid.sigma[i + 1] == 0:  # onto t = 0: h = ∞, only the first-order step is defined
            p = 1
        nodes = [0.0] + [float((lam[i - j] - lam[i]) / h) for j in range(1, p)]
        predictors.append(sa_update_coefficients(grid, i, taus[i], nodes, rescale_order2))
        if corrector_order == 0 or i == n - 1:
            correctors.append(None)
            continue
        c = min(corrector_order, i + 2)
        if lower_order_final:
            c = min(c, n - i + 1)
        nodes = [1.0] + [float((lam[i - j] - lam[i]) / h) for j in range(c - 1)]
        correctors.append(sa_update_coefficients(grid, i, taus[i], nodes, rescale_order2))
    return predictors, correctors


def _apply(u: SAUpdate, x: Tensor, outputs: Sequence[Tensor], noise: Tensor | None) -> Tensor:
    out = u.x_coef * x
    for w, m in zip(u.weights, outputs):
        out.add_(m, alpha=w)
    if u.noise_coef != 0.0:
        out.add_(noise, alpha=u.noise_coef)
    return out


@register_sampler("sa_solver", default_grid="time_uniform")
def sa_solver(
    run, x, *, predictor_order: int = 2, corrector_order: int | None = 2,
    tau: float | tuple[float, float, float] | Callable[[float], float] | str = "paper",
    lower_order_final: bool = True, order2_rescaling: bool = True,
):
    """SA-Solver (Xue et al. 2023): stochastic Adams predictor (order 1–4) / corrector (0–4), noise scale tau.

    Options:
        predictor_order: 1–4 (SA-Predictor, eq. 15). corrector_order: 1–4 (SA-Corrector, eq. 18); 0 or None
            switches the corrector off (a pure stochastic Adams–Bashforth sampler). The paper recommends 3/4
            unguided and 2/2 (the default, as diffusers) with guidance.
        tau: the SDE's noise scale τ(t) ≥ 0: a number (0: the probability-flow ODE, 1: the reverse SDE); an
            interval ``(t_lo, t_hi, value)``: τ = value for t_lo ≤ t ≤ t_hi and 0 elsewhere, in the
            schedule's time t (the time of ``grid=``/``t_start``/``t_end``; σ for EDM); a callable
            ``tau(t) -> float`` of that time; or ``"paper"`` (default): τ = 1 on the paper's interval
            (:func:`paper_tau_interval`: t ∈ [0.201, 0.801] for a 1000-step DiscreteVP, [0.2, 0.8] for other
            VP schedules), 0 elsewhere. τ is taken at the start of each step.
        lower_order_final: lower the orders over the last steps at any step count (diffusers, official code).
        order2_rescaling: the Appendix-D rescaling of order-2 coefficients (diffusers, official few-step code).
    """
    p = _check_order("predictor_order", predictor_order, (1, 2, 3, 4))
    c = 0 if corrector_order is None else _check_order("corrector_order", corrector_order, (0, 1, 2, 3, 4),
                                                       " (0 or None: no corrector)")
    for name, value in (("lower_order_final", lower_order_final), ("order2_rescaling", order2_rescaling)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected True or False, got {value!r}")
    g = run.grid
    taus = resolve_tau(tau, g.schedule, g.t[:-1])
    predictors, correctors = sa_plan(g, taus, p, c, lower_order_final, order2_rescaling)

    hist = History(max(p, c - 1, 1))  # x̂0 at t_i, t_{i−1}, … (evaluated at the predicted points)
    x_start, noise = x, None  # the corrected x_i and ξ_i of the step being taken
    for i in run.steps("sa_solver"):
        x0 = run.predict(x, i).x0
        if i > 0 and correctors[i - 1] is not None:
            x = _apply(correctors[i - 1], x_start, [x0, *hist.values], noise)
        hist.push(float(g.lam[i]), x0)
        step = predictors[i]
        noise = run.randn_like(x, step=i) if step.noise_coef != 0.0 else None
        x_start = x
        x = _apply(step, x, hist.values, noise)
        run.step_done(i, x, x0)
    return x
