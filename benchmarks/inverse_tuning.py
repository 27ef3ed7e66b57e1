"""How the digits16 restore presets were chosen, and why DDS trails DPS on inpainting and denoising.

    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dps-zeta [--num 3 --steps 250]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dds-eta [--num 8]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dds-gap [--num 16]

``dps-zeta`` and ``dds-eta`` tune on *training* digits (``digits("train")``, the first ``--num``), so the
held-out digits of ``benchmarks/inverse.py`` stay unseen:

- dps-zeta: DPS's ζ as multiples ¼ … 64 of the dimension-scaled paper value ζ_paper·√(M/M_paper) (M the
  number of pixels: 16² here, 256²·3 in the paper), with ``--steps`` ancestral steps and ζ·steps held fixed
  (ζ × 1000/steps), so a short run stands in for the 1000-step one;
- dds-eta: DDS's η (the fraction of fresh noise) ∈ {0, 0.5, 0.85, 1} with the matched γ, and the official
  code's constant γ = 1 at η = 0.85, at the preset's 50 steps.

``dds-gap`` (held-out digits, as ``benchmarks/inverse.py``) looks at the tasks where DDS stays below DPS:
DDS with more steps; the PSNR of the mean of 8 DDS samples against one DPS sample (if DDS only lost because
posterior samples scatter more than DPS's, their mean would catch up); the spread between two samples of the
same measurement; and, for denoising, the posterior mean E[x_0 | y] itself: with A = I and Gaussian noise,
α* y is distributed as x_t at the time where σ_t/α_t = σ_y, so one network call at α* y gives the MMSE
estimate, the best PSNR any method can reach on average.

PSNR in dB on [0, 1], mean ± the standard error over the digits.
"""

from __future__ import annotations

import argparse
import math

import torch

from diffsolve import load_model, solve
from diffsolve.data import digits
from diffsolve.inverse import measure, psnr
from diffsolve.inverse.tasks import _DPS_SCALE, TASKS, get_task

ZETA_MULTIPLIERS = (0.25, 1, 4, 16, 64)
DDS_ETAS = (0.0, 0.5, 0.85, 1.0)
GAP_TASKS = ("inpaint_box", "inpaint_random", "denoise")


def fmt(p: torch.Tensor) -> str:
    sem = float(p.std() / math.sqrt(len(p))) if len(p) > 1 else float("nan")
    return f"{float(p.mean()):.2f} ± {sem:.2f}"


def problem(model, name: str, x: torch.Tensor):
    task = get_task(name)
    op, noise = task.operator(model.sample_shape, seed=0), task.noise()
    return task, op, noise, measure(op, x.double(), noise, seed=1000).float()


def dps_zeta(model, x, tasks, steps: int) -> None:
    scale = math.sqrt(x[0].numel() / (256 * 256 * 3))
    print(f"DPS, {steps} steps (ζ × 1000/{steps}), {len(x)} training digits; ζ = multiplier × ζ_paper × {scale:.4f}\n")
    print("| task | ζ_paper | " + " | ".join(f"×{m:g}" for m in ZETA_MULTIPLIERS) + " |")
    print("|---|---|" + "---|" * len(ZETA_MULTIPLIERS))
    for name in tasks:
        task, op, noise, y = problem(model, name, x)
        paper = task.solver_options("dps")["zeta"] / _DPS_SCALE
        cells = []
        for m in ZETA_MULTIPLIERS:
            out = solve(model, op, y, "dps", noise=noise, steps=steps, seeds=range(len(x)),
                        zeta=m * paper * scale * 1000 / steps)
            cells.append(fmt(psnr(out, x)))
        print(f"| {name} | {paper:g} | " + " | ".join(cells) + " |", flush=True)


def dds_eta(model, x, tasks) -> None:
    print(f"DDS, 50 steps, {len(x)} training digits: η with the matched γ, and the official constant γ = 1\n")
    print("| task | " + " | ".join(f"η = {e:g}" for e in DDS_ETAS) + " | γ = 1, η = 0.85 |")
    print("|---|" + "---|" * (len(DDS_ETAS) + 1))
    for name in tasks:
        _, op, noise, y = problem(model, name, x)
        runs = [dict(eta=e) for e in DDS_ETAS] + [dict(eta=0.85, gamma=1.0)]
        cells = [fmt(psnr(solve(model, op, y, "dds", noise=noise, seeds=range(len(x)), **o), x)) for o in runs]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def dds_gap(model, x, tasks) -> None:
    n = len(x)
    print(f"{n} held-out digits, the presets' options; DPS 1000 steps, DDS as given\n")
    print("| task | DPS | DDS 50 | DDS 100 | DDS 200 | DDS 500 | mean of 8 DDS | mean of 2 DPS | "
          "rms(DDS₁ − DDS₂) | rms(DPS₁ − DPS₂) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in tasks:
        task, op, noise, y = problem(model, name, x)

        def run(method, k, steps=None):
            return solve(model, op, y, method, noise=noise, steps=steps, seeds=range(k * n, (k + 1) * n),
                         **task.solver_options(method))

        dps = [run("dps", k) for k in range(2)]
        dds = [run("dds", k) for k in range(8)]
        longer = [fmt(psnr(run("dds", 0, s), x)) for s in (100, 200, 500)]
        spread = lambda a, b: f"{float((a - b).pow(2).flatten(1).mean(1).sqrt().mean()):.3f}"
        print(f"| {name} | {fmt(psnr(dps[0], x))} | {fmt(psnr(dds[0], x))} | " + " | ".join(longer)
              + f" | {fmt(psnr(torch.stack(dds).mean(0), x))} | {fmt(psnr(torch.stack(dps).mean(0), x))} | "
              f"{spread(dds[0], dds[1])} | {spread(dps[0], dps[1])} |", flush=True)
        if name == "denoise":
            sched = model.schedule
            t = sched.t_from_lambda(torch.tensor(-math.log(noise.sigma), dtype=torch.float64))
            with torch.no_grad():
                mmse = model.predict(float(sched.alpha(t)) * y, t.float().expand(n)).x0
            print(f"\ndenoise: posterior mean E[x_0 | y] (one network call at t = {float(t):.4f}, "
                  f"σ_t/α_t = σ_y = {noise.sigma:g}): {fmt(psnr(mmse, x))}\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["dps-zeta", "dds-eta", "dds-gap"])
    ap.add_argument("--num", type=int, default=None, help="digits (default: 3 for dps-zeta, 8 for dds-eta, "
                                                          "16 for dds-gap)")
    ap.add_argument("--steps", type=int, default=250, help="dps-zeta: DPS steps")
    ap.add_argument("--tasks", nargs="+", default=None)
    args = ap.parse_args()
    model = load_model("digits16")
    if args.what == "dds-gap":
        x = digits("test")[0][: args.num or 16]
        dds_gap(model, x, args.tasks or GAP_TASKS)
        return
    x = digits("train")[0][: args.num or (3 if args.what == "dps-zeta" else 8)]
    tasks = args.tasks or list(TASKS)
    dps_zeta(model, x, tasks, args.steps) if args.what == "dps-zeta" else dds_eta(model, x, tasks)


if __name__ == "__main__":
    main()
