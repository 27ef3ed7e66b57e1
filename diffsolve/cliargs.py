"""What every ``diffsolve`` subcommand checks before it loads a model or samples: argparse types for the
common flags (finite numbers, counts, devices, output paths) and the typed reading of sampler/solver options
(``--eta 0.5``) from the types their functions declare.

An argparse ``type=`` runs while the command line is parsed, so a bad value is answered at once with the
subcommand's usage and a message naming the flag and the value (``argument --out: ...``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import tempfile
from pathlib import Path
from typing import Any

# ---- numbers -------------------------------------------------------------------------------------------


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, why: str = ""):
    """An argparse type: an integer >= ``low`` (``why``: the reason, for the message)."""
    expected = f"expected an integer >= {low}" + (f" ({why})" if why else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)


def steps_or_none(text: str) -> int | None:
    """``--steps``: an integer >= 1, or 'none' (adaptive samplers choose their own steps)."""
    return None if text.lower() == "none" else positive_int(text)


#: --guidance values outside this range are allowed but almost always a mistake (they are warned about)
USUAL_GUIDANCE = (0.0, 30.0)


def guidance_warning(scale: float) -> str | None:
    low, high = USUAL_GUIDANCE
    if low <= scale <= high:
        return None
    return (f"warning: --guidance {scale:g} is outside the usual range [{low:g}, {high:g}] (1 = no guidance, "
            "samples degrade far above ~10)")


# ---- devices --------------------------------------------------------------------------------------------


def device(text: str) -> str:
    """``--device``: a torch device this build and machine have (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: {built}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda[:N] or mps, got {text!r}")
    return text


# ---- output paths ---------------------------------------------------------------------------------------


def _check_writable_folder(folder: Path, text: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a folder we can create files in (tried, not
    guessed from permission bits: root passes ``os.access`` on read-only mounts such as /proc)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {existing} ({err.strerror})") from None


def output_file(*suffixes: str):
    """An argparse type for a file the command writes: not a folder, in a folder we can write, with one of
    ``suffixes`` (case-insensitive)."""

    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if text.endswith(os.sep) or path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name ending in {' or '.join(suffixes)}")
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a file name ending in {' or '.join(suffixes)} "
                                             f"(the format written), got {path.suffix or 'no extension'}")
        _check_writable_folder(path.parent, text)
        return str(path)

    parse.__name__ = "output file"
    return parse


def output_folder(text: str) -> str:
    """An argparse type for a folder the command writes into (created if missing)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    _check_writable_folder(path, text)
    return str(path)


# ---- sampler / solver options ---------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _alternatives(annotation: str) -> list[str]:
    """'float | tuple[float, float] | None' → ['float', 'tuple[float, float]', 'None'] (top-level '|' only)."""
    parts, depth, current = [], 0, ""
    for ch in annotation:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [p for p in [*parts, current.strip()] if p]


def _declared_types(param: inspect.Parameter) -> list[str]:
    """The option's types as written in the signature; an unannotated option takes its default's type (a
    default of None: a string or None, e.g. a path)."""
    if param.annotation is not inspect.Parameter.empty:
        annotation = param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(param.annotation)
        kinds = _alternatives(annotation.replace("typing.", ""))
    elif param.default is None:
        kinds = ["str", "None"]
    else:
        kinds = [type(param.default).__name__]
    return sorted(kinds, key=lambda kind: kind != "None")  # 'none' is None, before any string reading of it


def _read_number(text: str, kind: str):
    value = int(text) if kind == "int" else float(text)
    if not math.isfinite(value):
        raise OverflowError
    return value


def _read(text: str, kind: str):
    """``text`` as ``kind`` ('int', 'float', 'bool', 'str', 'None', 'tuple[float, ...]'); ValueError if it
    is not one, OverflowError if it is a non-finite number; None for a kind the command line cannot give."""
    if kind == "None":
        if text.lower() == "none":
            return None
        raise ValueError
    if kind == "bool":
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    if kind in ("int", "float"):
        return _read_number(text, kind)
    if kind == "str":
        return text
    if kind.startswith("tuple[") and kind.endswith("]"):
        items = [k.strip() for k in kind[6:-1].split(",")]
        values = [s.strip() for s in text.strip("()").split(",")]
        if len(values) != len(items) or any(k not in ("int", "float") for k in items):
            raise ValueError
        return tuple(_read_number(v, k) for v, k in zip(values, items))
    raise LookupError  # a kind (callable, tensor, EMS object) the command line cannot express


_DESCRIPTION = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
                "None": "none"}


def _describe(kind: str) -> str:
    if kind.startswith("tuple["):
        return f"{len(kind[6:-1].split(','))} comma-separated numbers"
    return _DESCRIPTION.get(kind, kind)


def parse_option(param: inspect.Parameter, text: str):
    """One ``--name value`` option read as the type its function declares; the first declared type that
    reads ``text`` wins (so ``bool | str`` reads 'true' as True and 'official' as a string). Non-finite
    numbers are refused, even where a string would be accepted."""
    flag = f"--{param.name.replace('_', '-')}"
    kinds = _declared_types(param)
    expressible = []
    for kind in kinds:
        try:
            return _read(text, kind)
        except OverflowError:
            raise ValueError(f"{flag}: expected a finite number, got {text!r}") from None
        except ValueError:
            expressible.append(kind)
        except LookupError:
            pass
    if not expressible or expressible == ["None"]:
        raise ValueError(f"{flag}: this option cannot be given on the command line (it takes "
                         f"{' or '.join(kinds)}); got {text!r}")
    raise ValueError(f"{flag}: expected {' or '.join(map(_describe, expressible))}, got {text!r}")


def parse_options(spec, raw: dict[str, str]) -> dict[str, Any]:
    """Typed values for ``raw`` (option name → the text given) by the signature of ``spec.fn`` (a sampler's or a
    solver's registered function); unknown names are refused first by ``spec.check_options``."""
    spec.check_options(raw)
    params = inspect.signature(spec.fn).parameters
    return {name: parse_option(params[name], text) for name, text in raw.items()}


def resolve_steps(steps, spec, default: int = 10):
    """``--steps`` for the sampler ``spec``: not given, ``default`` (None for an adaptive sampler, which chooses
    its own steps); given, it must suit the sampler. Messages speak in flags."""
    if steps is STEPS_NOT_GIVEN:
        return None if spec.adaptive else default
    if spec.adaptive and steps is not None:
        raise ValueError(f"--steps {steps}: sampler {spec.name!r} chooses its own steps; leave --steps out (or give "
                         "'none') and set its tolerances (--rtol, --atol) instead")
    if not spec.adaptive and steps is None:
        raise ValueError(f"--steps none: sampler {spec.name!r} needs a number of steps (an integer >= 1)")
    return steps


def check_conditioning(args, model=None) -> None:
    """``--class`` and ``--guidance`` in flag terms: before loading (guidance needs something to guide with)
    and, given the loaded ``model``, against its classes."""
    prompt = getattr(args, "prompt", None)
    if model is None:
        if args.guidance != 1.0 and args.class_label is None and prompt is None:
            raise ValueError(f"--guidance {args.guidance:g} needs --class (or --prompt for a text-to-image model): "
                             "guidance mixes the conditional and unconditional predictions")
        return
    if args.class_label is None:
        return
    classes = getattr(model, "num_classes", None)
    if classes is None:
        raise ValueError(f"--class {args.class_label}: the model {args.model!r} is not class-conditional")
    if not 0 <= args.class_label <= classes:
        raise ValueError(f"--class {args.class_label}: expected a label in 0–{classes - 1} (or {classes}, the null "
                         "class)")


# ---- usage and help -------------------------------------------------------------------------------------

#: ``--steps`` default when not given (argparse leaves a non-string default unconverted)
STEPS_NOT_GIVEN = object()


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: …)' to a flag's help unless the help already speaks of its default, the flag is
    required, or its default is 'not given' (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class FlagValueError(ValueError):
    """A flag's value its type refused (``argument --num: expected an integer >= 1, got '0'``); ``parser`` is
    the subcommand's, whose usage goes with the message."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class SubcommandParser(argparse.ArgumentParser):
    """The parser of each ``diffsolve`` subcommand: help shows defaults, and a value a flag's type refuses is
    a :class:`FlagValueError` (one line and this subcommand's usage, exit status 2, like every other bad
    input) rather than argparse's exit."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as err:
            raise FlagValueError(self, str(err)) from None


def add_model_args(p) -> None:
    """``--model``, ``--scheduler-config`` and ``--device`` for a subcommand that loads a model."""
    p.add_argument("--model", default="digits16", help="'digits16' (shipped), a diffusers folder or a hub id")
    add_scheduler_config_arg(p)
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")


def scheduler_config_file(text: str) -> str:
    """``--scheduler-config``: a scheduler_config.json, or a folder holding one."""
    from .loading import scheduler_config_path

    try:
        return str(scheduler_config_path(text))
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"expected a scheduler_config.json or a folder holding one, got "
                                         f"{text!r}") from None


def add_scheduler_config_arg(p) -> None:
    p.add_argument("--scheduler-config", type=scheduler_config_file, default=None,
                   help="scheduler_config.json (or its folder) for a --model folder that holds only a UNet")


def interrupted_note(args) -> str:
    """What a Ctrl-C leaves behind and how to go on, from the flags the interrupted command was given."""
    if getattr(args, "workdir", None):
        return f"finished shards are kept in {args.workdir}; rerun the same command to resume"
    if getattr(args, "checkpoint", None):
        return f"running sums are saved in {args.checkpoint} (every 30 s); rerun the same command to resume"
    if hasattr(args, "workdir"):
        return "nothing was kept (no --workdir); give --workdir to make a run resumable"
    return "no partial file was written (files are written whole, once done); rerun the command to start again"


def add_force_arg(p, flag: str = "--out") -> None:
    p.add_argument("--force", action="store_true", help=f"replace an existing {flag} (default: refuse)")


def refuse_to_overwrite(parser: argparse.ArgumentParser, path, force: bool, flag: str = "--out") -> None:
    """A usage error, before any work, if ``path`` exists and ``--force`` was not given (user files and the
    package's shipped files are never replaced by accident)."""
    if Path(path).exists() and not force:
        parser.error(f"{flag} {path} exists; pass --force to replace it, or choose another {flag}")
