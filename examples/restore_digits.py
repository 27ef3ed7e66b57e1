"""Degrade held-out test digits in every restore task and restore them with DPS, DDS and DAPS: one comparison
grid PNG, a block of rows per task, columns clean / measured / DPS / DDS / DAPS.

    python examples/restore_digits.py --out restore_digits.png [--num 4 --dps-steps 1000 --daps daps_100]

The "measured" column shows y itself (the ×4 super-resolution measurement enlarged 4× by nearest neighbour;
inpainting holes are mid-grey, y = 0), or, where y is not an image (MRI k-space, a CT sinogram, Fourier
magnitudes), its pseudo-inverse A⁺y. DDS needs a linear operator: its tile stays black for phase retrieval.
Per task and method the mean PSNR over the digits is printed (phase retrieval: up to its ambiguities, and
the restorations are shown aligned the same way), and a progress bar runs over each method's steps (after a
line naming the task and method) (``--quiet``: none).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from diffsolve import load_model, solve
from diffsolve.cliargs import HelpFormatter, device, output_file, positive_int
from diffsolve.data import digits
from diffsolve.images import make_grid, save_png
from diffsolve.inverse import measure, psnr
from diffsolve.inverse.tasks import TASKS, get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--out", type=output_file(".png"), default="restore_digits.png", help="the comparison grid PNG")
    ap.add_argument("--num", type=positive_int, default=4, help="digits per task")
    ap.add_argument("--dps-steps", type=positive_int, default=1000, help="DPS's ancestral steps")
    ap.add_argument("--daps", default="daps_100", choices=["daps_100", "daps_1k", "daps"], help="the DAPS preset")
    ap.add_argument("--scale", type=positive_int, default=4, help="enlarge each tile in the PNG")
    ap.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()

    model = load_model("digits16", device=args.device)
    x = digits("test")[0][: args.num].to(args.device)
    rows = []
    for name in TASKS:
        task = get_task(name)
        op = task.operator(model.sample_shape, seed=0)
        y64 = measure(op, x.double(), task.noise(), seed=1000)
        # A⁺y in float64: the CG least squares of real-image MRI loses its null space in float32 (3.9 dB)
        pinv = task.align(op.A_pinv(y64).float(), x)
        y = y64.to(torch.complex64 if y64.is_complex() else torch.float32)
        if not task.image_measurement:
            shown = pinv
        else:
            shown = F.interpolate(y, size=x.shape[-2:], mode="nearest") if y.shape[-2:] != x.shape[-2:] else y
        outs = []
        line = [f"{name:15s}", f"pinv {float(psnr(pinv, x).mean()):5.2f}"]
        for method in ("dps", "dds", args.daps):
            if method == "dds" and not op.linear:
                outs.append(-torch.ones_like(x))
                line.append("dds   n/a")
                continue
            steps = args.dps_steps if method == "dps" else task.solver_steps(method)
            if not args.quiet:
                print(f"{name}: {method}", file=sys.stderr, flush=True)
            out = task.align(solve(model, op, y, method, noise=task.noise(), steps=steps, seeds=range(args.num),
                                   progress=not args.quiet, **task.solver_options(method)), x)
            outs.append(out)
            line.append(f"{method} {float(psnr(out, x).mean()):5.2f}")
        print("  ".join(line) + "  (PSNR dB)", flush=True)
        block = torch.stack([x, shown.clamp(-1, 1), *outs], dim=1)  # (num, 5, C, H, W)
        rows.append(block.flatten(0, 1))
    grid = make_grid(torch.cat(rows).cpu(), per_row=5, pad=1, scale=args.scale)
    save_png(grid, args.out)
    print(f"columns: clean / measured / DPS / DDS / {args.daps.upper()}; {len(TASKS)} tasks × {args.num} digits "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
