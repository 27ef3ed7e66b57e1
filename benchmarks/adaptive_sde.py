"""Adaptive-step SDE solver ("Gotta Go Fast") against fixed-step Euler–Maruyama: network evaluations (NFE) and
distribution error, on the Gaussian-mixture oracle and on digits16; and the cost of per-sample stepping.

    python benchmarks/adaptive_sde.py [--dim 2 --components 3 --num 16384 --schedules vp edm]
                                      [--mixtures random narrow] [--sample-sets 0 1 2 3] [--skip-digits]
                                      [--skip-overhead]

GMM part. Two mixtures (``--seed``): "random" = ``GaussianMixture.random`` (component std U[0.1, 0.5]) and
"narrow" (the same recipe with std U[0.02, 0.1]: sharper modes, where a coarse solver's error shows), under
the score-SDE VP schedule (t from 1 to 10⁻³) and under EDM (σ from 80 to 0.002). Every method gets the exact
ε̂, so all error is the solver's. Both solvers end with the Tweedie denoise x̂0 = E[x_0 | x_{t_end}] (the
default of both), so the target law is that of E[x_0 | x_{t_end}] for exact samples x_{t_end} ~ p_{t_end}:
``--ref`` such samples (drawn in closed form) are the reference. The distribution error is
``diffsolve.testing.moment_discrepancy``: T² = dᵀ C⁺ d over the test functions (1_k, 1_k x_d, 1_k x_d²) of the
nearest mixture component k (mode weights, per-mode means and second moments), d the difference of their
means and C their covariance under the reference. Two samples of one law give E[T²] = rank(C)·(1/n + 1/N)
("floor") with standard deviation √(2 rank)·(1/n + 1/N) ("noise"); "err" = √max(T² − floor, 0) is the
discrepancy with the sampling noise removed, in standard deviations of the test functions, and
"(T² − floor)/noise" says how far above the noise it is. NFE: network evaluations per sample, the final
denoise included (adaptive: the mean over samples; "batched" is the number of batched calls, set by the
slowest sample). The NFE ratio compares EM at 1000 steps (the better of its grids) with the cheapest adaptive
setting whose T² is not above EM-1000's by more than twice the noise of their difference (2√2 noise); the
fewest EM steps within the same margin are printed too. EM runs on its default grid, uniform in t (the
papers' baseline); on EDM on the Karras grid (ρ = 7), since uniform steps in σ are poor there (shown once).
adaptive_sde runs with its defaults ("default") and, on the random mixture, as the official code's loop
("official": ``noise="fresh", max_growth=None``).

digits16 part (when the shipped model is present): the classifier judge ``diffsolve.data.classify`` (97 %
held-out accuracy): the share of confident samples (max probability ≥ 0.9) and the classifier score
exp(E_x KL(p(y|x) ‖ p(y))) (≤ 10), next to the same numbers for the held-out real digits.

Overhead part: seconds per batched network evaluation of ``adaptive_sde`` (per-sample t and h, masks,
Brownian-bridge bookkeeping) and of ``euler_maruyama`` (one shared t per step), each divided by the time of
one bare network call, on a tiny random UNet (where the overhead is largest relative to the network).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from diffsolve import DiffusionModel, sample
from diffsolve.schedules import EDM, VPLinear
from diffsolve.testing import GaussianMixture, moment_discrepancy

RTOLS = (0.1, 0.05, 0.02, 0.01)
EM_STEPS = (100, 250, 500, 1000)


#: the ``noise``/``max_growth`` variants compared: the defaults, and the official code's loop (fresh noise after a
#: rejection, unbounded step growth)
VARIANTS = {"default": {}, "official": {"noise": "fresh", "max_growth": None}}


def make_gmm(kind: str, schedule, args) -> GaussianMixture:
    """"random": ``GaussianMixture.random`` (component std U[0.1, 0.5]); "narrow": the same recipe with std
    U[0.02, 0.1], sharper modes where a coarse solver's error shows."""
    if kind == "random":
        return GaussianMixture.random(args.dim, args.components, schedule, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    k, d = args.components, args.dim
    return GaussianMixture(rng.dirichlet(np.full(k, 2.0)), rng.standard_normal((k, d)), rng.uniform(0.02, 0.1, (k, d)),
                           schedule)


def gmm_part(schedule, kind: str, sample_set: int, args):
    gmm = make_gmm(kind, schedule, args)
    model = gmm.as_model()
    t_start, t_end = schedule.default_range
    ref = gmm.x0_mean(gmm.sample_xt(args.ref, t_end, seed=args.seed + 1), t_end)
    prior = 1.0 if schedule.is_vp else t_start
    # sample set k draws x_T and the per-sample noise seeds afresh (the mixture and the reference stay)
    generator = torch.Generator().manual_seed(args.seed + 2 + 1000 * sample_set)
    x_T = prior * torch.randn(args.num, args.dim, dtype=torch.float64, generator=generator)
    seeds = range(sample_set * args.num, (sample_set + 1) * args.num)
    print(f"\n## {schedule!r}, {kind} GMM: dim {args.dim}, {args.components} components, {args.num} samples "
          f"(sample set {sample_set}), reference {args.ref} exact samples\n")
    print("| method | NFE / sample | batched NFE | T² | floor ± noise | err | (T² − floor)/noise | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}

    def row(name, x, nfe, batched, wall):
        m = moment_discrepancy(x, ref, gmm.means)
        rows[name] = (nfe, m)
        print(f"| {name} | {nfe:.1f} | {batched} | {m.t2:.2e} | {m.floor:.2e} ± {m.noise:.1e} | {m.error:.4f} | "
              f"{(m.t2 - m.floor) / m.noise:+.1f} | {wall:.1f} |", flush=True)

    # EM on its default grid (uniform in t, the papers' baseline); on EDM on the Karras grid (ρ = 7), EDM's own
    # discretisation, since uniform steps in σ are poor there (shown once, on the random mixture)
    grids = ["time_uniform"] if schedule.is_vp else (["time_uniform", "karras"] if kind == "random" else ["karras"])
    for grid in grids:
        for steps in EM_STEPS:
            x, info = sample(model, "euler_maruyama", steps, x_T=x_T, seeds=seeds, grid=grid, return_info=True)
            row(f"euler_maruyama {steps} ({grid})", x, info.nfe, info.nfe, info.wall_time)
    variants = args.variants if kind == "random" else ["default"]
    for variant in variants:
        for rtol in args.rtols:
            x, info = sample(model, "adaptive_sde", None, x_T=x_T, seeds=seeds, rtol=rtol, return_info=True,
                             **VARIANTS[variant])
            row(f"adaptive_sde rtol {rtol} ({variant})", x, info.nfe_per_sample.double().mean().item(), info.nfe,
                info.wall_time)

    em_name = min((f"euler_maruyama {EM_STEPS[-1]} ({grid})" for grid in grids), key=lambda k: rows[k][1].t2)
    em_nfe, em = rows[em_name]
    ratios = {}
    for variant in variants:
        ok = [(nfe, name) for name, (nfe, m) in rows.items() if name.startswith("adaptive") and f"({variant})" in name
              and m.t2 <= em.t2 + 2 * math.sqrt(2) * m.noise]
        if ok:
            nfe, name = min(ok)
            ratios[variant] = (em_nfe / nfe, name, nfe)
            print(f"\nNFE ratio ({variant}): {em_name} ({em_nfe} NFE, err {em.error:.4f}) vs {name} "
                  f"({nfe:.1f} NFE, err {rows[name][1].error:.4f}): {em_nfe / nfe:.1f}x")
        else:
            print(f"\nNFE ratio ({variant}): no adaptive setting reached the error of {em_name}")
    em_ok = [(nfe, name) for name, (nfe, m) in rows.items() if name.startswith("euler")
             and m.t2 <= em.t2 + 2 * math.sqrt(2) * m.noise]
    fewest_em_nfe, fewest_em = min(em_ok)
    print(f"Fewest EM steps within the same margin of {em_name}: {fewest_em} ({fewest_em_nfe:.0f} NFE)")
    return ratios, (fewest_em_nfe, fewest_em)


def summarise_sets(results: dict) -> None:
    """Per (schedule, mixture): the NFE ratio of the default adaptive_sde on each sample set, against EM-1000
    and against the fewest EM steps within the same margin, and the figure that holds on every set."""
    print("\n## NFE ratio over sample sets (adaptive_sde defaults; cheapest rtol within the margin of EM-1000)\n")
    print("| schedule, mixture | set | adaptive setting | NFE / sample | vs EM-1000 | fewest EM within margin | "
          "vs that EM |")
    print("|---|---|---|---|---|---|---|")
    for (schedule, kind), per_set in results.items():
        vs_1000, vs_fewest = [], []
        for k, (ratios, (em_nfe, em_name)) in per_set.items():
            if "default" not in ratios:
                print(f"| {schedule}, {kind} | {k} | none reached EM-1000 | – | – | {em_name} | – |")
                continue
            ratio, name, nfe = ratios["default"]
            vs_1000.append(ratio)
            vs_fewest.append(em_nfe / nfe)
            print(f"| {schedule}, {kind} | {k} | {name} | {nfe:.1f} | {ratio:.1f}x | {em_name} | {em_nfe / nfe:.1f}x |")
        if len(vs_1000) == len(per_set) and per_set:
            print(f"| {schedule}, {kind} | all {len(per_set)} | **holds on every set** | – | "
                  f"≥ {min(vs_1000):.1f}x (median {statistics.median(vs_1000):.1f}x, range {min(vs_1000):.1f}–"
                  f"{max(vs_1000):.1f}x) | – | ≥ {min(vs_fewest):.1f}x (median {statistics.median(vs_fewest):.1f}x) |")


def classifier_scores(x: torch.Tensor) -> tuple[float, float]:
    from diffsolve.data import classify

    probs = classify(x).double()
    confident = (probs.max(1).values >= 0.9).double().mean().item()
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (probs.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean().item()
    return confident, math.exp(kl)


def digits_part(args) -> None:
    from diffsolve import load_model
    from diffsolve.data import digits

    try:
        model = load_model("digits16")
    except Exception as err:  # the model is trained separately; skip when it is absent
        print(f"\n## digits16: skipped ({type(err).__name__}: {err})")
        return
    print(f"\n## digits16: {args.digits_num} unconditional samples, classifier judge\n")
    real = classifier_scores(digits("test")[0])
    print("| method | NFE / sample | batched NFE | confident (p ≥ 0.9) | classifier score | wall s |")
    print("|---|---|---|---|---|---|")
    print(f"| held-out real digits | – | – | {real[0]:.3f} | {real[1]:.2f} | – |")
    seeds = range(args.digits_num)
    for steps in args.digits_em_steps:
        x, info = sample(model, "euler_maruyama", steps, seeds=seeds, return_info=True)
        c, s = classifier_scores(x)
        print(f"| euler_maruyama {steps} | {info.nfe} | {info.nfe} | {c:.3f} | {s:.2f} | {info.wall_time:.1f} |",
              flush=True)
    for rtol in args.digits_rtols:
        x, info = sample(model, "adaptive_sde", None, seeds=seeds, rtol=rtol, return_info=True)
        c, s = classifier_scores(x)
        print(f"| adaptive_sde rtol {rtol} | {info.nfe_per_sample.double().mean():.1f} | {info.nfe} | {c:.3f} | "
              f"{s:.2f} | {info.wall_time:.1f} |", flush=True)


def overhead_part(args) -> None:
    from diffusers import UNet2DModel

    from diffsolve.schedules import DiscreteVP

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval().requires_grad_(False)
    model = DiffusionModel(unet, DiscreteVP.from_config(dict(beta_schedule="linear")))
    batch = args.overhead_batch
    x = torch.randn(batch, 1, 16, 16)
    t = torch.full((batch,), 0.5)

    def bare():
        start = time.perf_counter()
        with torch.no_grad():
            model.predict(x, t)
        return time.perf_counter() - start

    bare()
    per_call = statistics.median(bare() for _ in range(args.repeats * 4))
    print(f"\n## Overhead: tiny UNet (16×16), batch {batch}, CPU threads {torch.get_num_threads()}; median of "
          f"{args.repeats} runs\n")
    print("| sampler | batched NFE | s / NFE | / bare network call |")
    print("|---|---|---|---|")
    print(f"| bare network call | 1 | {per_call:.4f} | 1.00 |")
    runs = {"euler_maruyama 50 steps": ("euler_maruyama", 50, {}),
            "adaptive_sde rtol 0.1 (bridge)": ("adaptive_sde", None, {"rtol": 0.1}),
            "adaptive_sde rtol 0.1 (fresh)": ("adaptive_sde", None, {"rtol": 0.1, "noise": "fresh"})}
    for name, (sampler, steps, options) in runs.items():
        times = []
        for _ in range(args.repeats + 1):
            _, info = sample(model, sampler, steps, shape=x.shape, return_info=True, **options)
            times.append(info.wall_time / info.nfe)
        per_nfe = statistics.median(times[1:])
        print(f"| {name} | {info.nfe} | {per_nfe:.4f} | {per_nfe / per_call:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--components", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--num", type=int, default=16384, help="samples per method (GMM)")
    ap.add_argument("--sample-sets", type=int, nargs="+", default=[0],
                    help="draws of x_T and noise seeds (GMM); with several, a summary over them")
    ap.add_argument("--ref", type=int, default=1_000_000, help="exact reference samples (GMM)")
    ap.add_argument("--schedules", nargs="+", default=["vp", "edm"], choices=["vp", "edm"])
    ap.add_argument("--rtols", type=float, nargs="+", default=list(RTOLS))
    ap.add_argument("--mixtures", nargs="+", default=["random", "narrow"], choices=["random", "narrow"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="adaptive_sde variants on the random mixture (the narrow one runs the default only)")
    ap.add_argument("--skip-gmm", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--digits-num", type=int, default=256)
    ap.add_argument("--digits-em-steps", type=int, nargs="+", default=[100, 250, 1000])
    ap.add_argument("--digits-rtols", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--overhead-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    if not args.skip_gmm:
        results: dict = {}
        for kind in args.mixtures:
            for name in args.schedules:
                for sample_set in args.sample_sets:
                    results.setdefault((name, kind), {})[sample_set] = gmm_part(
                        VPLinear() if name == "vp" else EDM(), kind, sample_set, args)
        summarise_sets(results)
    if not args.skip_digits:
        digits_part(args)
    if not args.skip_overhead:
        overhead_part(args)


if __name__ == "__main__":
    main()
