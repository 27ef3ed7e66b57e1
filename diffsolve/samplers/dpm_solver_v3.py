"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023; arXiv 2310.13268) with empirical model statistics (EMS).

**Formulation.** diffsolve writes the solver in the data-prediction form, so that zero statistics give exactly
our DPM-Solver++ (:mod:`.dpm_solver_pp`). With x̂0 the model's data prediction and, per dimension, a
coefficient l_λ, the probability-flow ODE in λ = log(α/σ) reads

    dx/dλ = (d log σ/dλ + l_λ) x + α_λ f_θ(x, λ),        f_θ = x̂0 − l_λ x/α_λ,

and with the affine model f_θ' ≈ s_λ f_θ + b_λ of its λ-derivative along the trajectory, the function
g_θ(λ) = e^{−S(λ)} f_θ − B(λ) (S = ∫_{λ_s}^λ s, B = ∫_{λ_s}^λ e^{−S} b) is nearly constant. The exact solution
from s to t (L = ∫_{λ_s}^λ l) is

    x_t = (σ_t/σ_s) e^{L_t} x_s + σ_t ∫ e^{λ + L_t − L + S} (g_θ(λ) + B(λ)) dλ,

and the solver replaces g_θ by the polynomial through g at the current and previous points (order p = number
of points; "pseudo-order": the k-th derivative from the divided difference of the k + 1 nearest points only).
The weight integrals are split into the exact DPM-Solver++ part, σ_t ∫ e^λ ((λ−λ_s)/h)^k dλ = α_t k! h
φ_{k+1}(−h), plus a correction ∝ e^{L_t − L + S} − 1 integrated by the trapezoid rule on the EMS grid
(subdivided ×4, statistics piecewise linear in λ): with l = s = b = 0 the correction is exactly zero and the
update is DPM-Solver++ (order 2: the φ2 "heun" form; order 3: our 3M with the 2·hφ3 weight) to round-off.

The corrector (UniPC-like, no extra evaluation) redoes the last step with the new point's f included; like
the official code it keeps f_θ (equivalently N_θ) at the new point fixed and only moves x.

**Relation to the paper's and the official code's variables.** The paper (and thu-ml/DPM-Solver-v3) use the
noise form N_θ = σ ε_θ − l^p x; since α x̂0 = x − σ ε̂, the two are the same ODE with l = 1 − l^p, s = s^p,
b = −b^p (f = −f^p). Their "degenerated" DPM-Solver++ setting l^p = 1, s = b = 0 is our l = s = b = 0.

**EMS** (:func:`compute_ems`): on a uniform λ grid of ``n_lambda`` intervals between the sampling limits,
from K noised data samples x_λ = α x0 + σ ε (the same x0, ε and probe v at every λ, so the estimates are
smooth in λ):

