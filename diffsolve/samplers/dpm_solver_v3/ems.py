"""Computing the empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al. 2023, §3.2 and App. C).

On a uniform λ grid of ``n_lambda`` intervals between the sampling limits, from K noised data samples
x_λ = α x0 + σ ε (the same x0, ε and probe v at every λ, so the estimates are smooth in λ):

- l_λ = E[diag(α ∂x̂0/∂x)] (the minimiser of E‖∇_x(α f_θ)‖_F², i.e. 1 − the paper's l*, eq. (9)), estimated
  as E[v ⊙ α J v] with Rademacher v (one Jacobian-vector product per sample);
- s_λ, b_λ = argmin E‖f_θ' − s f_θ − b‖² per dimension (least squares, eq. (10)), where f_θ' is the total
  λ-derivative of f_θ = x̂0 − l x/α along the ODE, plus the l' term from the l estimates. By default
  (``derivative="grid"``) x̂0's part is the central difference over one EMS grid spacing along the trajectory;
  ``derivative="jvp"`` takes the exact tangent derivative (a second JVP with tangent (dx/dλ, dt/dλ)), which on
  UNets with a sinusoidal time embedding follows the embedding's fast wiggles (see :func:`compute_ems`).

The estimates are accumulated as running moments (so a long computation can be checkpointed and resumed) and
returned as an :class:`~.storage.EMS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...files import atomic_write
from ...model import DiffusionModel
from .storage import EMS, ems_grid, model_fingerprint

Tensor = torch.Tensor
F64 = torch.float64

_JVP_METHODS = ("auto", "forward", "double_backward", "finite_difference")
_CHECKPOINT_SECONDS = 30.0  # how often compute_ems writes its checkpoint (and after every batch)


# ---- schedule derivatives -------------------------------------------------------------------------------


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
    """Compute the empirical model statistics l, s, b of ``model`` (their definition: the module docstring).

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
