"""Samplers judged by the Gaussian-mixture oracle: exact PF-ODE solution (DOP853, rtol 1e-12) and exact
marginals."""

import math

import numpy as np
import pytest
import torch

from diffsolve import sample
from diffsolve.schedules import EDM, VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

SCHEDULES = [VPLinear(), VPCosine()]


def setup(schedule, batch=64, dim=4, components=3, seed=0):
    gmm = GaussianMixture.random(dim, components, schedule, seed=seed)
    x_T = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if not schedule.is_vp:
        x_T = x_T * schedule.default_range[0]
    t_start, t_end = schedule.default_range
    return gmm, x_T, gmm.ode_solution(x_T, t_start, t_end)


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("schedule", SCHEDULES + [EDM()], ids=repr)
def test_1000_step_dpm_solver_pp_reaches_exact_solution(schedule):
    gmm, x_T, exact = setup(schedule)
    model = gmm.as_model()
    x2 = sample(model, "dpm_solver_pp", 1000, x_T=x_T, grid="logSNR", order=2)
    x3 = sample(model, "dpm_solver_pp", 1000, x_T=x_T, grid="logSNR", order=3)
    scale = exact.abs().max().item()
    assert rmse(x2, exact) <= 1e-5 * scale
    assert (x3 - exact).abs().max().item() <= 1e-5 * scale


def measured_order(model, x_T, exact, sampler, steps, **options):
    errors = [rmse(sample(model, sampler, n, x_T=x_T, grid="logSNR", **options), exact) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


# Tolerances: at these step counts (h = Δλ/N ≈ 0.06 … 0.008) the next-order error term still shifts the
# fitted log-log slope by up to ≈ 0.1 (measured: DDIM 1.00, 2M 1.93, 3M 3.03 on VPLinear); ± 0.15 allows
# for that and fails on an order that is off by one or on a wrong coefficient (diffusers' 3M measures 2.2).
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("sampler,options,order", [
    ("ddim", {}, 1),
    ("dpm_solver_pp", {"order": 2}, 2),
    ("dpm_solver_pp", {"order": 2, "solver_type": "heun"}, 2),
    ("dpm_solver_pp", {"order": 3, "third_order": "exact"}, 3),
])
def test_convergence_order(schedule, sampler, options, order):
    gmm, x_T, exact = setup(schedule)
    steps = [80, 160, 320, 640] if order < 3 else [40, 80, 160, 320]
    slope, errors = measured_order(gmm.as_model(), x_T, exact, sampler, steps, **options)
    assert abs(slope - order) <= 0.15, f"slope {slope:.3f}, errors {errors}"
    assert errors[-1] < 1e-2


@pytest.mark.parametrize("sampler,options", [
    ("dpm_solver_pp", {}), ("ddim", {}), ("ddim", {"eta": 1.0}), ("euler_maruyama", {}),
])
def test_batch_invariance_bitwise_on_gmm(sampler, options):
    gmm = GaussianMixture.random(3, 2, VPLinear(), seed=1)
    model = gmm.as_model()
    seeds = [11, 4, 7, 0, 123, 5, 6, 99]
    full = sample(model, sampler, 12, seeds=seeds, **options)
    for size in (1, 3):
        parts = [sample(model, sampler, 12, seeds=seeds[i : i + size], **options) for i in range(0, len(seeds), size)]
        assert torch.equal(torch.cat(parts), full), f"batch size {size} changed the samples"


@pytest.mark.parametrize("sampler,steps,options", [("euler_maruyama", 500, {}), ("ddim", 200, {"eta": 1.0})])
def test_sde_samplers_reach_the_data_distribution(sampler, steps, options):
    gmm = GaussianMixture.random(2, 3, VPLinear(), seed=2)
    n = 4096
    x_T = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = sample(gmm.as_model(), sampler, steps, x_T=x_T, seeds=range(n), **options)
    ref = gmm.sample_x0(200_000, seed=4)
    mean, var = ref.mean(0), ref.var(0)
    # Monte-Carlo standard errors of the sample mean and variance; 5 of them, plus 2 % of the variance
    # for the O(h) bias of the first-order SDE schemes at these step counts
    se_mean = (var / n).sqrt()
    se_var = var * math.sqrt(2 / n)
    assert ((x.mean(0) - mean).abs() <= 5 * se_mean).all(), (x.mean(0), mean)
    assert ((x.var(0) - var).abs() <= 5 * se_var + 0.02 * var).all(), (x.var(0), var)
    # the nearest-component histogram matches the mixture weights
    nearest = torch.cdist(x, gmm.means).argmin(1)
    ref_nearest = torch.cdist(ref, gmm.means).argmin(1)
    p = torch.bincount(ref_nearest, minlength=3).double() / len(ref)
    q = torch.bincount(nearest, minlength=3).double() / n
    assert ((q - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (q, p)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_diffusers_3m_converges_at_order_2_and_third_order_diffusers_is_it(schedule):
    """``third_order="diffusers"`` is diffusers' own DPMSolverMultistepScheduler at order 3 (full loops on the exact
    ε̂ of a mixture under diffusers' discrete schedule, its own grids, ≤ 1e-5); that rule converges at order 2 on
    the oracle (slope over 80–640 logSNR steps, measured 2.21–2.22), the exact rule at order 3 (the test above)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from diffsolve.diffusers_grids import diffusers_grid
    from diffsolve.schedules import DiscreteVP

    discrete = DiscreteVP(DDPMScheduler().alphas_cumprod.double())
    gmm, x_T, _ = setup(discrete, batch=32)
    for n, spacing in [(10, "linspace"), (25, "trailing"), (40, "leading")]:
        scheduler = DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min", timestep_spacing=spacing)
        scheduler.set_timesteps(n)
        x = x_T.float()
        for t in scheduler.timesteps:
            x = scheduler.step(gmm.eps(x, discrete.timestep_to_t(t).expand(len(x))), t, x).prev_sample
        grid = diffusers_grid(discrete, n, "DPMSolverMultistepScheduler", dict(scheduler.config)).t
        for rule, equal in (("diffusers", True), ("exact", False)):
            ours = sample(gmm.as_model(), "dpm_solver_pp", n, x_T=x_T, grid=grid, order=3, third_order=rule)
            rel = ((ours - x.double()).abs().max() / x.abs().max()).item()
            assert (rel <= 1e-5) == equal, (n, rule, rel)

    gmm, x_T, exact = setup(schedule)
    slope, errors = measured_order(gmm.as_model(), x_T, exact, "dpm_solver_pp", [80, 160, 320, 640], order=3,
                                   third_order="diffusers")
    # an O(h³) local error: slope 2 (approached from above); ±0.15 as above would reject the measured 2.21
    assert 1.85 <= slope <= 2.4, f"slope {slope:.3f}, errors {errors}"
