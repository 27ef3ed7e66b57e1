"""The digits16 quality checks (tests/test_digits16.py, tests/test_dpm_solver_v3.py) on every time grid: how much of
what they measure is the sampler's grid, and how much the model and the sample.

    python benchmarks/digits16_quality.py [--seeds 0 1000] [--reference-steps 100]

For DPM-Solver++ (2M, its default order, at 20 steps: the check's setting) and DPM-Solver-v3 (10 NFE, shipped statistics), on the
logSNR, time-uniform and time-quadratic grids (each sampler's default marked), from the same seeds: the share of
confident samples (classifier max probability ≥ 0.9, ``diffsolve.data.classify``) with its binomial standard error,
the smallest class share (argmax), the RMSE to a near-converged reference (DPM-Solver++ 3M, ``--reference-steps``
logSNR steps, same seeds), the share of samples the classifier puts in the reference sample's class, and the
paired difference of the confident share from the reference's (mean ± standard error over the seeds); the
same classifier numbers for the reference, and for 3M at 50 logSNR steps (the tests' converged solution). The check requires a confident share
≥ 0.9 × that of the held-out real digits; the reference row is what the model gives when the solver error is gone.
Seeds are split in two halves ("A": first, "B": second) so that a grid chosen on A is reported on B; with the
default seeds A is the tests' seeds 0–499.
"""

from __future__ import annotations

import argparse
import math

import torch

from diffsolve import load_model, sample
from diffsolve.data import classify, digits

GRIDS = ("logSNR", "time_uniform", "time_quadratic")
RUNS = (("dpm_solver_pp", 20, {}, "logSNR"), ("dpm_solver_v3", 10, {}, "time_quadratic"))
CONVERGED = ("dpm_solver_pp", 50, {"order": 3, "third_order": "exact"}, "logSNR")  # the tests' near-converged solution


def scores(probs: torch.Tensor) -> tuple[float, float, float]:
    confident = (probs.max(1).values >= 0.9).double().mean().item()
    share = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    return confident, math.sqrt(confident * (1 - confident) / len(probs)), share.min().item()


def paired(probs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """(class agreement, mean and standard error of the per-seed confident difference) against the reference."""
    agreement = (probs.argmax(1) == reference.argmax(1)).double().mean().item()
    diff = (probs.max(1).values >= 0.9).double() - (reference.max(1).values >= 0.9).double()
    return agreement, diff.mean().item(), diff.std().item() / math.sqrt(len(diff))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1000], help="seed range [start, stop)")
    ap.add_argument("--reference-steps", type=int, default=100)
    args = ap.parse_args()
    model = load_model("digits16")
    seeds = range(*args.seeds)
    half = len(seeds) // 2
    halves = {"A": slice(0, half), "B": slice(half, None), "all": slice(None)}
    real = (classify(digits("test")[0]).max(1).values >= 0.9).double().mean().item()
    print(f"held-out real digits: {real:.3f} confident; the check requires ≥ 0.9 × that = {0.9 * real:.3f}\n")
    reference = sample(model, "dpm_solver_pp", args.reference_steps, seeds=seeds, grid="logSNR", order=3, third_order="exact")
    ref_probs = classify(reference)
    print("| run | grid | seeds | confident ± se | smallest class | RMSE to reference | same class as reference | "
          "confident − reference's (paired) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, part in halves.items():
        c, se, low = scores(ref_probs[part])
        print(f"| reference: dpm_solver_pp 3M {args.reference_steps} steps | logSNR | {name} | {c:.3f} ± {se:.3f} | "
              f"{low:.3f} | 0 | 1 | 0 |")
    for sampler, steps, options, default in (CONVERGED, *RUNS):
        for grid in GRIDS if (sampler, steps, options, default) != CONVERGED else (default,):
            x = sample(model, sampler, steps, seeds=seeds, grid=grid, **options)
            probs = classify(x)
            for name, part in halves.items():
                c, se, low = scores(probs[part])
                rmse = ((x[part] - reference[part]) ** 2).mean().sqrt().item()
                agree, diff, diff_se = paired(probs[part], ref_probs[part])
                mark = " (default)" if grid == default else ""
                label = f"{sampler} {'3M ' if options.get('order') == 3 else ''}{steps}"
                print(f"| {label} | {grid}{mark} | {name} | {c:.3f} ± {se:.3f} | {low:.3f} | {rmse:.4f} | {agree:.3f} | "
                      f"{diff:+.3f} ± {diff_se:.3f} |", flush=True)


if __name__ == "__main__":
    main()
