"""Accuracy on the Gaussian-mixture oracle: RMSE to the exact PF-ODE solution at 5/10/20/50 steps, diffsolve's
samplers next to diffusers' schedulers run in the same process on the same x_T.

    python benchmarks/gmm_accuracy.py [--dim 8 --components 4 --batch 256 --steps 5 10 20 50]

Setting: a random mixture under the discrete DDPM linear schedule (diffusers' default, N = 1000), from t = 1
(timestep 999) to t = 1/N (timestep 0); the exact solution is DOP853 (rtol 1e-12) on the exact field. Every
method gets the exact ε̂, so the error is discretisation error only. diffusers runs with
``final_sigmas_type="sigma_min"`` / ``set_alpha_to_one=False`` so that it stops at the same time. "ratio" is
diffsolve's best at each NFE over diffusers' best.
"""

from __future__ import annotations

import argparse
import math

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, SASolverScheduler,
                       UniPCMultistepScheduler)

from diffsolve import sample
from diffsolve.schedules import DiscreteVP
from diffsolve.testing import GaussianMixture


def diffusers_run(scheduler, gmm: GaussianMixture, schedule: DiscreteVP, x_T: torch.Tensor, steps: int):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps = gmm.eps(x, schedule.timestep_to_t(t).expand(len(x)))
        x = scheduler.step(eps, t, x).prev_sample
    t_first = float(schedule.timestep_to_t(scheduler.timesteps[0]))
    return x, t_first


def same_nfe(nfe: int) -> int:
    return nfe


def prk_steps(nfe: int) -> int | None:
    """F-PNDM: 3 pseudo Runge–Kutta steps of 4 evaluations, then one per step: NFE = steps + 9."""
    return nfe - 9 if nfe - 9 > 3 else None


def plms_steps(nfe: int) -> int | None:
    """PLMS-only / S-PNDM: one extra evaluation in the first (improved-Euler) step: NFE = steps + 1."""
    return nfe - 1 if nfe > 1 else None


# name → (factory, NFE → steps)
def diffusers_methods(config):
    return {
        "diffusers DDIM (trailing)": (lambda: DDIMScheduler(**config, timestep_spacing="trailing", set_alpha_to_one=False,
                                                            clip_sample=False), same_nfe),
        "diffusers DPM-Solver++ 2M": (lambda: DPMSolverMultistepScheduler(**config, solver_order=2, final_sigmas_type="sigma_min"), same_nfe),
        "diffusers DPM-Solver++ 2M (logSNR)": (lambda: DPMSolverMultistepScheduler(
            **config, solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True), same_nfe),
        "diffusers DPM-Solver++ 3M": (lambda: DPMSolverMultistepScheduler(**config, solver_order=3, final_sigmas_type="sigma_min"), same_nfe),
        "diffusers DPM-Solver++ 3M (logSNR)": (lambda: DPMSolverMultistepScheduler(
            **config, solver_order=3, final_sigmas_type="sigma_min", use_lu_lambdas=True), same_nfe),
        "diffusers UniPC-bh2": (lambda: UniPCMultistepScheduler(**config, solver_order=2, final_sigmas_type="sigma_min"), same_nfe),
        "diffusers PNDM (PRK+PLMS)": (lambda: PNDMScheduler(**config), prk_steps),
        "diffusers PNDM (PLMS only)": (lambda: PNDMScheduler(**config, skip_prk_steps=True), plms_steps),
        "diffusers SA-Solver 3/4, τ = 0": (lambda: SASolverScheduler(**config, predictor_order=3, corrector_order=4,
                                                                     tau_func=lambda t: 0.0), same_nfe),
    }


# name → (sampler, options, grid, NFE → steps)
OURS = {
    "diffsolve ddim": ("ddim", {}, "time_uniform", same_nfe),
    "diffsolve bdia γ=0.5": ("bdia", {"gamma": 0.5}, "time_uniform", same_nfe),
    "diffsolve dpm_solver_pp 2M": ("dpm_solver_pp", {"order": 2}, "logSNR", same_nfe),
    "diffsolve dpm_solver_pp 3M": ("dpm_solver_pp", {"order": 3, "third_order": "exact"}, "logSNR", same_nfe),
    "diffsolve pndm (F-PNDM)": ("pndm", {}, "time_uniform", prk_steps),
    "diffsolve pndm (PLMS only)": ("pndm", {"skip_prk": True}, "time_uniform", plms_steps),
    "diffsolve sa_solver 3/4, τ = 0": ("sa_solver", {"predictor_order": 3, "corrector_order": 4, "tau": 0.0}, "logSNR", same_nfe),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    args = ap.parse_args()

    config = dict(beta_schedule="linear", num_train_timesteps=1000)
    schedule = DiscreteVP.from_config(DDPMScheduler(**config).config)
    gmm = GaussianMixture.random(args.dim, args.components, schedule, seed=args.seed)
    x_T = torch.randn(args.batch, args.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    t_end = 1.0 / schedule.num_train_timesteps
    exact = {1.0: gmm.ode_solution(x_T, 1.0, t_end)}

    def rmse(x, t_first=1.0):
        if t_first not in exact:
            exact[t_first] = gmm.ode_solution(x_T, t_first, t_end)
        return ((x - exact[t_first]) ** 2).mean().sqrt().item()

    rows: dict[str, list[float | None]] = {}  # None: the method needs more evaluations than this NFE
    model = gmm.as_model()
    for name, (sampler, options, grid, steps_for) in OURS.items():
        rows[name] = [None if (n := steps_for(nfe)) is None else
                      rmse(sample(model, sampler, n, x_T=x_T, grid=grid, t_end=t_end, **options)) for nfe in args.nfe]
    for name, (make, steps_for) in diffusers_methods(config).items():
        # the exact reference starts at diffusers' first timestep, so a later start is not penalised
        rows[name] = [None if (n := steps_for(nfe)) is None else rmse(*diffusers_run(make(), gmm, schedule, x_T, n))
                      for nfe in args.nfe]

    print(f"GMM oracle: dim {args.dim}, {args.components} components, batch {args.batch}, DDPM linear, t 1 → 1/N; "
          "RMSE to the exact solution at equal NFE (— : the method needs more evaluations)\n")
    print("| method | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |")
    print("|" + "---|" * (len(args.nfe) + 1))
    for name, errs in rows.items():
        print(f"| {name} | " + " | ".join("—" if e is None else f"{e:.2e}" for e in errs) + " |")

    def best(prefix: str, i: int) -> float:  # NaN (a method that broke down) never counts as best
        return min(v for k, errs in rows.items() if k.startswith(prefix) and (v := errs[i]) is not None and math.isfinite(v))

    ours_best = [best("diffsolve", i) for i in range(len(args.nfe))]
    ref_best = [best("diffusers", i) for i in range(len(args.nfe))]
    print("| **ratio** diffsolve best / diffusers best | " + " | ".join(f"{a / b:.3f}" for a, b in zip(ours_best, ref_best)) + " |")


if __name__ == "__main__":
    main()
