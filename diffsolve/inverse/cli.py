"""``diffsolve degrade``, ``diffsolve restore`` and ``diffsolve solvers``.

    diffsolve degrade --task sr4 --input clean.png --out degraded.png --seed 0
    diffsolve restore --model digits16 --task sr4 --method dds --input degraded.png --out restored.png \\
        --reference clean.png
    diffsolve degrade --task gauss_blur --input photo.jpg --resize 256 --out blurred.png
    diffsolve restore --model ffhq256 --task gauss_blur --method dps --input blurred.png --out restored.png

A task preset (:mod:`diffsolve.inverse.tasks`) fixes the operator (``--mask-seed`` draws its box position,
random mask or motion kernel), the noise level (``--sigma-y`` on the [0, 1] pixel range) and the solver's
hyperparameters, for the image size (the papers' settings at 256×256, digits16's at 16×16); solver options given
as ``--name value`` override the preset's. ``degrade`` stores the task, its seeds and σ_y in the measurement PNG's
metadata; ``restore`` reads them back (flags it is given must agree: a measurement restored with another mask
would silently leave the hole). Images are read from any 8-bit file PIL reads (PNG, JPEG, …; grey or colour)
and written as PNG, 8-bit on [−1, 1] ↔ [0, 255], so values of a noisy measurement outside [−1, 1] are clipped
when it is written (as for any image file). An image of another size or channel count than the model's is an
error that says what was expected; ``--resize`` center-crops and resizes it instead (``degrade --resize N``: to
N×N). Tasks whose
measurement is not an image of the sample's grid (``mri4``: complex k-space, ``ct``: a sinogram,
``phase_retrieval``: Fourier magnitudes) write and read it as a NumPy ``.npy`` array of the operator's output
shape instead, unclipped and complex where it is complex (without stored settings: give ``restore`` the task and
seeds).
"""

from __future__ import annotations

from pathlib import Path


def _read(path, name: str):
    """The decoded image file given as argument ``name`` (a clear error for a missing or unreadable file)."""
    from ..images import read_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    try:
        return read_image(path)
    except Exception as err:  # PIL's errors for non-images are not ValueErrors
        raise ValueError(f"{name}: cannot read {path} as an image ({type(err).__name__}: {err})") from None


def _check_out(out, *inputs) -> None:
    for name, path in inputs:
        if path is not None and Path(out).resolve() == Path(path).resolve():
            raise ValueError(f"--out: {out} is the {name} file; choose another path (inputs are never overwritten)")


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


def _image(img, shape, name: str, path, what: str, resize: bool):
    """The image as a (1, *shape) tensor: center-cropped, resized and converted to ``shape`` when ``resize``,
    else it must have that shape (the error says which argument, what was expected and how to resize)."""
    from ..images import image_to_tensor

    if resize:
        return image_to_tensor(img, size=shape[-2:], channels=shape[0])
    x = image_to_tensor(img)
    got = tuple(x.shape[1:])
    if len(shape) != 3 or got != tuple(shape):
        raise ValueError(f"{name}: expected a {_describe(shape)} image ({what}), got a {_describe(got)} image "
                         f"({path}); pass --resize to center-crop and resize it to {shape[-2]}×{shape[-1]}"
                         + (f" and convert it to {shape[0]} channel{'s' * (shape[0] > 1)}" if got[0] != shape[0] else ""))
    return x


def _task_and_sigma(args):
    from .tasks import get_task

    task = get_task(args.task)
    sigma01 = task.sigma01 if args.sigma_y is None else args.sigma_y
    if not sigma01 >= 0:
        raise ValueError(f"--sigma-y: expected a noise level >= 0 (on the [0, 1] pixel range), got {sigma01}")
    return task, sigma01


#: the measurement settings ``degrade`` stores in its PNG: flag → metadata key
_MEASUREMENT_FLAGS = {"--task": "task", "--mask-seed": "mask_seed", "--sigma-y": "sigma_y"}


def _adopt_measurement_settings(args, measured) -> None:
    """Take the task, mask seed and σ_y ``degrade`` stored in the measurement image for flags not given; a flag
    given with another value is an error (the operator or the likelihood would not be the measurement's)."""
    from ..images import png_settings

    stored = {} if measured is None else png_settings(measured)
    for flag, key in _MEASUREMENT_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        given = getattr(args, dest)
        if key not in stored:
            continue
        if given is None:
            setattr(args, dest, stored[key])
        elif given != stored[key]:
            raise ValueError(f"{flag} {given}: {args.input} was made by `diffsolve degrade` with {flag} {stored[key]}; "
                             f"give {flag} {stored[key]} or leave {flag} out")
    if args.task is None:
        raise ValueError(f"--task: {args.input} does not say which task made it (not written by `diffsolve "
                         "degrade`): give --task")
    if args.mask_seed is None:
        args.mask_seed = 0


def _cmd_degrade(args, options, parser) -> int:
    from ..images import image_to_tensor, make_grid, save_png
    from .noise import measure

    task, sigma01 = _task_and_sigma(args)
    _check_suffix(task, args.out, "--out")
    _check_out(args.out, ("--input", args.input))
    img = _read(args.input, "--input")
    size = None if args.resize is None else (args.resize, args.resize)
    clean = image_to_tensor(img, size=size)
    shape = tuple(clean.shape[1:])
    op = task.operator(shape, args.mask_seed)
    y = measure(op, clean.double(), task.noise(sigma01), seed=args.seed)
    if task.image_measurement:
        settings = {"task": task.name, "mask_seed": args.mask_seed, "sigma_y": sigma01, "noise_seed": args.seed}
        save_png(make_grid(y.float(), per_row=1, pad=0), args.out, settings)
    else:
        import numpy as np

        from ..files import atomic_write

        atomic_write(args.out, lambda f: np.save(f, y[0].numpy()))
    print(f"{task.name}: {_describe(shape)} -> {_describe(op.shape_out)} measurement, {task.setting(shape)}, "
          f"sigma_y = {sigma01:g} on [0, 1] (seed {args.seed}, mask seed {args.mask_seed}) -> {args.out}")
    return 0