- l_λ = E[diag(α ∂x̂0/∂x)] (the minimiser of E‖∇_x(α f_θ)‖_F², i.e. 1 − the paper's l*), estimated as
  E[v ⊙ α J v] with Rademacher v (one Jacobian-vector product per sample);
- s_λ, b_λ = argmin E‖f_θ' − s f_θ − b‖² per dimension (least squares), where f_θ' is the total λ-derivative
  of f_θ along the ODE, plus the l' term from the l estimates. By default (``derivative="grid"``) x̂0's part is
  the central difference over one EMS grid spacing along the trajectory; ``derivative="jvp"`` takes the exact
  tangent derivative (a second JVP with tangent (dx/dλ, dt/dλ)), which on UNets with a sinusoidal time
  embedding follows the embedding's fast wiggles (see :func:`compute_ems`).

Statistics are per dimension (per channel and pixel for images), stored as (n_lambda + 1, *sample_shape).

**Timesteps** are snapped to the EMS grid: every interior sampling time moves to the nearest EMS λ point;
t_start and t_end must lie on the grid (an end time outside or between its points is an error, never a
silent misalignment), and two times snapping to one point is an error (more steps than the grid resolves).
logSNR steps that divide ``n_lambda`` (120 = 2³·3·5 by default: 5, 6, 8, 10, 12, 15, 20 …) land exactly.

**Default grid: time-quadratic** (t uniform in √t). The statistics make the nearly linear ends of the
trajectory (very noisy, nearly clean) cheap to integrate, so the steps are best spent in the middle of the λ
range, where the data distribution's modes separate; for linear-β schedules (DDPM, score-SDE VP) the
time-quadratic grid does that, and on the Gaussian-mixture oracle it beat logSNR and time-uniform for v3 at
5–10 NFE (benchmarks/dpm_solver_v3.py). For the cosine schedule, time-uniform has that shape and is the
better choice (``grid="time_uniform"``).

**Half-corrector.** ``half_corrector=True`` applies the corrector only at points with t ≤ T/2 (T the
schedule's largest time), the paper's rule as recorded in the project's reference notes; the official code
tests ``t > 0.5`` instead (the inverse), available as ``half_corrector="official"``.

**Other differences from the official code.** (1) It integrates every coefficient, the φ-function part
included, with the trapezoid rule on the EMS grid, so even its "degenerated" statistics miss DPM-Solver++ by
the quadrature error (≈ 5e-4 relative at 120 points, and an error floor at many steps); here that part is
exact. (2) It rounds any time onto the grid, an end time outside it included; here that is an error. (3)
Lower order at the end follows our DPM-Solver++ (diffusers' rule: below 15 steps, order 1 at the last and ≤ 2
at the second-to-last step) rather than min(order, steps − i) at every step count. (4) Its step times and
Vandermonde solves are float32 (``torch.FloatTensor``); ours are host float64. The predictor, pseudo-order and
corrector (same order as the preceding predictor step; one more with ``corrector_pseudo``) follow it.

**Class-conditional models**: statistics are computed either for the model without labels (its null class:
``conditional=False``) or for the guided model at one guidance scale with the data's labels
(``conditional=True``); sampling checks that the run matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import exp_moments, lagrange_basis_coefficients, multistep_order
from ..files import atomic_write
from ..model import DiffusionModel
from ..registry import register_sampler

Tensor = torch.Tensor
F64 = torch.float64

FORMAT = "diffsolve-ems/1"
#: shipped statistics live next to the shipped models, named ``<model>_ems.safetensors``
SHIPPED_EMS_DIR = Path(__file__).resolve().parents[1] / "models"
_REFINE = 4  # sub-intervals per EMS interval for the correction integrals
_JVP_METHODS = ("auto", "forward", "double_backward", "finite_difference")
_CHECKPOINT_SECONDS = 30.0  # how often compute_ems writes its checkpoint (and after every batch)


# ---- model identity --------------------------------------------------------------------------------------

_MODULE_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _hash_tensor(h, name: str, t: Tensor) -> None:
    t = t.detach()
    # floating weights are hashed in half precision, so float32/float16 copies of one model match
    t = t.to("cpu", torch.float16) if t.is_floating_point() else t.to("cpu", torch.int64)
    h.update(f"{name}:{tuple(t.shape)}:".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_module(module: torch.nn.Module) -> str:
    state = module.state_dict()
    versions = tuple(v._version for v in state.values())
    cached = _MODULE_HASHES.get(module)
    if cached is not None and cached[0] == versions:
        return cached[1]
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name in sorted(state):
        _hash_tensor(h, name, state[name])
    digest = h.hexdigest()
    _MODULE_HASHES[module] = (versions, digest)
    return digest


def _hash_object(h, obj: Any, name: str, depth: int) -> None:
    if isinstance(obj, Tensor):
        _hash_tensor(h, name, obj)
    elif isinstance(obj, torch.nn.Module):
        h.update(f"{name}:module:{_hash_module(obj)}".encode())
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        h.update(f"{name}={obj!r};".encode())
    elif isinstance(obj, (DiffusionModel, type)) or depth > 1:
        return
    elif callable(obj) and getattr(obj, "__closure__", None) is not None:
        h.update(f"{name}:fn:{getattr(obj, '__qualname__', '')}".encode())
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__):
            with contextlib.suppress(ValueError):  # an empty cell
                _hash_object(h, cell.cell_contents, f"{name}.{var}", depth + 1)
    elif hasattr(obj, "__dict__"):
        h.update(f"{name}:{type(obj).__qualname__}".encode())
        for key in sorted(vars(obj)):
            _hash_object(h, vars(obj)[key], f"{name}.{key}", depth + 1)


def model_fingerprint(model: DiffusionModel) -> str:
    """A hash identifying the network: its class and weights (an ``nn.Module``: every state-dict tensor, in
    half precision so that float32 and float16 copies match), or for a plain function its name and the
    tensors it closes over (e.g. the parameters of a :class:`~diffsolve.testing.GaussianMixture` oracle)."""
    net = model.net
    if isinstance(net, torch.nn.Module):
        return _hash_module(net)
    h = hashlib.sha256(f"{getattr(net, '__module__', '')}.{getattr(net, '__qualname__', type(net).__qualname__)}".encode())
    _hash_object(h, net, "net", 0)
    return h.hexdigest()


# ---- the statistics and their storage -------------------------------------------------------------------


@dataclass
class EMS:
    """Empirical model statistics on a uniform λ grid (see the module docstring for their definition).

    ``t`` and ``lam`` (float64, shape (N + 1,)) run from the sampling start (noisiest, smallest λ) to its end;
    ``l``, ``s``, ``b`` have shape (N + 1, *sample_shape). The remaining fields identify what they were
    computed for; :meth:`check` compares them with a model and a sampling run.
    """

    t: Tensor
    lam: Tensor
    l: Tensor
    s: Tensor
    b: Tensor
    schedule: str
    prediction: str
    model_hash: str
    conditional: bool = False
    guidance_scale: float = 1.0
    num_samples: int = 0
    info: dict = field(default_factory=dict)

    @property
    def n_lambda(self) -> int:
        """The number of grid intervals N (arrays hold N + 1 points)."""
        return len(self.lam) - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def __repr__(self) -> str:
        return (f"EMS(n_lambda={self.n_lambda}, shape={self.shape}, t=[{float(self.t[0]):.6g} → {float(self.t[-1]):.6g}], "
                f"schedule={self.schedule}, prediction={self.prediction!r}, K={self.num_samples}, "
                f"conditional={self.conditional}, guidance_scale={self.guidance_scale})")

    @classmethod
    def zeros(cls, model: DiffusionModel, n_lambda: int = 120, *, t_start: float | None = None,
              t_end: float | None = None, shape: tuple[int, ...] | None = None, conditional: bool = False,
              guidance_scale: float = 1.0) -> "EMS":
        """l = s = b = 0 on the grid ``compute_ems`` would use: the sampler then is DPM-Solver++."""
        shape = _sample_shape(model, shape)
        t, lam = ems_grid(model.schedule, n_lambda, t_start, t_end)
        z = torch.zeros((n_lambda + 1, *shape), dtype=F64)
        return cls(t, lam, z, z.clone(), z.clone(), repr(model.schedule), model.prediction, model_fingerprint(model),
                   conditional, float(guidance_scale), 0, {"kind": "zeros"})

    # -- storage --
    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        """Write a safetensors file: tensors ``t``, ``lambda`` (float64) and ``l``, ``s``, ``b`` (``dtype``),
        with the identity fields as metadata."""
        from safetensors.torch import save

        tensors = {"t": self.t.to(F64).contiguous(), "lambda": self.lam.to(F64).contiguous(),
                   **{k: getattr(self, k).to(dtype).contiguous() for k in ("l", "s", "b")}}
        meta = {"format": FORMAT, "schedule": self.schedule, "prediction": self.prediction,
                "model_hash": self.model_hash, "conditional": json.dumps(self.conditional),
                "guidance_scale": repr(float(self.guidance_scale)), "num_samples": str(int(self.num_samples)),
                "n_lambda": str(self.n_lambda), "parameterization": "data-prediction (l = 1 - l_paper, b = -b_paper)",
                "info": json.dumps(self.info)}
        atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EMS":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ems: no statistics file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # not a safetensors file
            raise ValueError(f"ems: {path} is not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"ems: {path} is not a diffsolve EMS file (format {meta.get('format')!r}, expected {FORMAT!r})")
        missing = {"t", "lambda", "l", "s", "b"} - set(tensors)
        if missing:
            raise ValueError(f"ems: {path} lacks the tensors {sorted(missing)}")
        return cls(tensors["t"].to(F64), tensors["lambda"].to(F64), tensors["l"], tensors["s"], tensors["b"],
                   meta["schedule"], meta["prediction"], meta["model_hash"], json.loads(meta["conditional"]),
                   float(meta["guidance_scale"]), int(meta["num_samples"]), json.loads(meta.get("info", "{}")))

    # -- compatibility --
    def check(self, model: DiffusionModel, shape: tuple[int, ...] | None = None, *, conditional: bool = False,
              guidance_scale: float = 1.0) -> None:
        """Raise ``ValueError`` naming the mismatch if these statistics were not computed for ``model`` (its
        weights, schedule, prediction type), samples of ``shape`` and this conditioning."""
        n = len(self.lam)
        if self.t.shape != (n,) or any(getattr(self, k).shape[0] != n for k in ("l", "s", "b")) or n < 2:
            raise ValueError(f"ems: inconsistent arrays (t {tuple(self.t.shape)}, lambda {tuple(self.lam.shape)}, "
                             f"l {tuple(self.l.shape)}, s {tuple(self.s.shape)}, b {tuple(self.b.shape)})")
        if shape is not None and tuple(shape) != self.shape:
            raise ValueError(f"ems: the statistics are for samples of shape {self.shape}, but the samples have shape "
                             f"{tuple(shape)} (another resolution or channel count): compute EMS for this model")
        if self.prediction != model.prediction:
            raise ValueError(f"ems: the statistics were computed for prediction type {self.prediction!r}, the model "
                             f"predicts {model.prediction!r}: recompute the EMS for this model")
        if self.schedule != repr(model.schedule):
            raise ValueError(f"ems: the statistics were computed for the schedule {self.schedule}, the model uses "
                             f"{model.schedule!r}: recompute the EMS for this schedule")
        lam = model.schedule.lambda_(self.t.to(F64))
        if not torch.allclose(lam, self.lam.to(F64), rtol=1e-6, atol=1e-6):
            worst = float((lam - self.lam).abs().max())
            raise ValueError(f"ems: the model's schedule {model.schedule!r} gives other λ at the statistics' times "
                             f"(max difference {worst:.3g}): they were computed for another noise schedule")
        digest = model_fingerprint(model)
        if digest != self.model_hash:
            raise ValueError(f"ems: the statistics belong to another model (model hash {self.model_hash[:12]}…, this "
                             f"model {digest[:12]}…): compute EMS for it with compute_ems or `diffsolve ems`")
        if conditional != self.conditional or (conditional and float(guidance_scale) != self.guidance_scale):
            have = (f"class-conditional at guidance scale {self.guidance_scale}" if self.conditional
                    else "the model without class labels")
            want = f"class-conditional at guidance scale {guidance_scale}" if conditional else "without class labels"
            raise ValueError(f"ems: the statistics are for {have}, but this run samples {want}: compute EMS with "
                             "matching conditional=/guidance_scale=")


def load_ems(path: str | os.PathLike) -> EMS:
    """Read statistics written by :meth:`EMS.save` (or ``diffsolve ems``)."""
    return EMS.load(path)


def shipped_ems(model: DiffusionModel) -> EMS | None:
    """The statistics shipped with diffsolve for this model (matched by its weights' hash), or None."""
    from safetensors import safe_open

    digest = None
    for path in sorted(SHIPPED_EMS_DIR.glob("*_ems.safetensors")):
        with contextlib.suppress(Exception):
            with safe_open(str(path), framework="pt") as f:
                file_hash = (f.metadata() or {}).get("model_hash")
            digest = digest or model_fingerprint(model)
            if file_hash == digest:
                return EMS.load(path)
    return None


# ---- the EMS grid and schedule derivatives --------------------------------------------------------------


def ems_grid(schedule, n_lambda: int, t_start: float | None = None, t_end: float | None = None) -> tuple[Tensor, Tensor]:
    """(t, λ) of the uniform λ grid with ``n_lambda`` intervals from t_start to t_end (defaults: the schedule's
    sampling range), float64; t is exact at both ends."""
    if isinstance(n_lambda, bool) or not isinstance(n_lambda, int) or n_lambda < 1:
        raise ValueError(f"n_lambda: expected an integer >= 1, got {n_lambda!r}")
    t_start = schedule.default_range[0] if t_start is None else float(t_start)
    t_end = schedule.default_range[1] if t_end is None else float(t_end)
    schedule.check_range(t_start, t_end)
    if t_end <= 0:
        raise ValueError(f"t_end: the EMS grid is uniform in λ and cannot reach t_end={t_end} (λ = +∞); use a small "
                         "t_end > 0")
    lam_ends = schedule.lambda_(torch.tensor([t_start, t_end], dtype=F64))
    lam = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), n_lambda + 1, dtype=F64)
    t = schedule.t_from_lambda(lam)
    t[0], t[-1] = t_start, t_end
    lam[0], lam[-1] = lam_ends[0], lam_ends[1]
    return t, lam


def _log_derivatives(schedule, lam: float) -> tuple[float, float]:
    """(d log α/dλ, d log σ/dλ) at λ: VP σ², −α²; VE (α = 1, σ = e^{−λ}) 0, −1."""
    if schedule.is_vp:
        a2 = 1.0 / (1.0 + math.exp(-2.0 * lam))
        return 1.0 - a2, -a2
    return 0.0, -1.0


def _dt_dlambda(schedule, t: float) -> float:
    """dt/dλ from the SDE coefficients: g² = −2σ² dλ/dt."""
    tt = torch.tensor([t], dtype=F64)
    _, g2 = schedule.sde_coefficients(tt)
    return float(-2.0 * schedule.sigma(tt) ** 2 / g2)


def _sample_shape(model: DiffusionModel, shape) -> tuple[int, ...]:
    shape = model.sample_shape if shape is None else tuple(shape)
    if shape is None:
        raise ValueError("shape: the model does not know its sample shape; pass shape=")
    return tuple(int(s) for s in shape)


# ---- Jacobian-vector products ---------------------------------------------------------------------------


@contextlib.contextmanager
def _math_attention():
    """Route scaled_dot_product_attention to its composite ("math") kernel, which (unlike the fused CPU
    flash kernel) has double-backward support."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _jvp_pair(fn, x: Tensor, t: Tensor, v: Tensor, tangent_x, dt: float, method: str, v_scale: float = 1.0):
    """x̂0 = fn(x, t), J_x v, and the total derivative J_x ẋ + ∂_t x̂0 · dt where ẋ = tangent_x(x̂0) (None
    when ``tangent_x`` is None).

    ``forward``: two forward-mode JVPs (torch.func.jvp); ``double_backward``: one reverse pass with
    create_graph and two double-backward products (exact; works where forward AD rules are missing);
    ``finite_difference``: central differences with step ε^{1/3} of the dtype (≈ 5e-3 in float32, 6e-6 in
    float64), times ``v_scale`` for the probe v: the denoiser varies on the scale of the noise level σ, so the
    probe step must shrink with σ (a fixed 5e-3 misses the Jacobian by ~15 % at σ = 0.01); the trajectory
    tangent dx/dλ = α(x̂0 − αx)·… is itself O(σ)."""
    dt_vec = torch.full_like(t, dt)
    if method == "forward":
        out, jv = torch.func.jvp(fn, (x, t), (v, torch.zeros_like(t)))
        if tangent_x is None:
            return out, jv, None
        _, dout = torch.func.jvp(fn, (x, t), (tangent_x(out), dt_vec))
        return out, jv, dout
    if method == "double_backward":
        with torch.enable_grad(), _math_attention():
            x_ = x.detach().requires_grad_(True)
            t_ = t.detach().requires_grad_(True)
            out = fn(x_, t_)
            u = torch.zeros_like(out, requires_grad=True)
            gx, gt = torch.autograd.grad(out, (x_, t_), u, create_graph=True, allow_unused=True)
            jv, = torch.autograd.grad((gx * v).sum(), u, retain_graph=tangent_x is not None)
            if tangent_x is None:
                return out.detach(), jv, None
            tx = tangent_x(out.detach())
            total = (gx * tx).sum() + ((gt * dt_vec).sum() if gt is not None else 0.0)
            dout, = torch.autograd.grad(total, u)
        return out.detach(), jv, dout
    if method == "finite_difference":
        eps = torch.finfo(x.dtype).eps ** (1 / 3)
        ev = eps * v_scale
        with torch.no_grad():
            out = fn(x, t)
            jv = (fn(x + ev * v, t) - fn(x - ev * v, t)) / (2 * ev)
            if tangent_x is None:
                return out, jv, None
            tx = tangent_x(out)
            dout = (fn(x + eps * tx, t + eps * dt_vec) - fn(x - eps * tx, t - eps * dt_vec)) / (2 * eps)
        return out, jv, dout
    raise ValueError(f"jvp: expected one of {list(_JVP_METHODS)}, got {method!r}")


# ---- EMS computation --------------------------------------------------------------------------------------

_MOMENTS = ("q", "qq", "a", "c", "da", "dc", "aa", "ac", "cc", "a_da", "a_dc", "c_da", "c_dc")


def _collect(data, num_samples: int, conditional: bool) -> tuple[Tensor, Tensor | None]:
    """The first ``num_samples`` items of ``data`` (a tensor, a DataLoader or an iterable of batches; a batch
    is a tensor or a tuple/list (images, labels, …)); a re-iterable source is cycled if it is shorter."""
    xs, ys, n = [], [], 0
    while n < num_samples:
        got = 0
        source = [data] if isinstance(data, Tensor) else data
        for batch in source:
            labels = None
            if isinstance(batch, (tuple, list)):
                batch, labels = batch[0], (batch[1] if len(batch) > 1 else None)
            elif isinstance(batch, dict):
                key = next((k for k in ("images", "pixel_values", "x", "sample") if k in batch), None)
                if key is None:
                    raise ValueError(f"data: a batch dict needs an 'images' entry, got keys {sorted(batch)}")
                batch, labels = batch[key], batch.get("labels", batch.get("class_labels"))
            if not isinstance(batch, Tensor):
                raise TypeError(f"data: expected tensors (or (images, labels) batches), got {type(batch).__name__}")
            take = min(len(batch), num_samples - n)
            xs.append(batch[:take])
            if conditional:
                if labels is None:
                    raise ValueError("conditional=True needs class labels: pass data as (images, labels) batches")
                ys.append(torch.as_tensor(labels)[:take].long())
            n += take
            got += take
            if n >= num_samples:
                break
        if got == 0:
            raise ValueError(f"data: supplied {n} samples, but num_samples={num_samples} were asked for (a one-shot "
                             "iterator cannot be cycled: pass a tensor, a DataLoader, or num_samples <= its length)")
    return torch.cat(xs), (torch.cat(ys) if conditional else None)


def _config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def compute_ems(
    model: DiffusionModel,
    data,
    *,
    n_lambda: int = 120,
    num_samples: int = 1024,
    t_start: float | None = None,
    t_end: float | None = None,
    batch_size: int = 256,
    conditional: bool = False,
    guidance_scale: float = 1.0,
    seed: int = 0,
    jvp: str = "auto",
    derivative: str = "grid",
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> EMS:
    """Compute the empirical model statistics l, s, b of ``model`` (see the module docstring).

    Args:
        data: clean training samples x0 in the model's data space: a tensor (N, *sample_shape), a DataLoader or
            an iterable of batches (tensors or (images, labels) tuples). The first ``num_samples`` are used
            (cycled with fresh noise if there are fewer).
        n_lambda: intervals of the uniform λ grid (arrays hold n_lambda + 1 points; the paper uses 120–1200).
            Sampling steps snap to this grid, so keep it a multiple of the step counts you use.
        num_samples: K, the noised samples per λ (paper: 1024–4096). The Monte-Carlo standard error of l is
            reported in ``ems.info["l_stderr_max"]``.
        t_start, t_end: the grid's limits (default: the schedule's sampling range); sampling must start and end
            on the grid.
        batch_size: samples per network call (each λ costs two JVPs per sample).
        conditional, guidance_scale: statistics of the model without labels (its null class; default) or of
            the guided model at this scale with the data's labels (``data`` must then yield labels).
        seed: noise ε and Rademacher probes are drawn per batch from (seed, batch index).
        jvp: how J v is computed: "auto" (forward-mode AD, falling back to double backward, then central
            differences), "forward", "double_backward" or "finite_difference".
        derivative: how f_θ' along the trajectory is computed. "grid" (default): the central difference
            of x̂0 between x ± Δλ·dx/dλ at λ ± Δλ, Δλ the grid spacing (one-sided at the grid's ends), i.e.
            the derivative at the resolution the solver sees. A network trained on integer timesteps
            (digits16, every DDPM UNet) has a sinusoidal time embedding whose fast wiggles dominate the
            instantaneous ∂x̂0/∂t: with "jvp" (the exact tangent derivative, by the ``jvp`` method) digits16's
            s and b jump from one grid point to the next (mean |second difference over λ| ≈ 2× their mean
            magnitude, against 0.4–0.8× with "grid", K = 64) and v3 loses to DPM-Solver++ at 5–10 NFE, while with
            "grid" it wins at 5 and 10 (benchmarks/RESULTS.md, ``--derivative-ablation``). On smooth models
            (the GMM oracle) the two agree to O(Δλ²).
        checkpoint: a file to save the running sums to (every 30 s and after every batch); a rerun with the
            same arguments resumes from it (a checkpoint written for other arguments is an error).
        progress: a tqdm bar over (batch, λ) evaluations.
        device, dtype: where and in which dtype to evaluate (default: the model's, else the data's).

    Returns:
        an :class:`EMS` (float64 arrays), ready for ``sample(..., "dpm_solver_v3", ems=...)`` or ``.save``.
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model: expected a diffsolve DiffusionModel, got {type(model).__name__}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples: expected an integer >= 2, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if jvp not in _JVP_METHODS:
        raise ValueError(f"jvp: expected one of {list(_JVP_METHODS)}, got {jvp!r}")
    if derivative not in ("grid", "jvp"):
        raise ValueError(f"derivative: expected 'grid' or 'jvp', got {derivative!r}")
    if conditional and model.num_classes is None:
        raise ValueError("conditional=True needs a class-conditional model")
    if not conditional and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} needs conditional=True (guidance mixes the conditional "
                         "and unconditional predictions)")
    schedule = model.schedule
    t_grid, lam_grid = ems_grid(schedule, n_lambda, t_start, t_end)
    x0_all, y_all = _collect(data, num_samples, conditional)
    shape = tuple(x0_all.shape[1:])
    if model.sample_shape is not None and shape != model.sample_shape:
        raise ValueError(f"data: samples of shape {shape}, but the model takes {model.sample_shape}")
    device = torch.device(device) if device is not None else model.device
    dtype = dtype or model.dtype or (x0_all.dtype if x0_all.is_floating_point() else torch.float32)
    digest = model_fingerprint(model)
    D = math.prod(shape)
    n_batches = math.ceil(num_samples / batch_size)
    config = {"model_hash": digest, "schedule": repr(schedule), "prediction": model.prediction,
              "lam": [float(lam_grid[0]), float(lam_grid[-1]), n_lambda], "K": num_samples, "seed": seed,
              "batch_size": batch_size, "conditional": conditional, "guidance_scale": float(guidance_scale),
              "derivative": derivative,
              "data": hashlib.sha256(x0_all.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()}
    acc = {k: np.zeros((n_lambda + 1, D)) for k in _MOMENTS}
    start_batch, start_j, elapsed, method = 0, 0, 0.0, jvp
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        start_batch, start_j, elapsed, saved_method = _load_checkpoint(ckpt, config, acc)
        # the JVP method "auto" picked before the checkpoint (reported even when no batch is left to run)
        method = saved_method if jvp == "auto" and saved_method else jvp
    labels_all = None if not conditional else y_all
    fn_labels = None

    def fn(x, t):
        return model.predict(x, t, fn_labels, float(guidance_scale)).x0

    # per-λ constants (host float64)
    consts = []
    for j in range(n_lambda + 1):
        tj, lj = float(t_grid[j]), float(lam_grid[j])
        a, s = (float(v) for v in schedule.alpha_sigma_from_lambda(torch.tensor(lj, dtype=F64)))
        dla, dls = _log_derivatives(schedule, lj)
        consts.append((tj, a, s, dla, dls, _dt_dlambda(schedule, tj)))

    # the "grid" derivative: x̂0 at λ_j + hi and λ_j + lo (hi = +Δλ, lo = −Δλ; 0 at the grid's ends)
    delta = float(lam_grid[1] - lam_grid[0])
    offsets = [(delta if j < n_lambda else 0.0, -delta if j > 0 else 0.0) for j in range(n_lambda + 1)]
    t_at = lambda lam: float(schedule.t_from_lambda(torch.tensor(lam, dtype=F64)))
    t_off = [tuple(t_at(float(lam_grid[j]) + o) if o else float(t_grid[j]) for o in offsets[j])
             for j in range(n_lambda + 1)]

    bar = tqdm(total=(n_batches - start_batch) * (n_lambda + 1) - start_j, desc="EMS", disable=not progress,
               leave=False)
    t0 = last_save = time.perf_counter()
    for bi in range(start_batch, n_batches):
        lo, hi = bi * batch_size, min(num_samples, (bi + 1) * batch_size)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + bi)
        x0 = x0_all[lo:hi].to(F64)
        eps = torch.randn(x0.shape, generator=gen, dtype=F64)
        v = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(F64)
        x0, eps, v = (u.to(device=device, dtype=dtype) for u in (x0, eps, v))
        fn_labels = None if labels_all is None else labels_all[lo:hi].to(device)
        for j, (tj, a, s, dla, dls, dtdl) in enumerate(consts):
            if bi == start_batch and j < start_j:
                continue  # done before the checkpoint
            x = a * x0 + s * eps
            tvec = torch.full((hi - lo,), tj, dtype=dtype, device=device)
            tangent = lambda out, x=x, a=a, dls=dls: dls * x + a * out  # dx/dλ along the ODE
            pair_tangent = tangent if derivative == "jvp" else None
            if method == "auto":
                for candidate in ("forward", "double_backward", "finite_difference"):
                    try:
                        out, jv, dout = _jvp_pair(fn, x, tvec, v, pair_tangent, dtdl, candidate, s)
                        method = candidate
                        break
                    except (NotImplementedError, RuntimeError):
                        continue
            else:
                out, jv, dout = _jvp_pair(fn, x, tvec, v, pair_tangent, dtdl, method, s)
            if derivative == "grid":  # (x̂0(λ + hi) − x̂0(λ + lo))/(hi − lo) along x + o dx/dλ
                with torch.no_grad():
                    tx = tangent(out.detach())
                    vals = [fn(x + o * tx, torch.full_like(tvec, tt)) if o else out.detach()
                            for o, tt in zip(offsets[j], t_off[j])]
                    dout = (vals[0] - vals[1]) / (offsets[j][0] - offsets[j][1])
            A = out.detach().to(F64).flatten(1)
            C = (x.to(F64) / a).flatten(1)
            dA = dout.detach().to(F64).flatten(1)
            dX = tangent(out.detach()).to(F64).flatten(1)
            dC = dX / a - C * dla
            Q = a * (v.to(F64).flatten(1) * jv.detach().to(F64).flatten(1))
            for key, val in (("q", Q), ("qq", Q * Q), ("a", A), ("c", C), ("da", dA), ("dc", dC), ("aa", A * A),
                             ("ac", A * C), ("cc", C * C), ("a_da", A * dA), ("a_dc", A * dC), ("c_da", C * dA),
                             ("c_dc", C * dC)):
                acc[key][j] += val.sum(0).cpu().numpy()
            bar.update(1)
            if ckpt is not None and (j == n_lambda or time.perf_counter() - last_save >= _CHECKPOINT_SECONDS):
                # position (batch, next λ index); every 30 s and at the end of each batch
                done = (bi + 1, 0) if j == n_lambda else (bi, j + 1)
                _save_checkpoint(ckpt, config, acc, done, elapsed + time.perf_counter() - t0, method)
                last_save = time.perf_counter()
    bar.close()
    elapsed += time.perf_counter() - t0

    l, s_, b_, l_se = _finish(acc, num_samples, lam_grid.numpy())
    to_t = lambda arr: torch.from_numpy(arr).reshape(n_lambda + 1, *shape)
    info = {"jvp": method, "derivative": derivative, "seed": seed, "compute_seconds": round(elapsed, 3), "l_stderr_max": float(l_se.max()),
            "l_stderr_mean": float(l_se.mean()), "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    return EMS(t_grid, lam_grid, to_t(l), to_t(s_), to_t(b_), repr(schedule), model.prediction, digest,
               bool(conditional), float(guidance_scale), num_samples, info)


