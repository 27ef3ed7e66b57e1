"""Adaptive-step SDE solver, "Gotta Go Fast" (Jolicoeur-Martineau et al. 2021; arXiv 2105.14080, Algorithm 1;
official code AlexiaJM/score_sde_fast_sampling, ``AdaptivePredictor``).

The reverse SDE dx = [f x − g² ∇log p_t] dt + g dw̄ with ∇log p_t = −ε̂/σ (f, g² from
``schedule.sde_coefficients``: VP f = −β/2, g² = β; EDM f = 0, g² = 2σ), stepped per sample from t to t − h:

    D(x, t) = f(t) x + g²(t) ε̂(x, t)/σ(t)                 the drift in forward-time sign
    K1 = −h D(x, t)      + g(t) √h z
    K2 = −h D(x′, t − h) + g(t − h) √h z                    the SAME z
    x′ = x + K1                                              Euler–Maruyama proposal
    x″ = x + (K1 + K2)/2                                     improved Euler (SDE-Heun) proposal
    δ  = max(ε_abs, ε_rel · max(|x′|, |x′_prev|))            elementwise
    E  = ‖(x′ − x″)/δ‖₂ / √n                                 per sample; n = elements of one sample

Accept when E ≤ 1: x ← x″ (extrapolation: the higher-order proposal is kept), x′_prev ← x′, t ← t − h.
Accepted or not, h ← min(t − t_end, θ h E^(−r), max_growth · h). x′_prev is the Euler–Maruyama proposal of
the last accepted step (x_T before the first), as in the official code. After t_end, one Tweedie denoise
x̂0 = E[x_0 | x_{t_end}] (``denoise_final``). The paper's defaults: ε_rel = 0.05, ε_abs = 0.0078, θ = 0.9,
r = 0.9, h_init = 0.01; its step growth is unbounded (``max_growth=None``; the default here is 3, see the
option).

The noise after a rejection (``noise``). The official code retries with a fresh draw z (``noise="fresh"``).
That biases the law: E grows with the part of K1 that the drift does not cancel, so the draws that pass the
test are those that push against the drift's pull toward the modes, and in a few dimensions (where E hinges
on the one draw) the modes come out wide (+35 % variance on a 2-D mixture, ≈ +2 % at 8-D, not measurable at
32-D with 4096 samples; images, with n in the thousands, are little affected). The default
``noise="bridge"`` keeps one Brownian path per sample: a retry over a shorter step draws the increment from
the Brownian bridge through the rejected one (:class:`BrownianPath`), so the accepted noise is an exact path
increment whatever was rejected.

Per-sample stepping in one batch: t, h, x′_prev and the NFE count are (batch,) tensors; each iteration makes
two network calls on the whole batch at per-sample times. A finished sample is still evaluated (at its
final time, h = 0) but its state is masked and its NFE is not counted, so every tensor keeps the batch's
shape and nothing syncs with the host but the loop's termination check. Noise: iteration i draws stream i of
every sample's seed. A sample is active from iteration 0 until it finishes and never again, so iteration i is
its i-th attempt whatever batch it runs in: the results are batch-invariant.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from tqdm.auto import tqdm

from ..core import BudgetExceededError
from ..model import _expand
from ..registry import register_sampler

Tensor = torch.Tensor


#: ``noise`` option values: "bridge" (one Brownian path per sample, rejected steps refined by Brownian bridges)
#: and "fresh" (the official code's: a new N(0, h) draw at every attempt, the rejected one forgotten)
NOISE = ("bridge", "fresh")
#: the SeededNoise sub-stream of the bridge draws (iteration i draws stream (i, sub))
_BRIDGE_SUB = 1


class BrownianPath:
    """One Brownian motion per sample, sampled lazily at the times an adaptive solver asks for.

    The solver stands at τ_now (where W is ``w_now``) and asks for W(τ) at some τ > τ_now. Given every value
    already drawn, W(τ) is a Brownian bridge between its nearest known neighbours (Markov property), or a free
    increment √(τ − τ_left) ξ past the last one, so each query is one draw of ξ from its exact conditional law.
    A rejected attempt's point is kept (up to ``capacity`` future points per sample), and points the solver
    has passed are dropped. This is "rejection sampling with memory" (Rackauckas & Nie 2017, RSwM) in the
    form of torchsde's ``BrownianInterval``: accept/reject decisions then do not bias the noise that is used
    (a fresh draw after a rejection keeps only the small increments that passed the error test, which inflates
    the variance of low-dimensional samples). Everything is a (batch, …) tensor; no host syncs. Times τ are
    float64; values W are stored in ``dtype``.
    """

    def __init__(self, batch: int, shape, device, dtype=torch.float64, capacity: int = 32):
        self.tau = torch.full((batch, capacity), math.inf, dtype=torch.float64, device=device)  # inf = free slot
        self.w = torch.zeros(batch, capacity, math.prod(shape), dtype=dtype, device=device)
        self.overflows = torch.zeros(batch, dtype=torch.int64, device=device)

    def query(self, tau_now: Tensor, w_now: Tensor, tau: Tensor, xi: Tensor) -> Tensor:
        """W(τ) given W(τ_now) = w_now (batch, n), every stored future point and the standard normal ξ (batch, n)."""
        stored = self.tau
        ahead = stored >= tau[:, None]
        right_tau, right_idx = torch.where(ahead, stored, math.inf).min(1)
        behind = torch.where(ahead, -math.inf, stored)  # stored points are all > τ_now (passed ones dropped)
        left_tau, left_idx = behind.max(1)
        has_left = left_tau > tau_now
        left_tau = torch.where(has_left, left_tau, tau_now)
        rows = torch.arange(len(tau), device=tau.device)
        w_left = torch.where(has_left[:, None], self.w[rows, left_idx], w_now)
        has_right = torch.isfinite(right_tau)
        right_tau = torch.where(has_right, right_tau, tau + 1.0)  # placeholder, unused
        w_right = self.w[rows, right_idx]
        span = right_tau - left_tau
        a = torch.where(has_right, (tau - left_tau) / span, 0.0)
        var = torch.where(has_right, (tau - left_tau) * (right_tau - tau) / span, tau - left_tau)
        a, sd = a.to(w_now.dtype)[:, None], var.clamp(min=0).sqrt().to(w_now.dtype)[:, None]
        return w_left + a * (torch.where(has_right[:, None], w_right, w_left) - w_left) + sd * xi

    def update(self, accept: Tensor, tau: Tensor, w: Tensor, keep: Tensor) -> None:
        """After an attempt at τ with value w: where accepted, drop the points at or before τ; where rejected
        (and ``keep``), store (τ, w) in a free slot, or in place of the farthest point when none is free (an
        overflow, counted: that point is forgotten)."""
        self.tau.masked_fill_(accept[:, None] & (self.tau <= tau[:, None]), math.inf)
        put = keep & ~accept
        free = torch.isinf(self.tau)
        has_free = free.any(1)
        slot = torch.where(has_free, free.to(torch.int8).argmax(1), self.tau.argmax(1))
        self.overflows += (put & ~has_free).to(torch.int64)
        rows = torch.arange(len(tau), device=tau.device)
        # written in place, row by row at each sample's slot (a sample that stores nothing rewrites its own value)
        self.tau[rows, slot] = torch.where(put, tau, self.tau[rows, slot])
        self.w[rows, slot] = torch.where(put[:, None], w, self.w[rows, slot])


def _check_options(rtol, atol, theta, r, h_init, h_min, max_growth, max_nfe, denoise_final, probability_flow,
                   noise, span: float, t_end: float) -> None:
    """Every option checked before the first network call: ValueError naming argument, expectation, value."""

    def real(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if t_end <= 0:
        raise ValueError(f"t_end: adaptive_sde needs t_end > 0 (the reverse SDE's drift g²·ε̂/σ diverges at "
                         f"σ = 0; the final Tweedie denoise lands on clean data), got t_end={t_end}")
    if not (real(rtol) and rtol > 0):
        raise ValueError(f"rtol: expected the relative tolerance ε_rel > 0 (a finite number), got {rtol!r}")
    if not (real(atol) and atol >= 0):
        raise ValueError(f"atol: expected the absolute tolerance ε_abs >= 0 (a finite number), got {atol!r}")
    if not (real(theta) and 0 < theta <= 1):
        raise ValueError(f"theta: expected the safety factor θ in (0, 1], got {theta!r}")
    if not (real(r) and r > 0):
        raise ValueError(f"r: expected the step-size exponent r > 0, got {r!r}")
    if h_init is not None and not (real(h_init) and h_init > 0):
        raise ValueError(f"h_init: expected a first step size > 0 (in units of t) or None, got {h_init!r}")
    if h_min is not None and not (real(h_min) and h_min >= 0):
        raise ValueError(f"h_min: expected a minimum step size >= 0 (in units of t) or None, got {h_min!r}")
    if max_growth is not None and not (real(max_growth) and max_growth > 1):
        raise ValueError(f"max_growth: expected a step growth factor > 1 or None (unbounded), got {max_growth!r}")
    if not isinstance(denoise_final, bool):
        raise ValueError(f"denoise_final: expected True or False, got {denoise_final!r}")
    if not isinstance(probability_flow, bool):
        raise ValueError(f"probability_flow: expected True or False, got {probability_flow!r}")
    if noise not in NOISE:
        raise ValueError(f"noise: expected one of {list(NOISE)}, got {noise!r}")
    h0 = 0.01 * span if h_init is None else h_init
    if h_min is not None and h_min > min(h0, span):
        raise ValueError(f"h_min: expected at most the first step h_init = {min(h0, span):g}, got {h_min!r}")
    # the fewest evaluations that can finish: one attempt (2 evaluations) if h_init covers [t_end, t_start],
    # else two (the step size may grow without bound after the first), plus the final denoise
    least = 2 * (1 if h0 >= span else 2) + int(denoise_final)
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, numbers.Integral) or max_nfe < least:
        raise ValueError(f"max_nfe: expected an integer >= {least} (the fewest network evaluations per sample that "
                         f"can reach t_end with these options), got {max_nfe!r}")


@register_sampler("adaptive_sde", adaptive=True)
def adaptive_sde(run, x, *, rtol: float = 0.05, atol: float = 0.0078, theta: float = 0.9, r: float = 0.9,
                 h_init: float | None = None, h_min: float | None = None, max_growth: float | None = 3.0,
                 max_nfe: int = 10_000,
                 denoise_final: bool = True, probability_flow: bool = False, noise: str = "bridge"):
    """Adaptive-step SDE solver (Jolicoeur-Martineau et al. 2021), per-sample steps, final Tweedie denoise.

    Options (defaults: the paper's for VP models):
        rtol, atol: ε_rel and ε_abs of the error scale δ = max(ε_abs, ε_rel · max(|x′|, |x′_prev|)). ε_abs is
            in the units of x (0.0078 ≈ 1/128 of the [−1, 1] pixel range).
        theta, r: safety factor θ ∈ (0, 1] and exponent r of the step-size update h ← θ h E^(−r).
        h_init: the first step, in units of t; default 1 % of t_start − t_end (the paper's 0.01 on [10⁻³, 1]).
        h_min: the smallest step, in units of t; default 10⁻⁸ (t_start − t_end). A step of this size is
            accepted even when E > 1 (so a sample cannot stall); the run then warns once with the count.
        max_growth: the next step is at most this factor times the last (default 3; None: unbounded, as the
            paper). Without a bound, where the error is tiny (EDM at large σ) the next proposal is the whole
            remaining interval; it is nearly always rejected, but in a few dimensions E sometimes passes by
            chance, and that sample lands far from the data (~1 in 2000 on a 2-D mixture under EDM).
        max_nfe: network evaluations allowed per sample, the final denoise included. When some samples have
            not reached t_end within it, the run RAISES a RuntimeError that says how many.
        denoise_final: finish with x̂0 = E[x_0 | x_{t_end}] (one more evaluation).
        probability_flow: integrate the probability-flow ODE (drift f x + g² ε̂/(2σ), no noise) instead of
            the reverse SDE; the same controller then is a plain embedded Euler/Heun ODE solver (whose
            error is O(h²): r = 0.5 suits it better than the paper's 0.9, which alternates accept/reject).
        noise: "bridge" (default): one Brownian path per sample, a retry after a rejection draws the shorter
            increment from the Brownian bridge through the rejected one (unbiased); "fresh": a new draw at
            every attempt, as the official code (biased in low dimension; see the module docstring).

    ``callback(i, t, x, x0_pred)`` runs after every iteration i with ``t`` the (batch,) tensor of per-sample
    times reached. ``sample(..., return_info=True).nfe_per_sample`` holds each sample's evaluations.
    """
    grid = run.grid
    t_start, t_end = float(grid.t[0]), float(grid.t[-1])
    span = t_start - t_end
    _check_options(rtol, atol, theta, r, h_init, h_min, max_growth, max_nfe, denoise_final, probability_flow, noise,
                   span, t_end)
    h0 = min(0.01 * span if h_init is None else float(h_init), span)
    h_min = 1e-8 * span if h_min is None else float(h_min)
    rtol, atol, theta, r = float(rtol), float(atol), float(theta), float(r)
    max_growth = None if max_growth is None else float(max_growth)

    schedule, batch, dev, dtype = grid.schedule, x.shape[0], x.device, x.dtype
    n = x[0].numel()
    budget = max_nfe - int(denoise_final)  # evaluations per sample for the stepping itself
    c_drift, c_noise = (0.5, 0.0) if probability_flow else (1.0, 1.0)

    def coefficients(t: Tensor):
        """f, c·g²/σ and g (noise scale) at per-sample times, as columns against x (computed in float64)."""
        f, g2 = schedule.sde_coefficients(t)
        return (_expand(f, x).to(dtype), _expand(c_drift * g2 / schedule.sigma(t), x).to(dtype),
                _expand(c_noise * g2.sqrt(), x).to(dtype))

    # per-sample state; times and steps in float64 so that t lands exactly on t_end
    f64 = torch.float64
    t = torch.full((batch,), t_start, dtype=f64, device=dev)
    h = torch.full((batch,), h0, dtype=f64, device=dev)
    nfe = torch.zeros(batch, dtype=torch.int64, device=dev)
    forced = torch.zeros(batch, dtype=torch.int64, device=dev)
    failed = torch.zeros(batch, dtype=torch.bool, device=dev)
    active = torch.ones(batch, dtype=torch.bool, device=dev)
    x_prev = x
    z = None
    bridge = noise == "bridge" and not probability_flow
    if bridge:
        # the path in float64 for float64 x, else float32 (its memory: 32 stored points per sample)
        w_dtype = f64 if dtype == f64 else torch.float32
        path = BrownianPath(batch, x.shape[1:], dev, w_dtype)
        w_now = torch.zeros(batch, n, dtype=w_dtype, device=dev)  # each sample's W at its t (τ = t_start − t)

    bar = tqdm(desc="adaptive_sde", unit="it", disable=not run.progress, leave=False)
    i = 0
    # The loop's termination check is the one host sync per iteration (everything else stays on the device).
    while bool(active.any()):
        f1, k1, s1 = coefficients(t)
        pred1 = run.predict_at(x, t.to(dtype))
        h_x = _expand(h, x).to(dtype)
        K1 = -h_x * (f1 * x + k1 * pred1.eps)
        last = h >= t - t_end  # a step onto t_end: land on it exactly
        t2 = torch.where(last, torch.full_like(t, t_end), t - h)
        if bridge:  # the increment of the sample's one Brownian path over [t2, t]
            xi = run.noise.normal((n,), step=i, sub=_BRIDGE_SUB, dtype=w_dtype).to(dev)
            w_new = path.query(t_start - t, w_now, t_start - t2, xi)
            z = (w_new - w_now).reshape(x.shape).to(dtype)
            K1 = K1 + s1 * z
        elif not probability_flow:
            # a fresh draw per attempt; iteration i is every active sample's i-th attempt (samples leave the
            # loop and never return), so the draw does not depend on the batch
            z = h_x.sqrt() * run.randn_like(x, step=i)
            K1 = K1 + s1 * z
        x1 = x + K1  # Euler–Maruyama proposal x′
        f2, k2, s2 = coefficients(t2)
        pred2 = run.predict_at(x1, t2.to(dtype))
        K2 = -h_x * (f2 * x1 + k2 * pred2.eps)
        if z is not None:
            K2 = K2 + s2 * z
        x2 = x + 0.5 * (K1 + K2)  # improved-Euler proposal x″
        diff = 0.5 * (K1 - K2)  # x′ − x″
        delta = torch.clamp(rtol * torch.maximum(x1.abs(), x_prev.abs()), min=atol)
        ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / delta)  # 0/0 (δ = 0 with atol = 0) → 0
        err = (ratio.reshape(batch, -1).square().sum(1) / n).sqrt().to(f64)

        finite = torch.isfinite(x2.reshape(batch, -1)).all(1)
        at_min = h <= h_min
        # a non-finite proposal is taken (and the sample stopped) so that the run reports it; a step of h_min is
        # taken whatever its error
        accept = active & ((err <= 1) | at_min | ~finite)
        forced += (active & finite & at_min & (err > 1)).to(torch.int64)
        failed |= active & ~finite
        acc_x = _expand(accept, x)
        x = torch.where(acc_x, x2, x)
        x_prev = torch.where(acc_x, x1, x_prev)
        t = torch.where(accept, t2, t)
        if bridge:
            path.update(accept, t_start - t2, w_new, keep=active)
            w_now = torch.where(accept[:, None], w_new, w_now)
        nfe += 2 * active.to(torch.int64)

        h_new = theta * h * err.clamp(min=1e-12).pow(-r)
        if max_growth is not None:
            h_new = torch.minimum(h_new, max_growth * h)
        h_new = torch.minimum(torch.clamp(h_new, min=h_min), t - t_end)
        active = active & (t > t_end) & ~failed & (nfe + 2 <= budget)
        h = torch.where(active, h_new, torch.zeros_like(h))
        run.step_done(i, x, pred1.x0, t=t)
        bar.update(1)
        i += 1
    bar.close()

    # end of the run: one sync for the guards
    unfinished = int(((t > t_end) & ~failed).sum())
    if unfinished:
        raise BudgetExceededError(
            f"adaptive_sde: {unfinished} of {batch} samples did not reach t_end={t_end:g} within max_nfe={max_nfe} "
            f"network evaluations per sample (furthest behind at t={float(t.max()):.4g}); raise max_nfe or loosen "
            f"rtol/atol")
    n_forced = int((forced > 0).sum())
    if n_forced:
        warnings.warn(f"adaptive_sde: {n_forced} of {batch} samples took steps of h_min={h_min:g} with their error "
                      f"above tolerance (E > 1); lower h_min or loosen rtol/atol", RuntimeWarning, stacklevel=3)
    if bridge:
        n_over = int((path.overflows > 0).sum())
        if n_over:
            warnings.warn(f"adaptive_sde: {n_over} of {batch} samples had more than {path.tau.shape[1]} rejected "
                          f"points pending; the extra ones were forgotten (their retries drew fresh noise)",
                          RuntimeWarning, stacklevel=3)
    if denoise_final:
        x = run.predict_at(x, torch.full((batch,), t_end, dtype=dtype, device=dev)).x0
        nfe += 1
    run.nfe_per_sample = nfe
    return x
