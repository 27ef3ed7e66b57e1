"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023; arXiv 2310.13268) with empirical model statistics (EMS).

**Formulation.** diffsolve writes the solver in the data-prediction form, so that zero statistics give exactly
our DPM-Solver++ (:mod:`..dpm_solver_pp`). With x̂0 the model's data prediction and, per dimension, a
coefficient l_λ, the probability-flow ODE in λ = log(α/σ) reads

    dx/dλ = (d log σ/dλ + l_λ) x + α_λ f_θ(x, λ),        f_θ = x̂0 − l_λ x/α_λ,

and with the affine model f_θ' ≈ s_λ f_θ + b_λ of its λ-derivative along the trajectory, the function
g_θ(λ) = e^{−S(λ)} f_θ − B(λ) (S = ∫_{λ_s}^λ s, B = ∫_{λ_s}^λ e^{−S} b) is nearly constant. The exact solution
from s to t (L = ∫_{λ_s}^λ l) is

    x_t = (σ_t/σ_s) e^{L_t} x_s + σ_t ∫ e^{λ + L_t − L + S} (g_θ(λ) + B(λ)) dλ,

and the solver replaces g_θ by the polynomial through g at the current and previous points (order p = number
of points; "pseudo-order": the k-th derivative from the divided difference of the k + 1 nearest points only).
The weight integrals are split into the exact DPM-Solver++ part, σ_t ∫ e^λ ((λ−λ_s)/h)^k dλ = α_t k! h
φ_{k+1}(−h), plus a correction ∝ e^{L_t − L + S} − 1 integrated by the trapezoid rule on the EMS grid
(subdivided ×4, statistics piecewise linear in λ): with l = s = b = 0 the correction is exactly zero and the
update is DPM-Solver++ (order 2: the φ2 "heun" form; order 3: our 3M with the 2·hφ3 weight) to round-off.

The statistics come from :mod:`.ems` (computed) or :mod:`.storage` (saved, shipped, checked);
the step weights from :mod:`.coefficients`.

The corrector (UniPC-like, no extra evaluation) redoes the last step with the new point's f included; like
the official code it keeps f_θ (equivalently N_θ) at the new point fixed and only moves x.

**Relation to the paper's and the official code's variables.** The paper (and thu-ml/DPM-Solver-v3) use the
noise form N_θ = σ ε_θ − l^p x; since α x̂0 = x − σ ε̂, the two are the same ODE with l = 1 − l^p, s = s^p,
b = −b^p (f = −f^p). Their "degenerated" DPM-Solver++ setting l^p = 1, s = b = 0 is our l = s = b = 0.

**Timesteps** are snapped to the EMS grid: every interior sampling time moves to the nearest EMS λ point;
t_start and t_end must lie on the grid (an end time outside or between its points is an error, never a
silent misalignment), and two times snapping to one point is an error (more steps than the grid resolves).
logSNR steps that divide ``n_lambda`` (120 = 2³·3·5 by default: 5, 6, 8, 10, 12, 15, 20 …) land exactly.

**Default grid: time-quadratic** (t uniform in √t). The statistics make the nearly linear ends of the
trajectory (very noisy, nearly clean) cheap to integrate, so the steps are best spent in the middle of the λ
range, where the data distribution's modes separate; for linear-β schedules (DDPM, score-SDE VP) the
time-quadratic grid does that, and on the Gaussian-mixture oracle it beat logSNR and time-uniform for v3 at
5–10 NFE (benchmarks/dpm_solver_v3.py). For the cosine schedule, time-uniform has that shape and is the
better choice (``grid="time_uniform"``).

