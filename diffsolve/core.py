"""The stepping core shared by every sampler and solver.

- :class:`SeededNoise`: per-sample Gaussian noise from integer seeds, batch-size invariant and identical on
  CPU and GPU (counter-based: splitmix64 over (seed, stream, element index), so no Python loop over samples).
- :class:`TimeGrid`: the time grid with α, σ, λ computed once per run in float64 on the host; samplers read
  their step coefficients from it as Python floats, so a step never synchronises with the device.
- :class:`Run`: what a sampler receives: the model evaluation at grid points, noise, the step loop with
  progress bar and ``callback(step, t, x, x0_pred)``, and a non-finite check that costs no per-step sync
  (a device-side flag, read once at the end, that names the first bad step).
- Shared exponential-integrator math: :func:`phi` (φ-functions), :class:`History` (multistep buffer),
  :func:`multistep_order` (warm-up and lower-order-final rules), :func:`adams_bashforth_weights`,
  :func:`exp_lagrange_weights` (exponentially weighted Lagrange quadrature: the stochastic Adams weights).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .model import DiffusionModel, KnownTime, Prediction, _expand
from .schedules import NoiseSchedule

Tensor = torch.Tensor

# ---- counter-based per-sample noise -------------------------------------------------------------------


class BudgetExceededError(RuntimeError):
    """An adaptive sampler ran out of its evaluation budget (``max_nfe``) before every sample finished."""


def _signed(c: int) -> int:
    """A Python integer taken mod 2^64, as the int64 with the same bits."""
    c %= 1 << 64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_mix(z: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic = the uint64 original)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def per_sample(value: float | Tensor, ndim: int) -> float | Tensor:
    """A number as it is; a per-sample value of shape (batch,) shaped to broadcast against ``ndim``-dimensional
    batches."""
    return value.reshape(-1, *[1] * (ndim - 1)) if isinstance(value, Tensor) else value


def batch_seeds(seeds: Sequence[int] | Tensor | None, batch: int, per: str = "sample") -> Tensor:
    """One int64 seed per batch element, 0 … batch−1 by default; a count other than ``batch`` is an error that
    says what each seed is for (``per``: "sample", "measurement")."""
    seeds_t = torch.arange(batch, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    if len(seeds_t) != batch:
        raise ValueError(f"seeds: expected one seed per {per} ({batch}), got {len(seeds_t)}")
    return seeds_t


class SeededNoise:
    """Standard normal noise for a batch, where sample k depends only on ``seeds[k]``.

    ``normal(step, sub)`` returns a fresh draw for stream (step, sub): x_T uses step −1, a stochastic sampler
    step i uses step i (sub-streams for several draws per step). Values come from splitmix64 hashes of
    (seed, step, sub, element index) mapped to N(0, 1) through the inverse error function in float64, so
    they are the same for any batch size and on any device.
    """

    def __init__(self, seeds: Sequence[int] | Tensor, device: torch.device | str = "cpu"):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(device)
        self.device = torch.device(device)
        self._keys = splitmix64_mix(self.seeds + _GOLDEN)

    def __len__(self) -> int:
        return len(self.seeds)

    def normal(self, shape: Sequence[int], step: int | Tensor = -1, sub: int = 0,
               dtype: torch.dtype = torch.float32, offset: int = 0) -> Tensor:
        """Noise of shape ``(batch, *shape)``. ``step`` may be an int64 tensor of shape (batch,): sample k then
        draws stream (step[k], sub), bitwise what ``normal(shape, step=int(step[k]), sub)`` gives it.
        ``offset`` starts at that element of the stream, so a long draw can be taken in pieces: row j of
        ``normal((L, *shape))`` is bitwise ``normal(shape, offset=j * prod(shape))``."""
        n = math.prod(shape)
        if isinstance(step, Tensor):  # int64 arithmetic wraps like the Python value taken mod 2^64
            step_key = (step.to(device=self.device, dtype=torch.int64).reshape(-1) + 2) * _GOLDEN
        else:
            step_key = _signed((step + 2) * _GOLDEN)
        key = splitmix64_mix(self._keys + step_key)
        key = splitmix64_mix(key + _signed((sub + 1) * _GOLDEN))
        idx = torch.arange(offset + 1, offset + n + 1, dtype=torch.int64, device=self.device)
        z = splitmix64_mix(key[:, None] + idx[None, :] * _GOLDEN)
        u = (_shift_right(z, 11).to(torch.float64) + 0.5) * 2.0**-53  # uniform in (0, 1)
        out = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        return out.reshape(len(self.seeds), *shape).to(dtype)


# ---- exponential-integrator math -------------------------------------------------------------------


def phi(k: int, h: float) -> float:
    """φ_k(h) = Σ_j h^j/(j + k)!: φ_0 = e^h, φ_1 = (e^h − 1)/h, φ_{k+1} = (φ_k − 1/k!)/h.

    The recurrence loses digits for small |h| (cancellation), so there the Taylor series is summed.
    """
    if k == 0:
        return math.exp(h)
    if abs(h) > 0.5:
        value = math.expm1(h) / h
        for j in range(1, k):
            value = (value - 1.0 / math.factorial(j)) / h
        return value
    term, total = 1.0 / math.factorial(k), 0.0
    for j in range(30):
        total += term
        term *= h / (j + k + 1)
    return total


@functools.lru_cache(maxsize=None, typed=True)  # exact rational arithmetic: cheap once, not at every run
def adams_bashforth_weights(order: int) -> tuple[float, ...]:
    """Weights b_0 … b_{k−1} of the k-step Adams–Bashforth method for equal steps h,
    y_{n+1} = y_n + h Σ_j b_j f_{n−j}: the integral over [t_n, t_n + h] of the polynomial through
    f_n, …, f_{n−k+1}, b_j = (−1)^j / (j! (k−1−j)!) ∫_0^1 Π_{i≠j} (u + i) du, summed exactly in rationals.
    k = 1: (1,); 2: (3, −1)/2; 3: (23, −16, 5)/12; 4: (55, −59, 37, −9)/24."""
    from fractions import Fraction

    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order: expected an integer >= 1, got {order!r}")
    weights = []
    for j in range(order):
        poly = [Fraction(1)]  # coefficients of Π_{i≠j} (u + i) in u, lowest degree first
        for i in range(order):
            if i != j:
                poly = [(poly[m - 1] if m > 0 else 0) + (i * poly[m] if m < len(poly) else 0) for m in range(len(poly) + 1)]
        integral = sum(c / (m + 1) for m, c in enumerate(poly))
        weights.append((-1) ** j * integral / (math.factorial(j) * math.factorial(order - 1 - j)))
    return tuple(float(w) for w in weights)


def lagrange_basis_coefficients(nodes: Sequence[float]) -> np.ndarray:
    """Monomial coefficients of the Lagrange basis on distinct ``nodes`` θ_0 … θ_{n−1} (float64, shape (n, n)):
    row j holds a_j0 … a_j,n−1 with ℓ_j(θ) = Π_{m≠j} (θ − θ_m)/(θ_j − θ_m) = Σ_k a_jk θ^k.

    Pass nodes of size O(1), e.g. offsets (λ_j − λ_s)/h in units of the step h: expanding around an absolute
    λ instead (as diffusers' ``SASolverScheduler`` does, in float32) cancels badly for small steps."""
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    n = len(theta)
    if n == 0 or not np.isfinite(theta).all() or len(np.unique(theta)) != n:
        raise ValueError(f"Lagrange nodes must be finite and distinct, got {theta.tolist()}")
    out = np.empty((n, n))
    for j in range(n):
        others = np.delete(theta, j)
        out[j] = np.polynomial.polynomial.polyfromroots(others) / np.prod(theta[j] - others)
    return out


def exp_moments(n: int, h: float, nu: float = 1.0) -> list[float]:
    """M_k = ∫_0^h e^{−ν(h−u)} (u/h)^k du = k! h φ_{k+1}(−νh) for k = 0 … n−1 (host float64).

    M_0 = (1 − e^{−νh})/ν is also defined for h = ∞ (a last step onto σ = 0); k ≥ 1 needs a finite h."""
    if not (math.isfinite(nu) and nu > 0):
        raise ValueError(f"nu: expected a finite value > 0, got {nu}")
    moments = [-math.expm1(-nu * h) / nu]
    if n > 1 and not math.isfinite(h):
        raise ValueError(f"exp_moments: moments k >= 1 need a finite step, got h = {h}")
    moments += [math.factorial(k) * h * phi(k + 1, -nu * h) for k in range(1, n)]
    return moments


def exp_lagrange_weights(nodes: Sequence[float], h: float, nu: float = 1.0,
                         moments: Sequence[float] | None = None) -> list[float]:
    """Weights w_j = ∫_0^h e^{−ν(h−u)} ℓ_j(u/h) du of the exponentially weighted interpolatory quadrature
    ∫_0^h e^{−ν(h−u)} f(u) du ≈ Σ_j w_j f(θ_j h), ℓ_j the Lagrange basis on the nodes θ_j (offsets in units of
    h: θ = 0 is the start of the step, θ = 1 its end). ``moments`` replaces :func:`exp_moments` when given.
    These are the stochastic Adams (SA-Solver) weights and, for ν = 1, the exponential Adams–Bashforth and
    Adams–Moulton weights of the data-prediction ODE; host float64, computed once per step."""
    a = lagrange_basis_coefficients(nodes)
    m = exp_moments(len(a), h, nu) if moments is None else [float(v) for v in moments]
    if len(m) != len(a):
        raise ValueError(f"moments: expected {len(a)} values (one per node), got {len(m)}")
    return [float(v) for v in a @ np.asarray(m, dtype=np.float64)]


def multistep_order(i: int, steps: int, order: int, lower_order_final: bool, final_to_zero: bool) -> int:
    """The order a multistep solver uses at step i (0-based) of ``steps``: warm-up min(order, i + 1); with
    ``lower_order_final`` and fewer than 15 steps, order ≤ 1 at the last and ≤ 2 at the second-to-last
    step (diffusers' rule, for stability at few steps); a last step onto σ = 0 (h = ∞) is always first order."""
    p = min(order, i + 1)
    if i == steps - 1 and (final_to_zero or (lower_order_final and steps < 15)):
        p = 1
    elif i == steps - 2 and lower_order_final and steps < 15:
        p = min(p, 2)
    return p


@dataclass
class History:
    """The last few model outputs of a multistep method, newest first, with their λ."""

    size: int
    lambdas: list[float] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    def push(self, lam: float, value: Tensor) -> None:
        self.lambdas.insert(0, lam)
        self.values.insert(0, value)
        del self.lambdas[self.size:], self.values[self.size:]


# ---- time grid and run context -----------------------------------------------------------------------


class TimeGrid:
    """A decreasing time grid t_0 > … > t_N with α, σ, λ at each point (host float64, computed once)."""

    def __init__(self, schedule: NoiseSchedule, t: Tensor | np.ndarray | Sequence[float]):
        t64 = torch.as_tensor(np.asarray(t, dtype=np.float64))
        self.t = t64.numpy()
        self.alpha = schedule.alpha(t64).numpy()
        self.sigma = schedule.sigma(t64).numpy()
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)  # +∞ where σ = 0 (t = 0)
        self.schedule = schedule

    def __len__(self) -> int:
        return len(self.t)

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def h(self, i: int) -> float:
        """λ_{i+1} − λ_i (∞ for a last step onto σ = 0)."""
        return float(self.lam[i + 1] - self.lam[i])