def _finish(acc: dict, n: int, lam: np.ndarray):
    """l, s, b and the standard error of l from the running sums (float64)."""
    E = {k: v / n for k, v in acc.items()}
    l = E["q"]
    l_se = np.sqrt(np.maximum(E["qq"] - l**2, 0.0) * n / (n - 1) / n)
    if len(lam) >= 4:  # l' from the cubic spline through the (smooth: common random numbers) estimates
        from scipy.interpolate import CubicSpline

        dl = CubicSpline(lam, l, axis=0)(lam, 1)
    else:
        dl = np.gradient(l, lam, axis=0) if len(lam) > 1 else np.zeros_like(l)
    # f = a − l c,  f' = da − l' c − l dc  (a = x̂0, c = x/α)
    mf = E["a"] - l * E["c"]
    mf1 = E["da"] - dl * E["c"] - l * E["dc"]
    ff = E["aa"] - 2 * l * E["ac"] + l**2 * E["cc"]
    ff1 = (E["a_da"] - dl * E["ac"] - l * E["a_dc"] - l * E["c_da"] + l * dl * E["cc"] + l**2 * E["c_dc"])
    var = ff - mf**2
    cov = ff1 - mf * mf1
    # the moments are expanded in l, so var carries round-off of the size of the terms that cancel (f ≪ x̂0
    # near t = 0); below that level f does not vary across samples and the fit is s = 0, b = E[f']
    ok = var > 1e-10 * (E["aa"] + l**2 * E["cc"])
    s = np.where(ok, cov / np.where(ok, var, 1.0), 0.0)
    b = mf1 - s * mf
    return l, s, b, l_se


