"""The ``diffsolve`` command line.

    diffsolve sample --model digits16 --sampler dpm_solver_pp --steps 10 --num 64 --seed 0 --out samples.png
    diffsolve sample --model path/to/sd-pipeline --prompt "a red fox" --guidance 7.5 --steps 20 --num 4 --out fox.png
    diffsolve samplers
    diffsolve ems --model digits16 --data digits --out ems.safetensors

Sampler options are passed as ``--name value`` after the known flags (``--order 3``, ``--eta 1.0``); their
values are read as Python literals, and an option the sampler does not have is an error.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from .core import BudgetExceededError


def _parse_options(extra: list[str], parser: argparse.ArgumentParser) -> dict:
    options, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) <= 2:
            parser.error(f"unexpected argument {token!r} (sampler options are given as --name value)")
        name, _, value = token[2:].partition("=")
        if not value:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                parser.error(f"sampler option --{name} needs a value")
            value, i = extra[i + 1], i + 1
        try:
            options[name.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name.replace("-", "_")] = value
        i += 1
    return options


#: ``--steps`` not given (a non-string default: argparse leaves it unconverted)
_DEFAULT_STEPS = object()


def _cmd_sample(args, options, parser) -> int:
    from . import load_model, sample
    from .api import check_steps
    from .images import make_grid, save_png
    from .registry import get_sampler

    if args.num < 1:
        parser.error(f"--num: expected a positive number of samples, got {args.num}")
    if (args.out is None) == (args.out_dir is None):
        parser.error("give exactly one of --out (a PNG grid) and --out-dir (one PNG per sample)")
    spec = get_sampler(args.sampler)  # sampler, options and steps are checked before the model is loaded
    spec.check_options(options)
    if args.steps is _DEFAULT_STEPS:  # not given: 10, or None for adaptive samplers (they choose their steps)
        args.steps = None if spec.adaptive else 10
    check_steps(args.steps, spec.adaptive, spec.name)
    model = load_model(args.model, device=args.device)
    seeds = list(range(args.seed, args.seed + args.num))
    labels = None if args.class_label is None else [args.class_label] * args.num
    x, info = sample(
        model, args.sampler, args.steps, seeds=seeds, class_labels=labels, guidance_scale=args.guidance,
        grid=args.grid, t_end=args.t_end, progress=not args.quiet, return_info=True, **options,
        prompt=args.prompt, negative_prompt=args.negative_prompt,
    )
    if args.out is not None:
        save_png(make_grid(x, scale=args.scale), args.out)
        written = args.out
    else:
        out_dir = Path(args.out_dir)
        for k, one in zip(seeds, x):
            save_png(make_grid(one[None], per_row=1, pad=0, scale=args.scale), out_dir / f"{k:06d}.png")
        written = f"{out_dir}/ ({args.num} files)"
    per_sample = "" if info.nfe_per_sample is None else f", mean NFE per sample {info.nfe_per_sample.float().mean():.1f}"
    print(f"{args.sampler}: {args.num} samples, {info.nfe} network evaluations{per_sample}, "
          f"{info.wall_time:.2f} s -> {written}")
    return 0


def print_specs(specs, width: int, details) -> None:
    """One entry per registered method (``diffsolve samplers``, ``diffsolve solvers``): its name and summary,
    then ``details(spec, options)`` under them, ``options`` its options with their defaults."""
    for spec in specs:
        opts = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "(no options)"
        print(f"{spec.name:{width}s} {spec.summary}\n{'':{width}s} {details(spec, opts)}")


def _cmd_samplers(args, options, parser) -> int:
    from .registry import get_sampler, list_samplers

    print_specs(map(get_sampler, list_samplers()), 16, lambda spec, opts: f"options: {opts}; " + (
        "adaptive" if spec.adaptive else f"grid: {spec.default_grid}"))
    return 0


def _cmd_ems(args, options, parser) -> int:
    """``diffsolve ems``: DPM-Solver-v3's empirical model statistics for a model, saved as safetensors."""
    import time

    from . import load_model
    from .samplers.dpm_solver_v3 import compute_ems

    if args.data == "digits":
        from .data import digits

        images, labels = digits("train")
    else:
        import numpy as np
        import torch

        path = Path(args.data)
        if not path.is_file():
            raise FileNotFoundError(f"--data: expected 'digits' or a .npy/.safetensors file of images, got {args.data!r}")
        if path.suffix == ".npy":
            images, labels = torch.from_numpy(np.load(path)), None
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            images, labels = tensors.get("images", next(iter(tensors.values()))), tensors.get("labels")
    data = images if not args.conditional else [(images, labels)]
    model = load_model(args.model, device=args.device)
    start = time.perf_counter()
    ems = compute_ems(model, data, n_lambda=args.n_lambda, num_samples=args.num_samples, batch_size=args.batch_size,
                      t_start=args.t_start, t_end=args.t_end, conditional=args.conditional,
                      guidance_scale=args.guidance, seed=args.seed, jvp=args.jvp, derivative=args.derivative,
                      checkpoint=args.checkpoint, progress=not args.quiet)
    ems.save(args.out)
    print(f"EMS: n_lambda={ems.n_lambda}, K={ems.num_samples}, shape {ems.shape}, "
          f"{time.perf_counter() - start:.1f} s (JVP: {ems.info['jvp']}) -> {args.out}")
    return 0


