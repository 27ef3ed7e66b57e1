"""DPM-Solver-v3 against DPM-Solver++ and UniPC at 5–20 NFE: error tables, equal-error NFE ratios, EMS cost.

    python benchmarks/dpm_solver_v3.py                       # GMM oracle + digits16
    python benchmarks/dpm_solver_v3.py --skip-digits16       # GMM oracle only
    python benchmarks/dpm_solver_v3.py --gmm 8,4,0 6,4,12 --batch 256 --nfe 5 6 8 10 12 15 20
    python benchmarks/dpm_solver_v3.py --derivative-ablation 64  # + digits16 EMS by each derivative method
    python benchmarks/dpm_solver_v3.py --skip-digits16 --beta-schedule squaredcos_cap_v2 --gmm 3,3,11 6,4,12 10,5,13
    python benchmarks/dpm_solver_v3.py --skip-digits16 --gmm 8,4,0 6,4,12 3,3,11 10,5,13 --official-quadrature

With several mixtures, a last table gives the range of v3's error over diffusers' best across them per NFE.
``--official-quadrature``: what the official code's quadrature does to the samples. It integrates every step
coefficient, DPM-Solver++'s φ-function part included, with the trapezoid rule on the EMS grid; diffsolve
integrates that part exactly. With zero statistics (where v3 is DPM-Solver++ with v3's corrector), v3 is run
once with the exact moments and once with moments by the trapezoid rule over the EMS points of each step (the
official rule), and the relative RMSE between the two sample sets is printed per NFE (5–40), next to the
per-coefficient error of the rule (first moment, relative).

GMM oracle: random mixtures (dim, components, seed) under a diffusers discrete DDPM schedule (N = 1000, linear
unless ``--beta-schedule``),
t = 1 → 1/N; RMSE to the exact PF-ODE solution (DOP853, rtol 1e-12). The statistics are computed from
``num_samples`` samples of the mixture (never from its closed form). digits16: RMSE to a 1000-step
reference solution (our DPM-Solver++ 3M, logSNR grid) from the same x_T, per pixel in [−1, 1], with the
shipped statistics (or ``--ems``).

Every method gets the same x_T and the same model. diffusers' schedulers run with
``final_sigmas_type="sigma_min"`` so that they stop at the same time (the exact GMM reference starts at their
first timestep). "NFE ratio at equal error": for v3 at n NFE with error e, the NFE m at which the baseline's
best-so-far error curve reaches e (log-log interpolation between table columns); the ratio is n/m (< 1: v3
needs fewer evaluations), "<n/20" when the baseline does not reach e within the table.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffsolve import sample
from diffsolve.samplers.dpm_solver_v3 import EMS, compute_ems
from diffsolve.schedules import DiscreteVP
from diffsolve.testing import GaussianMixture

DDPM = dict(beta_schedule="linear", num_train_timesteps=1000)


def diffusers_methods(config: dict) -> dict:
    common = dict(final_sigmas_type="sigma_min")
    return {
        "diffusers DPM-Solver++ 2M": lambda: DPMSolverMultistepScheduler(**config, solver_order=2, **common),
        "diffusers DPM-Solver++ 2M (logSNR)": lambda: DPMSolverMultistepScheduler(
            **config, solver_order=2, use_lu_lambdas=True, **common),
        "diffusers DPM-Solver++ 3M": lambda: DPMSolverMultistepScheduler(**config, solver_order=3, **common),
        "diffusers DPM-Solver++ 3M (logSNR)": lambda: DPMSolverMultistepScheduler(
            **config, solver_order=3, use_lu_lambdas=True, **common),
        "diffusers UniPC-bh2": lambda: UniPCMultistepScheduler(**config, solver_order=2, **common),
    }


OURS = {
    "diffsolve dpm_solver_v3": ("dpm_solver_v3", {}, None),
    "diffsolve dpm_solver_v3 (logSNR)": ("dpm_solver_v3", {}, "logSNR"),
    # l = s = b = 0 on the same EMS grid: DPM-Solver++ with v3's corrector; isolates what the statistics add
    "diffsolve dpm_solver_v3 (zero statistics)": ("dpm_solver_v3", {"ems": "zeros"}, None),
    "diffsolve dpm_solver_pp 2M": ("dpm_solver_pp", {"order": 2}, "logSNR"),
    "diffsolve dpm_solver_pp 3M": ("dpm_solver_pp", {"order": 3, "third_order": "exact"}, "logSNR"),
    "diffsolve dpm_solver_pp 2M (time-quadratic)": ("dpm_solver_pp", {"order": 2}, "time_quadratic"),
    "diffsolve dpm_solver_pp 3M (time-quadratic)": ("dpm_solver_pp", {"order": 3, "third_order": "exact"}, "time_quadratic"),
    # the times v3 steps through (its default grid snapped to the EMS grid): isolates what the statistics add
    "diffsolve dpm_solver_pp 3M (v3's snapped grid)": ("dpm_solver_pp", {"order": 3, "third_order": "exact"}, "v3"),
}


def our_rows(model, nfe: list[int], ems, rmse, **start) -> dict:
    """RMSE per NFE of the OURS methods; ``start`` is x_T= or seeds=."""
    v3_grid = {n: sample(model, "dpm_solver_v3", n, ems=ems, return_info=True, **start)[1].grid for n in nfe}
    zeros = EMS.zeros(model, n_lambda=ems.n_lambda, t_start=float(ems.t[0]), t_end=float(ems.t[-1]),
                      shape=ems.shape)
    rows = {}
    for name, (sampler, options, grid) in OURS.items():
        if sampler == "dpm_solver_v3":
            options = {**options, "ems": zeros if options.get("ems") == "zeros" else ems}
        rows[name] = [rmse(sample(model, sampler, n, grid=v3_grid[n] if grid == "v3" else grid, **options, **start))
                      for n in nfe]
    return rows


def run_diffusers(scheduler, eps_fn, schedule: DiscreteVP, x_T: torch.Tensor, steps: int):
    """Run a diffusers scheduler with ε̂ = eps_fn(x, t) (continuous t); returns (x0, first t)."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            x = scheduler.step(eps_fn(x, schedule.timestep_to_t(t).expand(len(x)).to(x.dtype)), t, x).prev_sample
    return x, float(schedule.timestep_to_t(scheduler.timesteps[0]))


