"""BDIA: one step equals the paper's update evaluated by hand; samples converge to the exact PF-ODE solution of
the Gaussian-mixture oracle and beat DDIM at the paper's settings; γ = 0 is DDIM; inversion followed by sampling
reproduces x0 to round-off (naive DDIM inversion does not); bad input is refused before any network call."""

import numpy as np
import pytest
import torch

from diffsolve import invert, load_model, sample
from diffsolve.data import digits
from diffsolve.schedules import EDM, VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

# (steps, γ): the paper's two settings. γ < 1 over many steps amplifies round-off by (1/γ)^steps on the way back.
SETTINGS = [(10, 0.5), (50, 1.0)]


def relative_error(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def round_trip(model, x0, steps, gamma, **kw):
    inv = invert(model, x0, "bdia", steps, gamma=gamma, **kw)
    assert inv.x_T.shape == x0.shape and inv.extra["x_next"].shape == x0.shape
    return sample(model, **inv.sample_kwargs(), **kw)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_one_step_is_the_papers_update_by_hand(gamma):
    """From a pair (z_0 at t_0, z_1 at t_1) that no DDIM step links (so the backward term is exercised), the
    step to t_2 equals the paper's update (official code's form; time index decreasing towards the data there,
    written here with i = 1 the current point, i − 1 → 0 the earlier and i + 1 → 2 the next one):

        z_2 = z_0 − (1 − γ)(z_0 − z_1) − γ Δ(t_1 → t_0 | z_1) + Δ(t_1 → t_2 | z_1),
        Δ(t_1 → s | z_1) = α_s (z_1 − σ_1 ε̂(z_1, t_1))/α_1 + σ_s ε̂(z_1, t_1) − z_1,

    with ε̂ the oracle's exact noise prediction and α, σ from the schedule, not from diffsolve's DDIM helper."""
    schedule = VPLinear()
    gmm = GaussianMixture.random(3, 3, schedule, seed=4)
    generator = torch.Generator().manual_seed(5)
    z0 = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    z1 = 0.9 * z0 + 0.3 * torch.randn(6, 3, dtype=torch.float64, generator=generator)
    times = torch.tensor([0.8, 0.6, 0.45], dtype=torch.float64)
    ours = sample(gmm.as_model(), "bdia", 2, x_T=z0, x_next=z1, grid=times, gamma=gamma)

    alpha, sigma = schedule.alpha(times), schedule.sigma(times)
    eps = gmm.eps(z1, times[1])

    def delta(s):
        return alpha[s] * (z1 - sigma[1] * eps) / alpha[1] + sigma[s] * eps - z1

    by_hand = z0 - (1 - gamma) * (z0 - z1) - gamma * delta(0) + delta(2)
    assert (ours - by_hand).abs().max().item() <= 1e-12 * by_hand.abs().max().item()


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module", params=[(VPLinear(), "time_uniform"), (VPCosine(), "time_uniform"), (EDM(), "karras")],
                ids=lambda p: repr(p[0]))
def exact_case(request):
    """(model, x_T, exact PF-ODE solution, grid): 64 samples of a 4-D, 3-component mixture; EDM on its Karras grid
    (time-uniform steps in σ are poor for every solver there)."""
    schedule, grid = request.param
    gmm = GaussianMixture.random(4, 3, schedule, seed=0)
    x_T = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_start, t_end = schedule.default_range
    x_T = x_T * (1.0 if schedule.is_vp else t_start)
    return gmm.as_model(), x_T, gmm.ode_solution(x_T, t_start, t_end), grid


@pytest.mark.parametrize("steps,gamma", SETTINGS)
def test_closer_to_the_exact_solution_than_ddim_at_the_papers_settings(exact_case, steps, gamma):
    """The paper's claim: at its settings BDIA-DDIM is more accurate than DDIM with the same evaluations. Measured
    RMSE to the exact solution (VPLinear, VPCosine, EDM): 10 steps γ = 0.5: 0.080, 0.035, 0.033 against DDIM's
    0.115, 0.073, 0.139; 50 steps γ = 1: 0.0034, 0.0009, 0.011 against 0.026, 0.016, 0.028. A step with the wrong
    backward term γ (x_{i−1} − x_i) is 0.21–0.43 (VP) and diverges on EDM."""
    model, x_T, exact, grid = exact_case
    bdia = rmse(sample(model, "bdia", steps, x_T=x_T, gamma=gamma, grid=grid), exact)
    ddim = rmse(sample(model, "ddim", steps, x_T=x_T, grid=grid), exact)
    assert bdia < 0.8 * ddim, (bdia, ddim)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_converges_to_the_exact_solution(exact_case, gamma):
    """Error against the exact PF-ODE solution at 80, 160, 320 steps: it falls at least at first order (measured
    log-log slopes: γ = 0.5 0.92–1.06, γ = 1 1.51–2.00) and ends below 2e-3 (measured ≤ 1.51e-3). The wrong backward
    term γ (x_{i−1} − x_i) leaves an O(1) error that does not fall with the step count."""
    model, x_T, exact, grid = exact_case
    steps = [80, 160, 320]
    errors = [rmse(sample(model, "bdia", n, x_T=x_T, gamma=gamma, grid=grid), exact) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope >= 0.8 and errors[-1] <= 2e-3, (slope, errors)


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=repr)
def test_gamma_zero_is_ddim(schedule):
    model = GaussianMixture.random(3, 2, schedule).as_model()
    assert torch.equal(sample(model, "bdia", 10, shape=(5, 3), gamma=0.0), sample(model, "ddim", 10, shape=(5, 3)))
    # γ > 0 differs from DDIM after the first (plain DDIM) step
    assert not torch.allclose(sample(model, "bdia", 10, shape=(5, 3), gamma=0.5), sample(model, "ddim", 10, shape=(5, 3)))


