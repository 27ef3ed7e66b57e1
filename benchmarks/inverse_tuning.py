"""How the digits16 restore presets were chosen, and why DDS trails DPS on inpainting and denoising.

    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dps-zeta [--num 3 --steps 250]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dds-eta [--num 8]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dds-gap [--num 16]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py sweep --tasks mri4 ct --method dps --vary zeta 0.3 1 3 \
        [--set name=value ...] [--steps 250] [--num 8]
    OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dds-steps [--num 16 --tasks sr4 ...]

``dps-zeta`` and ``dds-eta`` tune on *training* digits (``digits("train")``, the first ``--num``), so the
held-out digits of ``benchmarks/inverse.py`` stay unseen:

- dps-zeta: DPS's ζ as multiples ¼ … 64 of the dimension-scaled paper value ζ_paper·√(M/M_paper) (M the
  number of pixels: 16² here, 256²·3 in the paper), with ``--steps`` ancestral steps and ζ·steps held fixed
  (ζ × 1000/steps), so a short run stands in for the 1000-step one;
- dds-eta: DDS's η (the fraction of fresh noise) ∈ {0, 0.5, 0.85, 1} with the matched γ, and the official
  code's constant γ = 1 at η = 0.85, at the preset's 50 steps.

- sweep: one option of one method over the values given (the other options from the task's preset and
  ``--set``), with ``--steps`` steps (DPS: ζ is scaled by 1000/steps, so ζ·steps stays the preset's);
- dds-steps: DDS at 20–50 steps against 1000-step DPS (both with the preset's options), paired PSNR
  difference per step count; the preset takes the fewest steps whose mean difference is ≥ −0.1 dB (a margin
  below the benchmark's −0.3 dB target, for the change from training to held-out digits), or, where none
  is, the step count with the best PSNR.

Restorations are scored up to the task's ambiguities (``Task.align``: phase retrieval's flip and shifts).

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
DDS_STEP_COUNTS = (20, 25, 30, 40, 50)
#: the tasks where the DDS paper makes its case (and SR/deblurring), for ``dds-steps``
DDS_HOME_TASKS = ("sr4", "gauss_blur", "motion_blur", "mri4", "ct")
#: dds-steps keeps the fewest steps whose mean PSNR difference to DPS on training digits is at least this
DDS_STEPS_MARGIN_DB = -0.1
DDS_ETAS = (0.0, 0.5, 0.85, 1.0)
GAP_TASKS = ("inpaint_box", "inpaint_random", "denoise")


def fmt(p: torch.Tensor) -> str:
    sem = float(p.std() / math.sqrt(len(p))) if len(p) > 1 else float("nan")
    return f"{float(p.mean()):.2f} ± {sem:.2f}"


def problem(model, name: str, x: torch.Tensor):
    task = get_task(name)
    op, noise = task.operator(model.sample_shape, seed=0), task.noise()
    return task, op, noise, measure(op, x.double(), noise, seed=1000)  # solve() casts y to the model's dtype


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


def parse_value(text: str):
    """A command-line option value: None, an integer, a float, or the text itself."""
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def scored(task, out, x) -> torch.Tensor:
    return psnr(task.align(out, x), x)


def sweep(model, x, tasks, method: str, vary: list, fixed: dict, steps: int | None) -> None:
    name_, values = vary[0], [parse_value(v) for v in vary[1:]]
    print(f"{method}, {steps or 'default'} steps, {len(x)} training digits; {name_} varied, fixed {fixed or '{}'}\n")
    print(f"| task | " + " | ".join(f"{name_} = {v}" for v in values) + " |")
    print("|---|" + "---|" * len(values))
    for name in tasks:
        task, op, noise, y = problem(model, name, x)
        cells = []
        for v in values:
            opts = {**task.solver_options(method), **fixed, name_: v}
            if method == "dps" and steps:
                opts["zeta"] = opts["zeta"] * 1000 / steps
            out = solve(model, op, y, method, noise=noise, steps=steps, seeds=range(len(x)), **opts)
            cells.append(fmt(scored(task, out, x)))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def dds_steps(model, x, tasks) -> None:
    print(f"{len(x)} training digits; DPS 1000 steps and DDS with the presets' options; DDS − DPS (dB), paired\n")
    print("| task | DPS | " + " | ".join(f"DDS {s}" for s in DDS_STEP_COUNTS) + " | chosen |")
    print("|---|---|" + "---|" * (len(DDS_STEP_COUNTS) + 1))
    for name in tasks:
        task, op, noise, y = problem(model, name, x)
        dps = scored(task, solve(model, op, y, "dps", noise=noise, seeds=range(len(x)), **task.solver_options("dps")), x)
        diffs = {s: scored(task, solve(model, op, y, "dds", noise=noise, steps=s, seeds=range(len(x)),
                                       **task.solver_options("dds")), x) - dps for s in DDS_STEP_COUNTS}
        good = [s for s in DDS_STEP_COUNTS if float(diffs[s].mean()) >= DDS_STEPS_MARGIN_DB]
        chosen = good[0] if good else max(DDS_STEP_COUNTS, key=lambda s: float(diffs[s].mean()))
        print(f"| {name} | {fmt(dps)} | " + " | ".join(f"{fmt(diffs[s])}" for s in DDS_STEP_COUNTS)
              + f" | {chosen} |", flush=True)


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
    ap.add_argument("what", choices=["dps-zeta", "dds-eta", "dds-gap", "sweep", "dds-steps"])
    ap.add_argument("--num", type=int, default=None, help="digits (default: 3 for dps-zeta, 8 for dds-eta, "
                                                          "16 for dds-gap)")
    ap.add_argument("--steps", type=int, default=None, help="dps-zeta: DPS steps (250); sweep: the method's steps")
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--method", default="dps", help="sweep: the method")
    ap.add_argument("--vary", nargs="+", default=None, help="sweep: an option name and its values")
    ap.add_argument("--set", nargs="*", default=[], help="sweep: other options as name=value")
    args = ap.parse_args()
    model = load_model("digits16")
    if args.what == "sweep":
        if not args.vary or len(args.vary) < 2:
            ap.error("sweep: --vary needs an option name and at least one value")
        fixed = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
        sweep(model, digits("train")[0][: args.num or 8], args.tasks or list(TASKS), args.method, args.vary, fixed,
              args.steps)
        return
    if args.what == "dds-steps":
        dds_steps(model, digits("train")[0][: args.num or 16], args.tasks or DDS_HOME_TASKS)
        return
    if args.what == "dds-gap":
        x = digits("test")[0][: args.num or 16]
        dds_gap(model, x, args.tasks or GAP_TASKS)
        return
    x = digits("train")[0][: args.num or (3 if args.what == "dps-zeta" else 8)]
    tasks = args.tasks or list(TASKS)
    dps_zeta(model, x, tasks, args.steps or 250) if args.what == "dps-zeta" else dds_eta(model, x, tasks)


if __name__ == "__main__":
    main()
