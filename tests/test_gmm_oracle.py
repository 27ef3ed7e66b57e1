"""The Gaussian-mixture oracle (diffsolve.testing) against independent computations: finite differences,
quadrature, closed forms and Monte Carlo. Everything runs in float64."""

import numpy as np
import pytest
import torch
from scipy import integrate

from diffsolve.schedules import EDM, DiscreteVP, VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

F64 = torch.float64


def _discrete():
    from diffusers import DDPMScheduler

    return DiscreteVP.from_config(DDPMScheduler().config)


# schedule factory and a few times inside its valid range
SCHEDULES = {
    "vp_linear": (VPLinear, (0.02, 0.3, 1.0)),
    "vp_cosine": (VPCosine, (0.02, 0.5, 0.99)),
    "discrete": (_discrete, (0.02, 0.5, 1.0)),
    "edm": (EDM, (0.05, 1.0, 20.0)),
}
schedule_names = pytest.mark.parametrize("name", list(SCHEDULES))


def _alpha_sigma(schedule, t):
    t = torch.tensor(t, dtype=F64)
    return float(schedule.alpha(t)), float(schedule.sigma(t))


def _mixture_1d(schedule):
    return GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[0.3], [0.6]], schedule)


def _quad_moments(gmm, x, alpha, sigma):
    """∫ x0^j p_0(x0) N(x; α x0, σ²) dx0 for j = 0, 1, 2 (1-D mixture) by adaptive quadrature."""
    w, mu, s = gmm.weights.numpy(), gmm.means[:, 0].numpy(), gmm.stds[:, 0].numpy()

    def integrand(x0, j):
        prior = np.sum(w * np.exp(-0.5 * ((x0 - mu) / s) ** 2) / (np.sqrt(2 * np.pi) * s))
        return x0**j * prior * np.exp(-0.5 * ((x - alpha * x0) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)

    lo, hi = float(np.min(mu - 15 * s)), float(np.max(mu + 15 * s))
    points = sorted(set(mu.tolist()) | {min(max(x / alpha, lo), hi)})
    return [integrate.quad(integrand, lo, hi, args=(j,), points=points, epsabs=0, epsrel=1e-12, limit=500)[0]
            for j in range(3)]


# ---- 1. score and ε against finite differences of log p_t ----------------------------------------------
@schedule_names
def test_score_and_eps_match_finite_difference_gradient_of_log_prob(name):
    factory, times = SCHEDULES[name]
    gmm = GaussianMixture.random(dim=3, components=3, schedule=factory(), seed=1)
    h = 1e-3
    for t in times:
        x = gmm.sample_xt(6, t, seed=2)
        # 4th-order central difference: (−f(x+2h) + 8 f(x+h) − 8 f(x−h) + f(x−2h)) / 12h, error O(h⁴)
        stencil = ((2, -1), (1, 8), (-1, -8), (-2, 1))
        fd = torch.stack([sum(c * gmm.log_prob(x + k * h * e, t) for k, c in stencil) / (12 * h)
                          for e in torch.eye(3, dtype=F64)], dim=1)
        score = gmm.score(x, t)
        # tolerance: 1e-6 absolute, relaxed to 1e-6 relative where |score| > 1
        torch.testing.assert_close(score, fd, rtol=1e-6, atol=1e-6)
        alpha, sigma = _alpha_sigma(gmm.schedule, t)
        eps = gmm.eps(x, t)
        torch.testing.assert_close(eps, -sigma * score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps, (x - alpha * gmm.x0_mean(x, t)) / sigma, rtol=1e-9, atol=1e-9)
        r = gmm.responsibilities(x, t)
        assert r.shape == (6, 3) and torch.allclose(r.sum(1), torch.ones(6, dtype=F64))


# ---- 2. E[x_0 | x_t] and p_t against quadrature of Bayes' rule -----------------------------------------
@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_x0_mean_and_log_prob_match_quadrature(name):
    factory, times = SCHEDULES[name]
    gmm = _mixture_1d(factory())
    for t in times:
        alpha, sigma = _alpha_sigma(gmm.schedule, t)
        x = torch.tensor([[-2.0], [-0.4], [0.3], [1.7], [3.0]], dtype=F64) * alpha
        moments = [_quad_moments(gmm, float(xi), alpha, sigma) for xi in x[:, 0]]
        z, m1 = (torch.tensor([m[j] for m in moments], dtype=F64) for j in (0, 1))
        torch.testing.assert_close(gmm.x0_mean(x, t)[:, 0], m1 / z, rtol=0, atol=1e-8)
        torch.testing.assert_close(gmm.log_prob(x, t), torch.log(z), rtol=0, atol=1e-8)


# ---- 3. the oracle as a DiffusionModel -------------------------------------------------------------------
@schedule_names
def test_as_model_gives_the_same_prediction_for_every_prediction_type(name):
    factory, times = SCHEDULES[name]
    gmm = GaussianMixture.random(dim=4, components=3, schedule=factory(), seed=3)
    t = torch.tensor(times, dtype=F64).repeat(4)  # a different time per sample
    x = gmm.sample_xt(len(t), t, seed=4)
    eps, x0 = gmm.eps(x, t), gmm.x0_mean(x, t)
    for prediction in ("epsilon", "x0", "v", "score"):
        model = gmm.as_model(prediction)
        assert model.sample_shape == (4,) and model.prediction == prediction
        pred = model.predict(x, t)
        torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-10, msg=prediction)
        torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-10, msg=prediction)
    assert gmm.as_model("v").predict(x.float(), t.float()).eps.dtype == torch.float32


