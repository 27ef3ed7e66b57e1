"""PNDM (F-PNDM, S-PNDM, diffusers' skip_prk PLMS): step-by-step agreement with diffusers' PNDMScheduler,
convergence orders on the Gaussian-mixture oracle, prediction types, NFE and bad input."""

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from diffsolve import DiffusionModel, sample
from diffsolve.core import adams_bashforth_weights
from diffsolve.schedules import EDM, DiscreteVP, VPLinear
from diffsolve.testing import GaussianMixture

from conftest import make_tiny_unet

# ---- diffusers, step by step ----------------------------------------------------------------------------


def diffusers_grid_points(scheduler):
    """The scheduler's timesteps at the main grid points and the indices of its calls that end on them.

    PRK mode calls the network 4 times per PRK step (t, midpoint, midpoint, t − δ) for 3 steps, then once
    per PLMS step; skip_prk_steps calls it twice in the first step (t, then t − δ for the improved-Euler
    average) and once after.
    """
    ts = scheduler.timesteps
    if len(ts) == 1:  # skip_prk_steps with 1 step: a single plain step
        return ts, [0]
    if scheduler.config.skip_prk_steps:
        return torch.cat([ts[:1], ts[2:]]), list(range(1, len(ts)))
    return torch.cat([ts[0:12:4], ts[12:]]), [3, 7, 11] + list(range(12, len(ts)))


