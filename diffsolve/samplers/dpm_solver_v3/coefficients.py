"""The step coefficients of DPM-Solver-v3: the weight integrals of the update (:mod:`.sampler`) from the
statistics, computed once per (statistics, grid, options) on the host in float64 and moved to the device.

A step from s to t on the nodes m (the current and previous points, θ_m = (λ_m − λ_s)/h) is

    x_t = a_x ⊙ x_s + Σ_m w_m ⊙ f_m + const,      a_x = (σ_t/σ_s) e^{L_t},
    w_m = e^{−S(λ_m)} W_m,      const = α_t ∫_{λ_s}^{λ_t} e^{λ − λ_t + L_t − L + S} B dλ − Σ_m W_m B(λ_m),
    W_m = Σ_k A_mk M_k,          M_k = α_t ∫_{λ_s}^{λ_t} e^{λ − λ_t + L_t − L + S} θ^k dλ,

with A the map from the values g_m to the Taylor coefficients of g in θ (Lagrange; or the pseudo-order divided
differences). M_k is the exact DPM-Solver++ moment α_t k! h φ_{k+1}(−h) (:func:`diffsolve.core.exp_moments`)
plus the correction α_t ∫ e^{λ−λ_t}(e^{L_t − L + S} − 1) θ^k dλ, which vanishes for l = s = b = 0 and is
integrated by the trapezoid rule on the EMS grid refined ×4 (statistics piecewise linear in λ).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ...core import exp_moments, lagrange_basis_coefficients
from .storage import EMS

Tensor = torch.Tensor
F64 = torch.float64

_REFINE = 4  # sub-intervals per EMS interval for the correction integrals


def _interp_rows(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows of ``arr`` (N + 1, D) linearly interpolated at fractional indices ``pos``."""
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(arr) - 2)
    w = (pos - i0)[:, None]
    return (1 - w) * arr[i0] + w * arr[i0 + 1]


def _cumtrapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (x[1:] - x[:-1])[:, None] * (y[1:] + y[:-1]), axis=0)
    return out


def _trapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (0.5 * (x[1:] - x[:-1])[:, None] * (y[1:] + y[:-1])).sum(0)


def _taylor_matrix(theta: list[float], pseudo: bool) -> np.ndarray:
    """A (n, n): row m, column k = weight of g_m in the coefficient of θ^k of the local model of g around θ = 0.
    Full: the interpolating polynomial (Lagrange). Pseudo: θ^k gets the k-th divided difference of the first
    k + 1 nodes (the paper's pseudo-order estimate g^(k) ≈ k! [g_0 … g_k])."""
    if not pseudo:
        return lagrange_basis_coefficients(theta)
    n = len(theta)
    out = np.zeros((n, n))
    for k in range(n):
        for m in range(k + 1):
            out[m, k] = 1.0 / np.prod([theta[m] - theta[q] for q in range(k + 1) if q != m])
    return out


