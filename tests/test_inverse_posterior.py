"""DPS, DDS and DAPS against the exact posterior of a linear-Gaussian measurement of a Gaussian mixture.

The prior is the closed-form oracle (``GaussianMixture``, 8-D, 3 components, a perfect denoiser), so every
difference from the exact posterior ``gmm.posterior(A, y, σ_y)`` is the solver's own. Two measurements at
the papers' σ_y = 0.05: random inpainting (4 of 8 coordinates) and a random dense 4×8 matrix.

Errors are stated relative to the posterior's spread √tr Σ. With N = 1000 samples the Monte Carlo error of
a sample mean is √(tr Σ / N), i.e. 0.032 in these units; tolerances are the measured errors (in comments;
deterministic: every sample is seeded) plus about 2× for slack, and stay well below the distance from the
prior mean (≥ 0.9 for both problems), so a solver that ignored y would fail.
"""

import math


import pytest
import torch

from diffsolve import solve
from diffsolve.inverse import Inpainting, MatrixOperator, measure
from diffsolve.schedules import VPLinear
from diffsolve.testing import GaussianMixture

N = 1000
SIGMA_Y = 0.05


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(8, 3, VPLinear(), seed=0)


def problem(gmm, kind):
    if kind == "inpaint":
        op = Inpainting.random((8,), 0.5, seed=1)
        A = torch.diag(op.mask)
    else:
        A = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / math.sqrt(8)
        op = MatrixOperator(A)
    y = measure(op, gmm.sample_x0(1, seed=5), SIGMA_Y, seed=3)
    post = gmm.posterior(A, y[0], SIGMA_Y)
    return op, A, y.expand(N, -1).clone(), post


def mean_error(x, post):
    m, cov = post.mean(), post.covariance()
    return float((x.mean(0) - m).norm() / cov.diagonal().sum().sqrt())


def generalized_eigenvalues(c_hat, c):
    """Eigenvalues of C^{-1/2} Ĉ C^{-1/2}: all 1 when the covariances agree."""
    li = torch.linalg.inv(torch.linalg.cholesky(c))
    return torch.linalg.eigvalsh(li @ c_hat @ li.T)


@pytest.mark.parametrize("kind", ["inpaint", "dense"])
def test_prior_mean_is_far_from_the_posterior_mean(gmm, kind):
    """The yardstick: ignoring y costs ≥ 0.9 in the units of the tolerances below."""
    _, _, _, post = problem(gmm, kind)
    prior_mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert float((prior_mean - post.mean()).norm() / post.covariance().diagonal().sum().sqrt()) > 0.9


# measured: inpaint 0.117, dense 0.037
@pytest.mark.parametrize("kind,tol", [("inpaint", 0.2), ("dense", 0.1)])
def test_dds_mean_is_near_the_posterior_mean(gmm, kind, tol):
    """DDS (100 DDIM steps, the noise-matched γ_t, η = 0.85, 5 CG steps) is not a posterior sampler, but its
    sample mean is close to the posterior mean. Its spread is not the posterior's: it collapses along some
    directions (covariance ratio down to 0.2; measured min 0.20 inpaint, 0.12 dense), unlike DAPS below."""
    op, _, y, post = problem(gmm, kind)
    x = solve(gmm.as_model(), op, y, "dds", noise=SIGMA_Y, steps=100, seeds=range(N))
    err = mean_error(x, post)
    assert err < tol, err
    ratios = generalized_eigenvalues(torch.cov(x.T), post.covariance())
    assert float(ratios.min()) < 0.5, ratios


# measured: inpaint 0.090, dense 0.116
@pytest.mark.parametrize("kind", ["inpaint", "dense"])
def test_dps_mean_is_near_the_posterior_mean(gmm, kind):
    """DPS with 500 ancestral steps and ζ = 0.03 (ζ scales the unit-norm residual direction; the image
    presets' ζ are larger because their residual norms are: see tasks.py). DPS's Jensen-gap approximation
    biases it; ~0.1 of the posterior spread here."""
    op, _, y, post = problem(gmm, kind)
    x = solve(gmm.as_model(), op, y, "dps", noise=SIGMA_Y, steps=500, zeta=0.03, seeds=range(N))
    err = mean_error(x, post)
    assert err < 0.2, err


