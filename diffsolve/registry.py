"""The sampler registry: ``register_sampler`` (decorator), ``get_sampler``, ``list_samplers``.

A sampler is a function ``fn(run, x, *, option=default, ...) -> x`` in the style of k-diffusion's
``sampling.py``: ``run`` (:class:`diffsolve.core.Run`) carries the model, the time grid, noise, callback and
progress; ``x`` is x_T; the keyword-only parameters are the sampler's options, checked by name and
reported by ``diffsolve samplers``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    #: option name → default value
    options: dict[str, Any]
    #: the grid kind used when ``sample`` gets no ``grid``
    default_grid: str
    #: adaptive samplers choose their own steps (``steps`` must be None)
    adaptive: bool
    summary: str
    #: ``invert(run, x0, **options) -> (x_T, extra options for sample)`` where the sampler can be inverted
    inverse: Callable | None = None

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(f"sampler {self.name!r} got unknown option(s) {unknown}; its options are: {valid}")


class Registry(dict):
    """Specs by name for one kind of method ("sampler", "solver"); the built-in ones register on first lookup
    (``load_builtin`` imports their modules)."""

    def __init__(self, kind: str, load_builtin: Callable[[], None]):
        super().__init__()
        self.kind, self._load_builtin = kind, load_builtin

    def spec(self, name: str):
        self._load_builtin()
        if not isinstance(name, str) or name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self))}")
        return self[name]

    def names(self) -> list[str]:
        self._load_builtin()
        return sorted(self)


def _load_builtin() -> None:
    from . import samplers  # noqa: F401  (registers the built-in samplers on import)


_REGISTRY: Registry = Registry("sampler", _load_builtin)
#: ``get_sampler(name) -> SamplerSpec`` (a ValueError listing the valid names for an unknown one)
get_sampler = _REGISTRY.spec
#: ``list_samplers() -> list[str]``, sorted
list_samplers = _REGISTRY.names


def keyword_options(kind: str, name: str, fn: Callable, second: str) -> tuple[dict[str, Any], str]:
    """The options of ``fn(run, <second>, *, option=default, ...)`` (name → default) and its docstring's first
    line; a function of another shape is a TypeError naming the ``kind`` ("sampler", "solver") and ``name``."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2 or any(p.kind is not p.KEYWORD_ONLY for p in params[2:]):
        raise TypeError(f"{kind} {name!r}: expected fn(run, {second}, *, options...), got {inspect.signature(fn)}")
    return {p.name: p.default for p in params[2:]}, (inspect.getdoc(fn) or "").split("\n")[0]


def register_sampler(name: str, *, default_grid: str = "time_uniform", adaptive: bool = False):
    """Register ``fn(run, x, *, ...)`` under ``name``."""

    def decorate(fn: Callable) -> Callable:
        options, summary = keyword_options("sampler", name, fn, "x")
        _REGISTRY[name] = SamplerSpec(name, fn, options, default_grid, adaptive, summary)
        return fn

    return decorate


def register_inversion(name: str):
    """Register ``invert(run, x0, *, options...)`` for the already registered sampler ``name``: it walks the
    grid from t_end back to t_start and returns ``(x_T, extra)``, where ``sample(..., x_T=x_T, **extra)``
    regenerates x0. Its options must be the sampler's (they are passed to both)."""

    def decorate(fn: Callable) -> Callable:
        _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], inverse=fn)
        return fn

    return decorate