class _Coefficients:
    """Host float64 step coefficients from the statistics (:func:`_device_plan` computes each once per plan)."""

    def __init__(self, ems: EMS, idx: np.ndarray, lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray):
        flat = lambda a: a.to(F64).reshape(len(ems.lam), -1).numpy()
        self.l, self.s, self.b = flat(ems.l), flat(ems.s), flat(ems.b)
        self.zero = not (self.l.any() or self.s.any() or self.b.any())
        self.lam_e = ems.lam.to(F64).numpy()
        self.idx, self.lam, self.alpha, self.sigma = idx, lam, alpha, sigma

    def l_at(self, i: int) -> np.ndarray:
        return self.l[self.idx[i]]

    def step(self, s: int, t: int, nodes: list[int], pseudo: bool):
        """(a_x, [w_m], const): x_t = a_x ⊙ x_s + Σ_m w_m ⊙ f_m + const, f_m = x̂0_m − l_m x_m/α_m."""
        lam, alpha, sigma = self.lam, self.alpha, self.sigma
        h = lam[t] - lam[s]
        theta = [(lam[m] - lam[s]) / h for m in nodes]
        A = _taylor_matrix(theta, pseudo)
        n = len(nodes)
        moments = np.asarray(exp_moments(n, h), dtype=np.float64)[:, None]  # (n, 1): the exact l = s = b = 0 part
        if self.zero:
            return (sigma[t] / sigma[s]), [alpha[t] * float(A[m] @ moments[:, 0]) for m in range(n)], None
        # refined grid over [lowest node, t] in EMS index units
        js, jt = self.idx[s], self.idx[t]
        jlo = min(self.idx[m] for m in nodes)
        pos = np.linspace(jlo, jt, (jt - jlo) * _REFINE + 1)
        x = _interp_rows(self.lam_e[:, None], pos)[:, 0]
        lv, sv, bv = (_interp_rows(a, pos) for a in (self.l, self.s, self.b))
        ks = (js - jlo) * _REFINE  # position of s on the refined grid
        L = _cumtrapz(lv, x)
        S = _cumtrapz(sv, x)
        L, S = L - L[ks], S - S[ks]
        Bc = _cumtrapz(np.exp(-S) * bv, x)
        B = Bc - Bc[ks]
        seg = slice(ks, None)
        xs, Ls, Ss, Bs = x[seg], L[seg], S[seg], B[seg]
        Lt = Ls[-1]
        decay = np.exp(xs - xs[-1])[:, None]  # e^{λ − λ_t}
        expo = Lt[None] - Ls + Ss
        th = ((xs - xs[0]) / h)[:, None]
        corr = np.stack([_trapz(decay * np.expm1(expo) * th**k, xs) for k in range(n)])  # (n, D)
        M = alpha[t] * (moments + corr)
        W = A @ M  # (n, D): weights of g_m
        const = alpha[t] * _trapz(decay * np.exp(expo) * Bs, xs)
        w_f, const_total = [], const.copy()
        for r, m in enumerate(nodes):
            km = (self.idx[m] - jlo) * _REFINE
            w_f.append(W[r] * np.exp(-S[km]))
            const_total -= W[r] * B[km]
        return (sigma[t] / sigma[s]) * np.exp(Lt), w_f, const_total


class _Update:
    """x_t = a_x ⊙ x_s + Σ_m w_m ⊙ f_m + const, the coefficients already on the device."""

    __slots__ = ("a_x", "w", "const")

    def __init__(self, a_x, w, const):
        self.a_x, self.w, self.const = a_x, w, const

    def __call__(self, x_s: Tensor, fs: list[Tensor]) -> Tensor:
        out = self.a_x * x_s
        for w, f in zip(self.w, fs):
            out = out + w * f
        return out if self.const is None else out + self.const


def _device_plan(coef: _Coefficients, plan, shape: tuple[int, ...], dtype, device):
    """Every step's coefficients computed on the host before sampling starts and moved to the device in one
    copy, so the loop does no host work and no transfer. Returns (l_i or None per step, [(corrector or None,
    predictor) per step])."""
    arrays: list[np.ndarray] = []

    def slot(c):
        if isinstance(c, float) or np.ndim(c) == 0:
            return float(c)
        arrays.append(np.asarray(c, dtype=np.float64).reshape(-1))
        return len(arrays) - 1

    def update(key):
        if key is None:
            return None
        a_x, w, const = coef.step(key[0], key[1], list(key[2]), key[3])
        return slot(a_x), [slot(c) for c in w], None if const is None else slot(const)

    l_slots = [None if coef.zero else slot(coef.l_at(i)) for i in range(len(plan))]
    slots = [(update(corr), update(pred)) for corr, pred in plan]
    stacked = torch.as_tensor(np.stack(arrays), dtype=dtype).to(device).reshape(-1, *shape) if arrays else None
    dev = lambda c: stacked[c] if isinstance(c, int) else c
    make = lambda u: None if u is None else _Update(dev(u[0]), [dev(c) for c in u[1]], dev(u[2]))
    return [dev(c) for c in l_slots], [(make(c), make(p)) for c, p in slots]


#: coefficient plans of recent runs: repeated runs with the same statistics, grid and options (the batches of
#: an FID job, a sweep) reuse them; keyed by the statistics' content, so editing an EMS in place is safe
_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 8


def cached_device_plan(stats: EMS, idx: np.ndarray, g, plan, shape: tuple[int, ...], dtype, device):
    h = hashlib.sha256()
    for name in ("lam", "l", "s", "b"):
        h.update(getattr(stats, name).to(F64).contiguous().numpy().tobytes())
    key = (h.hexdigest(), np.asarray(g.t, dtype=np.float64).tobytes(), tuple(plan), shape, dtype, str(device))
    if key not in _PLAN_CACHE:
        coef = _Coefficients(stats, idx, np.asarray(g.lam, dtype=np.float64), g.alpha, g.sigma)
        while len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        _PLAN_CACHE[key] = _device_plan(coef, plan, shape, dtype, device)
    return _PLAN_CACHE[key]
