"""diffsolve's samplers as a diffusers scheduler: :class:`DiffsolveScheduler` (also ``diffsolve.DiffsolveScheduler``).

    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="pndm")
    images = pipe(...)            # an unmodified diffusers pipeline (DDPMPipeline, StableDiffusionPipeline, …)

The registered sampler functions run **unchanged**; none of their update rules is copied here. How:

- ``set_timesteps(n)`` resolves the time grid exactly as ``diffsolve.sample`` does (same ``grid``, ``t_start``,
  ``t_end`` defaults) and *traces* the sampler once on a one-element dummy state whose network returns zeros,
  recording every time the sampler evaluates the network at. ``timesteps`` lists them all, as the discrete
  timestep values the UNet receives (``schedule.model_time(t)``, float32, the same values ``diffsolve.sample``
  feeds it). Samplers that evaluate the network more than once per step appear with all their evaluations —
  F-PNDM's pseudo Runge–Kutta warm-up adds 3 per step, as diffusers' ``PNDMScheduler`` does with its PRK
  timesteps — so ``len(timesteps)`` is the number of network evaluations (NFE), not ``num_inference_steps``,
  and ``order`` is 1 (a pipeline's progress bar counts evaluations past the extra ones).
- The first ``step`` starts the sampler on the pipeline's latents in a worker thread with a
  :class:`~diffsolve.core.Run` whose model is a hand-off: each time the sampler asks for the network at
  (x, t), the worker passes x to the pipeline and waits. ``step(model_output, t, sample)`` hands the
  pipeline's output (guided or not: the pipeline's business) to the waiting sampler, which converts it with
  :meth:`DiffusionModel.predict` (any prediction type) and runs until its next request; that request's x is
  returned as ``prev_sample`` — the point the pipeline evaluates its UNet at next. After the last evaluation
  the sampler's result is returned. The two threads strictly alternate (queues of one message), so the
  worker adds no parallelism, only a hand-off per network call. The worker runs under ``torch.no_grad``
  (and ``inference_mode`` when the pipeline uses it) on the pipeline's current CUDA stream; a run abandoned
  midway (an exception in the pipeline) is cancelled by the next ``set_timesteps`` or when the scheduler is
  garbage-collected.
- Noise of stochastic samplers (SA-Solver, DDIM η > 0, Euler–Maruyama) comes, as in ``diffsolve.sample``,
  from :class:`~diffsolve.core.SeededNoise` keyed by one integer seed per sample. The seeds follow the
  pipeline's ``generator`` (diffusers passes it to ``step``): at the first draw, one seed per sample is drawn
  with ``torch.randint(0, 2**62, ...)`` from it (from each generator of a list; from torch's global RNG when
  there is none), or taken from :meth:`DiffsolveScheduler.set_noise_seeds`. They are kept in
  ``noise_seeds``: ``diffsolve.sample(model, sampler, steps, x_T=<the pipeline's initial latents>,
  seeds=scheduler.noise_seeds)`` reproduces the pipeline's result. Deterministic samplers never touch the
  generator.

Grids: diffsolve's (``grid``, ``t_start``, ``t_end``), or, from the config of a ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ``PNDMScheduler`` or ``SASolverScheduler``, that scheduler's own
(``diffusers_grid``; :mod:`diffsolve.diffusers_grids`), with the network fed diffusers' timesteps; custom
``set_timesteps(timesteps=...)`` / ``sigmas=...``. Where diffusers' last step has length zero (DDIM/PNDM ending at
ᾱ_0 after evaluating the network there), ``timesteps`` keeps that evaluation and its step returns x unchanged.

Part-way starts (img2img / inpainting ``strength``): ``set_begin_index(k)`` re-plans the run to start at the
grid point of ``timesteps[k]``; the sampler (traced again from there) must evaluate the network exactly at the
remaining timesteps, which holds for samplers with one evaluation per step; ``add_noise`` at that timestep
noises to the grid point's σ. ``scheduler.grid`` is the grid of the run.

Refused: samplers with per-sample adaptive steps (``adaptive_sde``): the scheduler interface evaluates one
shared timestep per call and fixes the timesteps before sampling. Not supported: pipelines that change the
latents between steps (4-channel inpainting's blend; a clear error names the step).
``dpm_solver_v3`` needs its empirical model statistics to match the network: pass
``sampler_options={"ems": "<file>"}`` (or nothing for a model shipping them) and call
:meth:`DiffsolveScheduler.set_model` with the pipeline's UNet so that they can be checked against it.
Sampler options live in the scheduler config, so they must be JSON values (no callables or tensors).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import weakref
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

import numpy as np

from .api import _resolve_grid, check_steps
from .core import Run, SeededNoise, TimeGrid, per_sample
from .diffusers_grids import GRID_KEYS, SCHEDULERS, diffusers_grid, grid_options
from .model import DiffusionModel, Prediction
from .registry import get_sampler, list_samplers
from .schedules import GRIDS, DiscreteVP

Tensor = torch.Tensor

#: the scheduler-config keys that define the noise schedule (diffusers' DDPMScheduler reads them)
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
_SEED_HIGH = 2**62


@dataclass
class DiffsolveSchedulerOutput(BaseOutput):
    """``prev_sample``: the next point the pipeline evaluates its network at (after the last step: the
    sampler's result). ``pred_original_sample``: x̂0 of the evaluation just handed over."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class _Cancelled(BaseException):
    """Raised inside the worker thread to end an abandoned run (not an Exception: samplers do not catch it)."""


def _network_in_pipeline(x, t):  # the stand-in model's net when no network is bound; never called
    raise RuntimeError("DiffsolveScheduler: the network is evaluated by the pipeline")


class _HandoffModel(DiffusionModel):
    """A DiffusionModel whose raw output comes from ``handoff(x, t)``; :meth:`predict` converts it as usual
    (and keeps the last x̂0 in ``state`` for the scheduler's ``pred_original_sample``)."""

    handoff = None
    state = None
    #: set by the trace: record (x, t) and return zeros without converting (the values do not matter there)
    trace = None

    def output(self, x, t, class_labels=None, guidance_scale=1.0, net_time=None):
        self.nfe += 1
        return self.handoff(x, t)

    def predict(self, x, t, class_labels=None, guidance_scale=1.0, known=None):
        if self.trace is not None:
            self.trace(x, t)
            zero = torch.zeros_like(x)
            return Prediction(eps=zero, x0=zero)
        pred = super().predict(x, t, class_labels, guidance_scale, known)
        if self.state is not None:
            self.state.last_x0 = pred.x0
        return pred


class _RunState:
    """What the worker thread shares with the scheduler (not the scheduler itself, so that a scheduler dropped
    mid-run is garbage-collected and its finalizer cancels the worker)."""

    def __init__(self, fixed_seeds: Tensor | None):
        self.fixed_seeds = fixed_seeds
        self.generator = None
        self.noise_seeds: Tensor | None = None
        self.last_x0: Tensor | None = None

    def draw_seeds(self, batch: int) -> Tensor:
        if self.fixed_seeds is not None:
            seeds = self.fixed_seeds
            if len(seeds) != batch:
                raise ValueError(f"set_noise_seeds: {len(seeds)} seeds were set, but the batch has {batch} samples")
        else:
            gen = self.generator
            if isinstance(gen, (list, tuple)):
                if len(gen) != batch:
                    raise ValueError(f"generator: a list of {len(gen)} generators for a batch of {batch}")
                seeds = torch.cat([torch.randint(0, _SEED_HIGH, (1,), generator=g, device=g.device).cpu() for g in gen])
            elif gen is not None:
                seeds = torch.randint(0, _SEED_HIGH, (batch,), generator=gen, device=gen.device).cpu()
            else:
                seeds = torch.randint(0, _SEED_HIGH, (batch,))
        self.noise_seeds = seeds.clone()
        return seeds


class _Channel:
    """Two one-message queues between the pipeline's thread and the sampler's worker thread."""

    def __init__(self):
        self.to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self.to_main: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def cancel(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.to_worker.put(_Cancelled)
            self.thread.join(timeout=10)


class _GeneratorNoise:
    """SeededNoise whose seeds are fixed at the first draw (from set_noise_seeds or the generator)."""

    def __init__(self, state: _RunState, batch: int, device):
        self.state, self.batch, self.device = state, batch, device
        self.noise: SeededNoise | None = None

    def __len__(self) -> int:
        return self.batch

    def normal(self, shape, step=-1, sub=0, dtype=torch.float32, offset=0):
        if self.noise is None:
            self.noise = SeededNoise(self.state.draw_seeds(self.batch), device=self.device)
        return self.noise.normal(shape, step=step, sub=sub, dtype=dtype, offset=offset)


def _diffusers_class_of(config: dict) -> str | None:
    """The diffusers scheduler a config belongs to: its ``_class_name`` (a saved config) or, for a live
    scheduler's ``.config`` (which has none), the one of :data:`SCHEDULERS` with exactly its keys."""
    if "_class_name" in config:
        return config["_class_name"]
    import diffusers

    keys = {k for k in config if not k.startswith("_")}
    for name in SCHEDULERS:
        if keys == {k for k in getattr(diffusers, name)().config if not k.startswith("_")}:
            return name
    return None


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a registered diffsolve sampler (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type: the
            model's training schedule, as in every diffusers scheduler config (``from_config`` copies them from
            the pipeline's scheduler).
        sampler: a registered fixed-grid sampler (``diffsolve.list_samplers()``; not an adaptive one).
        sampler_options: the sampler's options (JSON values), e.g. ``{"order": 3}``, ``{"tau": 1.0}``.
        grid, t_start, t_end: the time grid, as for ``diffsolve.sample`` (default: the sampler's grid kind from
            the schedule's t = 1 to t = 1/N).
        diffusers_grid: instead, the grid that this diffusers scheduler (``"DDIMScheduler"``,
            ``"DPMSolverMultistepScheduler"``, ``"PNDMScheduler"``, ``"SASolverScheduler"``) builds from the grid
            options below (:mod:`diffsolve.diffusers_grids`), with the network fed diffusers' timesteps.
            ``from_config`` of such a scheduler's config sets it, so a pipeline keeps its tuned grid; passing
            ``grid``, ``t_start``, ``t_end`` or ``diffusers_grid=None`` there overrides it.
        timestep_spacing, steps_offset, set_alpha_to_one, final_sigmas_type, lambda_min_clipped, use_karras_sigmas,
            use_lu_lambdas, use_exponential_sigmas, use_beta_sigmas: diffusers' grid options (None: the default
            of the ``diffusers_grid`` scheduler); kept in the config so that they travel back to diffusers.
    """

    order = 1
    #: the keys of diffusers' own schedulers' configs are dropped silently by ``from_config``, as between them
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        sampler: str = "dpm_solver_pp",
        sampler_options: dict | None = None,
        grid: str | None = None,
        t_start: float | None = None,
        t_end: float | None = None,
        diffusers_grid: str | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool | None = None,
        final_sigmas_type: str | None = None,
        lambda_min_clipped: float | None = None,
        use_karras_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ):
        spec = get_sampler(sampler)
        if spec.adaptive:
            fixed = ", ".join(n for n in list_samplers() if not get_sampler(n).adaptive)
            raise ValueError(
                f"sampler {sampler!r} chooses its own step sizes per sample, which a diffusers scheduler cannot express "
                f"(the pipeline evaluates one shared timestep per network call, listed before sampling starts); "
                f"use diffsolve.sample for it, or a fixed-grid sampler here: {fixed}")
        options = dict(sampler_options or {})
        spec.check_options(options)
        try:
            json.dumps(options)
        except TypeError as err:
            raise TypeError(f"sampler_options must be JSON values to live in a scheduler config ({err}); callables "
                            "and tensors are available through diffsolve.sample only") from err
        if grid is not None and grid not in GRIDS:
            raise ValueError(f"grid: expected one of {list(GRIDS)} or None (the sampler's default), got {grid!r}")
        if diffusers_grid is not None:
            if diffusers_grid not in SCHEDULERS:
                raise ValueError(f"diffusers_grid: expected one of {list(SCHEDULERS)} or None, got {diffusers_grid!r}")
            if grid is not None or t_start is not None or t_end is not None:
                raise ValueError(f"diffusers_grid={diffusers_grid!r} fixes the grid; do not pass grid, t_start or t_end "
                                 "with it (or pass diffusers_grid=None)")
        self.spec, self.options = spec, options
        schedule = DiscreteVP.from_config({k: v for k, v in self.config.items() if k in _SCHEDULE_KEYS})
        self.schedule = schedule
        self._bound = None
        self._model = self._make_model()
        if diffusers_grid is None:
            _resolve_grid(self._model, 2, grid, t_start, t_end, spec.default_grid)  # endpoints and kind checked now
        else:
            grid_options(diffusers_grid, self._grid_config())

        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)
        ddpm = DDPMScheduler.from_config({k: v for k, v in self.config.items() if k in _SCHEDULE_KEYS})
        self.betas, self.alphas = ddpm.betas, ddpm.alphas  # diffusers' own float32 tables
        self.init_noise_sigma = 1.0  # VP: x_T ~ N(0, I), as diffsolve.sample draws it
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._fixed_seeds: Tensor | None = None
        self._grid: Tensor | None = None
        self._times: list[float] | None = None
        self._traces: dict[int, tuple] = {}
        self._timesteps_host: list[float] = []
        self._zero_final = False
        self._step_to: Tensor | None = None
        self._begin_index: int | None = None
        self._state = _RunState(None)
        self._reset_run()

    @property
    def noise_seeds(self) -> Tensor | None:
        """The per-sample seeds of the last run's noise (None if the sampler drew none): pass them as
        ``seeds=`` to ``diffsolve.sample`` to reproduce the run."""
        return self._state.noise_seeds

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, except that a config of another sampler does not pass its
        ``sampler_options`` on: ``from_config(pipe.scheduler.config, sampler="pndm")`` starts from pndm's defaults
        even when ``pipe.scheduler`` is a DiffsolveScheduler running another sampler with options."""
        if config is not None:
            config = dict(getattr(config, "config", config))
            if kwargs.get("sampler", config.get("sampler")) != config.get("sampler") and "sampler_options" not in kwargs:
                config.pop("sampler_options", None)
            source = _diffusers_class_of(config)
            if source in SCHEDULERS and not {"grid", "t_start", "t_end", "diffusers_grid"} & set(kwargs):
                config["diffusers_grid"] = source  # keep the pipeline's grid
            if {"grid", "t_start", "t_end"} & set(kwargs) and "diffusers_grid" not in kwargs:
                config["diffusers_grid"] = None
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---- setup ---------------------------------------------------------------------------------------
    def _make_model(self) -> _HandoffModel:
        net = self._bound if self._bound is not None else _network_in_pipeline
        model = _HandoffModel(net, self.schedule, self.config.prediction_type or "epsilon")
        return model

    def set_model(self, model) -> None:
        """Bind the pipeline's network (an ``nn.Module``, a :class:`~diffsolve.pipelines.FixedClassUNet` or a
        :class:`~diffsolve.DiffusionModel`) so that ``dpm_solver_v3`` can check its statistics against it (and
        find shipped ones). The scheduler never calls it; the pipeline does."""
        from .pipelines import FixedClassUNet

        if isinstance(model, DiffusionModel):
            model = model.net
        if isinstance(model, FixedClassUNet):
            model = model.unet
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"set_model: expected the pipeline's network (an nn.Module) or a DiffusionModel, got "
                            f"{type(model).__name__}")
        self._bound = model
        self._model = self._make_model()
        self._traces.clear()

    def set_noise_seeds(self, seeds) -> None:
        """Fix the per-sample noise seeds of the following runs (one integer per sample); None: draw them from
        the pipeline's generator again."""
        self._fixed_seeds = None if seeds is None else torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).cpu()

    def _grid_config(self) -> dict:
        return {k: self.config[k] for k in (*GRID_KEYS, "beta_schedule")}

    def _final_time(self) -> float:
        """Where a custom timestep or σ list ends: t = 0 unless the config ends at ᾱ_0 (``final_sigmas_type=
        "sigma_min"``, ``set_alpha_to_one=False``)."""
        rules = self.config.diffusers_grid
        ends_at_one = rules is None or grid_options(rules, self._grid_config())[3] == "zero"
        return 0.0 if ends_at_one else 1.0 / self.schedule.num_train_timesteps

    def _plan(self, steps, timesteps, sigmas) -> tuple[Tensor, Tensor | None, bool, Tensor | None]:
        """(the grid, the network's timestep at each grid point or None for the schedule's, zero_final, the time
        each step ends at where diffusers' DDIM ends it off the grid, for ddim's ``step_to``, else None)."""
        n_train = self.schedule.num_train_timesteps
        if timesteps is not None or sigmas is not None:
            if self.config.grid is not None or self.config.t_start is not None or self.config.t_end is not None:
                raise ValueError("set_timesteps: custom timesteps or sigmas replace the configured grid; this scheduler "
                                 "has grid/t_start/t_end set")
            if any(self.config[k] for k in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas",
                                            "use_beta_sigmas")):
                raise ValueError("set_timesteps: custom timesteps or sigmas cannot be combined with use_*_sigmas")
            given = np.asarray(timesteps if timesteps is not None else sigmas, dtype=np.float64).reshape(-1)
            name = "timesteps" if timesteps is not None else "sigmas"
            if len(given) < 1 or not np.isfinite(given).all() or (np.diff(given) >= 0).any():
                raise ValueError(f"set_timesteps: {name} must be a non-empty, strictly decreasing list, got {given.tolist()}")
            if timesteps is not None:
                if (given != np.round(given)).any() or given[0] > n_train - 1 or given[-1] < 0:
                    raise ValueError(f"set_timesteps: timesteps must be integers in [0, {n_train - 1}], got {given.tolist()}")
                t = self.schedule.timestep_to_t(torch.from_numpy(given))
                network = torch.from_numpy(given)
            else:
                if given[-1] <= 0:
                    raise ValueError(f"set_timesteps: sigmas must be > 0 (the final σ is appended), got {given.tolist()}")
                t = self.schedule.t_from_lambda(torch.from_numpy(-np.log(given)))
                self.schedule.check_range(float(t[0]), float(t[-1]) / 2)
                network = None
            t = torch.cat([t, torch.tensor([self._final_time()], dtype=torch.float64)])
            zero_final = bool(t[-1] == t[-2])
            return (t[:-1] if zero_final else t), network, zero_final, None
        check_steps(steps, False, self.spec.name)
        if self.config.diffusers_grid is not None:
            g = diffusers_grid(self.schedule, int(steps), self.config.diffusers_grid, self._grid_config())
            return g.t, g.timesteps, g.zero_final, g.step_to if "step_to" in self.spec.options else None
        grid = _resolve_grid(self._model, int(steps), self.config.grid, self.config.t_start, self.config.t_end,
                             self.spec.default_grid)
        return grid, None, False, None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps=None, sigmas=None, **kwargs):
        """Resolve the grid of ``num_inference_steps`` steps (or of the custom ``timesteps`` — integer training
        timesteps, decreasing — or VE noise levels ``sigmas`` = √((1 − ᾱ)/ᾱ), each followed by the config's
        final point) and list every network evaluation in ``timesteps``. Other keywords (e.g. ``mu`` of flow
        schedulers) are refused."""
        if kwargs:
            raise TypeError(f"set_timesteps: unsupported argument(s) {sorted(kwargs)} (a DiscreteVP schedule has no "
                            "flow shift)")
        if (num_inference_steps is None) == (timesteps is None and sigmas is None) or (
                timesteps is not None and sigmas is not None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas")
        self._reset_run()
        self._begin_index = None
        custom = timesteps is not None or sigmas is not None
        key = num_inference_steps if not custom else None
        if key is None or key not in self._traces:  # pipelines call set_timesteps on every run: trace each once
            grid, network, zero_final, step_to = self._plan(num_inference_steps, timesteps, sigmas)
            times = self._trace(grid)
            evaluations = self._network_timesteps(grid, network, times)
            if zero_final:  # diffusers evaluates the network once more, for a step of length zero
                evaluations = torch.cat([evaluations, evaluations.new_tensor([float(network[-1])])])
            plan = (grid, times, evaluations, zero_final, step_to)
            if key is not None:
                self._traces[key] = plan
        else:
            plan = self._traces[key]
        self._grid, self._times, timesteps_out, self._zero_final, self._step_to = plan
        self.num_inference_steps = len(self._grid) - 1 + self._zero_final
        self._timesteps_host = timesteps_out.tolist()
        self.timesteps = timesteps_out.to(device)

    def _network_timesteps(self, grid: Tensor, network: Tensor | None, times: list[float]) -> Tensor:
        """The timestep the network receives at each traced evaluation: diffusers' own at its grid points (when
        the grid is diffusers'), else the schedule's ``model_time`` of the evaluation's time (float32)."""
        t32 = torch.tensor(times, dtype=torch.float64).to(torch.float32)
        out = self.schedule.model_time(t32)
        if network is not None:
            points = {float(v): k for k, v in enumerate(grid.to(torch.float32))}
            for j, time in enumerate(t32.tolist()):
                if time in points and points[time] < len(network):
                    out[j] = float(network[points[time]])
        return out

    @property
    def grid(self) -> Tensor | None:
        """The time grid (float64) the sampler runs on in this run: from the begin index on when one is set
        (``diffsolve.sample(model, sampler, len(grid) - 1, grid=scheduler.grid, x_T=...)`` runs the same)."""
        if self._grid is None:
            return None
        return self._grid[self._begin_point():] if self._begin_index is not None else self._grid

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """The index into ``timesteps`` of the next ``step`` (None before the first)."""
        return None if self._k == 0 else self._k + (self._begin_index or 0)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (img2img ``strength``): the sampler runs from the grid
        point the pipeline noised its latents to (``add_noise`` at that timestep), on the rest of the grid."""
        if self._times is None:
            raise RuntimeError("set_begin_index: call set_timesteps first")
        n = len(self._timesteps_host)
        if not 0 <= int(begin_index) < n:
            raise ValueError(f"begin_index: expected 0 … {n - 1} (an index into timesteps), got {begin_index}")
        self._reset_run()
        self._begin_index = int(begin_index)
        if self._begin_index == 0:
            return
        point = self._begin_point()
        tail = self._trace(self._grid[point:]) if point < len(self._grid) - 1 else []
        expected = self._timesteps_host[self._begin_index:len(self._times)]
        if tail != self._times[self._begin_index:] or len(tail) != len(expected):
            self._begin_index = None
            raise ValueError(f"set_begin_index({begin_index}): sampler {self.spec.name!r} run from that grid point "
                             f"evaluates the network {len(tail)} times, not the {len(expected)} timesteps the pipeline "
                             "has left (its warm-up takes extra evaluations, e.g. F-PNDM's pseudo Runge–Kutta steps); "
                             "a part-way start needs a sampler with one evaluation per step (ddim, dpm_solver_pp, "
                             "sa_solver, bdia, euler_maruyama, dpm_solver_v3)")
        self._tail_times = tail

    def _begin_point(self) -> int:
        """The grid point at which evaluation ``begin_index`` is made."""
        time = self._times[self._begin_index] if self._begin_index < len(self._times) else float(self._grid[-1])
        points = [float(v) for v in self._grid.to(torch.float32)]
        if time not in points:
            raise ValueError(f"set_begin_index({self._begin_index}): timesteps[{self._begin_index}] is not a grid point "
                             f"of sampler {self.spec.name!r} (an intermediate evaluation of a step)")
        return points.index(time)

    def _trace(self, grid: Tensor) -> list[float]:
        """The times (as float32 values, what the sampler passes) of every network evaluation on ``grid``."""
        times: list[float] = []

        def record(x, t):
            times.append(float(t.reshape(-1)[0]))

        shape = self._model.sample_shape or (1,)
        if self.spec.name == "dpm_solver_v3" and self._bound is None:
            raise ValueError("sampler 'dpm_solver_v3': its statistics (EMS) belong to one network; call "
                             "scheduler.set_model(pipe.unet) so that they can be checked against it, and pass "
                             "sampler_options={'ems': '<file>'} unless the model ships them")
        model = self._make_model()
        model.trace = record
        run = Run(model, TimeGrid(self.schedule, grid), SeededNoise([0]))
        with torch.no_grad():
            self.spec.fn(run, torch.zeros((1, *shape)), **self.options)
        if not times:
            raise RuntimeError(f"sampler {self.spec.name!r} made no network evaluation")
        return times

    # ---- diffusers' interface -------------------------------------------------------------------------
    def scale_model_input(self, sample: Tensor, timestep=None, *args, **kwargs) -> Tensor:
        """The identity: the network takes x_t as is (VP schedules)."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = α_t x0 + σ_t ε. A timestep of the current ``timesteps`` (an img2img start) is noised to its grid
        point (which, on diffusers' σ grids, is not the rounded timestep's own noise level); any other integer
        training timestep (training, DDPM-style use) to that timestep."""
        steps = torch.as_tensor(timesteps).cpu().reshape(-1).to(torch.float64)
        t = self.schedule.timestep_to_t(steps)
        if self._times is not None:
            listed = {v: k for k, v in reversed(list(enumerate(self._timesteps_host)))}
            for j, value in enumerate(steps.tolist()):
                k = self._begin_index if self._begin_index is not None else listed.get(float(np.float32(value)))
                if k is not None and k < len(self._times):
                    t[j] = self._times[k]
        a = per_sample(self.schedule.alpha(t), original_samples.ndim).to(original_samples)
        s = per_sample(self.schedule.sigma(t), original_samples.ndim).to(original_samples)
        return a * original_samples + s * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _run_plan(self) -> tuple[Tensor, list[float], int]:
        """(grid, evaluation times, index of the first timestep) of the run that starts at the begin index."""
        if not self._begin_index:
            return self._grid, self._times, 0
        return self._grid[self._begin_point():], self._tail_times, self._begin_index

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float | None = None,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None, return_dict: bool = True,
             **kwargs):
        """Hand the network's output at ``timestep`` (= ``timesteps[k]`` of the k-th call) to the sampler and
        return the next point to evaluate (after the last evaluation: the sampler's result).

        ``eta`` (``DDIMPipeline`` passes it): DDIM's η for this run, where the sampler has an ``eta`` option (it
        must not change within a run); other samplers accept only η = 0 or None. ``generator`` seeds the noise
        (see the module docstring). ``use_clipped_model_output`` and ``variance_noise`` are refused: the
        sampler's noise comes from its seeds and its outputs are not clipped."""
        if kwargs:
            raise TypeError(f"step: unsupported argument(s) {sorted(kwargs)}")
        if use_clipped_model_output or variance_noise is not None:
            raise ValueError("step: use_clipped_model_output and variance_noise are not supported (the sampler draws "
                             "its own seeded noise and does not clip x̂0)")
        if self._times is None:
            raise RuntimeError("DiffsolveScheduler.step: call set_timesteps(num_inference_steps) first")
        grid, times, first = self._run_plan() if self._k == 0 else (self._grid, self._run_times, self._first)
        k, n = self._k, len(times)
        total = n + self._zero_final
        if k >= total:
            raise RuntimeError(f"DiffsolveScheduler.step: all {total} network evaluations of this run were handed over "
                               "already; call set_timesteps to start another run")
        self._check_timestep(first + k, timestep)
        if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
            raise TypeError("step: model_output and sample must be tensors")
        c = sample.shape[1] if sample.ndim > 1 else 0
        if model_output.shape != sample.shape and not (
                sample.ndim > 1 and model_output.shape[0] == sample.shape[0] and model_output.shape[1] == 2 * c
                and model_output.shape[2:] == sample.shape[2:]):
            self._abandon()
            raise ValueError(f"step {k}: model_output has shape {tuple(model_output.shape)}, expected the latents' "
                             f"shape {tuple(sample.shape)} (or 2·{c} channels with a learned variance)")
        options = self._options_with_eta(eta)
        if k == 0:
            self._run_times, self._first, self._run_options = times, first, options
            self._start(sample, generator, grid, times, options)
        elif options != self._run_options:
            raise ValueError(f"step {k}: eta={eta} differs from this run's eta={self._run_options.get('eta')}")
        elif sample is not self._pending and not torch.equal(sample, self._pending):
            self._abandon()
            raise ValueError(f"step {k}: the sample differs from the prev_sample this scheduler returned at step "
                             f"{k - 1}; DiffsolveScheduler runs a multistep sampler whose state cannot follow latents "
                             "changed between steps (e.g. by a callback or an inpainting blend)")
        if k == n:  # diffusers' zero-length last step: x stays where it is
            self._k = k + 1
            return (sample,) if not return_dict else DiffsolveSchedulerOutput(prev_sample=sample)
        self._state.generator = generator
        self._channel.to_worker.put(model_output)
        kind, value = self._channel.to_main.get()
        self._k = k + 1
        if kind == "error":
            self._times = None  # the worker has ended; another run needs set_timesteps
            raise value
        x0, self._state.last_x0 = self._state.last_x0, None
        if kind == "eval":
            if self._k == n:
                self._abandon()
                raise RuntimeError(f"sampler {self.spec.name!r} asked for more than the {n} traced network evaluations")
            self._pending = value
        elif self._k != n:  # done early
            self._times = None
            raise RuntimeError(f"sampler {self.spec.name!r} finished after {self._k} of {n} traced network evaluations")
        else:
            self._pending = value
        if not return_dict:
            return (value,)
        return DiffsolveSchedulerOutput(prev_sample=value, pred_original_sample=x0)

    def _options_with_eta(self, eta) -> dict:
        if eta is None or ("eta" not in self.spec.options and eta == 0):
            return self.options
        if "eta" not in self.spec.options:
            raise ValueError(f"step: eta={eta} was passed, but sampler {self.spec.name!r} has no eta option (only ddim "
                             "has); pass eta=0 or use sampler='ddim'")
        return {**self.options, "eta": float(eta)}

    # ---- the worker ----------------------------------------------------------------------------------
    def _check_timestep(self, k: int, timestep) -> None:
        if isinstance(timestep, Tensor):
            if timestep.is_cuda or timestep.numel() != 1:  # no host sync on the GPU; trust the order there
                return
            value = float(timestep.reshape(-1)[0])
        else:
            value = float(timestep)
        expected = self._timesteps_host[k]
        if not math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-4):
            raise ValueError(f"step {k}: got timestep {value:g}, but this scheduler's timesteps[{k}] is {expected:g}; "
                             "DiffsolveScheduler takes its timesteps in order, one step per entry, and cannot skip or "
                             "repeat them (a pipeline that starts part-way, e.g. img2img, calls set_begin_index)")

    def _start(self, x_T: Tensor, generator, grid: Tensor, times: list[float], options: dict) -> None:
        """Start the sampler on x_T in a worker thread and wait for its first request (at x_T itself)."""
        state = self._state = _RunState(self._fixed_seeds)
        state.generator = generator
        channel = _Channel()
        model = self._make_model()
        model.state = state
        times, count = list(times), [0]

        def handoff(x, t):
            k = count[0]
            count[0] += 1
            if t.device.type == "cpu" and k < len(times):  # checked without a host sync where that is free
                # the trace ran in float32: compare at float32 precision (or t's own, if lower)
                common = torch.float32 if t.dtype == torch.float64 else t.dtype
                got = float(t.reshape(-1)[0])
                if float(t.reshape(-1)[0].to(common)) != float(torch.tensor(times[k], dtype=torch.float64).to(common)):
                    raise RuntimeError(f"sampler evaluated the network at t={got:.9g}, but its traced evaluation {k} "
                                       f"is at t={times[k]:.9g}: its evaluation times depend on the data")
            channel.to_main.put(("eval", x))
            out = channel.to_worker.get()
            if out is _Cancelled:
                raise _Cancelled
            if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
                out = out[:, : x.shape[1]]  # learned variance: the first C channels, as diffsolve.sample
            return out.to(x.dtype)

        model.handoff = handoff
        run = Run(model, TimeGrid(self.schedule, grid), _GeneratorNoise(state, x_T.shape[0], x_T.device),
                  device=x_T.device)
        fn, options, inference = self.spec.fn, dict(options), torch.is_inference_mode_enabled()
        if self._step_to is not None:  # diffusers' DDIM rule, on the steps of this run's part of the grid
            options["step_to"] = self._step_to[len(self._step_to) - (len(grid) - 1):].tolist()
        stream = torch.cuda.current_stream(x_T.device) if x_T.is_cuda else None

        def work():
            try:
                with torch.inference_mode(inference), torch.no_grad():
                    if stream is not None:
                        with torch.cuda.device(x_T.device), torch.cuda.stream(stream):
                            out = fn(run, x_T, **options)
                    else:
                        out = fn(run, x_T, **options)
                run.check_finite()
                channel.to_main.put(("done", out))
            except _Cancelled:
                return
            except BaseException as err:  # handed to the pipeline's thread and raised there
                channel.to_main.put(("error", err))

        channel.thread = threading.Thread(target=work, name=f"diffsolve-{self.spec.name}", daemon=True)
        self._channel = channel
        self._finalizer = weakref.finalize(self, channel.cancel)
        channel.thread.start()
        kind, value = channel.to_main.get()
        if kind == "error":
            self._times = None
            raise value
        if kind != "eval" or value is not x_T:
            self._abandon()
            raise RuntimeError(f"sampler {self.spec.name!r} did not start by evaluating the network at x_T")
        self._pending = value

    def _abandon(self) -> None:
        self._times = None
        if self._channel is not None:
            self._channel.cancel()

    def _reset_run(self) -> None:
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.cancel()
            self._finalizer.detach()
        self._channel: _Channel | None = None
        self._k = 0
        self._pending = None
