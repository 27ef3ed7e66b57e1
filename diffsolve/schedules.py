"""Noise schedules x_t = α_t x_0 + σ_t ε, with λ_t = log(α_t/σ_t) (half log-SNR), and sampling time grids.

Every schedule maps continuous time t to α(t), σ(t), λ(t) and back (t(λ)), vectorised over tensors; the
arithmetic runs in float64 and the result is cast back to the input's dtype. t = 0 is clean data (α = 1,
σ = 0, λ = +∞) for every schedule, so a time grid may end at 0: that last step lands on the denoised sample
(diffusers' ``final_sigmas_type="zero"``, DDIM's ``set_alpha_to_one``).

Families:
- VP (α² + σ² = 1): :class:`VPLinear` (score-SDE β(t) = β0 + t(β1 − β0)), :class:`VPCosine` (iDDPM) and
  :class:`DiscreteVP` (a diffusers ``alphas_cumprod`` table made continuous as DPM-Solver does: index n sits
  at t = (n + 1)/N and log α is piecewise linear in t).
- :class:`EDM` (variance exploding, σ-parameterised): α = 1, σ = t.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

Array = torch.Tensor


def _f64(t) -> Array:
    return torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Array) else t.to(torch.float64)


def _vp_log_sigma(log_alpha: Array) -> Array:
    """log σ of a VP schedule from log α: σ² = 1 − α², written so that small t keeps its precision."""
    return 0.5 * torch.log(-torch.expm1(2 * log_alpha))


def _like(out: Array, t) -> Array:
    if isinstance(t, Array) and t.is_floating_point():
        return out.to(t.dtype)
    return out


class NoiseSchedule:
    """Base class. Subclasses define log α(t), t(λ) and the derivative d log α/dt (``_log_alpha``,
    ``_t_from_lambda``, ``_dlog_alpha_dt`` on float64 tensors) plus the two ranges below."""

    name: str = "schedule"
    #: ``(t_min, t_max)``: times at which the schedule (and a network trained on it) is defined.
    valid_range: tuple[float, float]
    #: default sampling interval ``(t_start, t_end)``, t_start > t_end.
    default_range: tuple[float, float]
    is_vp: bool = True

    # ---- public, vectorised ---------------------------------------------------------------------
    def log_alpha(self, t) -> Array:
        return _like(self._log_alpha(_f64(t)), t)

    def alpha(self, t) -> Array:
        return _like(torch.exp(self._log_alpha(_f64(t))), t)

    def sigma(self, t) -> Array:
        return _like(torch.exp(self._log_sigma(_f64(t))), t)

    def alpha_sigma(self, t) -> tuple[Array, Array]:
        """α(t) and σ(t) from one evaluation of log α (a per-sample-time prediction needs both)."""
        t64 = _f64(t)
        log_alpha = self._log_alpha(t64)
        log_sigma = _vp_log_sigma(log_alpha) if self.is_vp else self._log_sigma(t64)
        return _like(torch.exp(log_alpha), t), _like(torch.exp(log_sigma), t)

    def lambda_(self, t) -> Array:
        t64 = _f64(t)
        return _like(self._log_alpha(t64) - self._log_sigma(t64), t)

    def t_from_lambda(self, lam) -> Array:
        return _like(self._t_from_lambda(_f64(lam)), lam)

    def alpha_sigma_from_lambda(self, lam) -> tuple[Array, Array]:
        """α and σ as functions of λ alone (they do not depend on the schedule within a family)."""
        lam64 = _f64(lam)
        if self.is_vp:
            a, s = torch.sigmoid(2 * lam64).sqrt(), torch.sigmoid(-2 * lam64).sqrt()
        else:
            a, s = torch.ones_like(lam64), torch.exp(-lam64)
        return _like(a, lam), _like(s, lam)

    def sde_coefficients(self, t) -> tuple[Array, Array]:
        """Drift and squared diffusion ``(f(t), g²(t))`` of the forward SDE dx = f x dt + g dw that has this
        schedule's marginals: f = d log α/dt, g² = dσ²/dt − 2 f σ² = −2 σ² dλ/dt."""
        t64 = _f64(t)
        f = self._dlog_alpha_dt(t64)
        if self.is_vp:  # σ² = 1 − α² makes g² = −2α²f − 2fσ² = −2f (= β), without evaluating σ at all
            return _like(f, t), _like(-2 * f, t)
        dlam = f - self._dlog_sigma_dt(t64)
        g2 = -2 * torch.exp(2 * self._log_sigma(t64)) * dlam
        return _like(f, t), _like(g2, t)

    def model_time(self, t) -> Array:
        """The time input a diffusers UNet trained on this schedule expects (float)."""
        return _like(self._model_time(_f64(t)), t)

    def check_range(self, t_start: float, t_end: float) -> None:
        lo, hi = self.valid_range
        if not t_start > t_end:
            raise ValueError(f"t_end must be smaller than t_start, got t_start={t_start} and t_end={t_end}")
        if t_start > hi or t_end < 0 or (0 < t_end < lo):
            raise ValueError(
                f"sampling interval [t_end={t_end}, t_start={t_start}] lies outside {self.name}'s valid time "
                f"range [{lo}, {hi}] (t_end = 0, clean data, is also allowed)"
            )

    # ---- defaults for subclasses --------------------------------------------------------------------
    def _log_sigma(self, t: Array) -> Array:
        if self.is_vp:
            return _vp_log_sigma(self._log_alpha(t))
        raise NotImplementedError

    def _dlog_sigma_dt(self, t: Array) -> Array:
        # VP: d log σ/dt = −(α²/σ²) d log α/dt
        return -torch.exp(2 * (self._log_alpha(t) - self._log_sigma(t))) * self._dlog_alpha_dt(t)

    def _model_time(self, t: Array) -> Array:
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPLinear(NoiseSchedule):
    """Score-SDE VP schedule: β(t) = β0 + t(β1 − β0), log α_t = −(β1 − β0) t²/4 − β0 t/2, t ∈ [0, 1]."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_end: float = 1e-3):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VPLinear needs 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.valid_range = (0.0, 1.0)
        self.default_range = (1.0, float(t_end))

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _dlog_alpha_dt(self, t):
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def _t_from_lambda(self, lam):
        # solves (β1−β0)t²/4 + β0 t/2 = log(1 + e^{−2λ})/2 for t ≥ 0 (a stable form of the quadratic root)
        d = self.beta_max - self.beta_min
        tmp = 2.0 * d * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.beta_min**2 + tmp) + self.beta_min) / d

    def _model_time(self, t):
        return 999.0 * t  # score-SDE's convention for networks trained in continuous time

    def __repr__(self):
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPCosine(NoiseSchedule):
    """iDDPM cosine schedule: α_t = cos(π/2 · (t + s)/(1 + s)) / cos(π/2 · s/(1 + s)).

    ``t_max`` = 0.9946 keeps λ finite and matches DPM-Solver's default for this schedule.
    """

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_max: float = 0.9946, t_end: float = 1e-3):
        self.s, self.t_max = float(s), float(t_max)
        self._log_alpha_0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))
        self.valid_range = (0.0, self.t_max)
        self.default_range = (self.t_max, float(t_end))

    def _angle(self, t):
        return (t + self.s) / (1.0 + self.s) * math.pi / 2.0

    def _log_alpha(self, t):
        return (torch.log(torch.cos(self._angle(t))) - self._log_alpha_0).clamp(max=0.0)  # round-off at t = 0

    def _dlog_alpha_dt(self, t):
        return -torch.tan(self._angle(t)) * math.pi / (2.0 * (1.0 + self.s))

    def _t_from_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) - self.s

    def _model_time(self, t):
        return 999.0 * t

    def __repr__(self):
        return f"VPCosine(s={self.s}, t_max={self.t_max})"


class DiscreteVP(NoiseSchedule):
    """A discrete DDPM schedule (``alphas_cumprod`` of length N) made continuous the DPM-Solver way.

    Index n sits at t_n = (n + 1)/N; log α is linear in t between the indices and between t = 0 (α = 1)
    and t_0 = 1/N. A diffusers UNet receives the (fractional) index N·t − 1.
    """

    name = "discrete"

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray | Array, prediction_type: str | None = None):
        ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a 1-D, strictly decreasing sequence in (0, 1) of length >= 2")
        self.alphas_cumprod = ac
        self.num_train_timesteps = n = len(ac)
        #: the diffusers config's prediction type, if the schedule came from one
        self.prediction_type = prediction_type
        log_alpha = 0.5 * torch.log(ac)
        self._t_table = torch.cat([torch.zeros(1, dtype=torch.float64), torch.arange(1, n + 1, dtype=torch.float64) / n])
        self._log_alpha_table = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha])
        self.valid_range = (1.0 / n, 1.0)
        self.default_range = (1.0, 1.0 / n)
        self._device_tables: dict[torch.device, tuple[Array, Array]] = {}

    @classmethod
    def from_config(cls, config) -> "DiscreteVP":
        """From any diffusers scheduler config (dict, FrozenDict or a scheduler): diffusers' own
        ``DDPMScheduler`` computes ``alphas_cumprod`` so every ``beta_schedule`` it knows is supported."""
        from diffusers import DDPMScheduler

        config = getattr(config, "config", config)
        scheduler = DDPMScheduler.from_config(dict(config))
        return cls(scheduler.alphas_cumprod.double(), prediction_type=dict(config).get("prediction_type", "epsilon"))

    def _tables(self, device: torch.device) -> tuple[Array, Array]:
        """The (t, log α) tables on ``device``, copied there once: a copy per call would sync every step."""
        if device not in self._device_tables:
            self._device_tables[device] = (self._t_table.to(device), self._log_alpha_table.to(device))
        return self._device_tables[device]

    def _log_alpha(self, t):
        tt, la = self._tables(t.device)
        return _interp(t, tt, la)

    def _dlog_alpha_dt(self, t):
        tt, la = self._tables(t.device)
        k = torch.clamp(torch.searchsorted(tt, t.contiguous(), right=True) - 1, 0, len(tt) - 2)
        return (la[k + 1] - la[k]) / (tt[k + 1] - tt[k])

    def _t_from_lambda(self, lam):
        # log α is linear in t on each segment, so interpolating t against log α(λ) inverts exactly
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        tt, la = self._tables(lam.device)
        return _interp(log_alpha, la.flip(0), tt.flip(0))

    def _model_time(self, t):
        return self.num_train_timesteps * t - 1.0

    def timestep_to_t(self, timesteps) -> Array:
        """Integer diffusers timesteps → continuous t = (n + 1)/N (float64)."""
        return (_f64(timesteps) + 1.0) / self.num_train_timesteps

    def __repr__(self):
        return f"DiscreteVP(N={self.num_train_timesteps})"


class EDM(NoiseSchedule):
    """Variance-exploding, σ-parameterised (Karras et al. 2022): α = 1, σ = t, λ = −log σ."""

    name = "edm"
    is_vp = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.valid_range = (self.sigma_min, self.sigma_max)
        self.default_range = (self.sigma_max, self.sigma_min)

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _log_sigma(self, t):
        return torch.log(t)

    def _dlog_alpha_dt(self, t):
        return torch.zeros_like(t)

    def _dlog_sigma_dt(self, t):
        return 1.0 / t

    def _t_from_lambda(self, lam):
        return torch.exp(-lam)

    def __repr__(self):
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def _interp(x: Array, xp: Array, fp: Array) -> Array:
    """Piecewise-linear interpolation with linear extrapolation beyond the ends (as DPM-Solver's
    ``interpolate_fn``), batched and without host synchronisation. ``xp`` increasing."""
    k = torch.clamp(torch.searchsorted(xp, x.contiguous(), right=True) - 1, 0, len(xp) - 2)
    x0, x1, f0, f1 = xp[k], xp[k + 1], fp[k], fp[k + 1]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


SCHEDULES = {"vp_linear": VPLinear, "vp_cosine": VPCosine, "edm": EDM}


def get_schedule(name: str, **kwargs) -> NoiseSchedule:
    """``get_schedule("vp_linear" | "vp_cosine" | "edm", **kw)``."""
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {name!r}") from None
    return cls(**kwargs)


# ---- time grids -------------------------------------------------------------------------------------

GRIDS = ("time_uniform", "time_quadratic", "logSNR", "karras", "beta", "lu_lambdas", "exponential", "leading", "trailing",
         "linspace")
#: grid kinds that are another kind's σ list under diffusers' name (diffusers' ``use_lu_lambdas`` and
#: ``use_exponential_sigmas`` both space σ/α geometrically, i.e. uniformly in λ)
_SAME_GRID = {"lu_lambdas": "logSNR", "exponential": "logSNR"}
#: the shape parameters of the beta grid (diffusers' ``_convert_to_beta`` defaults, from Lee et al. 2024)
BETA_GRID_SHAPE = (0.6, 0.6)


def time_grid(
    schedule: NoiseSchedule, steps: int, kind: str = "logSNR", t_start: float | None = None,
    t_end: float | None = None, rho: float = 7.0,
) -> Array:
    """``steps + 1`` decreasing times from ``t_start`` to ``t_end`` (float64).

    - ``time_uniform``: uniform in t; ``time_quadratic``: uniform in √t (DPM-Solver's ``time_quadratic``);
    - ``logSNR``: uniform in λ (DPM-Solver's recommendation at ≤ 20 steps);
    - ``karras``: Karras et al.'s ρ-polynomial grid in σ/α = e^{−λ} (ρ = 7);
    - ``beta``: σ/α at the quantiles 1 − k/steps of a Beta(0.6, 0.6) distribution between its ends ("Beta
      sampling is all you need", Lee et al. 2024; diffusers' ``use_beta_sigmas``);
    - ``lu_lambdas``, ``exponential``: diffusers' names of ``logSNR`` (``use_lu_lambdas``,
      ``use_exponential_sigmas``);
    - with ``t_end = 0`` the λ-based kinds (logSNR, karras, beta) space ``steps`` points from t_start to the
      schedule's default end and append t = 0 (diffusers' ``final_sigmas_type="zero"``);
    - ``leading``, ``trailing``, ``linspace``: diffusers' ``DDIMScheduler`` timestep spacings over the
      discrete training timesteps (:class:`DiscreteVP` only, ``steps_offset`` = 0). Their last point is t = 0
      (clean data), as DDIM with ``set_alpha_to_one=True``; ``t_start``/``t_end`` do not apply.
    """
    if kind not in GRIDS:
        raise ValueError(f"grid: expected one of {list(GRIDS)}, got {kind!r}")
    if kind in ("leading", "trailing", "linspace"):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"grid {kind!r} is a diffusers timestep spacing and needs a DiscreteVP schedule, got {schedule!r}")
        n = schedule.num_train_timesteps
        if kind == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1]
        elif kind == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1]
        else:
            ts = np.round(np.arange(n, 0, -n / steps)) - 1
        return torch.cat([schedule.timestep_to_t(torch.from_numpy(ts.copy())), torch.zeros(1, dtype=torch.float64)])
    t_start = schedule.default_range[0] if t_start is None else float(t_start)
    t_end = schedule.default_range[1] if t_end is None else float(t_end)
    if kind == "time_uniform":
        ts = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    elif kind == "time_quadratic":
        ts = torch.linspace(t_start**0.5, t_end**0.5, steps + 1, dtype=torch.float64) ** 2
    else:
        if t_end == 0:  # the kind's grid to the last noisy time, then a final step onto clean data
            last = schedule.default_range[1]
            if steps < 2 or not t_start > last:
                raise ValueError(f"grid {kind!r} with t_end=0 spaces steps − 1 steps from t_start to {last} before the "
                                 f"final step onto t = 0: needs steps >= 2 and t_start > {last}, got steps={steps}, "
                                 f"t_start={t_start}")
            return torch.cat([time_grid(schedule, steps - 1, kind, t_start, last, rho),
                              torch.zeros(1, dtype=torch.float64)])
        lam = schedule.lambda_(torch.tensor([t_start, t_end], dtype=torch.float64))
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        s_max, s_min = torch.exp(-lam[0]), torch.exp(-lam[1])
        kind = _SAME_GRID.get(kind, kind)
        if kind == "logSNR":
            lams = torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=torch.float64)
        elif kind == "karras":  # ρ-polynomial in the VE noise level σ/α = e^{−λ}
            lams = -torch.log((s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho)
        else:  # beta: Beta(a, b) quantiles in σ/α
            from scipy.stats import beta as beta_distribution

            q = torch.from_numpy(beta_distribution.ppf(1 - ramp.numpy(), *BETA_GRID_SHAPE))
            lams = -torch.log(s_min + q * (s_max - s_min))
        ts = schedule.t_from_lambda(lams)
    ts[0], ts[-1] = t_start, t_end  # exact endpoints despite round-off
    return ts
