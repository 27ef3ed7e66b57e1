"""DPM-Solver++ 3M: the exact third-order rule (D2 weighted by 2·h·φ3) against diffusers'/the official code's
(h·φ3), at the step counts people use, to choose ``dpm_solver_pp(order=3)``'s default ``third_order``.

    python benchmarks/dpm_solver_3m.py [--nfe 5 10 15 20 25] [--digits 64] [--reference-steps 250]

Two problems, each split into a set the default is chosen on ("choose") and a held-out set it is reported
on ("report"):
- Gaussian mixtures (exact ε̂, error = RMSE to the exact PF-ODE solution, DOP853 rtol 1e-12): random
  mixtures (dim 8, 4 components) under three schedules (diffusers' discrete linear DDPM, score-SDE VP linear,
  iDDPM cosine); mixture seeds 0–2 choose, 3–5 report; 256 samples each.
- digits16 (the shipped model): RMSE (pixels in [−1, 1]) to a ``--reference-steps`` exact-rule 3M solution
  from the same x_T (both rules converge to the same solution); two sets of n x_T seeds (0…2n−1) choose, two more (2n…4n−1) report.
Every run: the sampler's default logSNR grid from t = t_start to t_end of the schedule, ``lower_order_final``
on, NFE = steps. "ratio" = diffusers-rule error / exact-rule error (< 1: the diffusers rule is better),
geometric mean over the sets, with its min–max over them. The default is the rule with the lower error on the
"choose" sets: geometric mean of the ratio over every set and NFE, the two problems weighted equally.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from diffsolve import load_model, sample
from diffsolve.schedules import DiscreteVP, VPCosine, VPLinear
from diffsolve.testing import GaussianMixture

RULES = ("exact", "diffusers")


def rmse(a, b) -> float:
    return ((a.double() - b.double()) ** 2).mean().sqrt().item()


def gmm_sets(seeds, batch: int):
    """(name, model, x_T, exact solution) per schedule and mixture seed."""
    from diffusers import DDPMScheduler

    schedules = {"discrete linear": DiscreteVP(DDPMScheduler().alphas_cumprod.double()), "VP linear": VPLinear(),
                 "VP cosine": VPCosine()}
    for sname, schedule in schedules.items():
        for seed in seeds:
            gmm = GaussianMixture.random(8, 4, schedule, seed=seed)
            x_T = torch.randn(batch, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
            yield f"{sname} #{seed}", gmm.as_model(), x_T, gmm.ode_solution(x_T, *schedule.default_range)


def errors(model, x_T, ref, nfes) -> dict[str, list[float]]:
    return {rule: [rmse(sample(model, "dpm_solver_pp", n, x_T=x_T, order=3, third_order=rule), ref) for n in nfes]
            for rule in RULES}


def table(title: str, rows: dict[str, dict[str, list[float]]], nfes) -> float:
    """Print the errors and the ratios; return the mean log ratio over every set and NFE."""
    print(f"\n{title}\n")
    print("| set | rule | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for name, errs in rows.items():
        for rule in RULES:
            print(f"| {name} | {rule} | " + " | ".join(f"{e:.2e}" for e in errs[rule]) + " |")
    ratios = [[errs["diffusers"][k] / errs["exact"][k] for errs in rows.values()] for k in range(len(nfes))]
    geo = [math.exp(sum(map(math.log, r)) / len(r)) for r in ratios]
    print("| **ratio** diffusers / exact | geometric mean (min–max) | "
          + " | ".join(f"{g:.3f} ({min(r):.2f}–{max(r):.2f})" for g, r in zip(geo, ratios)) + " |")
    wins = sum(g < 1 for g in geo)
    print(f"\ndiffusers rule lower (geometric mean) at {wins} of {len(nfes)} NFE")
    return sum(math.log(v) for r in ratios for v in r) / sum(len(r) for r in ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 15, 20, 25])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--digits", type=int, default=32, help="digits16 samples per set, two sets per split (0: skip)")
    p.add_argument("--reference-steps", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(1)
    chosen_on = []  # mean log ratio per problem on its "choose" set
    for split, seeds in (("choose", range(0, 3)), ("report", range(3, 6))):
        rows = {name: errors(model, x_T, ref, args.nfe) for name, model, x_T, ref in gmm_sets(seeds, args.batch)}
        mean_log = table(f"Gaussian mixtures, {split} set (mixture seeds {seeds.start}–{seeds.stop - 1}): RMSE to the exact "
              "solution", rows, args.nfe)
        if split == "choose":
            chosen_on.append(mean_log)
    if args.digits:
        model = load_model("digits16")
        n = args.digits
        for split, first in (("choose", 0), ("report", 2 * n)):
            start, rows = time.perf_counter(), {}
            for seeds in (range(first, first + n), range(first + n, first + 2 * n)):
                x_T = torch.cat([torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
                ref = sample(model, "dpm_solver_pp", args.reference_steps, x_T=x_T, order=3, third_order="exact")
                rows[f"digits16 seeds {seeds.start}–{seeds.stop - 1}"] = errors(model, x_T, ref, args.nfe)
            mean_log = table(f"digits16, {split} set (2 × {n} samples): RMSE to a {args.reference_steps}-step exact 3M reference "
                  f"({time.perf_counter() - start:.0f} s)", rows, args.nfe)
            if split == "choose":
                chosen_on.append(mean_log)
    ratio = math.exp(sum(chosen_on) / len(chosen_on))
    print(f"\nchoose sets, each problem weighted equally: diffusers/exact error ratio {ratio:.3f} (geometric mean) "
          f"-> default third_order={'diffusers' if ratio < 1 else 'exact'!r}")

if __name__ == "__main__":
    main()