def _save_checkpoint(path: Path, config: dict, acc: dict, position: tuple[int, int], elapsed: float,
                     jvp: str) -> None:
    from safetensors.torch import save

    meta = {"config": json.dumps(config, sort_keys=True), "batch": str(position[0]), "lambda_index": str(position[1]),
            "elapsed": repr(elapsed), "jvp": jvp}
    atomic_write(path, lambda f: f.write(save({k: torch.from_numpy(v) for k, v in acc.items()}, metadata=meta)))


def _load_checkpoint(path: Path, config: dict, acc: dict) -> tuple[int, int, float, str | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        saved = json.loads(meta.get("config", "{}"))
        if _config_digest(saved) != _config_digest(config):
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise ValueError(f"checkpoint {path} was written for another EMS computation (differs in {diff}); "
                             "delete it or pass another checkpoint path")
        for k in acc:
            acc[k][:] = f.get_tensor(k).numpy()
    return int(meta["batch"]), int(meta["lambda_index"]), float(meta["elapsed"]), meta.get("jvp")


# ---- the sampler ------------------------------------------------------------------------------------------


def _resolve_ems(ems, model: DiffusionModel) -> EMS:
    if isinstance(ems, EMS):
        return ems
    if isinstance(ems, (str, os.PathLike)):
        return EMS.load(ems)
    if ems is None:
        found = shipped_ems(model)
        if found is None:
            raise ValueError("dpm_solver_v3 needs empirical model statistics for this model: pass ems= (an EMS or a "
                             "path to one; compute them with diffsolve.samplers.dpm_solver_v3.compute_ems or "
                             "`diffsolve ems`); no statistics shipped with diffsolve match this model")
        return found
    raise TypeError(f"ems: expected an EMS, a path or None, got {type(ems).__name__}")


def snap_to_ems(grid, ems: EMS) -> tuple[np.ndarray, np.ndarray]:
    """EMS indices of the sampling times and the snapped times (float64). Interior times move to the nearest
    grid λ; the first and last must lie on the grid (else ``ValueError``); indices must strictly increase."""
    lam_e = ems.lam.to(F64).numpy()
    n = len(lam_e) - 1
    lo, hi = lam_e[0], lam_e[-1]
    delta = (hi - lo) / n
    tol = 1e-6 * delta
    lam = np.asarray(grid.lam, dtype=np.float64)
    t = np.asarray(grid.t, dtype=np.float64)
    t_e = ems.t.to(F64).numpy()
    for name, k in (("t_start", 0), ("t_end", len(lam) - 1)):
        if not (lo - tol <= lam[k] <= hi + tol):
            raise ValueError(f"{name}={t[k]:.6g} (λ = {lam[k]:.6g}) lies outside the EMS grid, which covers "
                             f"t ∈ [{t_e[-1]:.6g}, {t_e[0]:.6g}] (λ ∈ [{lo:.6g}, {hi:.6g}]): sample within it or "
                             f"compute EMS with this {name}")
        j = int(round((lam[k] - lo) / delta))
        if abs(lam[k] - lam_e[j]) > tol:
            j0 = int(np.floor((lam[k] - lo) / delta))
            near = ", ".join(f"{t_e[i]:.6g}" for i in sorted({max(j0, 0), min(j0 + 1, n)}))
            raise ValueError(f"{name}={t[k]:.6g} is not a point of the EMS grid (n_lambda={n}, Δλ={delta:.4g}); the "
                             f"nearest grid times are {near}: pass one of them or recompute the EMS for this {name}")
    idx = np.clip(np.rint((lam - lo) / delta), 0, n).astype(np.int64)
    if np.any(np.diff(idx) <= 0):
        k = int(np.argmax(np.diff(idx) <= 0))
        raise ValueError(f"{len(t) - 1} steps on this grid do not fit the EMS grid (n_lambda={n}): times {t[k]:.6g} "
                         f"and {t[k + 1]:.6g} snap to the same EMS point; use fewer steps, a logSNR grid, or EMS with "
                         "a larger n_lambda")
    snapped = ems.t.to(F64).numpy()[idx].copy()
    snapped[0], snapped[-1] = t[0], t[-1]
    return idx, snapped


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


def _step_plan(g, order: int, pseudo_order: bool, corrector: bool, corrector_pseudo: bool, half_corrector,
               lower_order_final: bool, t_half: float) -> list[tuple[tuple | None, tuple]]:
    """Per step i: the corrector's update (s, t, nodes, pseudo) that revises x_i before it enters the
    history (None where none runs), and the predictor's update from x_i to x_{i+1}."""
    plan, p_prev = [], 0
    for i in range(g.steps):
        corr = None
        if corrector and i >= 1 and (half_corrector is False or (g.t[i] <= t_half) == (half_corrector is True)):
            c = p_prev + int(bool(corrector_pseudo))
            if c > 1:
                corr = (i - 1, i, (i - 1, i, *(i - 2 - k for k in range(c - 2))), bool(corrector_pseudo))
        p = multistep_order(i, g.steps, order, lower_order_final, final_to_zero=False)
        plan.append((corr, (i, i + 1, tuple(i - k for k in range(p)), bool(pseudo_order))))
        p_prev = p
    return plan


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


def _cached_device_plan(stats: EMS, idx: np.ndarray, g, plan, shape: tuple[int, ...], dtype, device):
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


@register_sampler("dpm_solver_v3", default_grid="time_quadratic")
def dpm_solver_v3(run, x, *, ems=None, order: int = 3, pseudo_order: bool = False, corrector: bool = True,
                  corrector_pseudo: bool = False, half_corrector: bool | str = False, lower_order_final: bool = True):
    """DPM-Solver-v3 (Zheng et al. 2023): multistep predictor (orders 1–3, pseudo-order) + corrector, with EMS.

    ``ems``: an EMS, a path to a saved one, or None for a model that ships statistics (digits16). Sampling
    times are snapped to the EMS grid (t_start and t_end must be grid points). ``corrector``: the UniPC-like
    corrector of the same order as the preceding predictor step (one order higher with ``corrector_pseudo``,
    whose derivatives are then pseudo-order estimates); ``half_corrector``: True applies it only at t ≤ T/2,
    "official" only at t > T/2 (the official code's test). With l = s = b = 0, ``corrector=False`` and
    ``pseudo_order=False`` this is ``dpm_solver_pp`` (order 2 with ``solver_type="heun"``).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if half_corrector not in (False, True, "official"):
        raise ValueError(f"half_corrector: expected False, True or 'official', got {half_corrector!r}")
    g = run.grid
    steps = g.steps
    if steps < order:
        raise ValueError(f"order {order} needs at least {order} steps (NFE) for the multistep warm-up, got steps={steps}; "
                         f"use order <= {steps} or more steps")
    model = run.model
    stats = _resolve_ems(ems, model)
    stats.check(model, tuple(x.shape[1:]), conditional=run.class_labels is not None,
                guidance_scale=run.guidance_scale)
    if g.sigma[-1] == 0:
        raise ValueError("t_end=0 lies outside the EMS grid (λ = +∞); end at the EMS grid's last time instead")
    idx, snapped = snap_to_ems(g, stats)
    run.set_grid(snapped)
    g = run.grid
    t_half = 0.5 * float(model.schedule.valid_range[1])
    plan = _step_plan(g, order, bool(pseudo_order), corrector, corrector_pseudo, half_corrector, lower_order_final,
                      t_half)
    l_steps, updates = _cached_device_plan(stats, idx, g, plan, tuple(x.shape[1:]), x.dtype, x.device)
    x_at: dict[int, Tensor] = {}  # x_m and f_m of the last steps, by step index m (the plan's nodes)
    f_at: dict[int, Tensor] = {}
    for i in run.steps("dpm_solver_v3"):
        pred = run.predict(x, i)
        f_at[i] = pred.x0 if l_steps[i] is None else pred.x0 - l_steps[i] * x / float(g.alpha[i])
        (corrector_key, predictor_key), (corrector_update, predictor_update) = plan[i], updates[i]
        if corrector_update is not None:
            x = corrector_update(x_at[i - 1], [f_at[m] for m in corrector_key[2]])
        x_at[i] = x
        x_at.pop(i - 4, None), f_at.pop(i - 4, None)
        x = predictor_update(x, [f_at[m] for m in predictor_key[2]])
        run.step_done(i, x, pred.x0)
    return x