class Run:
    """One sampling run: what a sampler function receives besides x and its options.

    Attributes: ``model``, ``grid`` (:class:`TimeGrid`), ``noise`` (:class:`SeededNoise`), ``batch``.
    """

    def __init__(
        self, model: DiffusionModel, grid: TimeGrid, noise: SeededNoise, *, class_labels: Tensor | None = None,
        guidance_scale: float = 1.0, callback: Callable | None = None, progress: bool = False, device=None,
        net_dtype: torch.dtype | None = None, network: Callable | None = None,
    ):
        self.model, self.grid, self.noise = model, grid, noise
        #: how the network runs during :meth:`execute` (see ``DiffusionModel.evaluating``)
        self.net_dtype, self.network = net_dtype, network
        self.class_labels, self.guidance_scale = class_labels, guidance_scale
        self.callback, self.progress = callback, progress
        self.batch = len(noise)
        #: adaptive samplers set this to the network evaluations each sample took (a (batch,) tensor)
        self.nfe_per_sample: Tensor | None = None
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._points: dict = {}  # (dtype, batch) → per grid point (t, KnownTime), prepared once per run
        self._step_sums: Tensor | None = None  # Σx after each fixed-grid step: non-finite iff x was
        self._first_bad_step: Tensor | None = None  # adaptive samplers: the first bad iteration (−1: none)

    def set_grid(self, t) -> None:
        """Replace the time grid by another with the same number of points, for samplers that must move the
        points (e.g. onto the λ grid of precomputed statistics); ``SampleInfo.grid`` and callbacks then report
        the new times."""
        grid = TimeGrid(self.grid.schedule, t)
        if len(grid) != len(self.grid):
            raise ValueError(f"set_grid: expected {len(self.grid)} times, got {len(grid)}")
        self.grid = grid
        self._points = {}

    def grid_points(self, dtype: torch.dtype, batch: int) -> list[tuple[Tensor, KnownTime]]:
        """Per grid point i: the (batch,) times t_i in ``dtype`` and what the model needs there (its time input,
        α_i, σ_i), computed once per run so that a step does no lookups."""
        key = (dtype, batch)
        if key not in self._points:
            self._points[key] = self.points_at(self.grid, dtype, batch)
        return self._points[key]

    def points_at(self, grid: TimeGrid, dtype: torch.dtype, batch: int) -> list[tuple[Tensor, KnownTime]]:
        """:meth:`grid_points` of other fixed times (e.g. the stage times of a Runge–Kutta step), for
        :meth:`predict_at`; one host-to-device copy."""
        # the network's time input from t in the state's dtype, as an evaluation at per-sample times gets it
        t = torch.as_tensor(grid.t, dtype=torch.float64).to(device=self.device, dtype=dtype)
        net_time = self.model.network_time(t)
        t, net_time = t[:, None].expand(-1, batch), net_time[:, None].expand(-1, batch)
        return [(t[i], KnownTime(net_time[i], float(grid.alpha[i]), float(grid.sigma[i]))) for i in range(len(grid))]

    def predict(self, x: Tensor, i: int) -> Prediction:
        """(ε̂, x̂0) at grid point i, with the coefficients prepared before the loop."""
        t, known = self.grid_points(x.dtype, x.shape[0])[i]
        return self.model.predict(x, t, self.class_labels, self.guidance_scale, known=known)

    def predict_at(self, x: Tensor, t: Tensor, known: KnownTime | None = None) -> Prediction:
        """(ε̂, x̂0) at per-sample times ``t`` of shape (batch,); ``known`` from :meth:`points_at` when the
        times are fixed before sampling."""
        return self.model.predict(x, t, self.class_labels, self.guidance_scale, known=known)

    def prior_noise(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """x at the grid's first time drawn from the prior, seeded per sample: N(0, I) for VP schedules,
        σ_0·N(0, I) for VE."""
        prior_std = 1.0 if self.grid.schedule.is_vp else float(self.grid.sigma[0])
        return prior_std * self.noise.normal(shape, step=-1, dtype=dtype)

    def execute(self, fn: Callable, x, options: dict):
        """``fn(self, x, **options)`` (a sampler, an inversion or a solver) without gradients, then one NaN/Inf
        check: (output, NFE, wall seconds, the device synchronised before the clock stops)."""
        nfe_before = self.model.nfe
        start = time.perf_counter()
        with torch.no_grad(), self.model.evaluating(self.net_dtype, self.network):
            out = fn(self, x, **options)
        self.check_finite()
        if self.noise.device.type == "cuda":
            torch.cuda.synchronize(self.noise.device)
        return out, self.model.nfe - nfe_before, time.perf_counter() - start

    def randn_like(self, x: Tensor, step: int, sub: int = 0) -> Tensor:
        return self.noise.normal(x.shape[1:], step=step, sub=sub, dtype=x.dtype).to(x.device)

    def steps(self, desc: str = "sampling", reverse: bool = False):
        """The step indices 0 … N−1 (N−1 … 0 for an inversion), with a progress bar when asked."""
        indices = range(self.grid.steps - 1, -1, -1) if reverse else range(self.grid.steps)
        return tqdm(indices, desc=desc, leave=False) if self.progress else indices

    def step_done(self, i: int, x: Tensor, x0_pred: Tensor | Prediction | None = None, t: Tensor | None = None) -> None:
        """Call after step i (t_i → t_{i+1}, or back for an inversion): runs the callback (``x0_pred``: x̂0, or
        the Prediction to read it from, only when there is a callback) and records on the
        device whether x became non-finite. Samplers that step off the grid (adaptive ones) pass the
        per-sample times ``t`` (batch,) that x has reached; the callback then receives them in place of t_{i+1}
        and ``i`` counts iterations.

        On the grid the record is one reduction written in place, Σx into slot i of a buffer made at the first
        step: a NaN/Inf element makes the sum non-finite (so does a sum beyond the dtype's range, |x| ~ 1e38/n
        in float32, which only a diverged run reaches). Nothing here reads a value back to the host."""
        if t is not None:
            bad = ~torch.isfinite(x).all()
            if self._first_bad_step is None:
                self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=x.device)
            self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), i, self._first_bad_step)
        else:
            if self._step_sums is None:
                self._step_sums = torch.zeros(self.grid.steps, dtype=x.dtype, device=x.device)
            torch.sum(x.detach(), dim=tuple(range(x.ndim)), out=self._step_sums[i])
        if self.callback is not None:
            x0 = x0_pred.x0 if isinstance(x0_pred, Prediction) else x0_pred
            self.callback(i, float(self.grid.t[i + 1]) if t is None else t, x, x0)

    def check_finite(self) -> None:
        """One host sync at the end: raise if any step produced NaN/Inf, naming the first."""
        if self._first_bad_step is not None:
            first = int(self._first_bad_step)
            if first >= 0:
                raise FloatingPointError(
                    f"the sampler produced NaN/Inf at iteration {first} (t from {self.grid.t[0]:.6g} to "
                    f"{self.grid.t[-1]:.6g}); try tighter tolerances or a later t_end")
        if self._step_sums is not None:
            bad = (~torch.isfinite(self._step_sums)).nonzero()
            if len(bad):
                first = int(bad[0])
                raise FloatingPointError(
                    f"the sampler produced NaN/Inf at step {first} (t = {self.grid.t[first]:.6g} → "
                    f"{self.grid.t[first + 1]:.6g}); try more steps, a lower order, or a later t_end")


def solver_dtype(model: DiffusionModel, x_T: Tensor | None = None) -> torch.dtype:
    """The dtype of a sampler's state: x_T's when it is float32 or float64, else float64 for a float64 network
    and float32 for any other (half-precision networks included, as diffusers upcasts its schedulers)."""
    if x_T is not None and x_T.dtype in (torch.float32, torch.float64):
        return x_T.dtype
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def scale(c: float | Tensor, x: Tensor) -> float | Tensor:
    """A step coefficient against x: Python floats pass through, per-sample tensors broadcast."""
    return _expand(c, x).to(x.dtype) if isinstance(c, Tensor) else c
