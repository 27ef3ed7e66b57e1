"""Inversion: reconstruction error and time of x0 → invert → sample → x0, BDIA vs naive DDIM inversion,
on digits16 (held-out real digits, under their class labels) and on the Gaussian-mixture oracle.

    python benchmarks/inversion.py [--num 64 --steps 10 20 50]

Relative error ‖x̂0 − x0‖/‖x0‖ over the batch; time = inversion + regeneration (wall seconds, CPU unless
--device). BDIA uses the default γ (0.5 up to 10 steps, else 1.0: the paper's 10- and 40-step settings).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffsolve import invert, load_model, sample
from diffsolve.data import digits
from diffsolve.schedules import VPLinear
from diffsolve.testing import GaussianMixture


def round_trip(model, x0, sampler, steps, **kw):
    start = time.perf_counter()
    inv = invert(model, x0, sampler, steps, **kw)
    x = sample(model, **inv.sample_kwargs(), **kw)
    return ((x - x0).norm() / x0.norm()).item(), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    images, labels = digits("test")
    cases = [
        ("digits16 float32", load_model("digits16", device=args.device), images[: args.num].to(args.device),
         {"class_labels": labels[: args.num]}),
        ("digits16 float64", load_model("digits16", device=args.device, dtype=torch.float64),
         images[: args.num].double().to(args.device), {"class_labels": labels[: args.num]}),
    ]
    gmm = GaussianMixture.random(8, 4, VPLinear(), seed=0)
    x_gmm = gmm.sample_x0(args.num, seed=1)
    cases += [("GMM float32", gmm.as_model(), x_gmm.float(), {}), ("GMM float64", gmm.as_model(), x_gmm, {})]

    print("| data | steps | BDIA rel. error | BDIA time (s) | DDIM inversion rel. error | DDIM time (s) |")
    print("|---|---|---|---|---|---|")
    for name, model, x0, kw in cases:
        for steps in args.steps:
            b_err, b_time = round_trip(model, x0, "bdia", steps, **kw)
            d_err, d_time = round_trip(model, x0, "ddim", steps, **kw)
            print(f"| {name} | {steps} | {b_err:.1e} | {b_time:.2f} | {d_err:.1e} | {d_time:.2f} |")


if __name__ == "__main__":
    main()