def best_per_nfe(rows: dict, prefix: str) -> np.ndarray:
    table = np.array([v for k, v in rows.items() if k.startswith(prefix)], dtype=float)
    table[~np.isfinite(table)] = np.inf
    return table.min(0)


def equal_error_ratio(nfe: list[int], ours: np.ndarray, baseline: np.ndarray) -> list[str]:
    """n/m where the baseline's running-minimum error curve reaches our error at n NFE."""
    env = np.minimum.accumulate(baseline)
    out = []
    for n, e in zip(nfe, ours):
        if e >= env[0]:
            m = nfe[0] if e == env[0] else None
            out.append(f"{n / nfe[0]:.2f}" if m else f">{n / nfe[0]:.2f}")
            continue
        k = next((i for i in range(1, len(nfe)) if env[i] <= e), None)
        if k is None:
            out.append(f"<{n / nfe[-1]:.2f}")
            continue
        # log-log interpolation between (nfe[k-1], env[k-1]) and (nfe[k], env[k])
        a, b = math.log(env[k - 1]), math.log(env[k])
        w = 0.0 if a == b else (a - math.log(e)) / (a - b)
        m = math.exp(math.log(nfe[k - 1]) + w * (math.log(nfe[k]) - math.log(nfe[k - 1])))
        out.append(f"{n / m:.2f}")
    return out


