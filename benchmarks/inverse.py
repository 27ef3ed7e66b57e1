"""Inverse problems on digits16: per task and method, the quality of one restoration, of the mean of K
posterior samples, their spread and the digit classifier's verdict, with NFE and CPU time; and DDS against
1000-step DPS where the DDS paper stakes its claim.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/inverse.py [--num 32] [--samples 4] [--tasks sr4 ...]
        [--methods dps dds daps_100 daps_1k] [--dds-steps 50] [--device cpu] [--json rows.json]
    python benchmarks/inverse.py --table rows1.json rows2.json ...     # the tables of saved runs, merged
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/inverse.py --speed 3 --num 8 --tasks mri4 ct ...   # DPS/DDS

Held-out test digits (``digits("test")``, the first ``--num``), each task's preset (operator with mask seed 0,
σ_y, solver hyperparameters and DDS's step count: ``diffsolve.inverse.tasks``), measurement noise seeds
1000 + j for digit j. Every method draws K = ``--samples`` restorations of each measurement in one batch:
sample k of digit j has solver seed k·num + j (sample 0 is the one-sample restoration, seeded as before).

Columns:
- PSNR (1 sample): of sample 0, mean over the digits ± the standard error; SSIM of sample 0;
- PSNR (mean of K): of the average of the K samples (a posterior sampler's mean approaches the MMSE
  estimate, which PSNR rewards; a solver whose samples barely differ gains nothing);
- spread: per digit √(mean over pixels of the samples' variance across k), on [0, 1], averaged over the
  digits: 0 for a deterministic solver;
- class acc.: the share of all K·num restorations that the digits classifier (``diffsolve.data.classify``,
  97 % accurate on clean held-out digits) assigns to the true digit's class: a restoration that turns a 9
  into a 5 can still have a fair PSNR;
- NFE: batched network evaluations per restoration (DPS also back-propagates through each); CPU time: the
  process's CPU time per ``num`` restorations (K·num were run, the total is divided by K), which with one
  thread (OMP_NUM_THREADS=1) is the time on an idle core whatever else the machine runs.

All scores are taken after ``Task.align`` (phase retrieval: the closest of x and its 180° rotation, each shifted
by 0 or ±1 px horizontally, which give the same measurement for almost all digits). Two yardsticks per task: "pinv", the measurement's own
pseudo-inverse (FBP for CT, error reduction for phase retrieval), and "prior", unconditional samples of the
model (DDIM, 50 steps, the same seeds), i.e. what a solver that ignored y would score.

The DDS table compares DDS at the task's preset step count (chosen on training digits:
``benchmarks/inverse_tuning.py dds-steps``) and at each other count in ``--dds-steps`` with 1000-step DPS:
the paired per-digit difference of one-sample PSNR ± its standard error, the same for the mean of K, and
DPS's CPU time over DDS's. The target (issue 15): difference ≥ −0.3 dB at ≥ 50× less CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from diffsolve import load_model, sample, solve
from diffsolve.data import classify, digits
from diffsolve.files import atomic_write
from diffsolve.inverse import measure, psnr, ssim
from diffsolve.inverse.tasks import TASKS, get_task

DDS_DEFAULT_STEPS = 50
PRIOR_STEPS = 50
TARGET_DB, TARGET_RATIO = -0.3, 50.0


def spread(samples: torch.Tensor) -> torch.Tensor:
    """Per digit, √(mean over pixels of the variance across samples) on [0, 1]; samples (K, B, …)."""
    return (samples.double() / 2).var(0).flatten(1).mean(1).sqrt()


def scores(task, samples: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor) -> dict:
    """The per-digit metrics of K restorations of each digit, samples (K, B, C, H, W)."""
    aligned = torch.stack([task.align(s, clean) for s in samples.to(clean.dtype)])
    k = len(aligned)
    hits = torch.stack([classify(s).argmax(1) == labels for s in aligned]).double()
    return dict(psnr=psnr(aligned[0], clean), ssim=ssim(aligned[0], clean), psnr_mean=psnr(aligned.mean(0), clean),
                spread=spread(aligned) if k > 1 else torch.zeros(len(clean), dtype=torch.float64),
                class_acc=hits.mean(0))


def task_measurement(model, name, clean):
    """(task, operator, noise, y): the task's preset operator (mask seed 0) and its measurement of ``clean``."""
    task = get_task(name)
    op = task.operator(model.sample_shape, seed=0)
    noise = task.noise()
    return task, op, noise, measure(op, clean.double(), noise, seed=1000)


