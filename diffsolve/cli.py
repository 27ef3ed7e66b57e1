"""The ``diffsolve`` command line.

    diffsolve sample --model digits16 --sampler dpm_solver_pp --steps 10 --num 64 --seed 0 --out samples.png
    diffsolve sample --model path/to/sd-pipeline --prompt "a red fox" --guidance 7.5 --steps 20 --num 4 --out fox.png
    diffsolve samplers
    diffsolve digits --split test --index 3 --out clean.png
    diffsolve ems --model digits16 --data digits --out ems.safetensors

Sampler options are passed as ``--name value`` after the known flags (``--order 3``, ``--eta 1.0``); each
value is read as the type the sampler's function declares (:mod:`diffsolve.cliargs`), and an option the
sampler does not have is an error. Every flag is checked before a model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core import BudgetExceededError


def _parse_options(extra: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``--name value`` / ``--name=value`` pairs after the known flags: option name → the text given (typed
    later by :func:`diffsolve.cliargs.parse_options` from the method's signature)."""
    options, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) <= 2:
            parser.error(f"unexpected argument {token!r} (sampler options are given as --name value)")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                parser.error(f"sampler option --{name} needs a value")
            value, i = extra[i + 1], i + 1
        options[name.replace("-", "_")] = value
        i += 1
    return options