def print_table(title: str, nfe: list[int], rows: dict) -> None:
    print(f"\n{title}\n")
    print("| method (NFE) | " + " | ".join(map(str, nfe)) + " |")
    print("|" + "---|" * (len(nfe) + 1))
    for name, errs in rows.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    ours = np.array(rows["diffsolve dpm_solver_v3"])
    ref = best_per_nfe(rows, "diffusers")
    pp = best_per_nfe({k: v for k, v in rows.items() if "dpm_solver_pp" in k}, "diffsolve")
    print("| **error ratio** v3 / diffusers best | " + " | ".join(f"{a / b:.3f}" for a, b in zip(ours, ref)) + " |")
    print("| **error ratio** v3 / our DPM-Solver++ best | " + " | ".join(f"{a / b:.3f}" for a, b in zip(ours, pp))
          + " |")
    print("| **NFE ratio** at equal error vs diffusers best | " + " | ".join(equal_error_ratio(nfe, ours, ref)) + " |")
    print("| **NFE ratio** at equal error vs our DPM-Solver++ best | " + " | ".join(equal_error_ratio(nfe, ours, pp))
          + " |")


def gmm_benchmark(spec: tuple[int, int, int], nfe: list[int], batch: int, num_samples: int, n_lambda: int,
                  beta_schedule: str = "linear", official_nfe: list[int] | None = None) -> np.ndarray:
    """Print the mixture's error table; return v3's error over diffusers' best per NFE."""
    dim, components, seed = spec
    config = {**DDPM, "beta_schedule": beta_schedule}
    schedule = DiscreteVP.from_config(DDPMScheduler(**config).config)
    gmm = GaussianMixture.random(dim, components, schedule, seed=seed)
    model = gmm.as_model()
    x_T = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    t_end = schedule.default_range[1]
    start = time.perf_counter()
    ems = compute_ems(model, gmm.sample_x0(num_samples, seed=seed + 1000), n_lambda=n_lambda,
                      num_samples=num_samples, batch_size=min(num_samples, 4096), progress=False)
    ems_seconds = time.perf_counter() - start
    exact = {}

    def rmse(x, t_first=1.0):
        if t_first not in exact:
            exact[t_first] = gmm.ode_solution(x_T, t_first, t_end)
        return ((x - exact[t_first]) ** 2).mean().sqrt().item()

    rows = our_rows(model, nfe, ems, rmse, x_T=x_T)
    for name, make in diffusers_methods(config).items():
        rows[name] = [rmse(*run_diffusers(make(), gmm.eps, schedule, x_T, n)) for n in nfe]
    print_table(f"GMM oracle: dim {dim}, {components} components (seed {seed}), batch {batch}, DDPM {beta_schedule}, t 1 → 1/N; "
                f"RMSE to the exact solution. EMS: K = {num_samples}, n_lambda = {n_lambda}, "
                f"{ems_seconds:.1f} s on CPU ({torch.get_num_threads()} thread(s))", nfe, rows)
    if official_nfe:
        official_quadrature_miss(model, x_T, n_lambda, official_nfe, rmse)
    return np.array(rows["diffsolve dpm_solver_v3"]) / best_per_nfe(rows, "diffusers")


