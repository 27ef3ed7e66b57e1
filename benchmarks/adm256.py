"""Memory and time of one solver step at the papers' size: the 93.6 M-parameter FFHQ-256 network of DPS and DAPS
(guided-diffusion's UNetModel with ffhq_10m.pt's flags, as diffsolve.adm converts it; random weights: the cost
does not depend on them), 256×256 RGB, batch 1, 128×128 box inpainting, σ_y = 0.05.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/adm256.py [--repeats 2] [--device cpu]

One step of each method is ``solve(..., steps=1)`` (the solver's own code): DPS (forward + backward through the
network), DPS with ``checkpointing=True``, DDS (one forward + 5 CG steps), DAPS-100 (one annealing step: 2
Euler ODE steps = 2 forwards, then 100 Langevin steps on the operator alone); "forward" is one bare forward
(``no_grad``). Each runs in its own process; its first call after building the network is the measured one: on
CPU the peak is the process's ru_maxrss (the high-water mark of its resident memory) after that call minus its
resident memory before it, so it counts what the step allocates on top of the weights; on CUDA,
torch.cuda.max_memory_allocated above the memory held before. Time: the median of ``--repeats`` further steps,
and of as many bare forwards in the same process, alternated; on CPU the process's CPU time (with
OMP_NUM_THREADS=1 the wall time on an idle core, whatever else the machine runs), on CUDA wall time. The ratio is
the step's cost in bare forwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = {
    "forward": None,
    "dps": ("dps", {}),
    "dps checkpointing": ("dps", {"checkpointing": True}),
    "dds": ("dds", {}),
    "daps_100": ("daps_100", {}),
}


def _resident_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _model(device: str):
    from diffusers import UNet2DModel

    from diffsolve import DiffusionModel
    from diffsolve.adm import PRESETS, config_from_flags, scheduler_config, unet_config
    from diffsolve.schedules import DiscreteVP

    cfg = config_from_flags(PRESETS["ffhq256-dps"])
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config(cfg)).to(device).eval().requires_grad_(False)
    return DiffusionModel(unet, DiscreteVP.from_config(scheduler_config(cfg)), "epsilon")


def measure_one(name: str, repeats: int, device: str) -> dict:
    """One configuration in this process: the step's peak memory above the loaded model, and its time."""
    from diffsolve import solve
    from diffsolve.inverse import Inpainting

    model = _model(device)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.full((1,), 0.5, dtype=torch.float64, device=device)
    op = Inpainting.box((3, 256, 256), 128, position=(64, 64))
    y = op.A(x.double()).float()

    def bare():
        with torch.no_grad():
            model.predict(x, t)

    def step():
        if METHODS[name] is None:
            return bare()
        method, options = METHODS[name]
        solve(model, op, y, method, noise=0.05, steps=1, **options)

    # CPU time of this process on CPU: unlike wall time it does not depend on what else the (shared) machine
    # runs, and with one thread it is the wall time on an idle core
    clock = time.perf_counter if device == "cuda" else time.process_time

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    # memory first, in a process that has run nothing yet: memory freed by an earlier call could be reused
    # without raising the resident high-water mark
    if device == "cuda":
        before = torch.cuda.memory_allocated() / 2**20
        step()
        peak = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        before = _resident_mb()
        step()
        peak = _peak_mb() - before
    steps, forwards = [], []
    for _ in range(repeats):  # alternated, so that a slow phase of the machine hits both
        steps.append(timed(step))
        forwards.append(timed(bare))
    return dict(name=name, peak_mb=peak, step_s=statistics.median(steps), forward_s=statistics.median(forwards),
                params=sum(p.numel() for p in model.net.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the per-configuration subprocess
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.repeats, args.device)))
        return
    rows = []
    for name in METHODS:
        done = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                               "--device", args.device], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: the measuring process failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", file=sys.stderr)
    dps_peak = next(r["peak_mb"] for r in rows if r["name"] == "dps")
    kind = "ru_maxrss" if args.device == "cpu" else "max_memory_allocated"
    print(f"FFHQ-256 ADM ({rows[0]['params'] / 1e6:.1f} M parameters), 256×256 RGB, batch 1, {args.device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}, {'wall' if args.device == 'cuda' else 'CPU'} time")
    print(f"| step | peak memory above the model (MB, {kind}) | / DPS | time (s) | bare forward (s) | "
          "time / bare forward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['peak_mb']:.0f} | {r['peak_mb'] / dps_peak:.2f} | {r['step_s']:.2f} | "
              f"{r['forward_s']:.2f} | {r['step_s'] / r['forward_s']:.2f} |")


if __name__ == "__main__":
    main()
