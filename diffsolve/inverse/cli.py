"""``diffsolve degrade``, ``diffsolve restore`` and ``diffsolve solvers``.

    diffsolve degrade --task sr4 --input clean.png --out degraded.png --seed 0
    diffsolve restore --model digits16 --task sr4 --method dds --input degraded.png --out restored.png \\
        --reference clean.png

A task preset (:mod:`diffsolve.inverse.tasks`) fixes the operator (``--mask-seed`` draws its box position,
random mask or motion kernel: give ``restore`` the seed ``degrade`` used; both default to 0), the noise level
(``--sigma-y`` on the [0, 1] pixel range) and the solver's hyperparameters; solver options given as
``--name value`` override the preset's. The measurement PNG is 8-bit on [−1, 1] ↔ [0, 255], so values of a
noisy measurement outside [−1, 1] are clipped when it is written (as for any image file). Tasks whose
measurement is not an image of the sample's grid (``mri4``: complex k-space, ``ct``: a sinogram,
``phase_retrieval``: Fourier magnitudes) write and read it as a NumPy ``.npy`` array of the operator's output
shape instead, unclipped and complex where it is complex.
"""

from __future__ import annotations

from pathlib import Path


def _load_image(path, name: str):
    from ..images import load_png

    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    try:
        return load_png(path)
    except Exception as err:  # PIL's errors for non-images are not ValueErrors
        raise ValueError(f"{name}: cannot read {path} as a PNG image ({type(err).__name__}: {err})") from None


def _load_array(path, name: str, op):
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{name}: cannot read {path} as a .npy array ({type(err).__name__}: {err})") from None
    kind = "complex" if op.complex_output else "real"
    if tuple(arr.shape) != tuple(op.shape_out) or np.iscomplexobj(arr) != op.complex_output:
        raise ValueError(f"{name}: expected a {kind} array of shape {tuple(op.shape_out)} (the measurement "
                         f"`diffsolve degrade` writes for this task), got a {arr.dtype} array of shape {arr.shape}")
    return torch.from_numpy(arr)[None]


def _check_suffix(task, path, name: str) -> None:
    want = ".png" if task.image_measurement else ".npy"
    if Path(path).suffix.lower() != want:
        what = "an image" if task.image_measurement else "not an image (written as a NumPy array)"
        raise ValueError(f"{name}: the {task.name} measurement is {what}: expected a {want} file, got {path}")


def _describe(shape) -> str:
    c, h, w = shape
    return f"{c}-channel {h}×{w}"


def _check_image(img, shape, name: str, what: str):
    got = tuple(img.shape[1:])
    if len(shape) != 3 or got != tuple(shape):
        raise ValueError(f"{name}: expected a {_describe(shape)} PNG ({what}), got a {_describe(got)} PNG")
    return img


def _task_and_sigma(args):
    from .tasks import get_task

    task = get_task(args.task)
    sigma01 = task.sigma01 if args.sigma_y is None else args.sigma_y
    if not sigma01 >= 0:
        raise ValueError(f"--sigma-y: expected a noise level >= 0 (on the [0, 1] pixel range), got {sigma01}")
    return task, sigma01


def _cmd_degrade(args, options, parser) -> int:
    from ..images import make_grid, save_png
    from .noise import measure

    task, sigma01 = _task_and_sigma(args)
    _check_suffix(task, args.out, "--out")
    clean = _load_image(args.input, "--input")
    op = task.operator(tuple(clean.shape[1:]), args.mask_seed)
    y = measure(op, clean.double(), task.noise(sigma01), seed=args.seed)
    if task.image_measurement:
        save_png(make_grid(y.float(), per_row=1, pad=0), args.out)
    else:
        import numpy as np

        from ..files import atomic_write

        atomic_write(args.out, lambda f: np.save(f, y[0].numpy()))
    print(f"{task.name}: {_describe(clean.shape[1:])} -> {_describe(op.shape_out)} measurement, sigma_y = {sigma01:g} "
          f"on [0, 1] (seed {args.seed}, mask seed {args.mask_seed}) -> {args.out}")
    return 0