**Half-corrector.** ``half_corrector=True`` applies the corrector only at points with t ≤ T/2 (T the
schedule's largest time), the paper's rule as recorded in the project's reference notes; the official code
tests ``t > 0.5`` instead (the inverse), available as ``half_corrector="official"``.

**Other differences from the official code.** (1) It integrates every coefficient, the φ-function part
included, with the trapezoid rule on the EMS grid, so even its "degenerated" statistics miss DPM-Solver++: by
5.4e-4 relative per coefficient at 120 points, which moves the samples by 1.4e-3–3.2e-3 relative (RMSE) at
5–40 NFE on four Gaussian mixtures (one outlier, 2.7e-2), an error floor that reaches the solver's own error
near 30 NFE and is 2.6–5.2× it at 40 (``benchmarks/dpm_solver_v3.py --official-quadrature``); here that part
is exact. (2) It rounds any time onto the grid, an end time outside it included; here that is an error. (3)
Lower order at the end follows our DPM-Solver++ (diffusers' rule: below 15 steps, order 1 at the last and ≤ 2
at the second-to-last step) rather than min(order, steps − i) at every step count. (4) Its step times and
Vandermonde solves are float32 (``torch.FloatTensor``); ours are host float64. The predictor, pseudo-order and
corrector (same order as the preceding predictor step; one more with ``corrector_pseudo``) follow it.

**Class-conditional models**: statistics are computed either for the model without labels (its null class:
``conditional=False``) or for the guided model at one guidance scale with the data's labels
(``conditional=True``); sampling checks that the run matches.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ...core import multistep_order
from ...model import DiffusionModel
from ...registry import register_sampler
from .coefficients import cached_device_plan
from .storage import EMS, shipped_ems

Tensor = torch.Tensor
F64 = torch.float64


@register_sampler("dpm_solver_v3", default_grid="time_quadratic")
def dpm_solver_v3(run, x, *, ems=None, order: int = 3, pseudo_order: bool = False, corrector: bool = True,
                  corrector_pseudo: bool = False, half_corrector: bool | str = False, lower_order_final: bool = True):
    """DPM-Solver-v3 (Zheng et al. 2023): multistep predictor (orders 1–3, pseudo-order) + corrector, with EMS.

    ``ems``: an EMS, a path to a saved one, or None for a model that ships statistics (digits16). Sampling
    times are snapped to the EMS grid (t_start and t_end must be grid points). ``corrector``: the UniPC-like
    corrector of the same order as the preceding predictor step (one order higher with ``corrector_pseudo``,
    whose derivatives are then pseudo-order estimates); ``half_corrector``: True applies it only at t ≤ T/2,
    "official" only at t > T/2 (the official code's test). With l = s = b = 0, ``corrector=False`` and
    ``pseudo_order=False`` this is ``dpm_solver_pp`` (order 2 with ``solver_type="heun"``).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if half_corrector not in (False, True, "official"):
        raise ValueError(f"half_corrector: expected False, True or 'official', got {half_corrector!r}")
    g = run.grid
    steps = g.steps
    if steps < order:
        raise ValueError(f"order {order} needs at least {order} steps (NFE) for the multistep warm-up, got steps={steps}; "
                         f"use order <= {steps} or more steps")
    model = run.model
    stats = _resolve_ems(ems, model)
    stats.check(model, tuple(x.shape[1:]), conditional=run.class_labels is not None,
                guidance_scale=run.guidance_scale)
    if g.sigma[-1] == 0:
        raise ValueError("t_end=0 lies outside the EMS grid (λ = +∞); end at the EMS grid's last time instead")
    idx, snapped = snap_to_ems(g, stats)
    run.set_grid(snapped)
    g = run.grid
    t_half = 0.5 * float(model.schedule.valid_range[1])
    plan = _step_plan(g, order, bool(pseudo_order), corrector, corrector_pseudo, half_corrector, lower_order_final,
                      t_half)
    l_steps, updates = cached_device_plan(stats, idx, g, plan, tuple(x.shape[1:]), x.dtype, x.device)
    x_at: dict[int, Tensor] = {}  # x_m and f_m of the last steps, by step index m (the plan's nodes)
    f_at: dict[int, Tensor] = {}
    for i in run.steps("dpm_solver_v3"):
        pred = run.predict(x, i)
        f_at[i] = pred.x0 if l_steps[i] is None else pred.x0 - l_steps[i] * x / float(g.alpha[i])
        (corrector_key, predictor_key), (corrector_update, predictor_update) = plan[i], updates[i]
        if corrector_update is not None:
            x = corrector_update(x_at[i - 1], [f_at[m] for m in corrector_key[2]])
        x_at[i] = x
        x_at.pop(i - 4, None), f_at.pop(i - 4, None)
        x = predictor_update(x, [f_at[m] for m in predictor_key[2]])
        run.step_done(i, x, pred.x0)
    return x


def _step_plan(g, order: int, pseudo_order: bool, corrector: bool, corrector_pseudo: bool, half_corrector,
               lower_order_final: bool, t_half: float) -> list[tuple[tuple | None, tuple]]:
    """Per step i: the corrector's update (s, t, nodes, pseudo) that revises x_i before it enters the
    history (None where none runs), and the predictor's update from x_i to x_{i+1}."""
    plan, p_prev = [], 0
    for i in range(g.steps):
        corr = None
        if corrector and i >= 1 and (half_corrector is False or (g.t[i] <= t_half) == (half_corrector is True)):
            c = p_prev + int(bool(corrector_pseudo))
            if c > 1:
                corr = (i - 1, i, (i - 1, i, *(i - 2 - k for k in range(c - 2))), bool(corrector_pseudo))
        p = multistep_order(i, g.steps, order, lower_order_final, final_to_zero=False)
        plan.append((corr, (i, i + 1, tuple(i - k for k in range(p)), bool(pseudo_order))))
        p_prev = p
    return plan


def _resolve_ems(ems, model: DiffusionModel) -> EMS:
    if isinstance(ems, EMS):
        return ems
    if isinstance(ems, (str, os.PathLike)):
        return EMS.load(ems)
    if ems is None:
        found = shipped_ems(model)
        if found is None:
            raise ValueError("dpm_solver_v3 needs empirical model statistics for this model: pass ems= (an EMS or a "
                             "path to one; compute them with diffsolve.samplers.dpm_solver_v3.compute_ems or "
                             "`diffsolve ems`); no statistics shipped with diffsolve match this model")
        return found
    raise TypeError(f"ems: expected an EMS, a path or None, got {type(ems).__name__}")


def snap_to_ems(grid, ems: EMS) -> tuple[np.ndarray, np.ndarray]:
    """EMS indices of the sampling times and the snapped times (float64). Interior times move to the nearest
    grid λ; the first and last must lie on the grid (else ``ValueError``); indices must strictly increase."""
    lam_e = ems.lam.to(F64).numpy()
    n = len(lam_e) - 1
    lo, hi = lam_e[0], lam_e[-1]
    delta = (hi - lo) / n
    tol = 1e-6 * delta
    lam = np.asarray(grid.lam, dtype=np.float64)
    t = np.asarray(grid.t, dtype=np.float64)
    t_e = ems.t.to(F64).numpy()
    for name, k in (("t_start", 0), ("t_end", len(lam) - 1)):
        if not (lo - tol <= lam[k] <= hi + tol):
            raise ValueError(f"{name}={t[k]:.6g} (λ = {lam[k]:.6g}) lies outside the EMS grid, which covers "
                             f"t ∈ [{t_e[-1]:.6g}, {t_e[0]:.6g}] (λ ∈ [{lo:.6g}, {hi:.6g}]): sample within it or "
                             f"compute EMS with this {name}")
        j = int(round((lam[k] - lo) / delta))
        if abs(lam[k] - lam_e[j]) > tol:
            j0 = int(np.floor((lam[k] - lo) / delta))
            near = ", ".join(f"{t_e[i]:.6g}" for i in sorted({max(j0, 0), min(j0 + 1, n)}))
            raise ValueError(f"{name}={t[k]:.6g} is not a point of the EMS grid (n_lambda={n}, Δλ={delta:.4g}); the "
                             f"nearest grid times are {near}: pass one of them or recompute the EMS for this {name}")
    idx = np.clip(np.rint((lam - lo) / delta), 0, n).astype(np.int64)
    if np.any(np.diff(idx) <= 0):
        k = int(np.argmax(np.diff(idx) <= 0))
        raise ValueError(f"{len(t) - 1} steps on this grid do not fit the EMS grid (n_lambda={n}): times {t[k]:.6g} "
                         f"and {t[k + 1]:.6g} snap to the same EMS point; use fewer steps, a logSNR grid, or EMS with "
                         "a larger n_lambda")
    snapped = ems.t.to(F64).numpy()[idx].copy()
    snapped[0], snapped[-1] = t[0], t[-1]
    return idx, snapped
