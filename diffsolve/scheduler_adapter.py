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

Refused: samplers with per-sample adaptive steps (``adaptive_sde``): the scheduler interface evaluates one
shared timestep per call and fixes the timesteps before sampling. Not supported: pipelines that skip
timesteps (img2img ``strength``) or change the latents between steps (a clear error names the step).
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
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .api import _resolve_grid, check_steps
from .core import Run, SeededNoise, TimeGrid
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

    def normal(self, shape, step=-1, sub=0, dtype=torch.float32):
        if self.noise is None:
            self.noise = SeededNoise(self.state.draw_seeds(self.batch), device=self.device)
        return self.noise.normal(shape, step=step, sub=sub, dtype=dtype)


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
        self.spec, self.options = spec, options
        schedule = DiscreteVP.from_config({k: v for k, v in self.config.items() if k in _SCHEDULE_KEYS})
        self.schedule = schedule
        self._bound = None
        self._model = self._make_model()
        _resolve_grid(self._model, 2, grid, t_start, t_end, spec.default_grid)  # endpoints and grid kind checked now

        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float32)
        self.init_noise_sigma = 1.0  # VP: x_T ~ N(0, I), as diffsolve.sample draws it
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._fixed_seeds: Tensor | None = None
        self._grid: Tensor | None = None
        self._times: list[float] | None = None
        self._traces: dict[int, tuple] = {}
        self._timesteps_host: list[float] = []
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

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None):
        """Resolve the grid of ``num_inference_steps`` steps and list every network evaluation in ``timesteps``."""
        check_steps(num_inference_steps, False, self.spec.name)
        self._reset_run()
        steps = int(num_inference_steps)
        if steps not in self._traces:  # pipelines call set_timesteps on every run: trace each step count once
            grid = _resolve_grid(self._model, steps, self.config.grid, self.config.t_start, self.config.t_end,
                                 self.spec.default_grid)
            times = self._trace(grid)
            t32 = torch.tensor(times, dtype=torch.float64).to(torch.float32)
            self._traces[steps] = (grid, times, self.schedule.model_time(t32))
        self._grid, self._times, timesteps = self._traces[steps]
        self.num_inference_steps = steps
        self._timesteps_host = timesteps.tolist()
        self.timesteps = timesteps.to(device)

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
    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The identity: the network takes x_t as is (VP schedules)."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = α_t x0 + σ_t ε at integer training timesteps (for training and pipelines that noise inputs)."""
        t = self.schedule.timestep_to_t(torch.as_tensor(timesteps).cpu().reshape(-1))
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alpha(t).reshape(shape).to(original_samples)
        s = self.schedule.sigma(t).reshape(shape).to(original_samples)
        return a * original_samples + s * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True):
        """Hand the network's output at ``timestep`` (= ``timesteps[k]`` of the k-th call) to the sampler and
        return the next point to evaluate (after the last evaluation: the sampler's result)."""
        if self._times is None:
            raise RuntimeError("DiffsolveScheduler.step: call set_timesteps(num_inference_steps) first")
        k, n = self._k, len(self._times)
        if k >= n:
            raise RuntimeError(f"DiffsolveScheduler.step: all {n} network evaluations of this run were handed over "
                               "already; call set_timesteps to start another run")
        self._check_timestep(k, timestep)
        if not isinstance(model_output, Tensor) or not isinstance(sample, Tensor):
            raise TypeError("step: model_output and sample must be tensors")
        c = sample.shape[1] if sample.ndim > 1 else 0
        if model_output.shape != sample.shape and not (
                sample.ndim > 1 and model_output.shape[0] == sample.shape[0] and model_output.shape[1] == 2 * c
                and model_output.shape[2:] == sample.shape[2:]):
            self._abandon()
            raise ValueError(f"step {k}: model_output has shape {tuple(model_output.shape)}, expected the latents' "
                             f"shape {tuple(sample.shape)} (or 2·{c} channels with a learned variance)")
        if k == 0:
            self._start(sample, generator)
        elif sample is not self._pending and not torch.equal(sample, self._pending):
            self._abandon()
            raise ValueError(f"step {k}: the sample differs from the prev_sample this scheduler returned at step "
                             f"{k - 1}; DiffsolveScheduler runs a multistep sampler whose state cannot follow latents "
                             "changed between steps (e.g. by a callback or an inpainting blend)")
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
        if not return_dict:
            return (value,)
        return DiffsolveSchedulerOutput(prev_sample=value, pred_original_sample=x0)

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
                             "repeat them (img2img strength and similar are not supported)")

    def _start(self, x_T: Tensor, generator) -> None:
        """Start the sampler on x_T in a worker thread and wait for its first request (at x_T itself)."""
        state = self._state = _RunState(self._fixed_seeds)
        state.generator = generator
        channel = _Channel()
        model = self._make_model()
        model.state = state
        times, count = list(self._times), [0]

        def handoff(x, t):
            k = count[0]
            count[0] += 1
            if t.device.type == "cpu" and k < len(times):  # checked without a host sync where that is free
                got = float(t.reshape(-1)[0])
                if got != float(torch.tensor(times[k], dtype=torch.float64).to(t.dtype)):
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
        run = Run(model, TimeGrid(self.schedule, self._grid), _GeneratorNoise(state, x_T.shape[0], x_T.device),
                  device=x_T.device)
        fn, options, inference = self.spec.fn, dict(self.options), torch.is_inference_mode_enabled()
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