@pytest.mark.parametrize("steps,gamma", SETTINGS)
def test_gmm_round_trip_is_exact(steps, gamma, capsys):
    gmm = GaussianMixture.random(4, 3, VPLinear(), seed=0)
    model = gmm.as_model()
    x0 = gmm.sample_x0(16, seed=1)
    err64 = relative_error(round_trip(model, x0, steps, gamma), x0)
    err32 = relative_error(round_trip(model, x0.float(), steps, gamma), x0.float())
    ddim = invert(model, x0, "ddim", steps)
    err_ddim = relative_error(sample(model, **ddim.sample_kwargs()), x0)
    with capsys.disabled():
        print(f"\nGMM, {steps} steps, γ={gamma}: BDIA round trip {err64:.1e} (float64), {err32:.1e} (float32); "
              f"naive DDIM inversion {err_ddim:.1e}")
    assert err64 <= 1e-10 and err32 <= 1e-5
    assert err_ddim > 1e-3  # the approximate inversion really is approximate here


def test_edm_round_trip_float64():
    gmm = GaussianMixture.random(4, 3, EDM(), seed=0)
    x0 = gmm.sample_x0(8, seed=2)
    for steps, gamma in SETTINGS:
        assert relative_error(round_trip(gmm.as_model(), x0, steps, gamma), x0) <= 1e-10


@pytest.mark.parametrize("steps,gamma", SETTINGS)
def test_digits16_round_trip_is_exact(steps, gamma):
    model = load_model("digits16")
    images, labels = digits("test")
    x0 = images[:8]
    labels = labels[:8]
    err32 = relative_error(round_trip(model, x0, steps, gamma, class_labels=labels), x0)
    model64 = load_model("digits16", dtype=torch.float64)
    err64 = relative_error(round_trip(model64, x0.double(), steps, gamma, class_labels=labels), x0.double())
    assert err32 <= 1e-5 and err64 <= 1e-10, (err32, err64)


def test_inversion_reports_nfe_and_samples_skip_the_first_step():
    model = GaussianMixture.random(2, 2, VPLinear()).as_model()
    inv = invert(model, torch.zeros(3, 2, dtype=torch.float64), "bdia", 10)
    assert inv.nfe == 10 and inv.extra["gamma"] == 0.5  # the paper's γ at 10 steps
    model.reset_nfe()
    sample(model, **inv.sample_kwargs())
    assert model.nfe == 9  # the pair (x_0, x_1) is given: no first DDIM step
    assert invert(model, torch.zeros(3, 2, dtype=torch.float64), "bdia", 11).extra["gamma"] == 1.0


def test_bad_input_before_any_network_call():
    model = GaussianMixture.random(2, 2, VPLinear()).as_model()
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    cases = [
        (dict(sampler="bdia", gamma=0.0), "gamma=0 makes BDIA plain DDIM"),
        (dict(sampler="bdia", gamma=1.5), r"gamma: expected a value in \[0, 1\], got 1.5"),
        (dict(sampler="bdia", gamma=-0.1), r"gamma: expected a value in \[0, 1\]"),
        (dict(sampler="dpm_solver_pp"), "sampler 'dpm_solver_pp' cannot invert; samplers with an inversion: bdia, ddim"),
        (dict(sampler="bdia", steps=1), "at least 2 steps"),
        (dict(sampler="bdia", t_end=0.0), "invert needs t_end > 0"),
        (dict(sampler="ddim", eta=1.0), "needs eta=0"),
    ]
    for kwargs, match in cases:
        kwargs = {"steps": 10, **kwargs}
        with pytest.raises(ValueError, match=match):
            invert(model, x0, kwargs.pop("sampler"), kwargs.pop("steps"), **kwargs)
    with pytest.raises(ValueError, match=r"x_T: expected shape \(batch, 2\)"):
        invert(model, torch.zeros(3, 5), "bdia", 10)
    with pytest.raises(ValueError, match="x_next: expected the shape of x_T"):
        sample(model, "bdia", 10, x_T=x0, x_next=torch.zeros(3, 3))
    assert model.nfe == 0
    with pytest.warns(UserWarning, match="round-off grows"):
        invert(model, x0, "bdia", 30, gamma=0.5)
