"""diffusers' inference grids, reproduced: the times ``set_timesteps`` of ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ``PNDMScheduler`` and ``SASolverScheduler`` step through, from their config
options, as a diffsolve time grid plus the timestep values the network receives at each grid point.

diffusers describes a grid by integer training timesteps (``timestep_spacing`` leading / trailing /
linspace, ``steps_offset``) or by a list of VE noise levels σ = √((1 − ᾱ)/ᾱ) (``use_karras_sigmas``,
``use_lu_lambdas``, ``use_exponential_sigmas``, ``use_beta_sigmas``) and ends at ᾱ = 1 (``final_sigmas_type=
"zero"``, DDIM's ``set_alpha_to_one``) or at ᾱ_0 (``"sigma_min"``). A grid point is a time t of the
:class:`~diffsolve.schedules.DiscreteVP` schedule (timestep n sits at t = (n + 1)/N, σ = 0 at t = 0). With a
σ list, diffusers steps with those σ but feeds the network an integer timestep near them (rounded for Karras
and Lu grids, truncated for exponential and beta ones): :attr:`DiffusersGrid.timesteps` holds what the network
receives, which the scheduler adapter passes on, while the sampler steps with the σ of the grid.

``use_lu_lambdas`` and ``use_exponential_sigmas`` both space σ geometrically (uniform in λ), which is the
``logSNR`` grid kind of :func:`diffsolve.schedules.time_grid`; Karras and beta grids are its ``karras`` and
``beta`` kinds, and ``t_end=0`` there appends the final σ = 0 as ``final_sigmas_type="zero"`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schedules import BETA_GRID_SHAPE, DiscreteVP, time_grid

#: the diffusers schedulers whose grids are reproduced
SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "SASolverScheduler")
SPACINGS = ("leading", "trailing", "linspace")
#: config flag → the grid kind of :func:`~diffsolve.schedules.time_grid` with the same σ list
SIGMA_GRIDS = {"use_karras_sigmas": "karras", "use_lu_lambdas": "logSNR", "use_exponential_sigmas": "logSNR",
               "use_beta_sigmas": "beta"}
#: the config keys that define the grid (the scheduler adapter takes them over from a diffusers config)
GRID_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "final_sigmas_type", "lambda_min_clipped",
             *SIGMA_GRIDS)


@dataclass
class DiffusersGrid:
    """``t``: the grid (decreasing times, float64); ``timesteps``: the network's timestep at each of diffusers'
    evaluations, as diffusers feeds it (float64 holding integers). Where diffusers' last step has length zero
    (it ends at ᾱ_0 after evaluating the network there, or repeats its last σ) ``zero_final`` is True: ``t``
    leaves that step out (it ends where diffusers' last step starts, and has one point fewer) while
    ``timesteps`` keeps diffusers' evaluation there; that step leaves x unchanged in every sampler.
    ``step_to``: where diffusers' DDIM ends its steps elsewhere than at the next grid point (trailing / linspace
    spacing at step counts that do not divide N), the time each step ends at, for ``ddim(step_to=...)``."""

    t: torch.Tensor
    timesteps: torch.Tensor
    zero_final: bool = False
    step_to: torch.Tensor | None = None


def _spaced_timesteps(rules: str, n_train: int, steps: int, spacing: str, offset: int, last: int) -> np.ndarray:
    """Integer timesteps, decreasing, by ``timestep_spacing``. DDIM and PNDM space ``steps`` points; DPM-Solver
    and SA-Solver space ``steps + 1`` and drop the last (their ``last`` is the end of the λ-clipped range)."""
    if rules in ("DDIMScheduler", "PNDMScheduler"):
        if spacing == "linspace":
            return np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.int64) + offset
        return np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(last, 0, -n_train / steps).round().astype(np.int64) - 1


def _sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of VE noise levels: linear in log σ between the entries of the float32
    table ``log_sigmas`` (increasing), clamped to [0, N − 1], in diffusers' ``_sigma_to_t`` arithmetic (the
    truncation of exponential and beta grids makes its last bits matter at the table's ends)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip((log_sigma[None, :] - log_sigmas[:, None] >= 0).sum(0) - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _diffusers_sigmas(flag: str, table: np.ndarray, steps: int) -> np.ndarray:
    """The σ list of a diffusers σ grid in diffusers' arithmetic (ends from the float32 table); only the
    network's timesteps are derived from it (the grid itself is :func:`~diffsolve.schedules.time_grid`'s)."""
    s_max, s_min = table[-1].item(), table[0].item()
    ramp = np.linspace(0, 1, steps)
    if flag == "use_karras_sigmas":
        return (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    if flag == "use_lu_lambdas":
        log_table = np.log(table)
        return np.exp(log_table[-1].item() + ramp * (log_table[0].item() - log_table[-1].item()))
    if flag == "use_exponential_sigmas":
        return np.exp(np.linspace(np.log(s_max), np.log(s_min), steps))
    from scipy.stats import beta as beta_distribution

    return s_min + beta_distribution.ppf(1 - ramp, *BETA_GRID_SHAPE) * (s_max - s_min)


def _check_zero_final(rules: str, zero_final: bool) -> None:
    """diffusers' multistep solvers count the zero-length last step in their lower-order-final rule (the real
    last step is then their second-to-last, of order 2 where a grid without it takes order 1): refused."""
    if zero_final and rules in ("DPMSolverMultistepScheduler", "SASolverScheduler"):
        raise ValueError(f"{rules} with this config ends with a step of length zero (its last σ repeated, or "
                         "final_sigmas_type='sigma_min' after the σ_min point) and applies its lower-order rules "
                         "counting that step; a diffsolve grid cannot hold it: use final_sigmas_type='zero' or "
                         "another steps_offset")


def grid_options(rules: str, config: dict) -> tuple[str, int, list[str], str]:
    """(timestep_spacing, steps_offset, the σ-grid flags set, the final-step rule "zero" / "sigma_min" /
    "repeat") of scheduler ``rules`` from ``config``, with that scheduler's defaults; a bad value is an error."""
    if rules not in SCHEDULERS:
        raise ValueError(f"diffusers_grid: expected one of {list(SCHEDULERS)}, got {rules!r}")
    spacing = config.get("timestep_spacing") or ("leading" if rules in ("DDIMScheduler", "PNDMScheduler") else "linspace")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing: expected one of {list(SPACINGS)}, got {spacing!r}")
    offset = int(config.get("steps_offset") or 0)
    flags = [k for k in SIGMA_GRIDS if config.get(k)]
    if len(flags) > 1:
        raise ValueError(f"only one σ grid can be used, got {flags}")
    if flags and rules not in ("DPMSolverMultistepScheduler", "SASolverScheduler") or "use_lu_lambdas" in flags \
            and rules != "DPMSolverMultistepScheduler":
        raise ValueError(f"{flags[0]} is an option of DPMSolverMultistepScheduler{'' if flags[0] == 'use_lu_lambdas' else ' and SASolverScheduler'}, not of {rules}")
    if rules == "DPMSolverMultistepScheduler":
        final = config.get("final_sigmas_type") or "zero"
    elif rules == "SASolverScheduler":
        final = "repeat" if flags else "sigma_min"  # SA-Solver repeats the last σ of a σ list
    else:
        to_one = config.get("set_alpha_to_one")
        final = "zero" if (rules == "DDIMScheduler" if to_one is None else to_one) else "sigma_min"
    if final not in ("zero", "sigma_min", "repeat"):
        raise ValueError(f"final_sigmas_type: expected 'zero' or 'sigma_min', got {final!r}")
    return spacing, offset, flags, final


