"""Empirical model statistics: the :class:`EMS` container, its file format, and the checks that tie it to one
model and one sampling run.

Statistics are per dimension (per channel and pixel for images), stored as (n_lambda + 1, *sample_shape) on a
uniform λ grid (:func:`ems_grid`) between the sampling limits, in diffsolve's data-prediction parameterisation
(l = 1 − the paper's l, s = the paper's s, b = −the paper's b; see :mod:`.sampler`). A file is a safetensors
file with the identity of what the statistics were computed for (model weights' hash, schedule, prediction
type, conditioning) as metadata; :meth:`EMS.check` refuses a run that does not match it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...files import atomic_write
from ...model import DiffusionModel

Tensor = torch.Tensor
F64 = torch.float64

FORMAT = "diffsolve-ems/1"
#: shipped statistics live next to the shipped models, named ``<model>_ems.safetensors``
SHIPPED_EMS_DIR = Path(__file__).resolve().parents[2] / "models"


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
    """Empirical model statistics on a uniform λ grid (their definition: :mod:`.ems`).

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


# ---- the EMS grid ----------------------------------------------------------------------------------------


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


def _sample_shape(model: DiffusionModel, shape) -> tuple[int, ...]:
    shape = model.sample_shape if shape is None else tuple(shape)
    if shape is None:
        raise ValueError("shape: the model does not know its sample shape; pass shape=")
    return tuple(int(s) for s in shape)
