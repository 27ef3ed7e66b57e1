"""The samplers' own cost per network evaluation against diffusers' cost per scheduler step, in one process.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py [--batches 1 8 64 --steps 20 --repeats 7]

The network returns a constant ε (a tensor made once), so the time measured is the sampler's own work: its
set-up (``diffsolve.sample``'s argument checks, grid and coefficients; diffusers' ``set_timesteps``) and its
per-step arithmetic, noise and bookkeeping. 1×16×16 samples, one thread, best of ``--repeats`` runs after a
warm-up. Each row: diffsolve's time per network evaluation (NFE) over diffusers' time per step (one network
call each), with the same method, the same discrete linear-β schedule and the same number of steps; target
≤ 1.0 (goal ≤ 0.5). The second table times ``adaptive_sde`` per NFE against diffsolve's fixed-step
``euler_maruyama`` per NFE (no diffusers counterpart steps per sample).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, SASolverScheduler

from diffsolve import DiffusionModel, sample
from diffsolve.schedules import DiscreteVP

CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SHAPE = (1, 16, 16)

#: (row label, diffsolve sampler and options, diffusers scheduler class and config)
METHODS = [
    ("DDIM", "ddim", {}, DDIMScheduler, {}),
    ("DPM-Solver++ 2M", "dpm_solver_pp", {}, DPMSolverMultistepScheduler, {}),
    ("PNDM (PRK + PLMS)", "pndm", {}, PNDMScheduler, {}),
    ("SA-Solver 2/2, τ paper", "sa_solver", {}, SASolverScheduler, {}),
]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def free_model(eps: torch.Tensor) -> DiffusionModel:
    """A model whose network costs nothing: it returns the same ε̂ whatever x and t."""
    return DiffusionModel(lambda x, t: eps, DiscreteVP.from_config(CONFIG), sample_shape=SHAPE)


def diffsolve_per_nfe(model: DiffusionModel, name: str, steps, x: torch.Tensor, options: dict,
                      repeats: int) -> tuple[float, int]:
    model.reset_nfe()
    sample(model, name, steps, x_T=x, **options)
    nfe = model.nfe
    return best_time(lambda: sample(model, name, steps, x_T=x, **options), repeats) / nfe, nfe


def diffusers_per_step(scheduler, eps: torch.Tensor, x: torch.Tensor, steps: int, repeats: int) -> tuple[float, int]:
    net = lambda x_t, t: eps  # noqa: E731  (the same free network diffsolve calls)
    # stochastic schedulers draw their noise from a generator, as in a pipeline
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(scheduler.step).parameters else {}

    def loop():
        scheduler.set_timesteps(steps)
        y = x
        with torch.no_grad():
            for t in scheduler.timesteps:
                y = scheduler.step(net(y, t), t, y, **kwargs).prev_sample
        return y

    loop()
    calls = len(scheduler.timesteps)
    return best_time(loop, repeats) / calls, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)

    print(f"one thread, {args.steps} steps, samples {'×'.join(map(str, SHAPE))}, a free network (constant ε̂), "
          f"best of {args.repeats}\n")
    print("| method | batch | diffsolve NFE | diffsolve µs / NFE | diffusers steps | diffusers µs / step | ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, name, options, cls, extra in METHODS:
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, *SHAPE, generator=gen)
            eps = torch.randn(batch, *SHAPE, generator=gen)
            ours, nfe = diffsolve_per_nfe(free_model(eps), name, args.steps, x, options, args.repeats)
            theirs, calls = diffusers_per_step(cls(**CONFIG, **extra), eps, x, args.steps, args.repeats)
            print(f"| {label} | {batch} | {nfe} | {ours * 1e6:.0f} | {calls} | {theirs * 1e6:.0f} | "
                  f"{ours / theirs:.2f} |")

    print(f"\nadaptive_sde (rtol 0.05) against euler_maruyama ({args.steps} steps), both diffsolve, per NFE:\n")
    print("| batch | adaptive_sde NFE | adaptive_sde µs / NFE | euler_maruyama NFE | euler_maruyama µs / NFE | ratio |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, *SHAPE, generator=gen)
        model = free_model(torch.randn(batch, *SHAPE, generator=gen))
        adaptive, nfe_a = diffsolve_per_nfe(model, "adaptive_sde", None, x, {}, args.repeats)
        em, nfe_e = diffsolve_per_nfe(model, "euler_maruyama", args.steps, x, {}, args.repeats)
        print(f"| {batch} | {nfe_a} | {adaptive * 1e6:.0f} | {nfe_e} | {em * 1e6:.0f} | {adaptive / em:.2f} |")


if __name__ == "__main__":
    main()