# measured: inpaint mean 0.312, 6.9 % of the samples in a component of exact weight 2.4e-6, covariance ratios
# within the dominant component [1.01, 1.44]; dense mean 0.084, 1.7 % in one of weight 6.5e-13, ratios [1.03, 1.65]
@pytest.mark.parametrize("kind,mean_tol,max_leak", [("inpaint", 0.45, 0.12), ("dense", 0.15, 0.05)])
def test_daps_samples_spread_like_the_posterior(gmm, kind, mean_tol, max_leak):
    """DAPS-100 (50 annealing × 2 ODE steps) with a Langevin step that mixes on this problem (ℓ = 5e-4
    without decay, 50 steps: ℓ/τ² = 0.2 per step on the data term) is a sampler: no direction collapses
    (every covariance ratio ≥ 0.8, where DDS goes down to 0.12), and its mean is near the posterior mean.

    Its errors are of two kinds, told apart by assigning each sample to the exact posterior component under
    which it is most likely: a few samples land in a component the exact posterior all but excludes (the
    early annealing steps, at large σ, cannot tell the components apart and later ones do not undo that):
    this is most of the mean error and the large covariance ratios of all samples together (7.6 inpaint,
    4.2 dense); within the dominant component the spread is the exact one to within 1.7× (ℓ·L ≤ 0.2 alone
    inflates a variance by ≤ 11 %; on a single Gaussian DAPS is within 0.85–1.13×, see the next test)."""
    op, A, y, post = problem(gmm, kind)
    x = solve(gmm.as_model(), op, y, "daps_100", noise=SIGMA_Y, seeds=range(N), lr=5e-4, lr_min_ratio=1.0,
              langevin_steps=50)
    err = mean_error(x, post)
    assert err < mean_tol, err
    assert float(generalized_eigenvalues(torch.cov(x.T), post.covariance()).min()) > 0.8
    components = [torch.distributions.MultivariateNormal(m, c) for m, c in zip(post.means, post.covariances)]
    nearest = torch.stack([c.log_prob(x) for c in components], 1).argmax(1)
    main = int(post.weights.argmax())
    assert float(post.weights[main]) > 0.999
    leak = float((nearest != main).double().mean())
    assert leak < max_leak, leak
    ratios = generalized_eigenvalues(torch.cov(x[nearest == main].T), post.covariances[main])
    assert float(ratios.min()) > 0.8 and float(ratios.max()) < 2.0, ratios


def _langevin_stage(mc: str, ell: float, precision: torch.Tensor, steps: int, momentum: float = 0.9):
    """K steps of the chain on a Gaussian target of precision P per coordinate, started at u_0 (distance to the
    target mean): u_K = A u_0 + noise. Returns (A, the noise variance). Langevin: u' = (1 − ℓP) u + √(2ℓ) z.
    The official code's damped HMC: v' = m v − √ℓ P u + √(2(1 − m)) z, u' = u + √ℓ v', with v_0 ~ N(0, 1): the
    pair (u, v) is a linear Gaussian recursion, propagated here as the coefficients on u_0 and the noise
    covariance."""
    if mc == "langevin":
        rho = 1.0 - ell * precision
        return rho**steps, 2 * ell * (1 - rho ** (2 * steps)) / (1 - rho**2)
    root, c = math.sqrt(ell), math.sqrt(2 * (1 - momentum))
    # M = [[1 − ℓP, √ℓ m], [−√ℓ P, m]] (v' first, then u' = u + √ℓ v'), b = c (√ℓ, 1)
    m00, m01, m10, m11 = 1 - ell * precision, root * momentum, -root * precision, torch.full_like(precision, momentum)
    b0, b1 = c * root, c
    a0, a1 = torch.ones_like(precision), torch.zeros_like(precision)
    s00, s01, s11 = torch.zeros_like(precision), torch.zeros_like(precision), torch.ones_like(precision)
    for _ in range(steps):
        a0, a1 = m00 * a0 + m01 * a1, m10 * a0 + m11 * a1
        s00, s01, s11 = (m00**2 * s00 + 2 * m00 * m01 * s01 + m01**2 * s11 + b0**2,
                         m00 * m10 * s00 + (m00 * m11 + m01 * m10) * s01 + m01 * m11 * s11 + b0 * b1,
                         m10**2 * s00 + 2 * m10 * m11 * s01 + m11**2 * s11 + b1**2)
    return a0, s00


