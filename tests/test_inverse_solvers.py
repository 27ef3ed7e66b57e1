"""``diffsolve.solve``: bad input is a clear error before any network call; solvers are batched per sample
(seeded, batch-size invariant, no coupling between samples); registry, presets and info."""

import pytest
import torch

import diffsolve
from diffsolve import DiffusionModel, solve
from diffsolve.inverse import (MRI, Inpainting, MatrixOperator, PhaseRetrieval, PoissonNoise,
                               SuperResolution, get_solver, list_solvers, measure)
from diffsolve.schedules import DiscreteVP, VPLinear
from diffsolve.testing import GaussianMixture

from conftest import CountingNet, make_tiny_unet


@pytest.fixture
def counted():
    net = CountingNet()
    return DiffusionModel(net, VPLinear(), "epsilon", sample_shape=(1, 8, 8)), net


BOX = Inpainting.box((1, 8, 8), 4, position=(2, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(y=torch.zeros(2, 1, 4, 4)), r"y: expected shape \(batch, 1, 8, 8\)"),
    (dict(y=torch.zeros(2, 64)), r"y: expected shape \(batch, 1, 8, 8\)"),
    (dict(y=torch.full((2, 1, 8, 8), float("nan"))), "y: contains NaN or Inf"),
    (dict(y=torch.zeros(2, 1, 8, 8).index_put_((torch.tensor([1]),), torch.tensor(float("inf")))),
     r"y: contains NaN or Inf \(first in sample 1\)"),
    (dict(y=torch.zeros(2, 1, 8, 8, dtype=torch.complex64)), "Inpainting makes real measurements"),
    (dict(y=[[0.0]]), "y: expected a tensor"),
    (dict(operator=Inpainting(torch.ones(8, 8)), y=torch.zeros(2, 8, 8)),
     r"Inpainting takes samples of shape \(8, 8\) \(its mask's shape\), but the model makes samples of shape "
     r"\(1, 8, 8\)"),
    (dict(operator=Inpainting(torch.ones(1, 8, 7)), y=torch.zeros(2, 1, 8, 7)), "its mask's shape"),
    (dict(operator="inpaint"), "operator: expected a diffsolve.inverse operator"),
    (dict(noise=-0.1), "sigma: expected a finite noise level >= 0"),
    (dict(noise="x"), "noise: expected GaussianNoise"),
    (dict(noise=None), "noise: give the measurement's noise model"),
    (dict(method="dds", zeta=0.3), r"unknown option\(s\) \['zeta'\] \('zeta' is an option of dps\)"),
    (dict(method="dps", cg_steps=3), r"unknown option\(s\) \['cg_steps'\] \('cg_steps' is an option of dds\)"),
    (dict(method="dds", langevin_steps=3), r"'langevin_steps' is an option of daps"),
    (dict(method="nope"), "unknown solver 'nope'; valid names: daps, daps_100, daps_1k, dds, dps"),
    (dict(steps=0, method="dds"), r"steps: expected an integer >= 1 \(DDIM steps \(= NFE\) of dds\)"),
    (dict(steps=2.5), "steps: expected an integer >= 1"),
    (dict(seeds=[1, 2, 3]), r"seeds: expected one seed per measurement \(2\), got 3"),
    (dict(method="dds", eta=1.5), "eta: expected a number >= 0 and <= 1"),
    (dict(method="dds", cg_steps=-1), "cg_steps: expected an integer >= 0"),
    (dict(method="dds", gamma=-1.0), "gamma: expected a number >= 0"),
    (dict(method="dps", zeta=float("nan")), "zeta: expected a number >= 0"),
    (dict(method="daps", lr=0.0), "lr: expected a number > 0"),
    (dict(method="daps", noise=0.0), "tau: the measurement is noiseless"),
    (dict(method="daps_100", sigma_min=200.0), "sigma_max must exceed sigma_min"),
    (dict(method="daps_100", mc="mala"), r"mc: expected one of \['langevin', 'hmc'\], got 'mala'"),
    (dict(method="daps_100", prior="score-t"), r"prior: expected one of \['gaussian', 'exact'\], got 'score-t'"),
    (dict(method="daps_100", momentum=1.5), "momentum: expected a number >= 0 and <= 1"),
    (dict(method="daps_100", prior_sigma_min=0.0), "prior_sigma_min: expected a number > 0"),
    (dict(method="dds", operator=PhaseRetrieval(shape=(1, 8, 8)), y=torch.zeros(2, 1, 12, 12)),
     "solver 'dds' needs a linear operator; PhaseRetrieval is nonlinear"),
    (dict(method="daps_100", operator=PhaseRetrieval(shape=(1, 8, 8)), y=torch.zeros(2, 1, 12, 12)),
     "lr: PhaseRetrieval is nonlinear, so DAPS cannot derive its Langevin step"),
    (dict(operator=MRI(torch.ones(8, 8)), y=torch.zeros(2, 1, 8, 8, dtype=torch.complex64)),
     "complex domain"),
    (dict(class_labels=[1, 2]), "not class-conditional"),
    (dict(callback=3), "callback: expected a callable"),
    (dict(noise=PoissonNoise(10.0), operator=MRI(torch.ones(8, 8), complex_input=False),
          y=torch.zeros(2, 1, 8, 8, dtype=torch.complex64)), "Poisson noise needs real measurements"),
])
def test_bad_input_is_a_clear_error_before_any_network_call(counted, kwargs, match):
    model, net = counted
    args = dict(operator=BOX, y=torch.zeros(2, 1, 8, 8), method="dps", noise=0.05, steps=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        solve(model, args.pop("operator"), args.pop("y"), args.pop("method"), **args)
    assert net.calls == 0 and model.nfe == 0


def test_model_type_is_checked():
    with pytest.raises(TypeError, match="model: expected a diffsolve DiffusionModel"):
        solve(object(), BOX, torch.zeros(1, 1, 8, 8), noise=0.1)


def test_latent_models_are_refused_before_any_network_call():
    """A VAE pipeline (``is_latent``, e.g. diffsolve's TextToImageModel) samples latents the operators cannot
    measure: refused with a clear error, even when the shapes happen to fit."""

    class LatentModel(DiffusionModel):
        is_latent = True

    net = CountingNet()
    model = LatentModel(net, VPLinear(), "epsilon", sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="samples VAE latents; .* latent-space inverse problems are not supported"):
        solve(model, BOX, torch.zeros(2, 1, 8, 8), "dds", noise=0.05, steps=3)
    assert net.calls == 0 and model.nfe == 0


def test_registry_presets_and_top_level_api():
    assert diffsolve.solve is solve
    assert {"dps", "dds", "daps", "daps_1k", "daps_100"} <= set(list_solvers())
    dps, dds = get_solver("dps"), get_solver("dds")
    assert dps.default_steps == 1000 and dps.options == {"zeta": 1.0, "clip_x0": False, "checkpointing": False}
    assert dds.default_steps == 50 and dds.options["cg_steps"] == 5 and dds.options["eta"] == 0.85 and dds.linear_only
    k1, k100 = get_solver("daps_1k"), get_solver("daps_100")
    assert (k1.default_steps, k1.options["ode_steps"], k1.options["langevin_steps"]) == (200, 5, 100)
    assert (k100.default_steps, k100.options["ode_steps"], k100.options["langevin_steps"]) == (50, 2, 100)
    assert get_solver("daps").options == k1.options


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(6, 3, VPLinear(), seed=1)


@pytest.mark.parametrize("method,kw", [("dps", dict(steps=20, zeta=0.1)), ("dds", dict(steps=8)),
                                       ("daps_100", dict(steps=6, langevin_steps=5))])
def test_batch_size_invariance_and_info(gmm, method, kw):
    """Sample k depends only on (y_k, seed_k): the same result alone as inside any batch; NFE and info."""
    model = gmm.as_model()
    op = MatrixOperator(torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = gmm.sample_x0(4, seed=2)
    y = measure(op, x, 0.05, seed=10)
    out, info = solve(model, op, y, method, noise=0.05, seeds=[7, 8, 9, 10], return_info=True, **kw)
    alone = solve(model, op, y[2:3], method, noise=0.05, seeds=[9], **kw)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.allclose(out[2:3], alone, atol=1e-12)
    nfe = {"dps": kw["steps"], "dds": kw["steps"], "daps_100": kw["steps"] * 2}[method]
    assert info.nfe == nfe and info.method == method and info.steps == kw["steps"] and info.wall_time > 0
    again = solve(model, op, y, method, noise=0.05, seeds=[7, 8, 9, 10], **kw)
    assert torch.equal(again, out)  # seeded


def test_dps_norms_are_per_sample_through_a_network():
    """A batch-mate with a huge residual does not change a sample's DPS trajectory (the official code's single
    batch norm would rescale every sample's step); gradients flow through the network although solve runs
    under no_grad and the network's parameters do not require grad."""
    unet = make_tiny_unet()
    model = DiffusionModel(unet, DiscreteVP((1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)).cumprod(0)))
    model.sample_shape = (3, 8, 8)
    op = SuperResolution(2, shape=(3, 8, 8))
    y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    y_wild = y.clone()
    y_wild[1] = 50.0
    kw = dict(noise=0.05, steps=5, seeds=[0, 1], zeta=0.5)
    a = solve(model, op, y, "dps", **kw)
    b = solve(model, op, y_wild, "dps", **kw)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert not torch.allclose(a[1], b[1], atol=1e-2)
    plain = solve(model, op, y, "dps", **{**kw, "zeta": 0.0})
    assert not torch.allclose(a[0], plain[0], atol=1e-4)  # the likelihood step did something


def test_dds_cg_is_exact_projection_for_noiseless_inpainting(gmm):
    """Noiseless form (σ_y = 0): CG from x̂0 on AᴴA x = Aᴴ y reaches the projection in one step for a mask,
    so the reconstruction matches y exactly on the observed coordinates."""
    model = gmm.as_model()
    op = Inpainting.random((6,), 0.5, seed=3)
    x = gmm.sample_x0(5, seed=4)
    y = measure(op, x, 0.0)
    out = solve(model, op, y, "dds", noise=0.0, steps=10)
    observed = op.mask.bool()
    assert torch.allclose(out[:, observed], x[:, observed], atol=1e-10)


def test_poisson_measurements_are_accepted_and_weighted(gmm):
    model = gmm.as_model()
    op = Inpainting.random((6,), 0.3, seed=1)
    x = gmm.sample_x0(3, seed=0).clamp(-1, 1)
    noise = PoissonNoise(100.0)
    y = measure(op, x, noise, seed=0)
    for method, kw in [("dds", dict(steps=10)), ("dps", dict(steps=10, zeta=0.1)), ("daps_100", dict(steps=5))]:
        out = solve(model, op, y, method, noise=noise, **kw)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())


