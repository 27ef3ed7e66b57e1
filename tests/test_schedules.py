import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffsolve.schedules import EDM, GRIDS, DiscreteVP, VPCosine, VPLinear, get_schedule, time_grid

DISCRETE_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]


def vp_schedules():
    return [VPLinear(), VPCosine()] + [DiscreteVP.from_config(DDPMScheduler(**c).config) for c in DISCRETE_CONFIGS]


@pytest.mark.parametrize("schedule", vp_schedules(), ids=repr)
def test_vp_alpha_sigma_lambda_roundtrip(schedule):
    lo, hi = schedule.valid_range
    t = torch.linspace(lo, hi, 1001, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-14, rtol=0)
    lam = schedule.lambda_(t)
    assert torch.allclose(lam, torch.log(a) - torch.log(s), atol=1e-10, rtol=0)
    assert (lam[1:] < lam[:-1]).all(), "λ must decrease with t"
    assert (schedule.t_from_lambda(lam) - t).abs().max() <= 1e-10
    # α, σ as functions of λ alone agree with α(t), σ(t)
    a2, s2 = schedule.alpha_sigma_from_lambda(lam)
    assert torch.allclose(a2, a, atol=1e-12) and torch.allclose(s2, s, atol=1e-12)


def test_edm_roundtrip():
    sch = EDM()
    t = torch.logspace(math.log10(0.002), math.log10(80), 200, dtype=torch.float64)
    assert torch.equal(sch.alpha(t), torch.ones_like(t)) and torch.allclose(sch.sigma(t), t)
    assert (sch.t_from_lambda(sch.lambda_(t)) - t).abs().max() / t.max() <= 1e-14


@pytest.mark.parametrize("config", DISCRETE_CONFIGS, ids=lambda c: c["beta_schedule"])
def test_discrete_equals_diffusers_alphas_cumprod(config):
    ref = DDPMScheduler(**config).alphas_cumprod.double()
    sch = DiscreteVP.from_config(DDIMScheduler(**config).config)  # any scheduler's config works
    n = torch.arange(len(ref))
    assert torch.allclose(sch.alpha(sch.timestep_to_t(n)) ** 2, ref, rtol=1e-14, atol=0)
    assert torch.allclose(sch.model_time(sch.timestep_to_t(n)), n.double(), atol=1e-9)
    assert sch.alpha(torch.tensor(0.0, dtype=torch.float64)) == 1.0 and sch.sigma(torch.tensor(0.0)) == 0.0


def test_vp_linear_closed_form_and_sde():
    sch = VPLinear(0.1, 20.0)
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    expected = -(20.0 - 0.1) * t**2 / 4 - 0.1 * t / 2
    assert torch.allclose(sch.log_alpha(t), expected, atol=1e-15)
    f, g2 = sch.sde_coefficients(t)
    beta = 0.1 + t * (20.0 - 0.1)
    assert torch.allclose(f, -beta / 2, atol=1e-13) and torch.allclose(g2, beta, atol=1e-12)


@pytest.mark.parametrize("schedule", vp_schedules() + [EDM()], ids=repr)
def test_sde_coefficients_match_finite_differences(schedule):
    # f = d log α/dt and g² = dσ²/dt − 2fσ², checked against central differences
    lo, hi = schedule.valid_range
    t = torch.linspace(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo), 7, dtype=torch.float64) + 1e-4 / 3
    d = 1e-7 * (hi - lo)
    f, g2 = schedule.sde_coefficients(t)
    f_fd = (schedule.log_alpha(t + d) - schedule.log_alpha(t - d)) / (2 * d)
    s2_fd = (schedule.sigma(t + d) ** 2 - schedule.sigma(t - d) ** 2) / (2 * d)
    assert torch.allclose(f, f_fd, rtol=1e-6, atol=1e-8)
    assert torch.allclose(g2, s2_fd - 2 * f * schedule.sigma(t) ** 2, rtol=1e-6, atol=1e-8)


def test_get_schedule_and_errors():
    assert isinstance(get_schedule("vp_linear", beta_max=10.0), VPLinear)
    assert isinstance(get_schedule("vp_cosine"), VPCosine) and isinstance(get_schedule("edm"), EDM)
    with pytest.raises(ValueError, match="expected one of"):
        get_schedule("linear")
    with pytest.raises(ValueError, match="beta_min"):
        VPLinear(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP([0.5, 0.9])
    assert VPLinear().default_range == (1.0, 1e-3)


@pytest.mark.parametrize("kind", [k for k in GRIDS if k not in ("leading", "trailing", "linspace")])
@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), EDM()], ids=repr)
def test_continuous_grids(schedule, kind):
    ts = time_grid(schedule, 12, kind)
    assert len(ts) == 13 and (ts[1:] < ts[:-1]).all()
    assert ts[0] == schedule.default_range[0] and ts[-1] == schedule.default_range[1]
    lam = schedule.lambda_(ts)
    if kind == "logSNR":
        assert torch.allclose(lam.diff(), lam.diff()[:1].expand(12), rtol=1e-9)
    if kind == "time_uniform":
        assert torch.allclose(ts.diff(), ts.diff()[:1].expand(12), rtol=1e-9)
    if kind == "karras":  # ρ = 7 polynomial in σ/α, the EDM grid for EDM
        ramp = (torch.exp(-lam) ** (1 / 7)).diff()
        assert torch.allclose(ramp, ramp[:1].expand(12), rtol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_diffusers_spacings_match_ddim(spacing):
    for steps in (7, 10, 50):
        ref = DDIMScheduler(timestep_spacing=spacing)
        ref.set_timesteps(steps)
        sch = DiscreteVP.from_config(ref.config)
        ts = time_grid(sch, steps, spacing)
        assert ts[-1] == 0
        np.testing.assert_allclose(sch.model_time(ts[:-1]).numpy(), ref.timesteps.numpy(), atol=1e-9)


def test_grid_errors():
    with pytest.raises(ValueError, match="DiscreteVP"):
        time_grid(VPLinear(), 10, "trailing")
    with pytest.raises(ValueError, match="expected one of"):
        time_grid(VPLinear(), 10, "uniform")
    sch = DiscreteVP.from_config(DPMSolverMultistepScheduler().config)
    with pytest.raises(ValueError, match="t_end must be smaller"):
        sch.check_range(0.5, 0.6)
    with pytest.raises(ValueError, match="valid time range"):
        sch.check_range(1.5, 0.1)


@pytest.mark.parametrize("schedule", vp_schedules() + [EDM()], ids=repr)
def test_alpha_sigma_equals_the_separate_evaluations(schedule):
    lo, hi = schedule.valid_range
    t = torch.linspace(lo, hi, 11, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    assert torch.equal(alpha, schedule.alpha(t)) and torch.equal(sigma, schedule.sigma(t))
    alpha32, sigma32 = schedule.alpha_sigma(t.float())
    assert alpha32.dtype == sigma32.dtype == torch.float32 and torch.equal(sigma32, schedule.sigma(t.float()))
