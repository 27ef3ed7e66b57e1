"""Inverse problems on digits16: PSNR, SSIM, NFE and wall time of DPS, DDS and DAPS per restore task, and the
speed ratio of DDS over DPS at equal or better PSNR.

    OMP_NUM_THREADS=1 python benchmarks/inverse.py [--num 32] [--tasks sr4 ...] [--methods dps dds daps_100 daps_1k]
        [--dds-steps 50 20] [--device cpu]

Held-out test digits (``digits("test")``, the first ``--num``), each task's preset (operator with mask seed 0,
σ_y, solver hyperparameters: ``diffsolve.inverse.tasks``), measurement noise seeds 1000 + k, solver seeds k.
PSNR/SSIM on [0, 1] (mean over the images, ± the standard error of the mean for PSNR); "pinv" is the
measurement's own pseudo-inverse A⁺y. NFE = batched network evaluations (DPS also back-propagates through
each). Wall time of the whole batch on the device given, and on CPU the process's CPU time, which does not
depend on what else the machine runs (with one thread, OMP_NUM_THREADS=1, it is the wall time the run would
take on an idle core).

DDS runs with its preset's 50 steps and with each other count in ``--dds-steps`` (the paper's DDS uses 50 or
100; fewer steps are cheaper). The speed table takes, per task, the cheapest DDS run whose mean PSNR is at
least DPS's, and reports DPS's time over its time (CPU time on CPU, wall time on GPU) with the paired PSNR
difference (± its standard error over the digits); where no DDS run reaches DPS's PSNR it says so and gives
the ratio of the preset's run.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from diffsolve import load_model, solve
from diffsolve.data import digits
from diffsolve.inverse import measure, psnr, ssim
from diffsolve.inverse.tasks import TASKS, get_task

DDS_PRESET_STEPS = 50


def run_task(model, name, x, methods, dps_steps, dds_steps, device):
    task = get_task(name)
    op = task.operator(model.sample_shape, seed=0)
    noise = task.noise()
    y = measure(op, x.double(), noise, seed=1000).float().to(device)
    ref = x.to(device)
    rows = []
    start = time.perf_counter()
    base = op.A_pinv(y)
    rows.append(dict(task=name, method="pinv", steps=0, psnr=psnr(base, ref), ssim=ssim(base, ref), nfe=0,
                     wall=time.perf_counter() - start, cpu=float("nan")))
    runs = []
    for method in methods:
        if method == "dds":
            runs += [("dds", s) for s in dict.fromkeys([DDS_PRESET_STEPS, *dds_steps])]
        else:
            runs.append((method, dps_steps if method == "dps" else None))
    for method, steps in runs:
        opts = task.solver_options(method)
        cpu = time.process_time()
        out, info = solve(model, op, y, method, noise=noise, steps=steps, seeds=range(len(x)), return_info=True, **opts)
        cpu = time.process_time() - cpu
        rows.append(dict(task=name, method=method, steps=info.steps, psnr=psnr(out, ref), ssim=ssim(out, ref),
                         nfe=info.nfe, wall=info.wall_time, cpu=cpu))
    return rows


def label(row) -> str:
    default = {"dps": 1000, "dds": DDS_PRESET_STEPS}.get(row["method"])
    return row["method"] if default in (None, row["steps"]) else f"{row['method']} ({row['steps']} steps)"


def speed_table(rows, tasks, key) -> None:
    print("| task | DDS run | DDS PSNR − DPS PSNR (dB) | DPS time / DDS time |")
    print("|---|---|---|---|")
    ratios = []
    for name in tasks:
        dps = next(r for r in rows if r["task"] == name and r["method"] == "dps")
        dds = sorted((r for r in rows if r["task"] == name and r["method"] == "dds"), key=lambda r: r[key])
        good = [r for r in dds if r["psnr"].mean() >= dps["psnr"].mean()]
        pick = good[0] if good else next(r for r in dds if r["steps"] == DDS_PRESET_STEPS)
        diff = pick["psnr"] - dps["psnr"]
        se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        ratio = dps[key] / pick[key]
        note = "" if good else " (no DDS run reaches DPS's PSNR)"
        if good:
            ratios.append(ratio)
        print(f"| {name} | {label(pick)} | {float(diff.mean()):+.2f} ± {se:.2f}{note} | {ratio:.0f}× |")
    if ratios:
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"\ngeometric-mean speed ratio DDS vs DPS over the {len(ratios)} tasks where DDS reaches DPS's PSNR: "
              f"{gm:.0f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=["dps", "dds", "daps_100", "daps_1k"])
    ap.add_argument("--dps-steps", type=int, default=1000)
    ap.add_argument("--dds-steps", type=int, nargs="*", default=[20], help="DDS step counts besides the preset's 50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    model = load_model("digits16", device=args.device)
    x = digits("test")[0][: args.num]
    print(f"digits16, {len(x)} held-out test digits, device {args.device}, torch threads {torch.get_num_threads()}\n")
    print("| task | method | PSNR (dB) | SSIM | NFE | wall time (s) | CPU time (s) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.tasks:
        for r in run_task(model, name, x, args.methods, args.dps_steps, args.dds_steps, args.device):
            p = r["psnr"]
            sem = float(p.std() / math.sqrt(len(p))) if len(p) > 1 else float("nan")
            print(f"| {name} | {label(r)} | {float(p.mean()):.2f} ± {sem:.2f} | {float(r['ssim'].mean()):.3f} | "
                  f"{r['nfe']} | {r['wall']:.2f} | {r['cpu']:.2f} |", flush=True)
            rows.append(r)
    print()
    if "dps" in args.methods and "dds" in args.methods:
        speed_table(rows, args.tasks, "cpu" if args.device == "cpu" else "wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "psnr": r["psnr"].tolist(), "ssim": r["ssim"].tolist()} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