def _cmd_restore(args, options, parser) -> int:
    from .. import load_model
    from ..images import make_grid, save_png
    from .metrics import psnr, ssim
    from ..cliargs import parse_options
    from .registry import get_solver
    from .solve import solve

    _check_out(args.out, ("--input", args.input), ("--reference", args.reference))
    # a .npy measurement (k-space, sinogram, magnitudes) is read once the operator gives its shape
    measured = None if Path(args.input).suffix.lower() == ".npy" else _read(args.input, "--input")
    _adopt_measurement_settings(args, measured)
    task, sigma01 = _task_and_sigma(args)
    spec = get_solver(args.method)  # method and options are checked before anything is loaded
    options = parse_options(spec, options)
    _check_suffix(task, args.input, "--input")
    reference = None if args.reference is None else _read(args.reference, "--reference")
    model = load_model(args.model, scheduler_config=args.scheduler_config, device=args.device)
    shape = model.sample_shape
    if shape is None or len(shape) != 3:
        raise ValueError(f"--model: restore needs an image model with a known (C, H, W) sample shape, got {shape}")
    op = task.operator(shape, args.mask_seed)
    preset = {k: v for k, v in task.solver_options(args.method, shape).items() if k in spec.options}
    if measured is None:
        measured = _load_array(args.input, "--input", op)
    else:
        measured = _image(measured, op.shape_out, "--input", args.input,
                          f"the {task.name} measurement of the model's {_describe(shape)} images", args.resize)
    if reference is not None:
        reference = _image(reference, shape, "--reference", args.reference, "the model's image size", args.resize)
    steps = task.solver_steps(args.method, shape) if args.steps is None else args.steps
    x, info = solve(model, op, measured.to(model.device), args.method, noise=task.noise(sigma01), steps=steps,
                    seeds=[args.seed], progress=not args.quiet, return_info=True, **{**preset, **options})
    save_png(make_grid(x, per_row=1, pad=0), args.out)
    print(f"{args.method} on {task.name}: {info.nfe} network evaluations, {info.wall_time:.2f} s, "
          f"{task.setting(shape)} -> {args.out}")
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
    from ..cliargs import add_model_args, finite_float, int_at_least, output_file
    from .registry import list_solvers
    from .tasks import TASKS

    tasks = f"one of {', '.join(TASKS)}"
    p = sub.add_parser("degrade", help="make a measurement of a clean image for a restore task",
                       description="Apply a task's operator and noise to a clean image (PNG, JPEG, ...; "
                                   "[0, 255] <-> [-1, 1]) at its size, or at --resize; the task, seeds and σ_y are "
                                   "stored in the measurement PNG for `diffsolve restore`. A clean digit: "
                                   "`diffsolve digits --out clean.png`.")
    p.add_argument("--task", required=True, help=tasks)
    p.add_argument("--input", required=True, help="the clean image (PNG, JPEG, ...)")
    p.add_argument("--out", type=output_file(".png", ".npy"), required=True,
                   help="the measurement to write: a PNG, or .npy for mri4, ct and phase_retrieval")
    p.add_argument("--resize", type=int_at_least(1, "the image side in pixels"), default=None, metavar="N",
                   help="center-crop the image to a square and resize it to N×N first (e.g. the model's 256; "
                        "default: keep its size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurement noise")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the box position / random mask / motion kernel")
    p.add_argument("--sigma-y", type=finite_float, default=None,
                   help="noise std on the [0, 1] pixel range (default: the task's)")
    p.set_defaults(run=_cmd_degrade, takes_options=False)

    p = sub.add_parser("restore", help="restore a degraded image with DPS, DDS or DAPS",
                       description="Solve a task's inverse problem for a measurement image; the task, mask seed and "
                                   "σ_y default to those `diffsolve degrade` stored in it. Solver options follow as "
                                   "--name value and override the task's preset (see `diffsolve solvers`).")
    add_model_args(p)
    p.add_argument("--task", default=None, help=f"{tasks} (default: the one stored in --input)")
    p.add_argument("--method", default="dds", metavar="NAME",
                   help=f"one of {', '.join(list_solvers())} (daps = daps_1k)")
    p.add_argument("--input", required=True, help="the measurement image, or .npy for mri4, ct and phase_retrieval (from `diffsolve degrade`)")
    p.add_argument("--out", type=output_file(".png"), required=True, help="the restored PNG to write")
    p.add_argument("--reference", default=None, help="the clean image: print PSNR and SSIM (default: none)")
    p.add_argument("--resize", action="store_true",
                   help="center-crop and resize --input to the measurement size of the model's images and "
                        "--reference to the model's size (converting grey/colour to the model's channels)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="solver steps (default: the task preset's, else the method's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the solver's noise")
    p.add_argument("--mask-seed", type=int, default=None,
                   help="the --mask-seed given to degrade (default: the one stored in --input, else 0)")
    p.add_argument("--sigma-y", type=finite_float, default=None,
                   help="noise std on [0, 1] (default: the one stored in --input, else the task's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_restore, takes_options=True)

    p = sub.add_parser("solvers", help="list the inverse-problem solvers and their options",
                       description="List the inverse-problem solvers with their options (and defaults) and what "
                                   "their steps count.")
    p.set_defaults(run=_cmd_solvers, takes_options=False)