def diffusers_grid(schedule: DiscreteVP, steps: int, rules: str, config: dict) -> DiffusersGrid:
    """The grid of ``steps`` steps that diffusers' scheduler ``rules`` (one of :data:`SCHEDULERS`) builds from
    ``config`` (its grid keys, :data:`GRID_KEYS`; absent keys take that scheduler's defaults)."""
    n_train = schedule.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"steps: expected 1 … {n_train} (the training timesteps), got {steps}")
    spacing, offset, flags, final = grid_options(rules, config)
    ac = schedule.alphas_cumprod.to(torch.float32)  # diffusers keeps its table in float32
    # σ with torch's float32 kernels, as diffusers computes it: numpy's float32 power can differ in the last bit
    # (by CPU), and the truncated timesteps of exponential and beta grids see that bit at σ_max
    table = (((1 - ac) / ac) ** 0.5).numpy()
    log_sigmas = np.log(table)
    if flags:
        kind = SIGMA_GRIDS[flags[0]]
        zero_final = final != "zero"
        _check_zero_final(rules, zero_final)
        t = time_grid(schedule, steps - 1, kind) if zero_final else time_grid(schedule, steps, kind, t_end=0.0)
        # the network's timesteps come from diffusers' own float32 σ list: truncation sees its last bits
        fractional = _sigma_to_timestep(_diffusers_sigmas(flags[0], table, steps), log_sigmas)
        cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
        rounds = kind == "karras" and (rules == "SASolverScheduler" or not cosine) or flags[0] == "use_lu_lambdas" and not cosine
        timesteps = np.round(fractional) if rounds else np.trunc(fractional)
        return DiffusersGrid(t, torch.from_numpy(timesteps), zero_final)
    last = n_train
    if rules in ("DPMSolverMultistepScheduler", "SASolverScheduler"):
        lam = torch.from_numpy(-log_sigmas).flip(0)
        last = n_train - int(torch.searchsorted(lam, float(-np.inf if config.get("lambda_min_clipped") is None else config["lambda_min_clipped"])))
    ts = _spaced_timesteps(rules, n_train, steps, spacing, offset, last)
    t_end = 0.0 if final == "zero" else 1.0 / n_train
    t = torch.cat([schedule.timestep_to_t(torch.from_numpy(ts.copy())), torch.tensor([t_end], dtype=torch.float64)])
    step_to = None
    if rules == "DDIMScheduler":
        # DDIM steps from each timestep to timestep − N // steps (below 0: its final ᾱ), whatever comes next
        prev = ts - n_train // steps
        if (prev[:-1] != ts[1:]).any() or prev[-1] >= 0:
            if ts[-1] == 0 and t_end > 0:
                raise ValueError(f"diffusers' DDIM with timestep_spacing={spacing!r} at {steps} steps skips part of the "
                                 f"trajectory (it steps from each timestep to timestep − {n_train // steps}, not to the "
                                 "next one it evaluates) and then takes a last step from timestep 0 to ᾱ_0, which a "
                                 "diffsolve grid cannot hold: use set_alpha_to_one=True or another step count")
            step_to = torch.cat([schedule.timestep_to_t(torch.from_numpy(prev[prev >= 0].copy())),
                                 torch.full(((prev < 0).sum(),), t_end, dtype=torch.float64)])
    zero_final = bool(t[-1] == t[-2])
    _check_zero_final(rules, zero_final)
    t = t[:-1] if zero_final else t
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"{rules} with this config at {steps} steps repeats a timestep ({ts.tolist()}): a step of zero "
                         "length inside the grid, which a diffsolve grid cannot hold")
    return DiffusersGrid(t, torch.from_numpy(ts.astype(np.float64)), zero_final, step_to)