def _poisson_case(gmm):
    """A 5×6 matrix measurement with few photons (rate 20: per-element variances differ by > 10×), and the last
    state of a run: (operator, y, noise, weights, x at t_{N−1}, t_{N−1})."""
    A = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) / 6**0.5
    op = MatrixOperator(A)
    noise = PoissonNoise(20.0)
    y = measure(op, gmm.sample_x0(4, seed=2).clamp(-1, 1), noise, seed=3)
    # the likelihood's Gaussian approximation (PoissonNoise's docstring), written out: var_i = (high − low)
    # (y_i − low)/rate floored at one count, relative to σ_y² = their mean over the sample (Problem.sigma_y)
    var = (2.0 * (y + 1.0) / 20.0).clamp_min(4.0 / 400.0)
    weights = var.mean(1, keepdim=True) / var
    assert float(weights.max() / weights.min()) > 10
    return op, A, y, noise, weights


def _last_state(model, op, y, noise, method, steps, **options):
    states = {}
    out = solve(model, op, y, method, noise=noise, steps=steps,
                callback=lambda i, t, x, x0: states.update({i: (t, x.detach().clone())}), **options)
    t_last, x_last = states[steps - 2]
    return out, t_last, x_last


def test_dds_solves_the_poisson_weighted_normal_equations(gmm):
    """DDS's last step returns the data-consistent x̂0*; with as many CG steps as unknowns that is the exact
    solution of the weighted system (I + γ Aᵀ W A) x = x̂0 + γ Aᵀ W y, W the Poisson inverse-variance weights
    relative to each sample's σ_y² and γ = r²/σ_y² (r² = s²/(1 + s²), s = σ/α at the last model time), solved with
    torch.linalg.solve from x̂0 of the oracle; the unweighted system's solution is far from it."""
    model = gmm.as_model()
    op, A, y, noise, weights = _poisson_case(gmm)
    out, t, x = _last_state(model, op, y, noise, "dds", 6, cg_steps=6)
    schedule = model.schedule
    alpha, sigma = (float(c(torch.tensor(t, dtype=torch.float64))) for c in (schedule.alpha, schedule.sigma))
    x0 = gmm.x0_mean(x, t)
    sigma_y2 = (2.0 * (y + 1.0) / 20.0).clamp_min(4.0 / 400.0).mean(1, keepdim=True)
    gamma = (sigma / alpha) ** 2 / (1 + (sigma / alpha) ** 2) / sigma_y2

    def exact(w):
        lhs = torch.eye(6, dtype=torch.float64) + gamma[:, :, None] * (A.T @ (w[:, :, None] * A))
        return torch.linalg.solve(lhs, x0 + gamma * ((w * y) @ A))

    weighted, unweighted = exact(weights), exact(torch.ones_like(weights))
    assert (out - weighted).abs().max() <= 1e-8 * weighted.abs().max()
    assert (out - unweighted).abs().max() >= 1e-2 * weighted.abs().max()


