"""The ``diffsolve fid``, ``diffsolve fid-ref`` and ``diffsolve sweep`` subcommands (also
``python -m diffsolve.fid`` and ``torchrun ... -m diffsolve.fid``).

    diffsolve fid-ref --data digits --features digits --out ref.npz
    diffsolve fid --model digits16 --sampler dpm_solver_pp --steps 10 --num 10000 --ref ref.npz --workdir run/
    torchrun --nproc_per_node 4 -m diffsolve.fid -- --model ... --num 10000 --ref ref.npz --workdir run/

Under torchrun put ``--`` after ``-m diffsolve.fid``: torchrun's own parser would otherwise take ``--num`` for an
abbreviation of its ``--numa-binding`` (or spell it ``--num-samples``).
    diffsolve sweep --model digits16 --samplers ddim,dpm_solver_pp --steps 5,10,20 --num 2000 --ref ref.npz \\
        --workdir sweep/ --out-md sweep.md --out-png sweep.png

Exit status: 0 done, 2 error, 3 stopped by --max-shards before all shards were done (rerun to continue).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from ..cliargs import (STEPS_NOT_GIVEN, add_scheduler_config_arg, device, finite_float, int_at_least, output_file,
                       output_folder, positive_int, steps_or_none)

INCOMPLETE = 3


def _int_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _tolerance_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers > 0, got {text!r}")
    return values


def _add_features_args(p, default: str | None) -> None:
    p.add_argument("--features", choices=("digits", "inception"), default=default,
                   help="feature extractor" + (" (default: the one the --ref file was made with)" if default is None
                                               else f" (default {default})"))
    p.add_argument("--inception-weights", default=None,
                   help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth); default "
                        "$DIFFSOLVE_INCEPTION_WEIGHTS")
    p.add_argument("--device", type=device, default=None,
                   help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")


def _add_run_args(p, num_help: str) -> None:
    p.add_argument("--ref", required=True, help="reference statistics (.npz from diffsolve fid-ref)")
    p.add_argument("--num", "--num-samples", dest="num", type=int_at_least(2, "FID needs at least 2 samples: a covariance"),
                   default=None, help=num_help)
    p.add_argument("--seed-start", type=int, default=0, help="sample i uses seed SEED_START + i")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="samples per network batch within a shard")
    p.add_argument("--max-shards", type=int_at_least(0), default=None,
                   help="compute at most this many shards (per process), then stop with exit status 3")
    p.add_argument("--kid-subsets", type=int_at_least(0), default=100,
                   help="random subsets KID is averaged over (0: no KID)")
    p.add_argument("--kid-subset-size", type=int_at_least(2), default=1000,
                   help="samples per KID subset (at most --num and the reference's KID features)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-shard log lines")


def add_commands(sub) -> None:
    """Add the subcommands to the ``diffsolve`` parser's subparsers."""
    from ..registry import list_samplers
    p = sub.add_parser("fid", help="FID and KID of a model's samples (or a folder of PNGs), sharded and resumable",
                       description="FID/KID against reference statistics. Sampler options follow as --name value. "
                                   "Scale out with torchrun --nproc_per_node N -m diffsolve.fid -- ARGS (the same arguments, "
                                   "after --; the workdir must be shared by all ranks). Exit status 3: stopped by "
                                   "--max-shards, rerun to continue.")
    p.add_argument("--model", default=None, help="'digits16', a diffusers folder or a hub id (or --images)")
    p.add_argument("--images", default=None, help="a folder of PNGs to evaluate instead of a model")
    add_scheduler_config_arg(p)
    p.add_argument("--sampler", default="dpm_solver_pp", metavar="NAME", help=f"one of {', '.join(list_samplers())}")
    p.add_argument("--steps", type=steps_or_none, default=STEPS_NOT_GIVEN,
                   help="number of steps (default: 10; adaptive samplers choose their own: leave it out or 'none')")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class label for every sample (default: unconditional)")
    p.add_argument("--guidance", type=finite_float, default=1.0, help="classifier-free guidance scale, with --class")
    p.add_argument("--grid", default=None, help="time grid kind (default: the sampler's)")
    p.add_argument("--t-end", type=finite_float, default=None,
                   help="the time sampling stops at (default: the schedule's smallest time)")
    p.add_argument("--workdir", type=output_folder, default=None,
                   help="folder of finished shards; a rerun resumes (default: a temporary folder, no resume)")
    _add_run_args(p, "number of samples (default: 10000 for --model, every PNG of --images)")
    _add_features_args(p, None)
    p.set_defaults(run=guarded(cmd_fid), takes_options=True)

    p = sub.add_parser("fid-ref", help="reference statistics (mean, covariance, count, extractor id) for FID/KID",
                       description="Compute the reference statistics FID and KID compare against: the features' "
                                   "mean and covariance, their count and the extractor's id, and a seeded subset of "
                                   "the features for KID, saved as .npz for `diffsolve fid --ref` and `sweep --ref`.")
    p.add_argument("--data", required=True,
                   help="'digits' (training split), 'digits:test', 'digits:all', or a folder of PNGs")
    p.add_argument("--out", type=output_file(".npz"), required=True, help=".npz file to write")
    p.add_argument("--batch-size", type=positive_int, default=250, help="images per feature-extractor batch")
    p.add_argument("--kid-max", type=int_at_least(0), default=10000,
                   help="keep a seeded random subset of at most this many features for KID (0: none)")
    _add_features_args(p, "digits")
    p.set_defaults(run=guarded(cmd_fid_ref), takes_options=False)

    p = sub.add_parser("sweep", help="FID against NFE for several samplers: a Markdown table and a PNG plot",
                       description="FID (and KID) of several samplers at several step counts, one resumable fid run "
                                   "per (sampler, steps) in its own sub-folder of --workdir. An adaptive sampler "
                                   "(adaptive_sde) chooses its own steps: it is swept over its tolerance --rtol "
                                   "instead, each point at its measured mean NFE. Prints a Markdown table, "
                                   "optionally plots FID vs NFE.")
    p.add_argument("--model", default="digits16", help="'digits16', a diffusers folder or a hub id")
    add_scheduler_config_arg(p)
    p.add_argument("--samplers", required=True, help=f"comma-separated sampler names: {', '.join(list_samplers())}")
    p.add_argument("--steps", type=_int_list, default=[5, 10, 20],
                   help="comma-separated step counts of the fixed-step samplers (default: 5,10,20)")
    p.add_argument("--rtol", type=_tolerance_list, default=None,
                   help="comma-separated relative tolerances of the adaptive samplers, e.g. 0.1,0.05,0.02 (needed "
                        "when --samplers names one)")
    p.add_argument("--workdir", type=output_folder, required=True,
                   help="one sub-folder per (sampler, steps or rtol); a rerun resumes")
    p.add_argument("--out-md", type=output_file(".md"), default=None,
                   help="write the Markdown table here (it is printed too)")
    p.add_argument("--out-png", type=output_file(".png"), default=None,
                   help="write the FID-vs-NFE plot here (needs matplotlib)")
    p.add_argument("--option", action="append", default=[], metavar="SAMPLER:NAME=VALUE",
                   help="a sampler option for one sampler of the sweep (repeatable), e.g. dpm_solver_v3:ems=ems.pt")
    _add_run_args(p, "number of samples per (sampler, steps) (default: 2000)")
    _add_features_args(p, None)
    p.set_defaults(run=guarded(cmd_sweep), takes_options=False)