# diffusers keeps its schedule in float32: agreement is to float32 precision (largest per-step difference
# relative to the largest |x| of that step ≤ 1e-5; measured ≤ 5e-7). Epsilon prediction only: diffusers'
# PNDMScheduler converts v-prediction in _get_prev_sample with the step's starting sample and ᾱ_t, also for
# PRK stages evaluated at intermediate points and for PLMS combinations of outputs from earlier points, so
# it is no oracle for v (test_prediction_types_agree checks v against the exact GMM field instead). Even
# timestep spacings only (1000 // steps even): for odd ones diffusers rounds the PRK midpoint to an integer
# timestep (and transfers x1 to T − ⌊r/2⌋ but evaluates it at T − ⌈r/2⌉), where we use the exact midpoint.
@pytest.mark.parametrize("skip_prk,steps", [(False, 10), (False, 20), (False, 4), (True, 10), (True, 2), (True, 1)])
def test_pndm_matches_diffusers(skip_prk, steps):
    unet = make_tiny_unet()
    # set_alpha_to_one=True: diffusers' last step goes to ᾱ = 1, our grid's last point t = 0 (with False it
    # would go to ᾱ_0, the timestep-0 point t = 1/N itself, a step of length 0)
    scheduler = PNDMScheduler(beta_schedule="linear", skip_prk_steps=skip_prk, set_alpha_to_one=True,
                              timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    schedule = DiscreteVP.from_config(scheduler.config)
    main, call_at_point = diffusers_grid_points(scheduler)
    grid = torch.cat([schedule.timestep_to_t(main), torch.zeros(1, dtype=torch.float64)])
    assert len(grid) == steps + 1
    if not skip_prk:  # diffusers' PRK midpoints are exact: our midpoints (t_i + t_{i+1})/2 are the same times
        assert torch.equal(2 * scheduler.timesteps[1:12:4], main[:3] + main[1:4])

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x, ref = x_T.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
            ref.append(x)
    ref = [ref[k] for k in call_at_point]

    model = DiffusionModel(unet, schedule, "epsilon")
    ours = []
    out, info = sample(model, "pndm", steps, x_T=x_T, grid=grid, skip_prk=skip_prk, return_info=True,
                       callback=lambda i, t, x, x0: ours.append(x))
    assert torch.equal(out, ours[-1])
    # steps + 9 (PRK), steps + 1 (skip_prk), but 1 for a single plain step onto t = 0
    assert info.nfe == len(scheduler.timesteps) == (steps + (1 if skip_prk else 9) if steps > 1 else 1)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-5, f"step {i}: relative difference {rel:.2e}"


# ---- convergence on the Gaussian-mixture oracle ----------------------------------------------------------


def gmm_setup(schedule, t_start, t_end, batch=64, seed=0):
    gmm = GaussianMixture.random(4, 3, schedule, seed=seed)
    x_T = torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if not schedule.is_vp:
        x_T = x_T * t_start
    return gmm, x_T, gmm.ode_solution(x_T, t_start, t_end)


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


# The orders, derived (see diffsolve/samplers/pndm.py): the transfer φ is the Euler step of dy/dρ = ε̂ in
# y = x/α, ρ = σ/α, so the gradient parts are classical methods in ρ —
# - EDM (σ = t = ρ) on a time-uniform grid: steps are equal in ρ and the t-midpoint is the ρ-midpoint, so PRK
#   is RK4 and PLMS is AB4: F-PNDM order 4. skip_prk's warm-up (improved Euler, then one AB2 step) has a local
#   error O(δ³), which caps it at order 3 (it shows once that error outgrows the O(δ⁴) of the AB4 steps: on
#   σ ∈ [0.6, 0.05] from 20 steps; on [1, 0.1] only beyond ~320 steps, measured 3.57 → 3.12). S-PNDM
#   (improved Euler + AB2) order 2.
# - VP on a logSNR grid (likewise time-uniform grids and diffusers' timesteps): steps in ρ change by a factor
#   e^{−Δλ} per step, and AB weights for equal steps leave a local error O(δ³) every step: F-PNDM (and
#   skip_prk, and S-PNDM) converge at order 2, not 4.
# Measured (fitted slopes): EDM F-PNDM 3.96, skip_prk 3.00, S-PNDM 1.98; VPLinear logSNR F-PNDM 2.02,
# S-PNDM 1.92. Tolerance ± 0.15 as in test_convergence.py: the next-order term bends the fitted slope by up
# to ≈ 0.1 at these step counts, and an order off by one or a wrong weight (order ≤ 1) fails.
# Not asserted (too slow to reach its asymptote): on a grid uniform in ρ of a VP schedule PLMS is AB4, but the
# PRK stage at the t-midpoint has abscissa ½ + O(δ), so F-PNDM is of order 3 there; the O(δ³) part is small
# (measured 1.7e-11 at 1280 steps on VPLinear t ∈ [0.3, 0.02], difference to a ρ-midpoint variant, slope
# 3.00) and the slope over 40–640 steps reads 4.0.
CONVERGENCE = [
    (EDM(), (1.0, 0.1), "time_uniform", {}, 4, [40, 80, 160, 320]),
    (EDM(), (0.6, 0.05), "time_uniform", {"skip_prk": True}, 3, [20, 40, 80, 160]),
    (EDM(), (1.0, 0.1), "time_uniform", {"method": "s_pndm"}, 2, [40, 80, 160, 320]),
    (VPLinear(), (1.0, 1e-3), "logSNR", {}, 2, [80, 160, 320, 640]),
    (VPLinear(), (1.0, 1e-3), "logSNR", {"method": "s_pndm"}, 2, [80, 160, 320, 640]),
]


@pytest.mark.parametrize("schedule,interval,grid,options,order,steps", CONVERGENCE,
                         ids=[f"{s!r}-{g}-{o}" for s, _, g, o, *_ in CONVERGENCE])
def test_convergence_order(schedule, interval, grid, options, order, steps):
    gmm, x_T, exact = gmm_setup(schedule, *interval)
    model = gmm.as_model()
    errors = [rmse(sample(model, "pndm", n, x_T=x_T, grid=grid, t_start=interval[0], t_end=interval[1],
                          **options), exact) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.15, f"slope {slope:.3f}, errors {errors}"
    assert errors[-1] < 1e-4 * exact.abs().max().item()


# ---- prediction types, NFE, batch invariance ---------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"method": "s_pndm"}, {"skip_prk": True}])
@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=repr)
def test_prediction_types_agree(schedule, options):
    gmm, x_T, exact = gmm_setup(schedule, *schedule.default_range, batch=16)
    kw = dict(x_T=x_T, grid="logSNR", **options)
    ref = sample(gmm.as_model("epsilon"), "pndm", 100, **kw)
    assert rmse(ref, exact) < 1e-3 * exact.abs().max().item()  # it converges (all variants are order 2 here)
    for prediction in ("v", "x0", "score"):
        out = sample(gmm.as_model(prediction), "pndm", 100, **kw)
        assert (out - ref).abs().max().item() <= 1e-10, prediction


@pytest.mark.parametrize("options,steps,t_end,nfe", [
    ({}, 10, 1e-3, 19), ({}, 4, 1e-3, 13),
    ({"method": "s_pndm"}, 10, 1e-3, 11), ({"method": "s_pndm"}, 1, 1e-3, 2),
    ({"skip_prk": True}, 10, 1e-3, 11), ({"skip_prk": True}, 1, 1e-3, 2),
    # a single step onto t = 0 (σ = 0) is plain DDIM: no network call at σ = 0
    ({"method": "s_pndm"}, 1, 0.0, 1), ({"skip_prk": True}, 1, 0.0, 1),
])
def test_nfe(options, steps, t_end, nfe):
    model = GaussianMixture.random(2, 2, VPLinear(), seed=1).as_model()
    x, info = sample(model, "pndm", steps, seeds=range(3), t_end=t_end, return_info=True, **options)
    assert info.nfe == model.nfe == nfe
    assert bool(torch.isfinite(x).all())


def test_batch_invariance_bitwise():
    model = GaussianMixture.random(3, 2, VPLinear(), seed=1).as_model()
    seeds = [11, 4, 7, 0, 123, 5]
    for options in ({}, {"method": "s_pndm"}, {"skip_prk": True}):
        full = sample(model, "pndm", 8, seeds=seeds, **options)
        parts = [sample(model, "pndm", 8, seeds=seeds[i : i + 2], **options) for i in range(0, len(seeds), 2)]
        assert torch.equal(torch.cat(parts), full), options


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,options,match", [
    (10, {"method": "plms"}, r"method: expected one of \['f_pndm', 's_pndm'\], got 'plms'"),
    (10, {"method": None}, r"method: expected one of .*, got None"),
    (3, {}, r"steps: method='f_pndm' needs more than 3 steps \(3 pseudo Runge–Kutta warm-up steps.*got 3"),
    (1, {"method": "f_pndm"}, r"steps: method='f_pndm' needs more than 3 steps.*got 1"),
    (10, {"skip_prk": "yes"}, r"skip_prk: expected True or False, got 'yes'"),
    (10, {"method": "s_pndm", "skip_prk": True}, r"skip_prk: only method='f_pndm' .* method='s_pndm'"),
])
def test_bad_input_is_a_clear_error_before_any_network_call(steps, options, match):
    model = GaussianMixture.random(2, 2, VPLinear(), seed=1).as_model()
    with pytest.raises(ValueError, match=match):
        sample(model, "pndm", steps, seeds=range(2), **options)
    assert model.nfe == 0


def test_adams_bashforth_weights():
    table = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9], 5: [1901, -2774, 2616, -1274, 251]}
    denominators = {1: 1, 2: 2, 3: 12, 4: 24, 5: 720}
    for k, nums in table.items():
        assert adams_bashforth_weights(k) == pytest.approx([n / denominators[k] for n in nums], rel=1e-15)
    # k-step AB integrates polynomials of degree < k exactly: ∫_0^1 u^m du = Σ_j b_j (−j)^m
    w = adams_bashforth_weights(4)
    for m in range(4):
        assert sum(b * (-j) ** m for j, b in enumerate(w)) == pytest.approx(1 / (m + 1), abs=1e-14)
    with pytest.raises(ValueError, match="order: expected an integer >= 1, got 0"):
        adams_bashforth_weights(0)