# ---- 4. the probability-flow ODE reference solution -------------------------------------------------------
@schedule_names
def test_ode_solution_single_gaussian_matches_closed_form(name):
    factory, _ = SCHEDULES[name]
    schedule = factory()
    mu, s = torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.1, 0.7, 1.3], dtype=F64)
    gmm = GaussianMixture([1.0], mu[None], s[None], schedule)
    t_start, t_end = schedule.default_range
    x_T = gmm.sample_xt(16, t_start, seed=5)
    out = gmm.ode_solution(x_T, t_start, t_end)

    def alpha_std(t):
        a, sig = _alpha_sigma(schedule, t)
        return a, torch.sqrt(a**2 * s**2 + sig**2)

    (a_T, std_T), (a_t, std_t) = alpha_std(t_start), alpha_std(t_end)
    z = (x_T - a_T * mu) / std_T  # conserved along the PF-ODE of a Gaussian
    assert out.dtype == F64 and out.shape == x_T.shape
    torch.testing.assert_close(out, a_t * mu + std_t * z, rtol=0, atol=1e-9)


def _check_matches_marginal(gmm, x, t, k=5.0):
    """Sample mean, variance and mean responsibilities of x against p_t's exact values, within k standard
    errors (E_{p_t}[r_k] = w_k exactly)."""
    alpha, sigma = _alpha_sigma(gmm.schedule, t)
    w = gmm.weights[:, None]
    mean = alpha * (w * gmm.means).sum(0)
    var = (w * (alpha**2 * (gmm.stds**2 + gmm.means**2) + sigma**2)).sum(0) - mean**2
    n = len(x)
    assert ((x.mean(0) - mean).abs() <= k * (var / n).sqrt()).all()
    sq = (x - x.mean(0)) ** 2
    assert ((x.var(0) - var).abs() <= k * sq.std(0) / n**0.5).all()
    r = gmm.responsibilities(x, t)
    assert ((r.mean(0) - gmm.weights).abs() <= k * r.std(0) / n**0.5).all()


@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_ode_solution_pushes_p_T_to_p_t(name):
    factory, _ = SCHEDULES[name]
    gmm = GaussianMixture.random(dim=2, components=3, schedule=factory(), seed=6)
    t_start, t_end = gmm.schedule.default_range
    x_T = gmm.sample_xt(2000, t_start, seed=7)
    _check_matches_marginal(gmm, x_T, t_start)
    _check_matches_marginal(gmm, gmm.ode_solution(x_T, t_start, t_end), t_end)


def test_ode_solution_rejects_t_zero():
    gmm = GaussianMixture.random(dim=2, components=2, schedule=VPLinear())
    with pytest.raises(ValueError, match="t_end > 0"):
        gmm.ode_solution(torch.zeros(1, 2, dtype=F64), 1.0, 0.0)


# ---- 5. exact posteriors of linear-Gaussian measurements --------------------------------------------------
def test_posterior_single_gaussian_matches_standard_formula():
    rng = np.random.default_rng(8)
    mu, s = rng.standard_normal(3), rng.uniform(0.2, 1.0, 3)
    A, y, sigma_y = rng.standard_normal((2, 3)), rng.standard_normal((4, 2)), 0.3
    gmm = GaussianMixture([1.0], mu[None], s[None], VPLinear())
    post = gmm.posterior(A, y, sigma_y)
    cov = np.linalg.inv(np.diag(1 / s**2) + A.T @ A / sigma_y**2)
    means = (cov @ (mu / s**2 + y @ A / sigma_y**2).T).T  # (B, D)
    assert post.weights.shape == (4, 1) and post.means.shape == (4, 1, 3)
    torch.testing.assert_close(post.weights, torch.ones(4, 1, dtype=F64))
    torch.testing.assert_close(post.mean(), torch.from_numpy(means), rtol=0, atol=1e-12)
    torch.testing.assert_close(post.covariance(), torch.from_numpy(cov).expand(4, 3, 3), rtol=0, atol=1e-12)


