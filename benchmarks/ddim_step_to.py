"""diffusers' DDIM rule where it skips part of the trajectory (``ddim(step_to=...)``, which DiffsolveScheduler
uses for such DDIMScheduler configs) against diffsolve's rule (the default).

    python benchmarks/ddim_step_to.py

Table 1: largest relative difference of the final sample of DiffsolveScheduler's full loop against diffusers'
DDIMScheduler (tiny random UNet2DModel, benchmarks/scheduler_suite.py's) for trailing / linspace spacings at
step counts that do not divide 1000. Table 2: RMSE to the exact PF-ODE solution of Gaussian mixtures (4-D, 3
components, 32 samples; diffusers' discrete linear schedule, trailing grid ending at ᾱ_0) of both rules on the
same grid, and their ratio (diffusers / diffsolve), per mixture seed. Asserted in tests/test_ddim_step_to.py.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffsolve import DiffsolveScheduler, sample
from diffsolve.diffusers_grids import diffusers_grid
from diffsolve.schedules import DiscreteVP
from diffsolve.testing import GaussianMixture
from scheduler_suite import X_T, loop, make_tiny_unet

CONFIGS = [("trailing", 7, False), ("trailing", 30, True), ("linspace", 7, True), ("linspace", 30, True)]
ORACLE_STEPS = [7, 15, 30, 60, 120, 240]
MIXTURE_SEEDS = [0, 1, 2, 3]


def main() -> None:
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()
    unet = make_tiny_unet(seed=2)
    print("| DDIMScheduler config | steps | epsilon | v_prediction | sample |")
    print("|---|---|---|---|---|")
    for spacing, steps, to_one in CONFIGS:
        cells = []
        for prediction in ("epsilon", "v_prediction", "sample"):
            theirs = DDIMScheduler(prediction_type=prediction, clip_sample=False, timestep_spacing=spacing,
                                   set_alpha_to_one=to_one)
            ours = DiffsolveScheduler.from_config(theirs.config, sampler="ddim")
            ref = loop(theirs, unet, steps)
            cells.append(f"{((loop(ours, unet, steps) - ref).abs().max() / ref.abs().max()).item():.1e}")
        print(f"| {spacing}, set_alpha_to_one={to_one} | {steps} | " + " | ".join(cells) + " |")

    discrete = DiscreteVP(DDPMScheduler().alphas_cumprod.double())
    x_T = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    print("\n| mixture seed | rule | " + " | ".join(f"{n} steps" for n in ORACLE_STEPS) + " |")
    print("|---|---|" + "---|" * len(ORACLE_STEPS))
    ratios = {n: [] for n in ORACLE_STEPS}
    for seed in MIXTURE_SEEDS:
        gmm = GaussianMixture.random(4, 3, discrete, seed=seed)
        exact = gmm.ode_solution(x_T, 1.0, 1.0 / discrete.num_train_timesteps)
        errors = {"diffsolve": [], "diffusers": []}
        for n in ORACLE_STEPS:
            g = diffusers_grid(discrete, n, "DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": False})
            for rule, options in (("diffsolve", {}), ("diffusers", {"step_to": g.step_to.tolist()})):
                x = sample(gmm.as_model(), "ddim", n, x_T=x_T, grid=g.t, **options)
                errors[rule].append(((x - exact) ** 2).mean().sqrt().item())
            ratios[n].append(errors["diffusers"][-1] / errors["diffsolve"][-1])
        for rule, e in errors.items():
            print(f"| {seed} | {rule} | " + " | ".join(f"{v:.2e}" for v in e) + " |")
    print("| all | ratio diffusers / diffsolve (min–max) | "
          + " | ".join(f"{min(r):.2f}–{max(r):.2f}" for r in ratios.values()) + " |")


if __name__ == "__main__":
    main()
