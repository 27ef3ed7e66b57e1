"""``diffsolve.solve``: run a registered inverse-problem solver, every argument checked before the network is
called (the pattern of :func:`diffsolve.sample`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core import Run, SeededNoise, TimeGrid, batch_seeds, per_sample, solver_dtype
from ..model import DiffusionModel
from .noise import PoissonNoise, as_noise
from .operators import Operator
from .operators.base import image_resize_hint
from .registry import Problem, SolverSpec, get_solver

Tensor = torch.Tensor


@dataclass
class SolveInfo:
    """What ``solve(..., return_info=True)`` reports next to the reconstruction."""

    method: str
    #: batched network evaluations (DPS also back-propagates through each one)
    nfe: int
    steps: int
    #: the options the solver ran with (defaults filled in)
    options: dict
    #: wall-clock seconds of the solver loop (ends with a device sync)
    wall_time: float


def default_grid(schedule, steps: int, options: dict) -> Tensor:
    """Time-uniform from the schedule's t_start to t = 0 (the last step lands on the data): for a 1000-step
    discrete schedule and 1000 steps these are exactly its timesteps 999 … 0, then α = 1."""
    t_start = schedule.default_range[0]
    return torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)


def _check_y(operator: Operator, y) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a tensor of shape (batch, {', '.join(map(str, operator.shape_out))}), got "
                        f"{type(y).__name__}")
    if y.ndim != len(operator.shape_out) + 1 or tuple(y.shape[1:]) != tuple(operator.shape_out):
        raise ValueError(f"y: expected shape (batch, {', '.join(map(str, operator.shape_out))}) (the operator's "
                         f"output shape {tuple(operator.shape_out)} with a batch dimension), got {tuple(y.shape)}"
                         f"{image_resize_hint(operator.shape_out, y)}")
    if y.shape[0] < 1:
        raise ValueError("y: the batch is empty")
    if y.is_complex() != operator.complex_output:
        kind = "complex" if operator.complex_output else "real"
        raise ValueError(f"y: {type(operator).__name__} makes {kind} measurements, got a "
                         f"{'complex' if y.is_complex() else 'real'} tensor")
    if not y.is_floating_point() and not y.is_complex():
        raise TypeError(f"y: expected a floating-point tensor, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).flatten(1).any(1).nonzero()[0])
        raise ValueError(f"y: contains NaN or Inf (first in sample {bad}); a measurement must be finite")
    return y


def _check_shapes(model: DiffusionModel, operator: Operator) -> None:
    if model.sample_shape is not None and tuple(model.sample_shape) != tuple(operator.shape_in):
        what = " (its mask's shape)" if hasattr(operator, "mask") and type(operator).__name__ == "Inpainting" else ""
        raise ValueError(f"operator: {type(operator).__name__} takes samples of shape "
                         f"{tuple(operator.shape_in)}{what}, "
                         f"but the model makes samples of shape {tuple(model.sample_shape)}")
    if operator.complex_input:
        raise ValueError(f"operator: {type(operator).__name__} has a complex domain (complex_input=True), but the "
                         "model generates real samples; build it with complex_input=False")


def solve(
    model: DiffusionModel,
    operator: Operator,
    y: Tensor,
    method: str = "dds",
    *,
    noise=None,
    steps: int | None = None,
    seeds: Sequence[int] | Tensor | None = None,
    class_labels: Sequence[int] | Tensor | int | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    callback: Callable | None = None,
    return_info: bool = False,
    **options,
):
    """Reconstruct x from a measurement y = A(x) + n with a diffusion prior.

    Args:
        model: a :class:`~diffsolve.DiffusionModel` (a class-conditional one runs on its null class unless
            ``class_labels`` are given).
        operator: a :mod:`diffsolve.inverse` operator whose ``shape_in`` is the model's sample shape.
        y: measurements (batch, *operator.shape_out), finite.
        method: ``"dds"`` (default; linear operators), ``"dps"``, ``"daps"`` (= ``"daps_1k"``), ``"daps_100"``
            (``diffsolve solvers`` lists them with their options).
        noise: the measurement's noise model: ``GaussianNoise(sigma)``, ``PoissonNoise(rate)`` or a number
            (σ_y of Gaussian noise), σ_y in the model's data space ([−1, 1] for image models). Required:
            every solver's data term depends on it; ``0`` for a noiseless measurement.
        steps: the solver's step count (default: the method's: DPS 1000 ancestral steps, DDS 50 DDIM steps,
            DAPS 200 or 50 annealing steps).
        seeds: one integer per sample (default 0 … batch−1); sample k depends only on ``seeds[k]``.
        class_labels, guidance_scale: class conditioning of the prior.
        callback: ``callback(step, t, x, x0_pred)`` after every (outer) step.
        return_info: also return a :class:`SolveInfo`.
        **options: the method's options; unknown ones (and another method's) are an error.

    Returns the reconstructions (batch, *operator.shape_in) in the model's dtype.
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model: expected a diffsolve DiffusionModel (see load_model), got {type(model).__name__}")
    if getattr(model, "is_latent", False):
        # the operators act on the model's samples; for a VAE pipeline those are latents, not images, and
        # y = A(decode(z)) would need the decoder inside every solver (latent-space solvers are out of scope)
        raise ValueError(f"model: {type(model).__name__} samples VAE latents; solve needs a model that generates "
                         "the data the operator measures (pixel-space models such as digits16): latent-space "
                         "inverse problems are not supported")
    spec: SolverSpec = get_solver(method)
    spec.check_options(options)
    if not isinstance(operator, Operator):
        raise TypeError(f"operator: expected a diffsolve.inverse operator (Inpainting, Blur, ..., MatrixOperator, "
                        f"DeepInvPhysics), got {type(operator).__name__}")
    if spec.linear_only and not operator.linear:
        raise ValueError(f"solver {spec.name!r} needs a linear operator; {type(operator).__name__} is nonlinear "
                         "(use dps or daps)")
    _check_shapes(model, operator)
    y = _check_y(operator, y)
    if noise is None:
        raise ValueError("noise: give the measurement's noise model, e.g. noise=GaussianNoise(0.05) or noise=0.05 "
                         "(sigma_y in the model's data space), or noise=0 for a noiseless measurement")
    noise = as_noise(noise)
    if isinstance(noise, PoissonNoise) and y.is_complex():
        raise ValueError("noise: Poisson noise needs real measurements")
    steps = spec.default_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1 ({spec.steps_meaning} of {spec.name}), got {steps!r}")
    steps = int(steps)
    batch = y.shape[0]
    seeds_t = batch_seeds(seeds, batch, per="measurement")
    labels = model.check_conditioning(batch, class_labels, float(guidance_scale))
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")

    resolved = {**spec.options, **options}
    # a network fixes the precision (a float32 state for a half-precision one); a parameterless model (the GMM
    # oracle) runs in y's
    device = model.device
    dtype = solver_dtype(model) if model.dtype is not None else (y.real.dtype if y.is_complex() else y.dtype)
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    y = y.to(device=device, dtype=complex_dtype if y.is_complex() else dtype)
    if isinstance(noise, PoissonNoise):
        var = noise.std(y) ** 2
        sigma_y = var.flatten(1).mean(1).sqrt()
        weight = per_sample(sigma_y, var.ndim) ** 2 / var
    else:
        sigma_y, weight = noise.sigma, None
    problem = Problem(operator, y, noise, sigma_y, weight)
    if spec.validate is not None:
        spec.validate(resolved, problem)
    times = (spec.grid or default_grid)(model.schedule, steps, resolved)
    run = Run(model, TimeGrid(model.schedule, times), SeededNoise(seeds_t, device=device), class_labels=labels,
              guidance_scale=float(guidance_scale), callback=callback, progress=progress, device=device)
    run.sample_shape, run.dtype = tuple(operator.shape_in), dtype

    x, nfe, wall = run.execute(spec.fn, problem, resolved)
    if not return_info:
        return x
    return x, SolveInfo(spec.name, nfe, steps, resolved, wall)


def initial_noise(run: Run) -> Tensor:
    """x at the grid's first time: N(0, I) for VP schedules, σ_0·N(0, I) for VE (seeded per sample)."""
    return run.prior_noise(run.sample_shape, run.dtype)