def _cmd_convert(args, options, parser) -> int:
    """``diffsolve convert``: a guided-diffusion (ADM) checkpoint as a diffusers pipeline folder."""
    from .adm import convert_checkpoint

    order = None if args.attention_order is None else args.attention_order == "new"
    cfg = convert_checkpoint(args.checkpoint, args.out_dir, args.preset, image_size=args.image_size,
                             num_heads=args.num_heads, num_head_channels=args.num_head_channels,
                             use_new_attention_order=order, noise_schedule=args.noise_schedule)
    print(f"UNet2DModel {cfg.image_size}×{cfg.image_size}, {len(cfg.level_channels)} levels of "
          f"{list(cfg.level_channels)} channels, {cfg.noise_schedule} schedule -> {args.out_dir}")
    return 0


def _add_convert_command(sub) -> None:
    from .adm import PRESETS

    p = sub.add_parser("convert", help="convert a guided-diffusion (ADM) checkpoint to a diffusers pipeline folder",
                       description="Convert a guided-diffusion (ADM) state dict (.pt, e.g. DPS's ffhq_10m.pt) to a "
                                   "diffusers pipeline folder (UNet2DModel + DDPMScheduler). The architecture is read "
                                   "from the state dict; what it does not fix comes from --preset or the flags "
                                   "below (by default from the presets that fit the state dict).")
    p.add_argument("checkpoint", help="guided-diffusion state dict (.pt/.pth)")
    p.add_argument("out_dir", help="folder to write (must not exist, or be empty)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the flags published with the checkpoint")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (when --num-head-channels is -1)")
    p.add_argument("--num-head-channels", type=int, default=None, help="channels per attention head (-1: by count)")
    p.add_argument("--attention-order", choices=("legacy", "new"), default=None,
                   help="guided-diffusion's use_new_attention_order (q/k/v split before or after the heads)")
    p.add_argument("--noise-schedule", choices=("linear", "cosine"), default=None)
    p.set_defaults(run=_cmd_convert, takes_options=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsolve", description="Fast diffusion sampling and inverse problems.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="draw samples and save them as PNG",
                       description="Draw samples; sampler options follow as --name value (see `diffsolve samplers`).")
    p.add_argument("--model", default="digits16", help="'digits16', a diffusers folder or a hub id")
    p.add_argument("--sampler", default="dpm_solver_pp")
    p.add_argument("--steps", type=lambda s: None if s.lower() == "none" else int(s), default=_DEFAULT_STEPS,
                   help="number of steps (default: 10; adaptive samplers choose their own: 'none', their default)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class label for every sample")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (with --class or --prompt)")
    p.add_argument("--prompt", default=None, help="text prompt for every sample (text-to-image pipelines)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for guidance (with --prompt)")
    p.add_argument("--grid", default=None, help="time grid kind (default: the sampler's)")
    p.add_argument("--t-end", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--scale", type=int, default=1, help="enlarge each sample this many times in the PNG")
    p.add_argument("--out", default=None, help="PNG grid to write")
    p.add_argument("--out-dir", default=None, help="folder for one PNG per sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_sample, takes_options=True)

    p = sub.add_parser("samplers", help="list the registered samplers and their options")
    p.set_defaults(run=_cmd_samplers, takes_options=False)

    p = sub.add_parser("ems", help="compute DPM-Solver-v3's empirical model statistics (EMS) for a model")
    p.add_argument("--model", default="digits16", help="'digits16', a diffusers folder or a hub id")
    p.add_argument("--data", default="digits", help="'digits' (the training split) or a .npy/.safetensors of images")
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--n-lambda", type=int, default=120, help="intervals of the uniform λ grid")
    p.add_argument("--num-samples", type=int, default=1024, help="K, noised samples per λ")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--t-start", type=float, default=None)
    p.add_argument("--t-end", type=float, default=None)
    p.add_argument("--conditional", action="store_true", help="statistics of the class-guided model (data labels)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (with --conditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jvp", default="auto", choices=("auto", "forward", "double_backward", "finite_difference"),
                   help="how the Jacobian-vector products for l are computed (auto: the first that works)")
    p.add_argument("--derivative", default="grid", choices=("grid", "jvp"),
                   help="f' along the trajectory: central difference over the λ grid spacing, or the exact tangent JVP")
    p.add_argument("--checkpoint", default=None, help="file for resumable running sums")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_ems, takes_options=False)

    _add_convert_command(sub)

    from .fid.cli import add_commands as add_fid_commands  # fid, fid-ref, sweep

    add_fid_commands(sub)

    from .inverse.cli import add_commands as add_inverse_commands  # degrade, restore, solvers

    add_inverse_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_options:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    options = _parse_options(extra, parser)
    try:
        return args.run(args, options, parser)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError,
            ImportError, BudgetExceededError) as err:
        print(f"diffsolve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