def _cmd_sample(args, options, parser) -> int:
    from . import load_model, sample
    from .cliargs import check_conditioning, parse_options, resolve_steps
    from .images import make_grid, save_png
    from .registry import get_sampler

    if (args.out is None) == (args.out_dir is None):
        parser.error("give exactly one of --out (a PNG grid) and --out-dir (one PNG per sample)")
    spec = get_sampler(args.sampler)  # sampler, options and steps are checked before the model is loaded
    options = parse_options(spec, options)
    args.steps = resolve_steps(args.steps, spec)
    check_conditioning(args)
    model = load_model(args.model, scheduler_config=args.scheduler_config, device=args.device)
    check_conditioning(args, model)
    seeds = list(range(args.seed, args.seed + args.num))
    labels = None if args.class_label is None else [args.class_label] * args.num
    x, info = sample(
        model, args.sampler, args.steps, seeds=seeds, class_labels=labels, guidance_scale=args.guidance,
        grid=args.grid, t_end=args.t_end, progress=not args.quiet, return_info=True, **options,
        prompt=args.prompt, negative_prompt=args.negative_prompt,
    )
    if args.out is not None:  # one sample is written as itself (a clean input for degrade), more as a grid
        save_png(make_grid(x, per_row=1, pad=0, scale=args.scale) if args.num == 1 else make_grid(x, scale=args.scale),
                 args.out)
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
    model = load_model(args.model, scheduler_config=args.scheduler_config, device=args.device)
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
    from .cliargs import positive_int

    p = sub.add_parser("convert", help="convert a guided-diffusion (ADM) checkpoint to a diffusers pipeline folder",
                       description="Convert a guided-diffusion (ADM) state dict (.pt, e.g. DPS's ffhq_10m.pt) to a "
                                   "diffusers pipeline folder (UNet2DModel + DDPMScheduler). The architecture is read "
                                   "from the state dict; what it does not fix comes from --preset or the flags "
                                   "below (by default from the presets that fit the state dict).")
    p.add_argument("checkpoint", help="guided-diffusion state dict (.pt/.pth)")
    p.add_argument("out_dir", help="folder to write (must not exist, or be empty)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="the flags published with the checkpoint")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="the image side the network was trained at (default: the preset's)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (when --num-head-channels is -1)")
    p.add_argument("--num-head-channels", type=int, default=None, help="channels per attention head (-1: by count)")
    p.add_argument("--attention-order", choices=("legacy", "new"), default=None,
                   help="guided-diffusion's use_new_attention_order (q/k/v split before or after the heads)")
    p.add_argument("--noise-schedule", choices=("linear", "cosine"), default=None,
                   help="the β schedule it was trained with (default: the preset's)")
    p.set_defaults(run=_cmd_convert, takes_options=False)


def _cmd_digits(args, options, parser) -> int:
    """``diffsolve digits``: one real digit of the 16×16 digits data set as a PNG (a clean image to degrade)."""
    from .data import digits
    from .images import make_grid, save_png

    images, labels = digits(args.split)
    if args.index >= len(images):
        raise ValueError(f"--index {args.index}: the {args.split} split holds {len(images)} digits "
                         f"(indices 0–{len(images) - 1})")
    save_png(make_grid(images[args.index:args.index + 1], per_row=1, pad=0, scale=args.scale), args.out)
    print(f"{args.split} digit {args.index} (a {int(labels[args.index])}) -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .cliargs import (STEPS_NOT_GIVEN, HelpFormatter, SubcommandParser, add_model_args, finite_float,
                          int_at_least, output_file, output_folder, positive_int, steps_or_none)
    from .registry import list_samplers

    parser = argparse.ArgumentParser(prog="diffsolve", description="Fast diffusion sampling and inverse problems.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)

    p = sub.add_parser("sample", help="draw samples and save them as PNG",
                       description="Draw samples from a model and save them as one PNG grid (--out) or one PNG per "
                                   "sample (--out-dir); --num 1 --out writes the sample itself, without the grid's "
                                   "border. Sampler options follow as --name value (see `diffsolve samplers`).")
    add_model_args(p)
    p.add_argument("--sampler", default="dpm_solver_pp", metavar="NAME",
                   help=f"one of {', '.join(list_samplers())}")
    p.add_argument("--steps", type=steps_or_none, default=STEPS_NOT_GIVEN,
                   help="number of steps (default: 10; adaptive samplers choose their own: leave it out or 'none')")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class label for every sample (class-conditional models; default: unconditional)")
    p.add_argument("--guidance", type=finite_float, default=1.0,
                   help="classifier-free guidance scale, with --class or --prompt (1: no guidance)")
    p.add_argument("--prompt", default=None, help="text prompt for every sample (text-to-image pipelines)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for guidance (with --prompt)")
    p.add_argument("--grid", default=None, help="time grid kind (default: the sampler's, see `diffsolve samplers`)")
    p.add_argument("--t-end", type=finite_float, default=None,
                   help="the time sampling stops at (default: the schedule's smallest time)")
    p.add_argument("--scale", type=positive_int, default=1, help="enlarge each sample this many times in the PNG")
    p.add_argument("--out", type=output_file(".png"), default=None, help="PNG grid to write (or --out-dir)")
    p.add_argument("--out-dir", type=output_folder, default=None,
                   help="folder for one PNG per sample, named by seed (or --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_sample, takes_options=True)

    p = sub.add_parser("samplers", help="list the registered samplers and their options",
                       description="List the samplers with their options (and defaults) and their time grid.")
    p.set_defaults(run=_cmd_samplers, takes_options=False)

    p = sub.add_parser("digits", help="write a real 16×16 digit as a PNG (a clean image for degrade)",
                       description="Write one digit of scikit-learn's digits data set, upscaled to 16×16 as "
                                   "digits16 was trained, as a PNG in [0, 255] <-> [-1, 1]: a clean input for "
                                   "`diffsolve degrade` and a --reference for `diffsolve restore`.")
    p.add_argument("--split", choices=("train", "test", "all"), default="test",
                   help="the training digits, the 300 held out from training, or all")
    p.add_argument("--index", type=int_at_least(0), default=0, help="which digit of the split")
    p.add_argument("--scale", type=positive_int, default=1, help="enlarge the digit this many times")
    p.add_argument("--out", type=output_file(".png"), required=True, help="PNG to write")
    p.set_defaults(run=_cmd_digits, takes_options=False)

    p = sub.add_parser("ems", help="compute DPM-Solver-v3's empirical model statistics (EMS) for a model",
                       description="Compute DPM-Solver-v3's empirical model statistics (l, s, b on a uniform λ grid) "
                                   "for a model and save them for `diffsolve sample --sampler dpm_solver_v3 --ems FILE`.")
    add_model_args(p)
    p.add_argument("--data", default="digits", help="'digits' (the training split) or a .npy/.safetensors of images")
    p.add_argument("--out", type=output_file(".safetensors"), required=True, help="safetensors file to write")
    p.add_argument("--n-lambda", type=positive_int, default=120, help="intervals of the uniform λ grid")
    p.add_argument("--num-samples", type=int_at_least(2), default=1024, help="K, noised samples per λ")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per network batch")
    p.add_argument("--t-start", type=finite_float, default=None, help="the grid's largest time (default: the schedule's)")
    p.add_argument("--t-end", type=finite_float, default=None, help="the grid's smallest time (default: the schedule's)")
    p.add_argument("--conditional", action="store_true", help="statistics of the class-guided model (data labels)")
    p.add_argument("--guidance", type=finite_float, default=1.0, help="guidance scale (with --conditional)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the JVP directions")
    p.add_argument("--jvp", default="auto", choices=("auto", "forward", "double_backward", "finite_difference"),
                   help="how the Jacobian-vector products for l are computed (auto: the first that works)")
    p.add_argument("--derivative", default="grid", choices=("grid", "jvp"),
                   help="f' along the trajectory: central difference over the λ grid spacing, or the exact tangent JVP")
    p.add_argument("--checkpoint", type=output_file(), default=None,
                   help="file for the running sums, saved every 30 s; a rerun with it resumes (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_ems, takes_options=False)

    _add_convert_command(sub)

    from .fid.cli import add_commands as add_fid_commands  # fid, fid-ref, sweep

    add_fid_commands(sub)

    from .inverse.cli import add_commands as add_inverse_commands  # degrade, restore, solvers

    add_inverse_commands(sub)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subcommand's own parser, so that its usage errors print its usage, not the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    from .cliargs import FlagValueError, guidance_warning, interrupted_note

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except FlagValueError as err:
        err.parser.print_usage(sys.stderr)
        print(f"{err.parser.prog}: error: {err}", file=sys.stderr)
        return 2
    usage = _subcommand_parser(parser, args.command)
    if extra and not args.takes_options:
        usage.error(f"unrecognised arguments: {' '.join(extra)}")
    options = _parse_options(extra, usage)
    warning = guidance_warning(args.guidance) if getattr(args, "guidance", None) is not None else None
    if warning:
        print(f"diffsolve {args.command}: {warning}", file=sys.stderr)
    try:
        return args.run(args, options, usage)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError, ImportError,
            BudgetExceededError) as err:
        print(f"diffsolve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffsolve {args.command}: interrupted; {interrupted_note(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