def test_posterior_mixture_1d_matches_quadrature():
    gmm, a, sigma_y = _mixture_1d(VPLinear()), 0.8, 0.4
    for y in (-1.5, 0.2, 1.0, 2.5):
        post = gmm.posterior([[a]], [y], sigma_y)
        z, m1, m2 = _quad_moments(gmm, y, a, sigma_y)
        assert abs(float(post.mean()[0]) - m1 / z) < 1e-8
        assert abs(float(post.covariance()[0, 0]) - (m2 / z - (m1 / z) ** 2)) < 1e-8


def test_posterior_of_scaled_identity_is_x0_mean():
    """y = α x_0 + σ n is x_t itself, so E[x_0 | y] is the denoiser's E[x_0 | x_t]."""
    gmm = GaussianMixture.random(dim=3, components=4, schedule=VPLinear(), seed=9)
    alpha, sigma = 0.7, 0.5
    y = gmm.sample_xt(5, 0.3, seed=10)
    post = gmm.posterior(alpha * torch.eye(3, dtype=F64), y, sigma)
    torch.testing.assert_close(post.mean(), gmm.x0_mean_from_alpha_sigma(y, alpha, sigma), rtol=0, atol=1e-12)
    torch.testing.assert_close(post.weights, gmm.responsibilities_from_alpha_sigma(y, alpha, sigma), rtol=0, atol=1e-12)


def test_posterior_noiseless_and_samples():
    gmm = GaussianMixture.random(dim=3, components=3, schedule=VPLinear(), seed=11)
    A, y = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64)
    exact = gmm.posterior(A, y, 0.0)
    torch.testing.assert_close(exact.means @ A.T, y.expand(3, 2), rtol=0, atol=1e-12)  # every component meets y
    torch.testing.assert_close(exact.mean(), gmm.posterior(A, y, 1e-7).mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.sample(50, seed=0) @ A.T, y.expand(50, 2), rtol=0, atol=1e-10)
    post = gmm.posterior(A, y, 0.5)
    x = post.sample(4000, seed=12)
    assert x.shape == (4000, 3) and x.dtype == F64
    std = post.covariance().diagonal().sqrt()
    assert ((x.mean(0) - post.mean()).abs() <= 5 * std / 4000**0.5).all()
    assert post.sample(7, seed=1).shape == (7, 3) and gmm.posterior(A, y.expand(2, 2), 0.5).sample(7).shape == (2, 7, 3)


# ---- 6. construction and bad input ----------------------------------------------------------------------
def test_random_is_reproducible_and_in_range():
    a, b = (GaussianMixture.random(dim=5, components=4, schedule=EDM(), seed=3) for _ in range(2))
    assert torch.equal(a.means, b.means) and torch.equal(a.stds, b.stds) and torch.equal(a.weights, b.weights)
    assert a.means.shape == (4, 5) and a.dim == 5 and a.num_components == 4
    assert ((a.stds >= 0.1) & (a.stds <= 0.5)).all() and abs(float(a.weights.sum()) - 1) < 1e-15
    x0 = a.sample_x0(10, seed=0)
    assert x0.shape == (10, 5) and x0.dtype == F64 and torch.equal(x0, a.sample_x0(10, seed=0))


@pytest.mark.parametrize("weights, means, stds, match", [
    ([0.5, 0.5], [[0.0, 1.0]], [[1.0, 1.0]], r"weights: expected shape \(1,\)"),
    ([1.0], [0.0, 1.0], [[1.0, 1.0]], r"means: expected shape \(K, D\)"),
    ([1.0], [[0.0, 1.0]], [[1.0]], r"stds: expected shape \(1, 2\)"),
    ([1.0], [[0.0, 1.0]], [[1.0, -0.1]], r"stds: expected finite values > 0"),
    ([0.0, 1.0], [[0.0], [1.0]], [[1.0], [1.0]], r"weights: expected finite values > 0"),
])
def test_constructor_rejects_bad_input(weights, means, stds, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(weights, means, stds, VPLinear())


def test_methods_reject_bad_input():
    gmm = GaussianMixture.random(dim=2, components=2, schedule=VPLinear())
    with pytest.raises(TypeError, match="schedule"):
        GaussianMixture([1.0], [[0.0]], [[1.0]], "vp_linear")
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 2\)"):
        gmm.score(torch.zeros(4, 3, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="expected a scalar or shape"):
        gmm.eps(torch.zeros(4, 2, dtype=F64), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="prediction"):
        gmm.as_model("noise")
    with pytest.raises(ValueError, match=r"A: expected shape \(M, 2\)"):
        gmm.posterior(torch.zeros(1, 3), torch.zeros(1), 0.1)
    with pytest.raises(ValueError, match=r"y: expected shape \(1,\) or \(B, 1\)"):
        gmm.posterior(torch.ones(1, 2), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        gmm.posterior(torch.ones(1, 2), torch.zeros(1), -1.0)
    with pytest.raises(ValueError, match="full row rank"):
        gmm.posterior(torch.ones(2, 2), torch.zeros(2), 0.0)
