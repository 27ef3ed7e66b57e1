"""SA-Solver (diffsolve/samplers/sa_solver.py): step-by-step agreement with diffusers' ``SASolverScheduler``
(τ = 0, and τ > 0 with the same noise injected into diffusers), convergence order of the τ = 0 solver against
the exact PF-ODE solution of the Gaussian-mixture oracle, the τ = 1 sampler's moments against the exact
mixture, batch invariance and input checks.

Reference precision: diffusers expands the Lagrange basis in absolute λ and evaluates the stochastic Adams
coefficients in float32 (its ``sigmas`` table), which cancels for orders 3–4: stock diffusers differs from
diffsolve's float64 coefficients by up to ~4e-5 relative (3/4 at 20 steps). With that table promoted to
float64 — the reference's algorithm unchanged — the two agree to float32 round-off of the sample arithmetic
(≤ 1e-6 measured). So: ≤ 1e-5 against diffusers with the float64 table, ≤ 1e-4 against stock diffusers.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import SASolverScheduler
from diffusers.schedulers import scheduling_sasolver
from scipy.integrate import quad

from diffsolve import DiffusionModel, sample
from diffsolve.core import SeededNoise, exp_lagrange_weights, lagrange_basis_coefficients
from diffsolve.samplers.sa_solver import paper_tau_interval, resolve_tau
from diffsolve.schedules import EDM, DiscreteVP, VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

SEEDS = [3, 9]


# ---- shared math ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodes", [[0.0], [0.0, -1.0], [0.0, -1.3, -2.1], [0.0, -1.0, -2.0, -3.0], [1.0, 0.0],
                                   [1.0, 0.0, -0.8, -1.9]])
@pytest.mark.parametrize("h", [0.01, 0.4, 3.0])
@pytest.mark.parametrize("nu", [1.0, 1.36, 2.0])
def test_exp_lagrange_weights_match_quadrature(nodes, h, nu):
    a = lagrange_basis_coefficients(nodes)
    for j, theta in enumerate(nodes):  # the basis is cardinal: ℓ_j(θ_k) = δ_jk
        assert np.allclose(np.polynomial.polynomial.polyval(np.array(nodes), a[j]), np.eye(len(nodes))[j], atol=1e-12)
    weights = exp_lagrange_weights(nodes, h, nu)
    for j in range(len(nodes)):
        ref = quad(lambda u: math.exp(-nu * (h - u)) * np.polynomial.polynomial.polyval(u / h, a[j]), 0, h,
                   epsabs=0, epsrel=1e-13)[0]
        assert weights[j] == pytest.approx(ref, rel=1e-10, abs=1e-15 * h)
    assert exp_lagrange_weights([0.0], math.inf, nu) == [pytest.approx(1 / nu, rel=1e-15)]  # a step onto σ = 0


# ---- diffusers, step by step ---------------------------------------------------------------------------------

def run_diffusers(unet, scheduler, x_T):
    x, states = x_T.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
            states.append(x)
    return states


def reference(unet, x_T, steps, float64_table, **config):
    scheduler = SASolverScheduler(beta_schedule="linear", prediction_type="epsilon", **config)
    scheduler.set_timesteps(steps)
    if float64_table:
        scheduler.sigmas = scheduler.sigmas.double()
    return scheduler, run_diffusers(unet, scheduler, x_T)


def run_ours(unet, scheduler, x_T, **options):
    """diffsolve on diffusers' timesteps; diffusers' last sigma is that of timestep 0, i.e. t = 1/N."""
    schedule = DiscreteVP.from_config(scheduler.config)
    grid = torch.cat([schedule.timestep_to_t(scheduler.timesteps), schedule.timestep_to_t(torch.tensor([0]))])
    model = DiffusionModel(unet, schedule, "epsilon")
    states = []
    out = sample(model, "sa_solver", len(scheduler.timesteps), x_T=x_T, seeds=SEEDS, grid=grid,
                 callback=lambda i, t, x, x0: states.append(x), **options)
    assert torch.equal(out, states[-1])
    assert model.nfe == len(scheduler.timesteps)  # PEC: one evaluation per step, the last step uncorrected
    return states


def max_relative_difference(ours, ref):
    assert len(ours) == len(ref)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


@pytest.fixture
def same_noise(monkeypatch):
    """Make diffusers' scheduler draw diffsolve's per-sample noise: its k-th ``randn_tensor`` call (one per
    step, shared by that step's predictor and corrector) returns SeededNoise stream ``step=k``, the draw
    ``run.randn_like(x, step=k)`` gives diffsolve. Patches the reference library only."""
    noise, calls = SeededNoise(SEEDS), [0]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        z = noise.normal(tuple(shape[1:]), step=calls[0], dtype=dtype or torch.float32)
        calls[0] += 1
        return z.to(device) if device is not None else z

    monkeypatch.setattr(scheduling_sasolver, "randn_tensor", randn_tensor)
    return calls


@pytest.mark.parametrize("orders", [(2, 2), (3, 4), (4, 4), (1, 1)])
def test_matches_diffusers_ode(tiny_unet, orders):
    p, c = orders
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    config = dict(predictor_order=p, corrector_order=c, tau_func=lambda t: 0)
    for float64_table, tol in ((True, 1e-5), (False, 1e-4)):
        scheduler, ref = reference(tiny_unet, x_T, 10, float64_table, **config)
        ours = run_ours(tiny_unet, scheduler, x_T, predictor_order=p, corrector_order=c, tau=0.0)
        rel = max_relative_difference(ours, ref)
        assert rel <= tol, f"float64 table {float64_table}: relative difference {rel:.2e}"


# τ = 0.6 separates τ from τ² (equal at τ = 1); "paper" is diffusers' default tau_func (tau_func=None)
@pytest.mark.parametrize("orders,tau,steps", [((2, 2), 1.0, 10), ((3, 4), 1.0, 10), ((3, 4), 0.6, 10),
                                              ((2, 2), "paper", 20)])
def test_matches_diffusers_sde_with_the_same_noise(tiny_unet, same_noise, orders, tau, steps):
    p, c = orders
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tau_func = None if tau == "paper" else (lambda t: tau)
    scheduler, ref = reference(tiny_unet, x_T, steps, True, predictor_order=p, corrector_order=c, tau_func=tau_func)
    assert same_noise[0] == steps
    ours = run_ours(tiny_unet, scheduler, x_T, predictor_order=p, corrector_order=c, tau=tau)
    rel = max_relative_difference(ours, ref)
    assert rel <= 1e-5, f"relative difference {rel:.2e}"
    # the noise matters: without it the trajectories part
    if tau != "paper":
        ode = run_ours(tiny_unet, scheduler, x_T, predictor_order=p, corrector_order=c, tau=0.0)
        assert max_relative_difference(ode, ref) > 1e-2


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_order_schedule_matches_diffusers(lower_order_final):
    """Warm-up and lower-order-final orders of every step, predictor and corrector, as diffusers chooses them
    (its ``this_predictor_order``/``this_corrector_order`` after each step)."""
    from diffsolve.core import TimeGrid
    from diffsolve.samplers.sa_solver import sa_plan

    for steps in (1, 2, 3, 4, 5, 8, 12):
        for p in (1, 2, 3, 4):
            for c in (1, 2, 3, 4):
                scheduler = SASolverScheduler(predictor_order=p, corrector_order=c, tau_func=lambda t: 0,
                                              lower_order_final=lower_order_final)
                scheduler.set_timesteps(steps)
                schedule = DiscreteVP.from_config(scheduler.config)
                grid = TimeGrid(schedule, torch.cat([schedule.timestep_to_t(scheduler.timesteps),
                                                     schedule.timestep_to_t(torch.tensor([0]))]))
                x, ref = torch.zeros(1, 1), []
                for t in scheduler.timesteps:
                    x = scheduler.step(torch.zeros(1, 1), t, x).prev_sample
                    ref.append((scheduler.this_predictor_order, scheduler.this_corrector_order))
                predictors, correctors = sa_plan(grid, [0.0] * steps, p, c, lower_order_final, True)
                assert [u.order for u in predictors] == [r[0] for r in ref], (steps, p, c)
                # the corrector order chosen at the last step is never used (no evaluation follows it)
                assert [u.order for u in correctors[:-1]] == [r[1] for r in ref[:-1]], (steps, p, c)
                assert correctors[-1] is None


def test_paper_interval_is_diffusers_default_tau():
    schedule = DiscreteVP.from_config(SASolverScheduler().config)
    default = SASolverScheduler().tau_func
    timesteps = torch.arange(1000)
    ours = resolve_tau("paper", schedule, schedule.timestep_to_t(timesteps).tolist())
    assert ours == [float(default(int(n))) for n in timesteps]
    assert paper_tau_interval(VPLinear()) == (0.2, 0.8)  # the official code's 0.2 <= t <= 0.8
    lo, hi = paper_tau_interval(EDM())  # σ of the reference DDPM at timesteps 200 and 800
    assert lo == pytest.approx(0.72, abs=0.01) and hi == pytest.approx(25.6, abs=0.2)


# ---- convergence on the Gaussian-mixture oracle (τ = 0: the PF-ODE) ----------------------------------------

def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


# Orders: the predictor alone has order p; PEC with a corrector has min(c, p + 1) (the model is evaluated at
# predicted points, off by O(h^{min(p,c)+1}), and those outputs enter with O(h) weights). lower_order_final is
# off: the reference rule ends on a first-order step at every step count, which caps the order at 2
# (measured 2.4–4.0 → falling for 3/4). The Appendix-D order-2 rescaling (on by default) keeps order 2.
# Tolerance ± 0.15 as tests/test_convergence.py: at these h the next error term moves the fitted slope by
# ≤ 0.1 (measured: p2 2.01, p3 3.02, 2/2 2.06, 2/3 2.98, 3/4 4.07 on VPLinear; 2.00, 3.02, 2.06, 2.97, 4.12
# on VPCosine), while an order off by one or a wrong coefficient moves it by ≥ 0.5. 3/4 uses more steps:
# below 160 the warm-up/pre-asymptotic terms still dominate (slope 3.7 over 20–160).
@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine()], ids=repr)
@pytest.mark.parametrize("p,c,order,steps", [
    (2, 0, 2, [80, 160, 320, 640]),
    (3, 0, 3, [80, 160, 320, 640]),
    (2, 2, 2, [80, 160, 320, 640]),
    (2, 3, 3, [80, 160, 320, 640]),
    (3, 4, 4, [160, 320, 640, 1280]),
])
def test_convergence_order(schedule, p, c, order, steps):
    gmm = GaussianMixture.random(4, 3, schedule, seed=0)
    x_T = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = gmm.ode_solution(x_T, *schedule.default_range)
    model = gmm.as_model()
    errors = [rmse(sample(model, "sa_solver", n, x_T=x_T, grid="logSNR", predictor_order=p, corrector_order=c,
                          tau=0.0, lower_order_final=False), exact) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.15, f"slope {slope:.3f}, errors {errors}"
    assert errors[-1] < 1e-4


def test_first_order_special_cases_are_ddim():
    """p = 1 without corrector: τ = 0 is DDIM, τ = 1 is DDPM ancestral sampling (DDIM η = 1, same noise)."""
    gmm = GaussianMixture.random(3, 2, VPLinear(), seed=1)
    model = gmm.as_model()
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for tau, eta in ((0.0, 0.0), (1.0, 1.0)):
        ours = sample(model, "sa_solver", 25, x_T=x_T, predictor_order=1, corrector_order=0, tau=tau)
        ddim = sample(model, "ddim", 25, x_T=x_T, eta=eta)
        assert torch.allclose(ours, ddim, rtol=1e-12, atol=1e-12), (ours - ddim).abs().max()


# ---- τ = 1: the samples' distribution --------------------------------------------------------------------

@pytest.mark.parametrize("orders", [(2, 2), (3, 4)])
def test_sde_reaches_the_data_distribution(orders):
    gmm = GaussianMixture.random(2, 3, VPLinear(), seed=2)
    n, steps = 4096, 200
    x_T = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = sample(gmm.as_model(), "sa_solver", steps, x_T=x_T, seeds=range(n), predictor_order=orders[0],
               corrector_order=orders[1], tau=1.0)
    # exact moments of p_{t_end} = Σ_k w_k N(α μ_k, α² s_k² + σ²)
    t_end = torch.tensor(gmm.schedule.default_range[1], dtype=torch.float64)
    a, s = gmm.schedule.alpha(t_end), gmm.schedule.sigma(t_end)
    m0 = (gmm.weights[:, None] * gmm.means).sum(0)
    mean = a * m0
    var = a**2 * ((gmm.weights[:, None] * (gmm.stds**2 + gmm.means**2)).sum(0) - m0**2) + s**2
    # 5 Monte-Carlo standard errors (the variance's from the samples' 4th central moment: the mixture is not
    # Gaussian) plus 2 % of the variance for the O(h) weak bias at 200 time-uniform steps (measured: 10–23 % at
    # 50 steps, 2–6 % at 100, within 2 standard errors at 200). A 10 % error in the noise coefficient fails.
    xm, xv = x.mean(0), x.var(0)
    se_mean = (xv / n).sqrt()
    se_var = ((((x - xm) ** 4).mean(0) - xv**2) / n).sqrt()
    assert ((xm - mean).abs() <= 5 * se_mean).all(), (xm, mean)
    assert ((xv - var).abs() <= 5 * se_var + 0.02 * var).all(), (xv, var)
    # the nearest-component histogram matches the mixture weights
    ref = gmm.sample_x0(200_000, seed=4)
    p = torch.bincount(torch.cdist(ref, gmm.means).argmin(1), minlength=3).double() / len(ref)
    q = torch.bincount(torch.cdist(x, gmm.means).argmin(1), minlength=3).double() / n
    assert ((q - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (q, p)


# ---- batch invariance, τ forms, grids ending at t = 0, input errors -----------------------------------------

@pytest.mark.parametrize("options", [{"tau": 1.0}, {"tau": 1.0, "predictor_order": 3, "corrector_order": 4},
                                     {"tau": "paper"}])
def test_batch_invariance_bitwise_on_gmm(options):
    gmm = GaussianMixture.random(3, 2, VPLinear(), seed=1)
    model = gmm.as_model()
    seeds = [11, 4, 7, 0, 123, 5, 6, 99]
    full = sample(model, "sa_solver", 12, seeds=seeds, **options)
    for size in (1, 3):
        parts = [sample(model, "sa_solver", 12, seeds=seeds[i: i + size], **options) for i in range(0, len(seeds), size)]
        assert torch.equal(torch.cat(parts), full), f"batch size {size} changed the samples"


def test_tau_forms_agree():
    gmm = GaussianMixture.random(3, 2, VPLinear(), seed=1)
    model = gmm.as_model()
    run = lambda tau: sample(model, "sa_solver", 12, seeds=range(6), tau=tau)  # noqa: E731
    constant = run(0.7)
    assert torch.equal(run(lambda t: 0.7), constant)
    assert torch.equal(run((0.0, 1.0, 0.7)), constant)  # the interval covers [0, 1]
    assert not torch.equal(run(0.0), constant)
    # the interval and the equivalent callable; τ is taken at each step's start
    assert torch.equal(run((0.3, 0.6, 1.0)), run(lambda t: 1.0 if 0.3 <= t <= 0.6 else 0.0))
    assert torch.equal(run("paper"), run((0.2, 0.8, 1.0)))


def test_grid_ending_at_zero_returns_the_last_x0():
    gmm = GaussianMixture.random(3, 2, VPLinear(), seed=1)
    model = gmm.as_model()
    grid = torch.cat([torch.linspace(1.0, 1e-3, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x0s = []
    out, info = sample(model, "sa_solver", 10, seeds=range(4), grid=grid, tau=0.0, predictor_order=3,
                       corrector_order=4, lower_order_final=False, return_info=True,
                       callback=lambda i, t, x, x0: x0s.append(x0))
    assert info.nfe == 10 and torch.isfinite(out).all()
    assert torch.equal(out, x0s[-1])  # the h = ∞ step is first order: x̂0 at the last point


@pytest.mark.parametrize("options,message", [
    ({"predictor_order": 0}, "predictor_order"),
    ({"predictor_order": 5}, "predictor_order"),
    ({"predictor_order": True}, "predictor_order"),
    ({"predictor_order": 2.0}, "predictor_order"),
    ({"corrector_order": 5}, "corrector_order"),
    ({"corrector_order": -1}, "corrector_order"),
    ({"tau": -0.5}, "tau: expected a finite number >= 0"),
    ({"tau": float("nan")}, "tau"),
    ({"tau": "sde"}, "tau"),
    ({"tau": (0.2, 1.5, 1.0)}, "outside vp_linear's time range"),
    ({"tau": (-0.1, 0.5, 1.0)}, "outside vp_linear's time range"),
    ({"tau": (0.8, 0.2, 1.0)}, "t_lo < t_hi"),
    ({"tau": (0.2, 0.8, -1.0)}, "value"),
    ({"tau": (0.2, 0.8)}, "(t_lo, t_hi, value)"),
    ({"tau": lambda t: -1.0}, "callable returned"),
    ({"lower_order_final": "yes"}, "lower_order_final"),
    ({"order2_rescaling": 1}, "order2_rescaling"),
])
def test_bad_options_fail_before_any_network_call(options, message):
    model = GaussianMixture.random(3, 2, VPLinear(), seed=1).as_model()
    with pytest.raises(ValueError) as err:
        sample(model, "sa_solver", 10, seeds=range(2), **options)
    assert message in str(err.value), str(err.value)
    assert model.nfe == 0