def speed_ratios(model, names, clean, repeats: int, device) -> list:
    """DPS (1000 steps) against DDS (the preset's steps) in CPU time, both timed in this process, alternating,
    ``repeats`` times per task on the same measurements: the ratio of each pair, median and range."""
    print("| task | DDS steps | DPS CPU (s) | DDS CPU (s) | DPS / DDS, median | range |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in names:
        task, op, noise, y = task_measurement(model, name, clean)
        if not op.linear:
            continue
        steps = task.solver_steps("dds") or DDS_DEFAULT_STEPS
        seeds, y = range(len(clean)), y.to(device)
        times = {"dps": [], "dds": []}
        for _ in range(repeats):
            for method, method_steps in (("dps", task.solver_steps("dps")), ("dds", steps)):
                cpu = time.process_time()
                solve(model, op, y, method, noise=noise, steps=method_steps, seeds=seeds, **task.solver_options(method))
                times[method].append(time.process_time() - cpu)
        ratios = sorted(a / b for a, b in zip(times["dps"], times["dds"]))
        print(f"| {name} | {steps} | {statistics.median(times['dps']):.2f} | {statistics.median(times['dds']):.3f} | "
              f"{statistics.median(ratios):.0f}× | {ratios[0]:.0f}–{ratios[-1]:.0f}× |", flush=True)
        rows.append(dict(task=name, method="speed", dds_steps=steps, ratios=ratios, num=len(clean)))
    return rows


def run_task(model, name, clean, labels, methods, samples, dds_steps, device):
    task, op, noise, y = task_measurement(model, name, clean)
    num = len(clean)
    ref = clean.to(device)
    rows = [dict(task=name, method="pinv", steps=0, nfe=0, cpu=float("nan"), wall=float("nan"),
                 **scores(task, op.A_pinv(y).float()[None], clean, labels))]
    seeds = range(samples * num)
    prior = sample(model, "ddim", PRIOR_STEPS, seeds=seeds).reshape(samples, num, *clean.shape[1:])
    rows.append(dict(task=name, method="prior", steps=PRIOR_STEPS, nfe=PRIOR_STEPS, cpu=float("nan"),
                     wall=float("nan"), **scores(task, prior.cpu(), clean, labels)))
    runs = []
    for method in methods:
        if method == "dds":
            if not op.linear:
                continue  # refused for nonlinear operators (solve raises): no row
            preset = task.solver_steps("dds") or DDS_DEFAULT_STEPS
            runs += [("dds", s) for s in dict.fromkeys([preset, *dds_steps])]
        else:
            runs.append((method, task.solver_steps(method)))
    y_k = y.repeat(samples, *([1] * (y.ndim - 1))).to(device)
    for method, steps in runs:
        cpu = time.process_time()
        out, info = solve(model, op, y_k, method, noise=noise, steps=steps, seeds=seeds, return_info=True,
                          **task.solver_options(method))
        cpu = (time.process_time() - cpu) / samples
        rows.append(dict(task=name, method=method, steps=info.steps, nfe=info.nfe, cpu=cpu,
                         wall=info.wall_time / samples,
                         **scores(task, out.cpu().reshape(samples, num, *clean.shape[1:]), clean, labels)))
    del ref
    return rows


def mean_se(v) -> tuple[float, float]:
    v = torch.as_tensor(v, dtype=torch.float64)
    return float(v.mean()), (float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan"))


def label(row) -> str:
    default = {"dps": 1000, "dds": row.get("preset_steps")}.get(row["method"])
    return row["method"] if default in (None, row["steps"]) else f"{row['method']} ({row['steps']} steps)"


def print_table(rows) -> None:
    print("| task | method | K | PSNR, 1 sample (dB) | PSNR, mean of K (dB) | spread | class acc. | SSIM | NFE | "
          "CPU time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r.get("samples", 1)
        p, pm = mean_se(r["psnr"]), mean_se(r["psnr_mean"])
        mean_k = f"{pm[0]:.2f} ± {pm[1]:.2f}" if k > 1 else "—"
        spread_k = f"{mean_se(r['spread'])[0]:.3f}" if k > 1 else "—"
        print(f"| {r['task']} | {label(r)} | {k} | {p[0]:.2f} ± {p[1]:.2f} | {mean_k} | {spread_k} | "
              f"{mean_se(r['class_acc'])[0]:.2f} | {mean_se(r['ssim'])[0]:.3f} | {r['nfe']} | {r['cpu']:.2f} |")


def print_dds_table(rows, speed: dict) -> None:
    """DDS against DPS per task: paired PSNR differences from the quality runs, and the CPU-time ratio measured
    by ``--speed`` (both timed in one process) for the preset's step count; another step count's ratio is that
    one scaled by the step counts (≈). Without a ``--speed`` row, the quotient of the runs' own CPU times (from
    separate runs, so under whatever load each had) is shown in parentheses and no verdict is given."""
    print("| task | DDS run | DDS − DPS, 1 sample (dB) | DDS − DPS, mean of K (dB) | DPS CPU / DDS CPU | target "
          f"(≥ {TARGET_DB:+.1f} dB at ≥ {TARGET_RATIO:.0f}×) |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["task"] for r in rows):
        dps = next((r for r in rows if r["task"] == name and r["method"] == "dps"), None)
        dds = [r for r in rows if r["task"] == name and r["method"] == "dds"]
        if dps is None or not dds:
            continue
        for r in sorted(dds, key=lambda r: r["steps"] != r.get("preset_steps")):
            d = mean_se(torch.tensor(r["psnr"]) - torch.tensor(dps["psnr"]))
            same_k = r.get("samples", 1) == dps.get("samples", 1) > 1
            dm = mean_se(torch.tensor(r["psnr_mean"]) - torch.tensor(dps["psnr_mean"])) if same_k else None
            if name in speed:
                measured = speed[name]
                ratio = statistics.median(measured["ratios"]) * measured["dds_steps"] / r["steps"]
                shown = f"{'' if r['steps'] == measured['dds_steps'] else '≈ '}{ratio:.0f}×"
                verdict = "holds" if d[0] >= TARGET_DB and ratio >= TARGET_RATIO else "fails"
            else:
                shown, verdict = f"({dps['cpu'] / r['cpu']:.0f}×)", "—"
            print(f"| {name} | {label(r)}{' (preset)' if r['steps'] == r.get('preset_steps') else ''} | "
                  f"{d[0]:+.2f} ± {d[1]:.2f} | {f'{dm[0]:+.2f} ± {dm[1]:.2f}' if dm else '—'} | {shown} | "
                  f"{verdict} |")


def print_daps_table(rows) -> None:
    """DAPS against DPS per task, paired over the digits: one-sample PSNR, mean-of-K PSNR (same K) and the
    class accuracy, each as DAPS − DPS with its standard error; "wins" when the difference exceeds 2 s.e."""
    def verdict(d):
        return "DAPS" if d[0] > 2 * d[1] else "DPS" if d[0] < -2 * d[1] else "tie"

    print("| task | DAPS run | Δ PSNR, 1 sample (dB) | better | Δ PSNR, mean of K (dB) | better | Δ class acc. | better |")
    print("|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["task"] for r in rows):
        dps = next((r for r in rows if r["task"] == name and r["method"] == "dps"), None)
        for r in (r for r in rows if r["task"] == name and r["method"].startswith("daps")):
            if dps is None:
                continue
            cells = []
            for key in ("psnr", "psnr_mean", "class_acc"):
                if key == "psnr_mean" and not r.get("samples", 1) == dps.get("samples", 1) > 1:
                    cells += ["—", "—"]
                    continue
                d = mean_se(torch.tensor(r[key]) - torch.tensor(dps[key]))
                cells += [f"{d[0]:+.2f} ± {d[1]:.2f}" if key != "class_acc" else f"{d[0]:+.3f} ± {d[1]:.3f}", verdict(d)]
            print(f"| {name} | {label(r)} | {' | '.join(cells)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="K restorations per measurement")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=["dps", "dds", "daps_100", "daps_1k"])
    ap.add_argument("--dds-steps", type=int, nargs="*", default=[DDS_DEFAULT_STEPS],
                    help="DDS step counts besides the task's preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file (a new file)")
    ap.add_argument("--table", nargs="+", default=None, help="print the tables of these saved JSON files instead")
    ap.add_argument("--speed", type=int, default=None, metavar="REPEATS",
                    help="instead: DPS against DDS in CPU time, timed alternately in this process REPEATS times per "
                         "task on --num digits, K = 1 (the ratio the DDS target needs, free of other runs' load)")
    args = ap.parse_args()

    if args.table:
        # the preset's DDS step count from tasks.py, so runs made with every count before it was chosen tabulate
        rows = [{**r, "preset_steps": get_task(r["task"]).solver_steps("dds") or DDS_DEFAULT_STEPS}
                for path in args.table for r in json.load(open(path))]
        speed = {r["task"]: r for r in rows if r["method"] == "speed"}
        rows = [r for r in rows if r["method"] != "speed"]
        # a task's methods may come from runs with different K: keep one copy of its yardsticks
        seen = set()
        rows = [r for r in rows if r["method"] not in ("pinv", "prior")
                or not ((r["task"], r["method"]) in seen or seen.add((r["task"], r["method"])))]
        print_table(rows)
        print()
        print_dds_table(rows, speed)
        print()
        print_daps_table(rows)
        return
    for name in args.tasks:
        get_task(name)
    model = load_model("digits16", device=args.device)
    clean, labels = (v[: args.num] for v in digits("test"))
    if args.speed:
        print(f"digits16, {len(clean)} held-out digits, K = 1, device {args.device}, torch threads "
              f"{torch.get_num_threads()}, {args.speed} alternating repeats\n")
        rows = speed_ratios(model, args.tasks, clean, args.speed, args.device)
        if args.json:
            atomic_write(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))
        return
    print(f"digits16, {len(clean)} held-out test digits, K = {args.samples} samples each, device {args.device}, "
          f"torch threads {torch.get_num_threads()}\n")
    rows = []
    for name in args.tasks:
        preset = get_task(name).solver_steps("dds") or DDS_DEFAULT_STEPS
        for r in run_task(model, name, clean, labels, args.methods, args.samples, args.dds_steps, args.device):
            r = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
            rows.append({**r, "preset_steps": preset, "samples": 1 if r["method"] == "pinv" else args.samples})
            print_table(rows[-1:])
            print(flush=True)
    print_table(rows)
    print()
    print_dds_table(rows, {})
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))


if __name__ == "__main__":
    main()
