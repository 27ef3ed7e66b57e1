"""A closed-form Gaussian-mixture oracle for testing samplers and inverse-problem solvers.

For data x_0 ~ p_0 = Σ_k w_k N(μ_k, diag(s_k²)) and x_t = α x_0 + σ ε, everything a diffusion model
approximates is known exactly. With v_k = α² s_k² + σ² (per coordinate):

    p_t(x)         = Σ_k w_k N(x; α μ_k, diag(v_k))
    r_k(x)         = w_k N(x; α μ_k, diag(v_k)) / p_t(x)                  (responsibilities)
    E[x_0 | x_t=x] = Σ_k r_k (μ_k + α s_k² (x − α μ_k) / v_k)
    ε̂(x)           = (x − α E[x_0 | x]) / σ = Σ_k r_k σ (x − α μ_k) / v_k
    ∇ log p_t(x)   = −ε̂ / σ = −Σ_k r_k (x − α μ_k) / v_k

(the right-hand forms of ε̂ and the score are algebraically equal to the definitions and free of the
cancellation in x − α E[x_0|x] at small σ). :class:`GaussianMixture` therefore serves as a perfect network
(:meth:`~GaussianMixture.as_model`), gives reference probability-flow-ODE solutions
(:meth:`~GaussianMixture.ode_solution`) and exact posteriors of linear-Gaussian inverse problems
(:meth:`~GaussianMixture.posterior`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .core import per_sample
from .model import DiffusionModel
from .schedules import NoiseSchedule

Tensor = torch.Tensor
F64 = torch.float64


def _check_positive(v: Tensor, name: str) -> None:
    if not bool((torch.isfinite(v) & (v > 0)).all()):
        raise ValueError(f"{name}: expected finite values > 0, got min {v.min().item():g}")


class GaussianMixture:
    """The mixture p_0 = Σ_k w_k N(μ_k, diag(s_k²)) diffused by ``schedule`` (see the module docstring).

    Args:
        weights: (K,) positive; normalised to sum to 1.
        means: (K, D) component means μ_k.
        stds: (K, D) positive per-coordinate standard deviations s_k.
        schedule: the diffsolve noise schedule giving α(t), σ(t).

    Parameters are stored as float64. Methods take flat data ``x`` of shape (B, D) and ``t`` a scalar or of
    shape (B,), compute in float64 and return ``x``'s dtype. The ``*_from_alpha_sigma`` variants take α, σ
    (scalars or (B,)) instead of t.
    """

    def __init__(self, weights, means, stds, schedule: NoiseSchedule):
        weights, means, stds = (torch.as_tensor(v, dtype=F64).detach().clone() for v in (weights, means, stds))
        if means.ndim != 2 or 0 in means.shape:
            raise ValueError(f"means: expected shape (K, D) with K, D >= 1, got {tuple(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights: expected shape ({k},) (one per row of means), got {tuple(weights.shape)}")
        if stds.shape != (k, d):
            raise ValueError(f"stds: expected shape ({k}, {d}) (that of means), got {tuple(stds.shape)}")
        _check_positive(weights, "weights")
        _check_positive(stds, "stds")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means: expected finite values")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a diffsolve NoiseSchedule, got {type(schedule).__name__}")
        self.weights, self.means, self.stds, self.schedule = weights / weights.sum(), means, stds, schedule

    @classmethod
    def random(cls, dim: int, components: int, schedule: NoiseSchedule, seed: int = 0) -> "GaussianMixture":
        """A random mixture: μ_k ~ N(0, I), s_k ~ U[0.1, 0.5] per coordinate, w ~ Dirichlet(2, …, 2)."""
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(components, 2.0))
        return cls(weights, rng.standard_normal((components, dim)), rng.uniform(0.1, 0.5, (components, dim)), schedule)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(components={self.num_components}, dim={self.dim}, schedule={self.schedule!r})"

    # ---- marginals in terms of (α, σ) -------------------------------------------------------------
    def _logits(self, x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """log(w_k N(x; α μ_k, diag(v_k))) (B, K), x − α μ_k (B, K, D), v_k (B|1, K, D), α, σ (B|1, 1, 1)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (B, {self.dim}), got {tuple(x.shape)}")
        x = x.to(F64)
        a, s = (torch.as_tensor(c, dtype=F64, device=x.device).reshape(-1, 1, 1) for c in (alpha, sigma))
        if a.shape[0] not in (1, len(x)) or s.shape[0] not in (1, len(x)):
            raise ValueError(f"t (or alpha, sigma): expected a scalar or shape ({len(x)},), got {a.shape[0]} "
                             f"alphas and {s.shape[0]} sigmas")
        means, stds, weights = self.means.to(x.device), self.stds.to(x.device), self.weights.to(x.device)
        var = a**2 * stds**2 + s**2
        diff = x[:, None, :] - a * means
        logits = torch.log(weights) - 0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        return logits, diff, var, a, s

    def _terms(self, x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """As :meth:`_logits` with the responsibilities r_k (B, K, 1) in place of the logits."""
        logits, *rest = self._logits(x, alpha, sigma)
        return (torch.softmax(logits, -1)[..., None], *rest)

    def log_prob_from_alpha_sigma(self, x: Tensor, alpha, sigma) -> Tensor:
        """log p(x) (B,) for x = α x_0 + σ ε: logsumexp_k log(w_k N(x; α μ_k, diag(v_k)))."""
        return torch.logsumexp(self._logits(x, alpha, sigma)[0], -1).to(x.dtype)

    def responsibilities_from_alpha_sigma(self, x: Tensor, alpha, sigma) -> Tensor:
        """r_k(x) = P(component k | x) (B, K)."""
        return torch.softmax(self._logits(x, alpha, sigma)[0], -1).to(x.dtype)

    def x0_mean_from_alpha_sigma(self, x: Tensor, alpha, sigma) -> Tensor:
        """E[x_0 | x] = Σ_k r_k (μ_k + α s_k² (x − α μ_k)/v_k) (B, D)."""
        r, diff, var, a, _ = self._terms(x, alpha, sigma)
        return (r * (self.means.to(r.device) + a * self.stds.to(r.device) ** 2 * diff / var)).sum(1).to(x.dtype)

    def eps_from_alpha_sigma(self, x: Tensor, alpha, sigma) -> Tensor:
        """ε̂ = (x − α E[x_0|x])/σ = Σ_k r_k σ (x − α μ_k)/v_k (B, D)."""
        r, diff, var, _, s = self._terms(x, alpha, sigma)
        return (r * s * diff / var).sum(1).to(x.dtype)

    def score_from_alpha_sigma(self, x: Tensor, alpha, sigma) -> Tensor:
        """∇ log p(x) = −ε̂/σ = −Σ_k r_k (x − α μ_k)/v_k (B, D)."""
        r, diff, var, _, _ = self._terms(x, alpha, sigma)
        return -(r * diff / var).sum(1).to(x.dtype)

    # ---- marginals at time t -------------------------------------------------------------------------
    def _alpha_sigma(self, t, x: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=F64, device=x.device)
        return self.schedule.alpha(t), self.schedule.sigma(t)

    def log_prob(self, x: Tensor, t) -> Tensor:
        """log p_t(x) (B,)."""
        return self.log_prob_from_alpha_sigma(x, *self._alpha_sigma(t, x))

    def responsibilities(self, x: Tensor, t) -> Tensor:
        """P(component k | x_t = x) (B, K)."""
        return self.responsibilities_from_alpha_sigma(x, *self._alpha_sigma(t, x))

    def x0_mean(self, x: Tensor, t) -> Tensor:
        """E[x_0 | x_t = x] (B, D)."""
        return self.x0_mean_from_alpha_sigma(x, *self._alpha_sigma(t, x))

    def eps(self, x: Tensor, t) -> Tensor:
        """E[ε | x_t = x] = (x − α_t E[x_0|x_t])/σ_t (B, D)."""
        return self.eps_from_alpha_sigma(x, *self._alpha_sigma(t, x))

    def score(self, x: Tensor, t) -> Tensor:
        """∇ log p_t(x) = −ε̂/σ_t (B, D)."""
        return self.score_from_alpha_sigma(x, *self._alpha_sigma(t, x))

    def as_model(self, prediction: str = "epsilon") -> DiffusionModel:
        """A :class:`DiffusionModel` whose network is this oracle: ``net(x, t)`` (continuous t of shape (B,))
        returns the exact ``"epsilon"`` ε̂, ``"x0"`` E[x_0|x_t], ``"v"`` α ε̂ − σ E[x_0|x_t] or ``"score"``
        ∇ log p_t, in x's dtype. ``sample_shape`` is (D,)."""

        def net(x: Tensor, t: Tensor) -> Tensor:
            a, s = self._alpha_sigma(t, x)
            x64 = x.to(F64)
            if model.prediction == "v":
                eps, x0 = self.eps_from_alpha_sigma(x64, a, s), self.x0_mean_from_alpha_sigma(x64, a, s)
                out = per_sample(a, 2) * eps - per_sample(s, 2) * x0
            else:
                fn = {"epsilon": self.eps_from_alpha_sigma, "x0": self.x0_mean_from_alpha_sigma,
                      "score": self.score_from_alpha_sigma}[model.prediction]
                out = fn(x64, a, s)
            return out.to(x.dtype)

        model = DiffusionModel(net, self.schedule, prediction, sample_shape=(self.dim,))
        return model

    # ---- sampling ----------------------------------------------------------------------------------
    def _draw_x0(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k] * torch.randn(n, self.dim, generator=generator, dtype=F64)

    def sample_x0(self, n: int, seed: int = 0) -> Tensor:
        """n exact samples of p_0 (n, D), float64: k ~ w, then μ_k + s_k ⊙ z, z ~ N(0, I)."""
        return self._draw_x0(n, torch.Generator().manual_seed(seed))

    def sample_xt(self, n: int, t, seed: int = 0) -> Tensor:
        """n exact samples of p_t (n, D), float64: α_t x_0 + σ_t ε (t a scalar or of shape (n,))."""
        g = torch.Generator().manual_seed(seed)
        x0 = self._draw_x0(n, g)
        a, s = self._alpha_sigma(t, x0)
        return per_sample(a, 2) * x0 + per_sample(s, 2) * torch.randn(n, self.dim, generator=g, dtype=F64)

    # ---- reference solutions -------------------------------------------------------------------------
    def ode_solution(self, x_T: Tensor, t_start: float, t_end: float) -> Tensor:
        """The exact probability-flow-ODE solution from ``x_T`` (B, D) at ``t_start`` to ``t_end`` (float64).

        In λ = log α − log σ the PF-ODE reads dx/dλ = (d log σ/dλ) x + α E[x_0 | x] with α, σ functions of λ
        alone (``schedule.alpha_sigma_from_lambda``): d log σ/dλ = −α² for VP (σ² = sigmoid(−2λ)) and −1 for
        EDM (α = 1, σ = e^{−λ}). The whole batch is one state vector integrated by ``solve_ivp`` (DOP853,
        rtol = atol = 1e-12) with a vectorised numpy right-hand side (E[x_0 | x] as in
        :meth:`x0_mean_from_alpha_sigma`; numpy avoids torch's per-call overhead over the ~10³ calls).
        Both times must be > 0: t = 0 is λ = +∞ (use a small t_end instead).
        """
        t_start, t_end = float(t_start), float(t_end)
        if not (t_start > 0 and t_end > 0):
            raise ValueError(f"ode_solution: the exact solution is defined for t_start, t_end > 0 (t = 0 is "
                             f"λ = +∞; use a small t_end), got t_start={t_start}, t_end={t_end}")
        x_T = torch.as_tensor(x_T, dtype=F64).cpu()
        if x_T.ndim != 2 or x_T.shape[1] != self.dim:
            raise ValueError(f"x_T: expected shape (B, {self.dim}), got {tuple(x_T.shape)}")
        lam_start, lam_end = (float(self.schedule.lambda_(torch.tensor(t, dtype=F64))) for t in (t_start, t_end))
        means, var0, log_w = self.means.numpy(), self.stds.numpy() ** 2, np.log(self.weights.numpy())

        def rhs(lam: float, y: np.ndarray) -> np.ndarray:
            a, s = (float(c) for c in self.schedule.alpha_sigma_from_lambda(torch.tensor(lam, dtype=F64)))
            x = y.reshape(x_T.shape)
            var = a**2 * var0 + s**2  # (K, D)
            diff = x[:, None, :] - a * means  # (B, K, D)
            logits = log_w - 0.5 * (diff**2 / var + np.log(var)).sum(-1)  # up to a constant
            r = np.exp(logits - logits.max(-1, keepdims=True))
            x0 = np.einsum("bk,bkd->bd", r / r.sum(-1, keepdims=True), means + a * var0 * diff / var)
            dlog_sigma = -(a**2) if self.schedule.is_vp else -1.0
            return (dlog_sigma * x + a * x0).ravel()

        sol = solve_ivp(rhs, (lam_start, lam_end), x_T.numpy().ravel(), method="DOP853", rtol=1e-12, atol=1e-12)
        if not sol.success:
            raise RuntimeError(f"ode_solution: solve_ivp failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(x_T.shape)

    def posterior(self, A, y, sigma_y: float) -> "GaussianMixturePosterior":
        """The exact posterior p(x_0 | y) of the measurement y = A x_0 + n, n ~ N(0, σ_y² I).

        ``A`` is (M, D), ``y`` (M,) or a batch (B, M). With S_k = diag(s_k²) and C_k = A S_k Aᵀ + σ_y² I,
        prior component k becomes N(μ_k', Σ_k') with weight ∝ w_k N(y; A μ_k, C_k), where

            Σ_k' = (S_k⁻¹ + AᵀA/σ_y²)⁻¹           = S_k − S_k Aᵀ C_k⁻¹ A S_k
            μ_k' = Σ_k' (S_k⁻¹ μ_k + Aᵀy/σ_y²)    = μ_k + S_k Aᵀ C_k⁻¹ (y − A μ_k).

        The right-hand (gain) forms are the ones computed (through a Cholesky factor of C_k); they also hold
        for σ_y = 0, a noiseless measurement, which needs A of full row rank (then C_k is invertible).
        """
        A, y = torch.as_tensor(A, dtype=F64), torch.as_tensor(y, dtype=F64)
        if A.ndim != 2 or A.shape[1] != self.dim:
            raise ValueError(f"A: expected shape (M, {self.dim}), got {tuple(A.shape)}")
        m = A.shape[0]
        if y.ndim not in (1, 2) or y.shape[-1] != m:
            raise ValueError(f"y: expected shape ({m},) or (B, {m}) (M = rows of A), got {tuple(y.shape)}")
        sigma_y = float(sigma_y)
        if not (math.isfinite(sigma_y) and sigma_y >= 0):
            raise ValueError(f"sigma_y: expected a finite value >= 0, got {sigma_y}")
        if sigma_y == 0 and int(torch.linalg.matrix_rank(A)) < m:
            raise ValueError(f"A: a noiseless measurement (sigma_y = 0) needs A of full row rank {m}, "
                             f"got rank {int(torch.linalg.matrix_rank(A))}")
        var = self.stds**2
        AS = A * var[:, None, :]  # A S_k, (K, M, D)
        L = torch.linalg.cholesky(AS @ A.T + sigma_y**2 * torch.eye(m, dtype=F64))  # C_k = L Lᵀ
        W = torch.linalg.solve_triangular(L, AS, upper=False)  # L⁻¹ A S_k, (K, M, D)
        cov = torch.diag_embed(var) - W.mT @ W
        r = torch.linalg.solve_triangular(L, (y[..., None, :] - self.means @ A.T)[..., None], upper=False)
        means = self.means + (W.mT @ r).squeeze(-1)  # (…, K, D)
        # log N(y; A μ_k, C_k) up to the constant −M/2 log 2π, which the normalisation removes
        log_det = 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
        log_w = torch.log(self.weights) - 0.5 * ((r.squeeze(-1) ** 2).sum(-1) + log_det)
        return GaussianMixturePosterior(torch.softmax(log_w, -1), means, cov)


@dataclass
class GaussianMixturePosterior:
    """The mixture Σ_k weights_k N(means_k, covariances_k), float64.

    ``weights`` (K,) and ``means`` (K, D) for one measurement, (B, K) and (B, K, D) for a batch;
    ``covariances`` (K, D, D) are the same for every measurement.
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor

    def mean(self) -> Tensor:
        """m = Σ_k w_k μ_k: (D,) or (B, D)."""
        return (self.weights[..., None] * self.means).sum(-2)

    def covariance(self) -> Tensor:
        """Σ_k w_k (Σ_k + (μ_k − m)(μ_k − m)ᵀ) (law of total covariance): (D, D) or (B, D, D)."""
        d = self.means - self.mean()[..., None, :]
        return (self.weights[..., None, None] * (self.covariances + d[..., :, None] * d[..., None, :])).sum(-3)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """n exact samples per measurement: (n, D), or (B, n, D) for a batch. Each Σ_k is factored by its
        eigendecomposition, so the singular covariances of a noiseless measurement are fine too: eigenvalues
        below 1e6·eps·max (round-off; scipy's ``multivariate_normal`` cut-off) count as 0."""
        g = torch.Generator().manual_seed(seed)
        k_, d_ = self.means.shape[-2:]
        weights, means = self.weights.reshape(-1, k_), self.means.reshape(-1, k_, d_)
        evals, evecs = torch.linalg.eigh(self.covariances)
        evals = torch.where(evals > 1e6 * torch.finfo(F64).eps * evals.amax(-1, keepdim=True), evals, 0.0)
        root = evecs * evals.sqrt()[..., None, :]  # root rootᵀ = Σ_k
        k = torch.multinomial(weights, n, replacement=True, generator=g)  # (B, n)
        z = torch.randn(*k.shape, d_, 1, generator=g, dtype=F64)
        x = means[torch.arange(len(means))[:, None], k] + (root[k] @ z).squeeze(-1)
        return x if self.weights.ndim == 2 else x[0]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x | y) of points x (N, D) under the posterior of one measurement."""
        if self.weights.ndim != 1:
            raise ValueError("log_prob: expected the posterior of one measurement, got a batch")
        comps = torch.distributions.MultivariateNormal(self.means, self.covariances)
        return torch.logsumexp(torch.log(self.weights) + comps.log_prob(torch.as_tensor(x, dtype=F64)[:, None]), -1)

    def hpd_level(self, x: Tensor, n_reference: int = 20000, seed: int = 0) -> Tensor:
        """For each point, the posterior mass of the highest-density region whose boundary passes through it,
        P(p(X) > p(x)) for X ~ p(·|y), estimated from ``n_reference`` exact samples. For exact posterior
        samples the levels are uniform on [0, 1]; a sampler that collapses toward the mode has too many small
        levels, one that spreads too wide or lands where the posterior has no mass too many near 1."""
        reference = torch.sort(self.log_prob(self.sample(n_reference, seed=seed))).values
        below = torch.searchsorted(reference, self.log_prob(x))  # reference densities ≤ p(x)
        return 1.0 - below.to(F64) / n_reference


@dataclass
class MomentDiscrepancy:
    """What :func:`moment_discrepancy` returns (see there)."""

    #: T² = dᵀ C⁺ d, d the difference of the test-function means
    t2: float
    #: E[T²] when both samples come from the same law: rank(C) · (1/n + 1/N)
    floor: float
    #: the standard deviation of T² at that floor: √(2 rank(C)) · (1/n + 1/N)
    noise: float
    #: rank(C): the number of independent test functions
    rank: int

    @property
    def error(self) -> float:
        """√max(T² − floor, 0): the debiased discrepancy, in standard deviations of the test functions."""
        return math.sqrt(max(self.t2 - self.floor, 0.0))


def moment_discrepancy(x: Tensor, reference: Tensor, centers: Tensor) -> MomentDiscrepancy:
    """A distribution distance with a known Monte-Carlo floor, between samples ``x`` (n, D) and a large exact
    ``reference`` sample (N, D), for mixtures with component means ``centers`` (K, D).

    The test functions are, per nearest centre k, φ = (1_k, 1_k x_d, 1_k x_d²) for every coordinate d: the mode
    weights and each mode's mean and second moment (K(1 + 2D) − 1 functions: the last 1_k is 1 minus the
    others; any that never vary are dropped by the pseudo-inverse). With d = mean φ(x) − mean φ(reference) and
    C the covariance of φ under the reference, T² = dᵀ C⁺ d is a squared Mahalanobis distance whose expectation
    for two samples of the same law is rank(C) (1/n + 1/N) (Hotelling), with standard deviation
    √(2 rank(C)) (1/n + 1/N). T² − floor estimates the squared distance (in that metric) of the two laws'
    test-function means, without the sampling noise."""
    centers = torch.as_tensor(centers, dtype=F64)

    def features(s: Tensor) -> Tensor:
        s = torch.as_tensor(s, dtype=F64)
        onehot = torch.nn.functional.one_hot(torch.cdist(s, centers).argmin(1), len(centers)).to(F64)  # (n, K)
        return torch.cat([onehot[:, :-1], (onehot[:, :, None] * s[:, None, :]).flatten(1),
                          (onehot[:, :, None] * s[:, None, :] ** 2).flatten(1)], 1)

    f_ref = features(reference)
    cov = torch.cov(f_ref.T)
    rank = int(torch.linalg.matrix_rank(cov, hermitian=True))
    d = features(x).mean(0) - f_ref.mean(0)
    t2 = float(d @ torch.linalg.pinv(cov, hermitian=True) @ d)
    scale = 1.0 / len(x) + 1.0 / len(f_ref)
    return MomentDiscrepancy(t2, rank * scale, math.sqrt(2 * rank) * scale, rank)


def random_ems(model: DiffusionModel, n_lambda: int, scale: float = 0.05, seed: int = 0):
    """DPM-Solver-v3 statistics for ``model`` with small random l, s, b (N(0, scale²), float64) on the EMS grid
    ``compute_ems`` would use: they exercise every correction term of the sampler at the cost of real ones,
    without the quality (for plumbing tests and timings; a few-sample estimate would be too noisy to stay
    finite)."""
    from .samplers.dpm_solver_v3 import EMS

    ems = EMS.zeros(model, n_lambda=n_lambda)
    gen = torch.Generator().manual_seed(seed)
    for name in ("l", "s", "b"):
        setattr(ems, name, scale * torch.randn(ems.l.shape, generator=gen, dtype=torch.float64))
    ems.info = {"kind": "random", "scale": scale, "seed": seed}
    return ems
