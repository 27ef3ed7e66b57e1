"""The solver registry: ``register_solver`` (decorator), ``get_solver``, ``list_solvers``.

A solver is ``fn(run, problem, *, option=default, ...) -> x0`` on the shared stepping core: ``run``
(:class:`diffsolve.core.Run`) carries the model, the time grid (host float64 coefficients), per-sample seeded
noise, callback and progress; ``problem`` (:class:`Problem`) the operator, the measurement and its noise.
The keyword-only parameters are the solver's options, checked by name before any network call; a preset
(``daps_100``) is the same function registered again with other defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..registry import Registry, keyword_options
from .noise import GaussianNoise, PoissonNoise
from .operators import Operator

Tensor = torch.Tensor


@dataclass
class Problem:
    """What a solver needs to know about the measurement y = A(x) + n."""

    operator: Operator
    y: Tensor
    noise: GaussianNoise | PoissonNoise
    #: the likelihood's σ_y: the noise's σ (Gaussian), or per sample, shape (batch,), the RMS of that sample's
    #: per-element stds (Poisson: so that sample k's run depends on its own measurement alone)
    sigma_y: float | Tensor
    #: per-element relative inverse variance σ_y²/σ_i² (Poisson); None for Gaussian noise (all 1)
    weight: Tensor | None = None

    @property
    def noiseless(self) -> bool:
        return not isinstance(self.sigma_y, Tensor) and self.sigma_y == 0

    def residual(self, x0: Tensor) -> Tensor:
        """y − A(x0), whitened relative to σ_y (multiplied by √weight) under Poisson noise."""
        r = self.y - self.operator.A(x0)
        return r if self.weight is None else r * self.weight.sqrt()

    def data_grad(self, x0: Tensor) -> Tensor:
        """∇ ½ Σ w |A(x0) − y|² (w = weight, 1 for Gaussian noise)."""
        return self.operator.data_grad(x0, self.y, self.weight)


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable
    #: option name → default value
    options: dict[str, Any]
    default_steps: int
    #: what ``steps`` counts, for messages and ``diffsolve solvers``
    steps_meaning: str
    summary: str
    #: solvers that need a linear operator (DDS: CG on the normal equations)
    linear_only: bool = False
    #: ``validate(options, problem)``: raise ValueError on bad option values (before any network call)
    validate: Callable | None = None
    #: ``grid(schedule, steps, options) -> times`` (float64, decreasing, ending at 0); default time-uniform
    grid: Callable | None = None

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if not unknown:
            return
        owners = []
        for name in unknown:
            others = sorted({s.name.split("_")[0] for s in _REGISTRY.values()
                             if name in s.options and s.fn is not self.fn})
            if others:
                owners.append(f"{name!r} is an option of {', '.join(others)}")
        hint = f" ({'; '.join(owners)})" if owners else ""
        valid = ", ".join(self.options) or "none"
        raise TypeError(f"solver {self.name!r} got unknown option(s) {unknown}{hint}; its options are: {valid}")


def _load_builtin() -> None:
    from . import daps, dds, dps  # noqa: F401  (registering on import)


_REGISTRY: Registry = Registry("solver", _load_builtin)
#: ``get_solver(name) -> SolverSpec`` (a ValueError listing the valid names for an unknown one)
get_solver = _REGISTRY.spec
#: ``list_solvers() -> list[str]``, sorted
list_solvers = _REGISTRY.names


def register_solver(name: str, *, default_steps: int, steps_meaning: str = "steps", linear_only: bool = False,
                    validate: Callable | None = None, grid: Callable | None = None,
                    defaults: dict[str, Any] | None = None, summary: str | None = None):
    """Register ``fn(run, problem, *, options...)`` under ``name``; ``defaults`` overrides some of the
    function's defaults (a preset)."""

    def decorate(fn: Callable) -> Callable:
        options, doc_summary = keyword_options("solver", name, fn, "problem")
        unknown = set(defaults or {}) - set(options)
        if unknown:
            raise TypeError(f"solver {name!r}: defaults for unknown options {sorted(unknown)}")
        options.update(defaults or {})
        text = summary or doc_summary
        _REGISTRY[name] = SolverSpec(name, fn, options, int(default_steps), steps_meaning, text, linear_only,
                                     validate, grid)
        return fn

    return decorate


# ---- option checks shared by the solvers ----------------------------------------------------------------

def check_number(options: dict, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, allow_none: bool = False, integer: bool = False) -> None:
    value = options[name]
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer) if integer else (int, float, np.number))
    if ok:
        value = float(value)
        ok = (np.isfinite(value) or (value == float("inf") and high is None and not integer))
        ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        none = " or None" if allow_none else ""
        raise ValueError(f"{name}: expected {kind} {' and '.join(bounds)}{none}, got {options[name]!r}")