# the "exact" prior at ℓ = 2e-3 (capped at 1/(1/τ² + 1/σ² + 1/σ_min²)) and σ_min = 0.1: at 5e-4 its chain moves the
# unobserved coordinates by ℓPK ≈ 0.1 of the way, too little for the test to see the prior term's pull
@pytest.mark.parametrize("mc,prior,lr", [("langevin", "gaussian", 5e-4), ("hmc", "gaussian", 5e-4),
                                         ("langevin", "exact", 2e-3)])
def test_daps_follows_its_closed_form_recursion_on_a_gaussian_prior(mc, prior, lr):
    """On a Gaussian prior N(μ, diag s²) with random inpainting, every DAPS stage is linear in x − μ, so the
    law of its output is Gaussian with a mean and variance per coordinate that follow in closed form:
    (1) each Euler step of the PF-ODE multiplies x − μ by 1 + (σ' − σ)/σ · σ²/(s² + σ²) and the last one (to
    σ = 0) by the denoiser's s²/(s² + σ²); (2) K Monte-Carlo steps from x̂0 on a Gaussian target of precision
    P = 1/σ² + m/τ² (m the mask) and mean (x̂0/σ² + m y/τ²)/P — or, with the official code's "exact" prior
    (the network's score at σ_min, exact here: −(x − μ)/(s² + σ_min²)), P = 1/σ² + 1/(s² + σ_min²) + m/τ² and
    mean (x_σ/σ² + μ/(s² + σ_min²) + m y/τ²)/P — per coordinate an AR(1) for unadjusted Langevin and a 2-D
    linear recursion for the damped HMC (:func:`_langevin_stage`); (3) re-noising adds σ'². DAPS's samples
    must match that recursion after every annealing step (5 standard errors of the Monte Carlo mean and
    variance over N = 4000 samples, √(2/N) = 2.2 % relative for a variance; 4 at the end). For the paper's
    pair (Langevin, Gaussian prior) the recursion ends near the exact posterior variance, (1/s² + m/σ_y²)⁻¹:
    measured 1.11–1.13× on the observed coordinates (the Langevin discretisation, ℓ·L ≤ 0.2) and 0.85–0.92× on
    the unobserved ones (at large σ the prior term has too little time to mix: ℓ/σ² ≪ 1/K); asserted within
    [0.8, 1.2]. The σ schedules are written here from the paper's (EDM's) formula, not taken from daps.py."""

    def edm_sigmas(hi, lo, n, rho=7.0):  # n points from hi to lo, uniform in σ^(1/ρ)
        return [(hi ** (1 / rho) + k / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for k in range(n)]

    n, tau, steps, ode_steps, langevin, prior_sigma = 4000, SIGMA_Y, 50, 2, 50, 0.1
    schedule = VPLinear()
    mu = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    s = torch.tensor([0.5, 0.8, 0.3, 1.0], dtype=torch.float64)
    gaussian = GaussianMixture(torch.ones(1), mu[None], s[None], schedule)
    op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    y = torch.tensor([0.1, 0.0, 0.7, 0.0], dtype=torch.float64)
    options = dict(lr=lr, lr_min_ratio=1.0, langevin_steps=langevin, tau=tau, ode_sigma_min=0.05, mc=mc,
                   prior=prior, prior_sigma_min=prior_sigma)
    # no clamping to the model's σ range anywhere, so the recursion needs only the σ's DAPS is given
    ve_min = float(schedule.sigma(torch.tensor(1e-3)) / schedule.alpha(torch.tensor(1e-3)))
    assert ve_min < min(0.05, prior_sigma)
    states = []  # x_{σ_{i+1}} after every annealing step: its law checks the σ schedule, which the end forgets
    x = solve(gaussian.as_model(), op, y.expand(n, -1).clone(), "daps_100", noise=SIGMA_Y, seeds=range(n),
              callback=lambda i, t, x, x0: states.append(x - mu), **options)

    # σ_max = 100 lies below VPLinear's largest σ/α (≈ 150), so nothing caps it; the official scheduler's steps + 1
    # points with the last dropped, then σ = 0
    sig = edm_sigmas(100.0, 0.1, steps + 1)[:-1] + [0.0]
    mask, s2 = op.mask, s**2
    mean, var = -mu, torch.full_like(mu, float(sig[0]) ** 2)  # of x − μ, from x_{σ_0} = σ_0 z
    for i in range(steps):
        sigma = float(sig[i])
        inner = edm_sigmas(sigma, min(0.05, sigma), ode_steps + 1)[:-1] + [0.0]
        ode = torch.ones_like(mu)  # x̂0 − μ = ode · (x_σ − μ)
        for a, b in zip(inner[:-1], inner[1:]):
            ode = ode * (s2 / (s2 + a**2) if b == 0 else 1 + (b - a) / a * a**2 / (s2 + a**2))
        ell = min(lr, 1.0 / (1.0 / tau**2 + 1.0 / sigma**2 + (1.0 / prior_sigma**2 if prior == "exact" else 0.0)))
        data = mask * (y - mu) / tau**2
        if prior == "gaussian":  # target mean (x̂0/σ² + m y/τ²)/P in x − μ units
            precision = 1.0 / sigma**2 + mask / tau**2
            start, pull = ode, ode / (sigma**2 * precision)
        else:  # target mean (x_σ/σ² + m y/τ²)/P, the prior's own pull to μ being 0 in x − μ units
            precision = 1.0 / sigma**2 + 1.0 / (s2 + prior_sigma**2) + mask / tau**2
            start, pull = ode, 1.0 / (sigma**2 * precision)
        keep_start, noise_var = _langevin_stage(mc, ell, precision, langevin)
        # x_K = m* + A (x̂0 − m*) + noise: on x_σ − μ with weight A·start + (1 − A)·pull
        gain = keep_start * start + (1 - keep_start) * pull
        mean = gain * mean + (1 - keep_start) * data / precision
        var = gain**2 * var + noise_var + float(sig[i + 1]) ** 2
        step_mean, step_var = states[i].mean(0), states[i].var(0)
        assert torch.all((step_mean - mean).abs() < 5 * (var / n).sqrt()), (i, step_mean, mean, var)
        assert torch.all((step_var / var - 1).abs() < 5 * math.sqrt(2 / n)), (i, step_var, var)
    got_mean, got_var = (x - mu).mean(0), (x - mu).var(0)
    assert torch.all((got_mean - mean).abs() < 4 * (var / n).sqrt()), (got_mean, mean, var)
    assert torch.all((got_var / var - 1).abs() < 4 * math.sqrt(2 / n)), (got_var, var)
    exact = 1.0 / (1.0 / s2 + mask / SIGMA_Y**2)
    print(f"\nDAPS {mc}/{prior}: final variance / exact posterior variance {(var / exact).tolist()}")
    if (mc, prior) == ("langevin", "gaussian"):
        assert torch.all((var / exact - 1).abs() < 0.2) and torch.all((got_var / exact - 1).abs() < 0.2), var / exact


def test_daps_hmc_without_momentum_is_langevin():
    """The damped HMC with m = 0 is v' = √ℓ s + √2 z, x' = x + ℓ s + √(2ℓ) z: unadjusted Langevin, draw for draw (to round-off: √ℓ·√ℓ is not ℓ in floating point)."""
    op = Inpainting(torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    model = GaussianMixture(torch.ones(1), torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64),
                            VPLinear()).as_model()
    y = torch.tensor([0.1, 0.0, 0.7, 0.0], dtype=torch.float64).expand(8, -1).clone()
    run = lambda **o: solve(model, op, y, "daps_100", noise=SIGMA_Y, seeds=range(8), steps=5, lr=5e-4, **o)  # noqa: E731
    assert torch.allclose(run(mc="hmc", momentum=0.0), run(mc="langevin"), rtol=0, atol=1e-12)
    assert not torch.allclose(run(mc="hmc", momentum=0.5), run(mc="langevin"))


LEVELS = (0.1, 0.5, 0.9)


# measured coverage at the 10 / 50 / 90 % regions (N = 1000 samples, 20000 reference samples):
#   inpaint: exact 0.096 / 0.491 / 0.928, DDS 0.506 / 0.918 / 0.981, DPS 0.351 / 0.777 / 0.924,
#            DAPS 0.047 / 0.333 / 0.732
#   dense:   exact 0.096 / 0.491 / 0.928, DDS 0.494 / 0.936 / 0.999, DPS 0.167 / 0.567 / 0.847,
#            DAPS 0.052 / 0.299 / 0.735
@pytest.mark.parametrize("kind", ["inpaint", "dense"])
def test_calibration_share_of_posterior_mass_covered(gmm, kind):
    """The calibration figure: for each solver, the share of its samples inside the exact posterior's
    highest-density regions of mass 10 %, 50 % and 90 % (``GaussianMixturePosterior.hpd_level``; a
    calibrated sampler puts a share α inside the region of mass α). The table in benchmarks/RESULTS.md
    ("Calibration on the Gaussian-mixture oracle") is this test's output (``pytest -s``).

    Exact posterior samples (another seed) must be calibrated to within 4 binomial standard errors plus the
    reference's own Monte Carlo error: that checks the yardstick. Then, per solver, what it measures:
    DDS collapses (≥ 85 % of its samples in the 50 % region, where a sampler that ignored y, landing in the
    prior's bulk, puts almost none); DPS is concentrated too but less (between DDS and the exact posterior
    at 50 %, and ≥ 80 % inside the 90 % region); DAPS is the only one that is not over-concentrated (≤ the
    exact share + 0.05 at 10 % and 50 %) and it still puts ≥ 65 % of its samples in the 90 % region (its
    leak into excluded components is the rest, see test_daps_samples_spread_like_the_posterior)."""
    op, _, y, post = problem(gmm, kind)
    model = gmm.as_model()
    runs = {
        "exact": post.sample(N, seed=7),
        "dds": solve(model, op, y, "dds", noise=SIGMA_Y, steps=100, seeds=range(N)),
        "dps": solve(model, op, y, "dps", noise=SIGMA_Y, steps=500, zeta=0.03, seeds=range(N)),
        "daps_100": solve(model, op, y, "daps_100", noise=SIGMA_Y, seeds=range(N), lr=5e-4, lr_min_ratio=1.0,
                          langevin_steps=50),
    }
    cover = {name: [float((post.hpd_level(x) <= a).double().mean()) for a in LEVELS] for name, x in runs.items()}
    print(f"\n{kind}: share of samples inside the exact posterior's HPD region of mass "
          + " / ".join(f"{a:.0%}" for a in LEVELS))
    for name, c in cover.items():
        print(f"  {name:8s} " + " / ".join(f"{v:.3f}" for v in c))
    for a, c in zip(LEVELS, cover["exact"]):
        assert abs(c - a) < 4 * math.sqrt(a * (1 - a) / N) + 0.01, (a, c)
    dds, dps, daps = cover["dds"], cover["dps"], cover["daps_100"]
    assert dds[1] >= 0.85 and dds[2] >= 0.95, dds
    assert cover["exact"][1] < dps[1] < dds[1] and dps[2] >= 0.8, dps
    assert daps[0] <= cover["exact"][0] + 0.05 and daps[1] <= cover["exact"][1] + 0.05 and daps[2] >= 0.65, daps
