"""Convergence slopes on the Gaussian-mixture oracle, in the setting and over the step ranges of
tests/test_convergence.py (so that README and RESULTS quote what the tests measure).

    python benchmarks/convergence_slopes.py

Setting: a random mixture (dim 4, 3 components, seed 0), 64 samples from x_T ~ N(0, I) (seed 0), logSNR grid from
the schedule's t_start to t_end; error = RMSE to the exact PF-ODE solution (DOP853, rtol 1e-12); slope = −(least-
squares slope of log error against log steps).
"""

from __future__ import annotations

import numpy as np
import torch

from diffsolve import sample
from diffsolve.schedules import VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

METHODS = [
    ("ddim", {}, [80, 160, 320, 640]),
    ("dpm_solver_pp 2M", {"order": 2}, [80, 160, 320, 640]),
    ("dpm_solver_pp 2M heun", {"order": 2, "solver_type": "heun"}, [80, 160, 320, 640]),
    ("dpm_solver_pp 3M exact", {"order": 3, "third_order": "exact"}, [40, 80, 160, 320]),
    ("dpm_solver_pp 3M exact", {"order": 3, "third_order": "exact"}, [80, 160, 320, 640]),
    ("dpm_solver_pp 3M diffusers", {"order": 3, "third_order": "diffusers"}, [40, 80, 160, 320]),
    ("dpm_solver_pp 3M diffusers", {"order": 3, "third_order": "diffusers"}, [80, 160, 320, 640]),
]


def main() -> None:
    torch.set_num_threads(1)
    print("| method | steps | " + " | ".join(repr(s) for s in (VPLinear(), VPCosine())) + " |")
    print("|---|---|---|---|")
    rows = {}
    for schedule in (VPLinear(), VPCosine()):
        gmm = GaussianMixture.random(4, 3, schedule, seed=0)
        x_T = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        exact = gmm.ode_solution(x_T, *schedule.default_range)
        for name, options, steps in METHODS:
            sampler = name.split()[0]
            errors = [((sample(gmm.as_model(), sampler, n, x_T=x_T, grid="logSNR", **options) - exact) ** 2).mean().sqrt()
                      .item() for n in steps]
            rows.setdefault((name, f"{steps[0]}–{steps[-1]}"), []).append(-np.polyfit(np.log(steps), np.log(errors), 1)[0])
    for (name, steps), slopes in rows.items():
        print(f"| {name} | {steps} | " + " | ".join(f"{s:.2f}" for s in slopes) + " |")


if __name__ == "__main__":
    main()
