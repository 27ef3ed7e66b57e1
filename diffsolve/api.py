"""``diffsolve.sample``: run a registered sampler on a model, with every argument checked before the network
is called."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .core import Run, SeededNoise, TimeGrid, batch_seeds, solver_dtype
from .model import DiffusionModel
from .pipelines import check_prompts
from .registry import get_sampler, list_samplers
from .schedules import GRIDS, time_grid

Tensor = torch.Tensor


@dataclass
class SampleInfo:
    """What ``sample(..., return_info=True)`` reports next to the samples."""

    sampler: str
    #: batched network evaluations of the run (a guided pass counts once)
    nfe: int
    #: network evaluations each sample took, for samplers that step per sample; else every sample took ``nfe``
    nfe_per_sample: Tensor | None
    #: the time grid used (float64), t_start first
    grid: Tensor
    #: wall-clock seconds of the sampling loop (ends with a device sync; prompt encoding and VAE decoding excluded)
    wall_time: float


def check_steps(steps, adaptive: bool, name: str) -> None:
    if adaptive:
        if steps is not None:
            raise ValueError(f"sampler {name!r} chooses its own steps: pass steps=None (got {steps!r}) and set "
                             "its tolerances instead")
        return
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1 for sampler {name!r}, got {steps!r}")


def _resolve_grid(model: DiffusionModel, steps, grid, t_start, t_end, default_kind: str) -> Tensor:
    schedule = model.schedule
    if grid is None or isinstance(grid, str):
        kind = default_kind if grid is None else grid
        if kind not in GRIDS:
            raise ValueError(f"grid: expected one of {list(GRIDS)} or a tensor of times, got {kind!r}")
        if kind in ("leading", "trailing", "linspace"):
            if t_start is not None or t_end is not None:
                raise ValueError(f"grid {kind!r} fixes its own endpoints; do not pass t_start/t_end with it")
        else:
            t_start = schedule.default_range[0] if t_start is None else float(t_start)
            t_end = schedule.default_range[1] if t_end is None else float(t_end)
            schedule.check_range(t_start, t_end)
        return time_grid(schedule, steps, kind, t_start, t_end)
    ts = torch.as_tensor(grid, dtype=torch.float64).reshape(-1).cpu()
    if t_start is not None or t_end is not None:
        raise ValueError("grid: an explicit tensor of times fixes t_start and t_end; do not pass them too")
    if len(ts) != steps + 1:
        raise ValueError(f"grid: expected steps + 1 = {steps + 1} times, got {len(ts)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"grid: times must be strictly decreasing, got {ts.tolist()}")
    schedule.check_range(float(ts[0]), float(ts[-1]))
    return ts


def _latent_note(model: DiffusionModel) -> str:
    if not getattr(model, "is_latent", False):
        return ""
    image = getattr(model, "image_shape", None)
    return (" (the model samples latents of its UNet; its VAE decodes them to images of shape "
            f"{tuple(image) if image else '?'})")


def _resolve_batch(model: DiffusionModel, shape, x_T, seeds) -> tuple[tuple[int, ...], Tensor]:
    if x_T is not None:
        if shape is not None:
            raise ValueError("pass either shape or x_T, not both")
        shape = tuple(x_T.shape)
        if model.sample_shape is not None and shape[1:] != model.sample_shape:
            raise ValueError(f"x_T: expected shape (batch, {', '.join(map(str, model.sample_shape))}) for this "
                             f"model, got {tuple(x_T.shape)}{_latent_note(model)}")
    elif shape is not None:
        shape = tuple(int(s) for s in shape)
        if model.sample_shape is not None and shape[1:] != model.sample_shape:
            raise ValueError(f"shape: expected (batch, {', '.join(map(str, model.sample_shape))}) for this model, "
                             f"got {shape}{_latent_note(model)}")
    elif seeds is not None:
        if model.sample_shape is None:
            raise ValueError("shape: the model does not know its sample shape; pass shape=(batch, ...) or x_T")
        shape = (len(seeds), *model.sample_shape)
    else:
        raise ValueError("pass shape=(batch, ...), seeds=[...] or x_T to say how many samples to draw")
    batch = shape[0]
    if batch < 1:
        raise ValueError(f"shape: the batch size must be >= 1, got {shape}")
    return shape, batch_seeds(seeds, batch)


def sample(
    model: DiffusionModel,
    sampler: str,
    steps: int | None,
    *,
    shape: Sequence[int] | None = None,
    x_T: Tensor | None = None,
    seeds: Sequence[int] | Tensor | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    grid: str | Tensor | None = None,
    class_labels: Sequence[int] | Tensor | int | None = None,
    guidance_scale: float = 1.0,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    decode: bool = True,
    progress: bool = False,
    callback: Callable | None = None,
    return_info: bool = False,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    **options,
):
    """Draw samples with a registered sampler.

    Args:
        model: a :class:`~diffsolve.DiffusionModel` (``load_model`` returns one).
        sampler: a registered name (``list_samplers()``).
        steps: number of steps of fixed-grid samplers; ``None`` for adaptive ones.
        shape: full shape ``(batch, *sample_shape)``; or give ``seeds`` (batch = their count) or ``x_T``.
        x_T: the starting noise; default σ-scaled N(0, I) drawn per sample from ``seeds``.
        seeds: one integer per sample; sample k depends only on ``seeds[k]`` (default 0 … batch−1).
        t_start, t_end: sampling interval (default: the schedule's ``default_range``); ``t_end = 0`` lands
            on the denoised sample with a final first-order step.
        grid: a grid kind (``schedules.GRIDS``; default: the sampler's) or an explicit decreasing tensor of
            ``steps + 1`` times.
        class_labels, guidance_scale: class conditioning and classifier-free guidance.
        prompt, negative_prompt: text conditioning of a text-to-image pipeline
            (:class:`~diffsolve.pipelines.TextToImageModel`): one string for every sample or one per sample,
            encoded by the pipeline's own text encoder; guidance (``guidance_scale != 1``) contrasts the prompt
            with the negative prompt (default: the empty prompt), batched into one forward. No prompt: the
            empty prompt (unconditional samples).
        decode: for latent models, decode the latents with the VAE and return images in [−1, 1] (default);
            ``False`` returns the latents. ``x_T``, ``shape`` and callbacks are in latent space.
        callback: ``callback(step, t, x, x0_pred)`` after every step.
        return_info: also return a :class:`SampleInfo`.
        dtype: the precision the network runs in: ``torch.float16`` or ``torch.bfloat16`` (half precision;
            a float32 module then runs under ``torch.autocast``, its weights untouched) or ``torch.float32``;
            default: the network's own (a model loaded with ``load_model(..., dtype=)`` runs in that). The
            sampler's state, history and coefficients stay float32 (float64 for a float64 ``x_T``): a half
            ``x_T`` is upcast and every network output is cast up before the sampler sees it.
        compile: run the network through ``torch.compile`` (compiled once per model, reused by later runs).
        cuda_graph: capture the network call in a CUDA graph per input shape and replay it at every
            evaluation (CUDA only; with ``compile=True`` the compiled network is captured).
        **options: the sampler's options (``diffsolve samplers`` lists them); unknown ones are an error.
    """
    spec = _check_model_and_sampler(model, sampler, options)
    check_steps(steps, spec.adaptive, spec.name)
    if spec.adaptive:
        if grid is not None:
            raise ValueError(f"sampler {spec.name!r} is adaptive and takes no grid")
        t_start = model.schedule.default_range[0] if t_start is None else float(t_start)
        t_end = model.schedule.default_range[1] if t_end is None else float(t_end)
        model.schedule.check_range(t_start, t_end)
        ts = torch.tensor([t_start, t_end], dtype=torch.float64)
    else:
        ts = _resolve_grid(model, steps, grid, t_start, t_end, spec.default_grid)
    shape, seeds_t = _resolve_batch(model, shape, x_T, seeds)
    text = check_prompts(model, shape[0], prompt, negative_prompt, class_labels, float(guidance_scale))
    labels = model.check_conditioning(shape[0], class_labels, float(guidance_scale)) if text is None else None
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {type(callback).__name__}")
    if not isinstance(decode, bool):
        raise TypeError(f"decode: expected True or False, got {decode!r}")
    device = model.device if x_T is None else x_T.device
    network = _check_acceleration(model, dtype, compile, cuda_graph, device)
    state_dtype = solver_dtype(model, x_T)
    if text is not None:  # every check passed: the text encoder is the first network call
        labels = model.conditioning(*text, float(guidance_scale))
    labels = None if labels is None else labels.to(device)
    run = Run(model, TimeGrid(model.schedule, ts), SeededNoise(seeds_t, device=device), class_labels=labels,
              guidance_scale=float(guidance_scale), callback=callback, progress=progress, device=device,
              net_dtype=dtype, network=network)
    x_T = run.prior_noise(shape[1:], state_dtype) if x_T is None else x_T.to(state_dtype)
    x, nfe, wall = run.execute(spec.fn, x_T, options)
    if decode and getattr(model, "is_latent", False):
        x = model.decode(x)
    if not return_info:
        return x
    return x, SampleInfo(spec.name, nfe, run.nfe_per_sample, torch.as_tensor(run.grid.t), wall)


_NETWORK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_acceleration(model: DiffusionModel, dtype, compile, cuda_graph, device):
    """Check ``dtype``/``compile``/``cuda_graph`` before any work; returns the network to run (None: as is)."""
    if dtype is not None and dtype not in _NETWORK_DTYPES:
        raise ValueError(f"dtype: expected one of {list(_NETWORK_DTYPES)} (the network's precision) or None, "
                         f"got {dtype!r}")
    if dtype == torch.float32 and model.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: the network's weights are {model.dtype}; it cannot run in float32 without a "
                         "float32 copy (load it with dtype=torch.float32)")
    for name, value in (("compile", compile), ("cuda_graph", cuda_graph)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if cuda_graph and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graph=True captures CUDA graphs and needs a CUDA device; this run is on "
                         f"{torch.device(device)} (use compile=True on other devices)")
    return model.accelerated_network(compile, cuda_graph)


def _check_model_and_sampler(model, sampler: str, options: dict):
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"model: expected a diffsolve DiffusionModel (see load_model), got {type(model).__name__}")
    spec = get_sampler(sampler)
    spec.check_options(options)
    return spec


@dataclass
class Inversion:
    """What :func:`invert` returns: the starting state(s) that regenerate x0 under ``sampler``.

    ``x_T`` is the state at the grid's first time t_start. ``extra`` holds what else the sampler needs to
    start from it: for BDIA ``{"x_next": x at the second grid point, "gamma": γ}``, because its chain is
    determined by two consecutive states; for DDIM nothing. ``sample(model, **inversion.sample_kwargs())``
    regenerates x0 (exactly for BDIA, up to round-off; approximately for DDIM); pass other ``class_labels``
    there to edit.
    """

    x_T: Tensor
    extra: dict
    sampler: str
    steps: int
    grid: Tensor
    options: dict
    nfe: int

    def sample_kwargs(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "x_T": self.x_T, "grid": self.grid,
                **self.options, **self.extra}


def invert(
    model: DiffusionModel,
    x0: Tensor,
    sampler: str = "bdia",
    steps: int = 10,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    grid: str | Tensor | None = None,
    class_labels: Sequence[int] | Tensor | int | None = None,
    guidance_scale: float = 1.0,
    progress: bool = False,
    **options,
) -> Inversion:
    """Map data ``x0`` (the state at t_end) back to the sampler's starting state(s) on the same grid.

    ``sampler="bdia"`` inverts exactly (γ > 0); ``sampler="ddim"`` is the usual approximate DDIM inversion
    (ε̂ at the less noisy point stands in for the one at the noisier point). t_end must be > 0: the model is
    evaluated at x0's own time. Returns an :class:`Inversion`.
    """
    spec = _check_model_and_sampler(model, sampler, options)
    if getattr(model, "is_latent", False):
        raise ValueError("invert: latent (VAE) pipelines are not supported; invert works in the model's sample "
                         "space, and latent-space inversion and inverse problems are out of scope")
    if spec.inverse is None:
        invertible = ", ".join(n for n in list_samplers() if get_sampler(n).inverse is not None)
        raise ValueError(f"sampler {spec.name!r} cannot invert; samplers with an inversion: {invertible}")
    check_steps(steps, spec.adaptive, spec.name)
    ts = _resolve_grid(model, steps, grid, t_start, t_end, spec.default_grid)
    if ts[-1] <= 0:
        raise ValueError(f"invert needs t_end > 0 (the model is evaluated at x0's time), got t_end={float(ts[-1])}")
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0: expected a tensor of shape (batch, ...), got {type(x0).__name__}")
    _resolve_batch(model, None, x0, None)
    labels = model.check_conditioning(x0.shape[0], class_labels, float(guidance_scale))
    labels = None if labels is None else labels.to(x0.device)
    run = Run(model, TimeGrid(model.schedule, ts), SeededNoise(range(x0.shape[0]), device=x0.device),
              class_labels=labels, guidance_scale=float(guidance_scale), progress=progress, device=x0.device)
    (x_T, extra), nfe, _ = run.execute(spec.inverse, x0, options)
    return Inversion(x_T, extra, spec.name, steps, ts, dict(options), nfe)
