"""DPS, diffusion posterior sampling (Chung, Kim, Mccann, Klasky, Ye; ICLR 2023; arXiv 2209.14687), Alg. 1.

Every step is an ancestral DDPM step (DDIM with η = 1: the DDPM posterior q(x_s | x_t, x̂0) with variance
β̃) followed by the likelihood step

    x_s ← x_s − ζ ∇_{x_t} ‖y − A(x̂0(x_t))‖₂

with the gradient of the *unsquared* norm back-propagated through the network (so the step is ζ times a
unit-norm residual direction pulled back through A and the denoiser's Jacobian).

Differences from the official code (DPS2022/diffusion-posterior-sampling), on purpose:
- the norm is taken per sample, ``‖y_k − A(x̂0_k)‖`` summed over k, so sample k's step depends on sample k
  alone. The official ``torch.linalg.norm(difference)`` is one norm over the whole batch: each sample's
  step is scaled by the batch's total residual, so results change with the batch size and its content.
- x̂0 is not clipped unless ``clip_x0=True`` (the official config clips to [−1, 1]; clipping also zeroes
  the gradient through clipped pixels, and it is wrong for data not in [−1, 1], such as the Gaussian-mixture
  oracle). With clipping, ε̂ is recomputed from the clipped x̂0 so the ancestral step is the DDPM posterior
  mean at the clipped x̂0, as in the official code.
- Poisson noise: the residual is whitened by the per-element std relative to the sample's σ_y (the RMS of its
  stds, so ζ keeps its Gaussian meaning and no sample depends on another; see ``PoissonNoise``)
  instead of the official ``‖r‖/|y|`` averaged over elements.

``checkpointing=True`` stores only each UNet block's inputs during the forward pass of the gradient and
recomputes the block's activations in the backward pass (diffusers' gradient checkpointing, switched on for the
solve and restored after): the same gradient, to round-off, for less memory and one more forward's worth of time
per step (benchmarks/adm256.py measures both at 256×256).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..samplers.ddim import ddim_noise_scale
from .registry import check_number, register_solver
from .solve import initial_noise


def _validate(options, problem) -> None:
    check_number(options, "zeta", low=0.0)
    for name in ("clip_x0", "checkpointing"):
        if not isinstance(options[name], bool):
            raise ValueError(f"{name}: expected True or False, got {options[name]!r}")


@contextmanager
def activation_checkpointing(net, enable: bool):
    """diffusers' gradient checkpointing on ``net`` inside the block (when ``enable``), its own setting after."""
    if not enable:
        yield
        return
    if not getattr(net, "_supports_gradient_checkpointing", False):
        raise ValueError(f"checkpointing=True needs a diffusers network that supports gradient checkpointing "
                         f"(UNet2DModel, ...), the model's network is a {type(net).__name__}")
    was_on = net.is_gradient_checkpointing
    net.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if not was_on:
            net.disable_gradient_checkpointing()


@register_solver("dps", default_steps=1000, steps_meaning="ancestral steps", validate=_validate)
def dps(run, problem, *, zeta: float = 1.0, clip_x0: bool = False, checkpointing: bool = False):
    """DPS (Chung et al. 2023): ancestral DDPM steps + ζ·∇‖y − A(x̂0)‖ per sample (backprop through the network)."""
    with activation_checkpointing(run.model.net, checkpointing):
        return _dps_steps(run, problem, float(zeta), clip_x0)


def _dps_steps(run, problem, zeta: float, clip_x0: bool):
    g = run.grid
    x = initial_noise(run)
    for i in run.steps("dps"):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pred = run.predict(xg, i)
            x0 = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
            r = problem.residual(x0)
            sq = (r.abs() ** 2 if r.is_complex() else r**2).flatten(1).sum(1)
            norms = (sq + 1e-30).sqrt()  # per sample; the tiny floor keeps the gradient finite at r = 0
            grad = torch.autograd.grad(norms.sum(), xg)[0]
        x0 = x0.detach()
        eps = (x - g.alpha[i] * x0) / g.sigma[i] if clip_x0 else pred.eps.detach()
        c = ddim_noise_scale(g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1], 1.0)
        x = g.alpha[i + 1] * x0 + math.sqrt(max(g.sigma[i + 1] ** 2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * run.randn_like(x, step=i)
        x = x - zeta * grad
        run.step_done(i, x, x0)
    return x
