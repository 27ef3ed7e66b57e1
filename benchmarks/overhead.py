"""Sampler overhead: wall time of ``diffsolve.sample`` divided by (network evaluations × the time of one bare
network call), next to the same ratio for diffusers' scheduler loop, in one run.

    python benchmarks/overhead.py [--batch 64 --steps 20 --repeats 5 --device cpu] [--only-adapter]

A ratio of 1.00 means the sampler adds nothing to the network's own cost; the target is ≤ 1.05. The network
is a tiny random UNet2DModel (the overhead is largest relative to a small network). Each figure is the
median of ``--repeats`` runs after a warm-up. A second table times each sampler as a diffusers scheduler
(``DiffsolveScheduler``) inside an unmodified ``DDPMPipeline`` against ``diffsolve.sample``, in ``--repeats``
interleaved pairs: the median and the range (min–max) of the per-pair ratios, per sampler and over all of them
(``--only-adapter`` runs that table alone).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from diffsolve import DiffusionModel, sample
from diffsolve.schedules import DiscreteVP
from diffsolve.testing import random_ems


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval().requires_grad_(False)


def timed(fn, repeats: int, device: torch.device) -> float:
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def network_tables(args, device, unet, model, x, names, options, config, diffusers_loop) -> None:
    """The first and third tables: sampler wall time over NFE × one bare call, and the sampler's own time."""
    t = torch.full((args.batch,), 500, device=device)
    with torch.no_grad():
        call = timed(lambda: unet(x, t), args.repeats * 4, device)
    rows = []
    for name in names:
        model.reset_nfe()
        sample(model, name, args.steps, x_T=x, **options[name])
        nfe = model.nfe
        wall = timed(lambda: sample(model, name, args.steps, x_T=x, **options[name]), args.repeats, device)
        rows.append((f"diffsolve {name}", nfe, wall, wall / (nfe * call)))
    for label, scheduler in [("diffusers DDIMScheduler", DDIMScheduler(**config)),
                             ("diffusers DPMSolverMultistepScheduler", DPMSolverMultistepScheduler(**config))]:
        wall = timed(diffusers_loop(scheduler), args.repeats, device)
        rows.append((label, args.steps, wall, wall / (args.steps * call)))

    print(f"device {device}, batch {args.batch}, {args.steps} steps; one bare UNet call: {call * 1e3:.2f} ms\n")
    print("| sampler | NFE | wall (s) | wall / (NFE × call) |")
    print("|---|---|---|---|")
    for label, nfe, wall, ratio in rows:
        print(f"| {label} | {nfe} | {wall:.4f} | {ratio:.3f} |")
    ref = {r[0]: r[3] for r in rows}
    if "diffsolve dpm_solver_pp" in ref:  # the like-for-like pair, when --samplers includes it
        print(f"\nratio diffsolve dpm_solver_pp / diffusers DPMSolverMultistepScheduler: "
              f"{ref['diffsolve dpm_solver_pp'] / ref['diffusers DPMSolverMultistepScheduler']:.3f}")

    # the samplers' own cost, free of the network's timing noise: the same runs over a network that costs
    # nothing (ε̂ = 0), so the wall time is the sampler's update arithmetic, grid, noise and bookkeeping
    free = DiffusionModel(lambda x_t, t_: torch.zeros_like(x_t), DiscreteVP.from_config(config),
                          sample_shape=tuple(x.shape[1:]))
    free_ems = Path(tempfile.mkdtemp()) / "ems.safetensors"
    random_ems(free, n_lambda=120).save(free_ems)
    print(f"\nsampler's own time per network evaluation over a free network (ε̂ = 0), batch {args.batch}:\n")
    print("| sampler | own time per evaluation (ms) | relative to one bare UNet call |")
    print("|---|---|---|")
    for name in names:
        opts = {"ems": str(free_ems)} if name == "dpm_solver_v3" else {}
        free.reset_nfe()
        sample(free, name, args.steps, x_T=x, **opts)
        nfe = free.nfe
        own = timed(lambda: sample(free, name, args.steps, x_T=x, **opts), args.repeats, device) / nfe
        print(f"| {name} | {own * 1e3:.3f} | {own / call:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samplers", nargs="+", default=None, help="default: all registered fixed-grid samplers")
    ap.add_argument("--only-adapter", action="store_true", help="only the DiffsolveScheduler-in-a-pipeline table")
    args = ap.parse_args()
    device = torch.device(args.device)

    unet = tiny_unet().to(device)
    config = dict(beta_schedule="linear")
    model = DiffusionModel(unet, DiscreteVP.from_config(config))
    x = torch.randn(args.batch, 1, 16, 16, device=device)

    def diffusers_loop(scheduler):
        def run():
            scheduler.set_timesteps(args.steps, device=device)
            y = x.clone()
            with torch.no_grad():
                for ts in scheduler.timesteps:
                    y = scheduler.step(unet(y, ts).sample, ts, y).prev_sample
        return run

    import diffsolve

    names = args.samplers or [n for n in diffsolve.list_samplers() if not diffsolve.get_sampler(n).adaptive]
    # dpm_solver_v3 runs on random statistics of this network: they cost what real ones cost
    ems_file = Path(tempfile.mkdtemp()) / "ems.safetensors"
    random_ems(model, n_lambda=120).save(ems_file)
    options = {name: {"ems": str(ems_file)} if name == "dpm_solver_v3" else {} for name in names}
    if not args.only_adapter:
        network_tables(args, device, unet, model, x, names, options, config, diffusers_loop)

    # diffsolve samplers as a diffusers scheduler (DiffsolveScheduler) inside an unmodified DDPMPipeline, against
    # diffsolve.sample with the same sampler, steps and noise: the cost of the hand-off to the sampler's worker
    # thread and of the pipeline's own loop (the pipeline draws x_T and post-processes to [0, 1] as well)
    from diffusers import DDPMPipeline
    from diffsolve import DiffsolveScheduler

    pipe = DDPMPipeline(unet=unet, scheduler=DiffsolveScheduler(**config)).to(device)
    pipe.set_progress_bar_config(disable=True)

    def clocks(fn):  # (wall, process CPU) seconds of one call; CPU time is robust to other load on a shared host
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    print(f"\nDiffsolveScheduler in DDPMPipeline against diffsolve.sample, {args.repeats} interleaved pairs per sampler "
          "(ratios pipeline / sample: median and min–max over the pairs)\n")
    print("| sampler | diffsolve.sample wall (s) | in DDPMPipeline wall (s) | wall ratio | wall ratio range "
          "| CPU-time ratio | CPU-time ratio range |")
    print("|---|---|---|---|---|---|---|")
    all_cpu, all_wall = [], []
    for name in names:
        pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler=name,
                                                        sampler_options=options[name])
        pipe.scheduler.set_model(unet)  # dpm_solver_v3 checks its statistics against the network
        gen = torch.Generator(device).manual_seed(0)
        runs = (lambda: pipe(batch_size=args.batch, num_inference_steps=args.steps, generator=gen, output_type="pt"),
                lambda: sample(model, name, args.steps, x_T=x, **options[name]))
        for fn in runs:
            fn()  # warm-up
        pairs = [[clocks(fn) for fn in runs] for _ in range(args.repeats)]  # interleaved, so that drift cancels
        in_pipe, alone = (statistics.median(p[k][0] for p in pairs) for k in (0, 1))
        walls = [p[0][0] / p[1][0] for p in pairs]
        cpus = [p[0][1] / p[1][1] for p in pairs]
        all_wall += walls
        all_cpu += cpus
        print(f"| {name} | {alone:.4f} | {in_pipe:.4f} | {statistics.median(walls):.3f} | {min(walls):.3f}–"
              f"{max(walls):.3f} | {statistics.median(cpus):.3f} | {min(cpus):.3f}–{max(cpus):.3f} |", flush=True)
    print(f"| **all samplers, all pairs** | | | {statistics.median(all_wall):.3f} | {min(all_wall):.3f}–{max(all_wall):.3f} "
          f"| {statistics.median(all_cpu):.3f} | {min(all_cpu):.3f}–{max(all_cpu):.3f} |")


if __name__ == "__main__":
    main()