def _cmd_restore(args, options, parser) -> int:
    from .. import load_model
    from ..images import make_grid, save_png
    from .metrics import psnr, ssim
    from .registry import get_solver
    from .solve import solve

    task, sigma01 = _task_and_sigma(args)
    spec = get_solver(args.method)  # method and options are checked before anything is loaded
    preset = task.solver_options(args.method)
    preset = {k: v for k, v in preset.items() if k in spec.options}
    spec.check_options(options)
    _check_suffix(task, args.input, "--input")
    measured = _load_image(args.input, "--input") if task.image_measurement else None
    reference = None if args.reference is None else _load_image(args.reference, "--reference")
    model = load_model(args.model, device=args.device)
    if model.sample_shape is None or len(model.sample_shape) != 3:
        raise ValueError(f"--model: restore needs an image model with a known (C, H, W) sample shape, got "
                         f"{model.sample_shape}")
    op = task.operator(model.sample_shape, args.mask_seed)
    if measured is None:
        measured = _load_array(args.input, "--input", op)
    else:
        _check_image(measured, op.shape_out, "--input",
                     f"the {task.name} measurement of a {_describe(model.sample_shape)} image")
    if reference is not None:
        _check_image(reference, model.sample_shape, "--reference", "the model's image size")
    steps = task.solver_steps(args.method) if args.steps is None else args.steps
    x, info = solve(model, op, measured.to(model.device), args.method, noise=task.noise(sigma01), steps=steps,
                    seeds=[args.seed], progress=not args.quiet, return_info=True, **{**preset, **options})
    save_png(make_grid(x, per_row=1, pad=0), args.out)
    print(f"{args.method} on {task.name}: {info.nfe} network evaluations, {info.wall_time:.2f} s -> {args.out}")
    if reference is not None:
        ref = reference.to(x.device)
        base = task.align(op.A_pinv(measured.to(x.device)).to(x.dtype), ref)
        x = task.align(x, ref)
        up_to = " (up to the measurement's ambiguities)" if task.ambiguities is not None else ""
        print(f"PSNR{up_to} {float(psnr(x, ref)):.2f} dB, SSIM {float(ssim(x, ref)):.3f} "
              f"(pseudo-inverse of the measurement: PSNR {float(psnr(base, ref)):.2f} dB, "
              f"SSIM {float(ssim(base, ref)):.3f})")
    return 0


def _cmd_solvers(args, options, parser) -> int:
    from ..cli import print_specs
    from .registry import get_solver, list_solvers

    print_specs(map(get_solver, list_solvers()), 10,
                lambda spec, opts: f"steps: {spec.default_steps} {spec.steps_meaning}; options: {opts}")
    return 0


def add_commands(sub) -> None:
    """Add ``degrade``, ``restore`` and ``solvers`` to the ``diffsolve`` argument parser."""
    from .tasks import TASKS

    tasks = ", ".join(TASKS)
    p = sub.add_parser("degrade", help="make a measurement of a clean PNG for a restore task",
                       description="Apply a task's operator and noise to a clean PNG (in [0, 255] <-> [-1, 1]).")
    p.add_argument("--task", required=True, help=tasks)
    p.add_argument("--input", required=True, help="the clean PNG")
    p.add_argument("--out", required=True, help="the measurement to write: a PNG, or .npy for mri4, ct and "
                                                 "phase_retrieval")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement noise")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the box position / random mask / motion kernel")
    p.add_argument("--sigma-y", type=float, default=None,
                   help="noise std on the [0, 1] pixel range (default: the task's)")
    p.set_defaults(run=_cmd_degrade, takes_options=False)

    p = sub.add_parser("restore", help="restore a degraded PNG with DPS, DDS or DAPS",
                       description="Solve a task's inverse problem; solver options follow as --name value "
                                   "(see `diffsolve solvers`).")
    p.add_argument("--model", default="digits16", help="'digits16' or a diffusers folder")
    p.add_argument("--task", required=True, help=tasks)
    p.add_argument("--method", default="dds", help="dps, dds, daps (= daps_1k) or daps_100")
    p.add_argument("--input", required=True, help="the measurement PNG or .npy (from `diffsolve degrade`)")
    p.add_argument("--out", required=True, help="the restored PNG to write")
    p.add_argument("--reference", default=None, help="the clean PNG: print PSNR and SSIM")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the task preset's, else the "
                                                            "method's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the solver's noise")
    p.add_argument("--mask-seed", type=int, default=0, help="the --mask-seed given to degrade")
    p.add_argument("--sigma-y", type=float, default=None, help="noise std on [0, 1] (default: the task's)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_restore, takes_options=True)

    p = sub.add_parser("solvers", help="list the inverse-problem solvers and their options")
    p.set_defaults(run=_cmd_solvers, takes_options=False)