def test_dps_steps_along_the_poisson_whitened_residual(gmm):
    """DPS's last step (onto t = 0, no noise) is x̂0(x) − ζ ∇_x ‖W^{1/2}(y − A x̂0(x))‖ per sample, W the Poisson
    weights; recomputed here with autograd through the oracle's x̂0, and far from the unweighted step."""
    model = gmm.as_model()
    op, A, y, noise, weights = _poisson_case(gmm)
    zeta = 0.3
    out, t, x = _last_state(model, op, y, noise, "dps", 6, zeta=zeta)

    def step(w):
        xg = x.clone().requires_grad_(True)
        x0 = gmm.x0_mean(xg, t)
        norms = ((w * (y - x0 @ A.T) ** 2).sum(1)).sqrt()
        return x0.detach() - zeta * torch.autograd.grad(norms.sum(), xg)[0]

    weighted, unweighted = step(weights), step(torch.ones_like(weights))
    assert (out - weighted).abs().max() <= 1e-8 * weighted.abs().max()
    assert (out - unweighted).abs().max() >= 1e-3 * weighted.abs().max()


@pytest.mark.parametrize("method,options", [("dds", dict(steps=6)), ("dds", dict(steps=6, gamma=2.0)),
                                            ("dps", dict(steps=6, zeta=0.3)), ("daps_100", dict(steps=3)),
                                            ("daps_100", dict(steps=3, tau=0.2))])