def guarded(fn):
    """Errors a user can fix (bad input, a missing file or optional package) become one line on stderr and
    exit status 2."""

    def run(args, options, parser):
        try:
            return fn(args, options, parser)
        except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError, FloatingPointError) as err:
            print(f"diffsolve {args.command}: error: {err}", file=sys.stderr)
            return 2
        finally:
            _leave_group()

    return run


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device(args) -> str:
    import torch

    if args.device:
        return args.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _log(args, rank: int):
    if args.quiet:
        return None
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return lambda msg: print(prefix + msg, file=sys.stderr, flush=True)


def _extractor_and_ref(args):
    from .features import get_extractor
    from .stats import Statistics

    ref = Statistics.load(args.ref)
    name = args.features or ref.extractor.split(":")[0]
    extractor = get_extractor(name, inception_weights=args.inception_weights, device=_device(args))
    ref.check_compatible(extractor.id, f"the reference statistics {args.ref}")
    return extractor, ref


def cmd_fid_ref(args, options, parser) -> int:
    from .features import get_extractor
    from .run import reference_statistics

    extractor = get_extractor(args.features, inception_weights=args.inception_weights, device=_device(args))
    stats = reference_statistics(args.data, extractor, batch_size=args.batch_size, kid_max=args.kid_max)
    stats.save(args.out)
    print(f"{stats.count} images of {args.data} -> {args.out} [{extractor.id}, {stats.dim}-d]")
    return 0


def _check_num(args, parser) -> None:
    if args.num < 2:
        raise ValueError(f"--num: FID needs at least 2 samples (a covariance), got {args.num}")


def _warn_small_num(args, extractor) -> None:
    """FID and KID of too few samples are mostly bias: said once, before the work, with the minimum."""
    if args.num <= extractor.dim:
        print(f"diffsolve {args.command}: warning: --num {args.num}: the covariance of {args.num} samples of "
              f"{extractor.dim}-d features is singular, and FID is dominated by its bias; use --num > "
              f"{extractor.dim} (FID is usually quoted at 10000 or more)", file=sys.stderr)
    if args.kid_subsets > 0 and args.num < args.kid_subset_size:
        print(f"diffsolve {args.command}: warning: --num {args.num} is below --kid-subset-size "
              f"{args.kid_subset_size}: KID uses subsets of {args.num} samples; use --num >= "
              f"{args.kid_subset_size} (or a smaller --kid-subset-size) for a KID comparable to others'",
              file=sys.stderr)