def official_quadrature_miss(model, x_T: torch.Tensor, n_lambda: int, nfe: list[int], rmse) -> None:
    """Zero statistics: v3's samples with the exact φ moments against those with the official trapezoid rule."""
    from diffsolve.samplers.dpm_solver_v3 import coefficients

    zeros = EMS.zeros(model, n_lambda)
    delta = float(zeros.lam[1] - zeros.lam[0])
    exact_moments = coefficients.exp_moments

    def trapezoid_moments(n, h, nu=1.0):  # over the EMS points of the step: steps start and end on them
        u = np.linspace(0.0, h, int(round(h / delta)) + 1)
        return [float(np.trapezoid(np.exp(-nu * (h - u)) * (u / h) ** k, u)) for k in range(n)]

    print(f"\nZero statistics (n_lambda = {n_lambda}, Δλ = {delta:.4f}), v3's default grid: samples with the official "
          "trapezoid moments against the exact ones\n")
    print("| NFE | relative RMSE between them | RMSE between them | exact-moment v3 RMSE to the exact solution | "
          "first-moment error of the rule (relative, one 120/NFE-interval step) |")
    print("|---|---|---|---|---|")
    for n in nfe:
        coefficients._PLAN_CACHE.clear()
        ours = sample(model, "dpm_solver_v3", n, x_T=x_T, ems=zeros)
        coefficients.exp_moments = trapezoid_moments
        coefficients._PLAN_CACHE.clear()
        try:
            official = sample(model, "dpm_solver_v3", n, x_T=x_T, ems=zeros)
        finally:
            coefficients.exp_moments = exact_moments
            coefficients._PLAN_CACHE.clear()
        diff = ((official - ours) ** 2).mean().sqrt().item()
        h = delta * round(n_lambda / n)
        moment = abs(trapezoid_moments(1, h)[0] / exact_moments(1, h)[0] - 1)
        print(f"| {n} | {diff / (ours ** 2).mean().sqrt().item():.2e} | {diff:.2e} | {rmse(ours):.2e} | {moment:.1e} |",
              flush=True)