def test_poisson_runs_do_not_depend_on_the_rest_of_the_batch(gmm, method, options):
    """Under Poisson noise each sample's σ_y, weights and (DAPS) Langevin step come from its own measurement:
    a sample solved in a batch equals it solved alone (the same seed), whatever the other measurements are."""
    model = gmm.as_model()
    op, A, y, noise, weights = _poisson_case(gmm)
    batch = solve(model, op, y, method, noise=noise, seeds=[10, 11, 12, 13], **options)
    for k in (0, 3):
        alone = solve(model, op, y[k:k + 1], method, noise=noise, seeds=[10 + k], **options)
        assert (batch[k] - alone[0]).abs().max() <= 1e-12 * alone.abs().max()


def test_non_finite_chain_raises(gmm):
    """A diverging run names its first bad step instead of returning zeros (the official DAPS code's choice)."""
    model = gmm.as_model()
    op = MatrixOperator(torch.eye(6, dtype=torch.float64))
    y = measure(op, gmm.sample_x0(2, seed=0), 0.1, seed=0)
    with pytest.raises(FloatingPointError, match="NaN/Inf at step"):
        solve(model, op, y, "dps", noise=0.1, steps=10, zeta=1e308)


def test_dds_and_dps_on_complex_multicoil_mri():
    """Complex measurements of a real image (2-coil Cartesian MRI, 4× undersampled, a quarter of the data a
    real image needs): DDS's CG and DPS's gradient run through the complex operator and beat the least-squares
    pseudo-inverse by far (measured relative errors: pinv 0.96, DDS 0.13, DPS 0.23)."""
    gmm = GaussianMixture.random(64, 3, VPLinear(), seed=2)
    flat = gmm.as_model()
    model = DiffusionModel(lambda x, t: flat.net(x.flatten(1), t).reshape(x.shape), VPLinear(), "epsilon",
                           sample_shape=(1, 8, 8))
    mask = MRI.cartesian_mask((8, 8), acceleration=4, center_fraction=0.25, seed=0)
    op = MRI(mask, MRI.simulated_coil_maps(2, (8, 8)), complex_input=False)
    x = gmm.sample_x0(6, seed=1).reshape(6, 1, 8, 8)
    y = measure(op, x, 0.01, seed=2)
    assert y.is_complex()
    err = {"pinv": float((op.A_pinv(y) - x).norm() / x.norm())}
    for method, kw in [("dds", dict(steps=30)), ("dps", dict(steps=200, zeta=0.3))]:
        out = solve(model, op, y, method, noise=0.01, **kw)
        err[method] = float((out - x).norm() / x.norm())
    assert err["dds"] < 0.25 * err["pinv"] and err["dps"] < 0.4 * err["pinv"], err