def cmd_fid(args, options, parser) -> int:
    from .run import FIDResult, FolderSource, ModelSource, evaluate, init_distributed

    from ..cliargs import parse_options, resolve_steps
    from ..registry import get_sampler

    if (args.model is None) == (args.images is None):
        parser.error("give exactly one of --model (generate samples) and --images (a folder of PNGs)")
    if args.images is not None and options:
        parser.error(f"sampler options {sorted(options)} make no sense with --images")
    if args.images is not None and args.scheduler_config is not None:
        parser.error(f"--scheduler-config {args.scheduler_config} makes no sense with --images (no model is loaded)")
    if args.model is not None:
        spec = get_sampler(args.sampler)
        options = parse_options(spec, options)
        args.steps = resolve_steps(args.steps, spec)
    if args.num is not None:
        _check_num(args, parser)
    rank, world = init_distributed()
    if args.images is not None:
        source = FolderSource(args.images)
        args.num = len(source.files) if args.num is None else args.num
        _check_num(args, parser)
    else:
        args.num = 10000 if args.num is None else args.num
        source = ModelSource(args.model, args.sampler, args.steps, options=options, seed_start=args.seed_start,
                             class_label=args.class_label, guidance=args.guidance, grid=args.grid, t_end=args.t_end,
                             device=_device(args), scheduler_config=args.scheduler_config)
    extractor, ref = _extractor_and_ref(args)
    if rank == 0:
        _warn_small_num(args, extractor)
    workdir, temporary = args.workdir, False
    if workdir is None:
        if world > 1:
            raise ValueError("--workdir is required under torchrun (a folder all ranks share)")
        workdir, temporary = tempfile.mkdtemp(prefix="diffsolve-fid-"), True
    try:
        result = evaluate(source, extractor, ref, workdir, num=args.num, shard_size=args.shard_size,
                          batch_size=args.batch_size, max_shards=args.max_shards, kid_subsets=args.kid_subsets,
                          kid_subset_size=args.kid_subset_size, log=_log(args, rank), reference_name=args.ref,
                          progress=not args.quiet)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    if not isinstance(result, FIDResult):
        if rank == 0:
            print(f"stopped by --max-shards: {result.done} of {result.total} shards done in {result.workdir}; "
                  "rerun the same command to continue")
        return INCOMPLETE
    if rank == 0:
        print(result.summary())
    return 0


def _sampler_options(items: list[str], samplers: list[str]) -> dict[str, dict]:
    """``--option SAMPLER:NAME=VALUE`` items → options per sampler, each typed by its sampler's signature."""
    from ..cliargs import parse_options
    from ..registry import get_sampler

    raw: dict[str, dict[str, str]] = {}
    for item in items:
        sampler, sep, rest = item.partition(":")
        name, eq, value = rest.partition("=")
        if not sep or not eq or not name:
            raise ValueError(f"--option: expected SAMPLER:NAME=VALUE, got {item!r}")
        if sampler not in samplers:
            raise ValueError(f"--option {item!r}: {sampler!r} is not one of --samplers {samplers}")
        raw.setdefault(sampler, {})[name.replace("-", "_")] = value
    return {sampler: parse_options(get_sampler(sampler), texts) for sampler, texts in raw.items()}


def cmd_sweep(args, options, parser) -> int:
    from pathlib import Path

    from ..files import atomic_write
    from .run import init_distributed
    from .sweep import markdown_table, plot, require_matplotlib, sweep

    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    sampler_options = _sampler_options(args.option, samplers)
    args.num = 2000 if args.num is None else args.num
    _check_num(args, parser)
    if args.out_png:
        require_matplotlib()  # before hours of sampling, not after
    rank, world = init_distributed()
    extractor, ref = _extractor_and_ref(args)
    if rank == 0:
        _warn_small_num(args, extractor)
    rows = sweep(args.model, samplers, args.steps, rtols=args.rtol, options=sampler_options, extractor=extractor,
                 reference=ref, reference_name=args.ref, scheduler_config=args.scheduler_config,
                 workdir=args.workdir, num=args.num, seed_start=args.seed_start, shard_size=args.shard_size,
                 batch_size=args.batch_size, device=_device(args), max_shards=args.max_shards,
                 kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, log=_log(args, rank),
                 progress=not args.quiet)
    if rank != 0:
        return 0 if all(r["fid"] is not None for r in rows) else INCOMPLETE
    title = (f"{args.model}: FID ({extractor.name} features, {args.num} samples, seeds {args.seed_start}–"
             f"{args.seed_start + args.num - 1}) vs {Path(args.ref).name} ({ref.count} images)")
    table = markdown_table(rows, title)
    print(table, end="")
    if args.out_md:
        atomic_write(Path(args.out_md), lambda f: f.write(table.encode()))
    if args.out_png and any(r["fid"] is not None for r in rows):
        plot(rows, args.out_png, f"{Path(args.model).name}: FID ({extractor.name} features) vs NFE, {args.num} samples")
    return 0 if all(r["fid"] is not None for r in rows) else INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    """``python -m diffsolve.fid [fid|fid-ref|sweep] ...``; without a subcommand, ``fid``."""
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fid", "fid-ref", "sweep"):
        argv = ["fid", *argv]
    return cli_main(argv)
