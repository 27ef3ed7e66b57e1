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
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

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


def diffusers_methods(config):
    return {
        "diffusers DDIM (trailing)": lambda: DDIMScheduler(**config, timestep_spacing="trailing", set_alpha_to_one=False,
                                                           clip_sample=False),
        "diffusers DPM-Solver++ 2M": lambda: DPMSolverMultistepScheduler(**config, solver_order=2, final_sigmas_type="sigma_min"),
        "diffusers DPM-Solver++ 2M (logSNR)": lambda: DPMSolverMultistepScheduler(
            **config, solver_order=2, final_sigmas_type="sigma_min", use_lu_lambdas=True),
        "diffusers DPM-Solver++ 3M": lambda: DPMSolverMultistepScheduler(**config, solver_order=3, final_sigmas_type="sigma_min"),
        "diffusers DPM-Solver++ 3M (logSNR)": lambda: DPMSolverMultistepScheduler(
            **config, solver_order=3, final_sigmas_type="sigma_min", use_lu_lambdas=True),
        "diffusers UniPC-bh2": lambda: UniPCMultistepScheduler(**config, solver_order=2, final_sigmas_type="sigma_min"),
    }


OURS = {
    "diffsolve ddim": ("ddim", {}, "time_uniform"),
    "diffsolve dpm_solver_pp 2M": ("dpm_solver_pp", {"order": 2}, "logSNR"),
    "diffsolve dpm_solver_pp 3M": ("dpm_solver_pp", {"order": 3}, "logSNR"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
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

    rows: dict[str, list[float]] = {}
    model = gmm.as_model()
    for name, (sampler, options, grid) in OURS.items():
        rows[name] = [rmse(sample(model, sampler, n, x_T=x_T, grid=grid, t_end=t_end, **options)) for n in args.steps]
    for name, make in diffusers_methods(config).items():
        # the exact reference starts at diffusers' first timestep, so a later start is not penalised
        rows[name] = [rmse(*diffusers_run(make(), gmm, schedule, x_T, n)) for n in args.steps]

    header = "| method (NFE = steps) | " + " | ".join(str(n) for n in args.steps) + " |"
    print(f"GMM oracle: dim {args.dim}, {args.components} components, batch {args.batch}, DDPM linear, t 1 → 1/N; RMSE to the exact solution\n")
    print(header)
    print("|" + "---|" * (len(args.steps) + 1))
    for name, errs in rows.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    def best(prefix: str, i: int) -> float:  # NaN rows (a method that broke down) never count as best
        return min(v for k, errs in rows.items() if k.startswith(prefix) and math.isfinite(v := errs[i]))

    ours_best = [best("diffsolve", i) for i in range(len(args.steps))]
    ref_best = [best("diffusers", i) for i in range(len(args.steps))]
    print("| **ratio** diffsolve best / diffusers best | " + " | ".join(f"{a / b:.3f}" for a, b in zip(ours_best, ref_best)) + " |")


if __name__ == "__main__":
    main()