def digits16_benchmark(nfe: list[int], batch: int, ems_path: str | None, reference_steps: int,
                       ablation_samples: int) -> None:
    from diffsolve import load_model
    from diffsolve.core import SeededNoise
    from diffsolve.loading import SHIPPED, _scheduler_config
    from diffsolve.samplers.dpm_solver_v3.sampler import _resolve_ems

    model = load_model("digits16")
    ems = _resolve_ems(ems_path, model)
    schedule = model.schedule
    seeds = list(range(batch))
    start = time.perf_counter()
    reference = sample(model, "dpm_solver_pp", reference_steps, seeds=seeds, grid="logSNR", order=3,
                       third_order="exact")
    ref_seconds = time.perf_counter() - start
    x_T = SeededNoise(seeds).normal(model.sample_shape, step=-1)  # what sample(seeds=...) starts from
    cfg = _scheduler_config(SHIPPED["digits16"] / "scheduler")
    config = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
              if k in cfg}

    def eps_fn(x, t):
        return model.predict(x, t).eps

    def rmse(x):
        return ((x - reference) ** 2).mean().sqrt().item()

    rows = our_rows(model, nfe, ems, rmse, seeds=seeds)
    for name, make in diffusers_methods(config).items():
        rows[name] = [rmse(run_diffusers(make(), eps_fn, schedule, x_T, n)[0]) for n in nfe]
    info = ems.info
    print_table(f"digits16: {batch} samples, RMSE (pixels in [−1, 1]) to a {reference_steps}-step DPM-Solver++ 3M "
                f"reference ({ref_seconds:.0f} s) from the same x_T. EMS: K = {ems.num_samples}, n_lambda = "
                f"{ems.n_lambda}, computed in {info.get('compute_seconds', float('nan')):.0f} s on CPU "
                f"(JVP: {info.get('jvp')}, derivative: {info.get('derivative', 'jvp')})", nfe, rows)

    # RMSE is dominated by the few samples whose trajectory changes mode; the share of samples on which v3
    # beats the best DPM-Solver++ variant (per NFE) shows whether a gain is broad or carried by a few samples
    share = []
    for k, n in enumerate(nfe):
        name = min((r for r in rows if "dpm_solver_pp" in r), key=lambda r: rows[r][k])
        sampler, options, grid = OURS[name]
        grid = sample(model, "dpm_solver_v3", n, seeds=seeds, ems=ems, return_info=True)[1].grid if grid == "v3" else grid
        per_sample = lambda x: ((x - reference) ** 2).flatten(1).mean(1)
        ours = per_sample(sample(model, "dpm_solver_v3", n, seeds=seeds, ems=ems))
        share.append(f"{(ours < per_sample(sample(model, sampler, n, seeds=seeds, grid=grid, **options))).float().mean():.2f}")
    print("| share of samples where v3 beats our DPM-Solver++ best | " + " | ".join(share) + " |")

    if ablation_samples:  # how f' is computed: the exact tangent derivative against the grid difference
        from diffsolve.data import digits

        images = digits("train")[0]
        print(f"\ndigits16, v3 RMSE to the same reference with statistics from K = {ablation_samples} (n_lambda = "
              f"{ems.n_lambda}) by each derivative method\n")
        print("| derivative (NFE) | " + " | ".join(map(str, nfe)) + " | EMS seconds |")
        print("|" + "---|" * (len(nfe) + 2))
        for derivative in ("jvp", "grid"):
            start = time.perf_counter()
            alt = compute_ems(model, images, n_lambda=ems.n_lambda, num_samples=ablation_samples,
                              batch_size=ablation_samples, jvp="finite_difference", derivative=derivative,
                              progress=False)
            seconds = time.perf_counter() - start
            errs = [rmse(sample(model, "dpm_solver_v3", n, seeds=seeds, ems=alt)) for n in nfe]
            print(f"| {derivative} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {seconds:.0f} |")
        pp = best_per_nfe({k: v for k, v in rows.items() if "dpm_solver_pp" in k}, "diffsolve")
        print("| our DPM-Solver++ best | " + " | ".join(f"{e:.2e}" for e in pp) + " | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gmm", nargs="*", default=["8,4,0", "6,4,12"], help="mixtures as dim,components,seed")
    ap.add_argument("--beta-schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                    help="the GMM oracle's discrete schedule (diffusers' beta_schedule)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-samples", type=int, default=512, help="K for the GMM statistics")
    ap.add_argument("--n-lambda", type=int, default=120)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 12, 15, 20])
    ap.add_argument("--skip-digits16", action="store_true")
    ap.add_argument("--digits-batch", type=int, default=64)
    ap.add_argument("--reference-steps", type=int, default=1000)
    ap.add_argument("--ems", default=None, help="digits16 statistics (default: the shipped file)")
    ap.add_argument("--official-quadrature", type=int, nargs="*", default=None, metavar="NFE",
                    help="also measure the official trapezoid rule's effect on the GMM samples (default NFE 5–40)")
    ap.add_argument("--derivative-ablation", type=int, default=0, metavar="K",
                    help="also compute digits16 statistics from K samples with each derivative method (0: skip)")
    args = ap.parse_args()
    official_nfe = None if args.official_quadrature is None else (args.official_quadrature or [5, 6, 8, 10, 12, 15,
                                                                                               20, 24, 30, 40])
    ratios = {spec: gmm_benchmark(tuple(int(v) for v in spec.split(",")), args.nfe, args.batch, args.num_samples,
                                  args.n_lambda, args.beta_schedule, official_nfe) for spec in args.gmm}
    if len(ratios) > 1:
        table = np.array(list(ratios.values()))
        print(f"\nv3's error / diffusers' best over the {len(ratios)} mixtures {', '.join(ratios)} (DDPM {args.beta_schedule})"
              "\n")
        print("| NFE | " + " | ".join(map(str, args.nfe)) + " |")
        print("|" + "---|" * (len(args.nfe) + 1))
        print("| min–max | " + " | ".join(f"{a:.2f}–{b:.2f}" for a, b in zip(table.min(0), table.max(0))) + " |")
        print("| median | " + " | ".join(f"{m:.2f}" for m in np.median(table, 0)) + " |")
    if not args.skip_digits16:
        digits16_benchmark(args.nfe, args.digits_batch, args.ems, args.reference_steps, args.derivative_ablation)


if __name__ == "__main__":
    main()
