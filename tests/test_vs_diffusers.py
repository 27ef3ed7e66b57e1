"""Step-by-step agreement with diffusers' own schedulers on a randomly initialised tiny UNet2DModel.

diffusers keeps its schedule in float32, so agreement is to float32 precision: the largest per-step
difference relative to the largest |x| of that step is asserted ≤ 1e-5.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from diffsolve import DiffusionModel, sample
from diffsolve.schedules import DiscreteVP

STEPS = 10


def run_diffusers(unet, scheduler, x_T, **step_kwargs):
    x, states = x_T.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
            states.append(x)
    return states


def run_ours(unet, scheduler, x_T, sampler, grid, **options):
    model = DiffusionModel(unet, DiscreteVP.from_config(scheduler.config), scheduler.config.prediction_type)
    states = []
    out = sample(model, sampler, len(scheduler.timesteps), x_T=x_T, grid=grid, callback=lambda i, t, x, x0: states.append(x), **options)
    assert torch.equal(out, states[-1])
    return states, model


def assert_same_trajectory(ours, ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-5, f"step {i}: relative difference {rel:.2e}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(tiny_unet, prediction_type, spacing):
    scheduler = DDIMScheduler(beta_schedule="linear", prediction_type=prediction_type, set_alpha_to_one=True,
                              timestep_spacing=spacing, clip_sample=False)
    scheduler.set_timesteps(STEPS)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = run_diffusers(tiny_unet, scheduler, x_T, eta=0.0)
    ours, model = run_ours(tiny_unet, scheduler, x_T, "ddim", spacing)
    assert model.nfe == STEPS
    assert_same_trajectory(ours, ref)


def discrete_grid(scheduler):
    """diffusers' inference timesteps as continuous times, ending at t = 0 (final_sigmas_type='zero')."""
    schedule = DiscreteVP.from_config(scheduler.config)
    return torch.cat([schedule.timestep_to_t(scheduler.timesteps), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
# Order 3 is not compared: diffusers' 3M drops the factor 2 on its D2 term (see samplers/dpm_solver_pp.py);
# tests/test_convergence.py judges both third-order updates against the exact ODE solution instead.
@pytest.mark.parametrize("order,solver_type,steps", [(2, "midpoint", 10), (2, "heun", 20), (2, "midpoint", 20), (1, "midpoint", 10)])
def test_dpm_solver_pp_matches_diffusers(tiny_unet, prediction_type, order, solver_type, steps):
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type=prediction_type,
                                            algorithm_type="dpmsolver++", solver_order=order, solver_type=solver_type)
    scheduler.set_timesteps(steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = run_diffusers(tiny_unet, scheduler, x_T)
    ours, _ = run_ours(tiny_unet, scheduler, x_T, "dpm_solver_pp", discrete_grid(scheduler), order=order,
                       solver_type=solver_type)
    assert_same_trajectory(ours, ref)
