"""End to end on the shipped digits16 model and held-out test digits, every ``diffsolve restore`` task with
its preset: each method beats the measurement's own pseudo-inverse in PSNR, and DDS against DPS.

Bounded for CI (about a minute on one core): the first 4 held-out digits with the measurement seeds of
``benchmarks/inverse.py`` (1000 + k), so DDS and DAPS-100 reproduce that benchmark's first 4 digits exactly
(every sample depends only on its own seeds); DPS with 250 of its 1000 ancestral steps and 4× the preset's
ζ (the same total likelihood push ζ·steps; the presets were tuned this way on training digits). The
benchmark runs the full settings on 32 digits (``benchmarks/RESULTS.md``).

DDS vs DPS. The issue asks for "DDS at least as good as DPS in PSNR". Measured on 32 held-out digits against
the full 1000-step DPS (``benchmarks/RESULTS.md``, DDS − DPS ± its standard error): it holds on ×4 SR
(−0.01 ± 0.59 dB: a tie), Gaussian blur (+0.87 ± 0.28) and motion blur (+0.06 ± 0.36), and fails on

- inpainting (box −4.17 ± 0.89, random −3.46 ± 0.55 dB), for a structural reason: for a mask AᴴA is a
  projector, so DDS's data-consistency step (CG in the Krylov space around x̂0) converges in one step to
  replacing the observed pixels by y and never moves a missing pixel; the missing pixels learn about y only
  through the next denoiser call on the re-noised image. That is the "replacement" scheme whose
  disharmony at the hole's border DPS's gradient through the denoiser's Jacobian (MCG, Chung et al. 2022)
  was introduced to fix; DDS's tangent-space (Krylov) assumption is what a hard mask breaks, and its paper
  evaluates MRI and CT;
- denoising (−0.84 ± 0.33 dB): measured, not explained; neither the likelihood weight (γ = 0.25–2 × the
  noise-matched γ_t), η (0.5–1) nor 30–100 steps closes it (``benchmarks/RESULTS.md``).

So ``test_dds_is_not_worse_than_dps`` asserts, on the other tasks, that DDS is not significantly worse: the
mean per-digit PSNR difference DDS − DPS is ≥ −2 standard errors of that paired difference (a one-sided test,
no margin in dB; with 4 digits it cannot tell a tie from a small win, the benchmark can), and
``test_dps_beats_dds_where_documented`` asserts the exceptions the other way, so that a change in either
solver that closes a gap shows up.
"""

import math
from functools import lru_cache

import pytest

from diffsolve import load_model, solve
from diffsolve.data import digits
from diffsolve.inverse import measure, psnr
from diffsolve.inverse.tasks import TASKS, get_task
from diffsolve.loading import SHIPPED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHIPPED["digits16"].exists(), reason="the digits16 model is not trained yet")]

NUM = 4
DPS_STEPS = 250
METHODS = ("dds", "dps", "daps_100")
#: where DPS beats DDS (see the module docstring)
DPS_AHEAD = ("inpaint_box", "inpaint_random", "denoise")


@lru_cache(maxsize=None)
def scores(name: str) -> dict:
    """Per-digit PSNR (dB) of the pseudo-inverse and of each method on one task, computed once."""
    model = load_model("digits16")
    clean = digits("test")[0][:NUM]
    task = get_task(name)
    op = task.operator(model.sample_shape, seed=0)
    noise = task.noise()
    y = measure(op, clean.double(), noise, seed=1000).float()
    out = {"pinv": psnr(op.A_pinv(y), clean)}
    for method in METHODS:
        opts = task.solver_options(method)
        steps = None
        if method == "dps":
            steps, opts["zeta"] = DPS_STEPS, opts["zeta"] * 1000 / DPS_STEPS
        x = solve(model, op, y, method, noise=noise, steps=steps, seeds=range(NUM), **opts)
        out[method] = psnr(x, clean)
    return out


def summary(s: dict) -> str:
    return ", ".join(f"{k} {float(v.mean()):.2f}" for k, v in s.items())


@pytest.mark.parametrize("name", list(TASKS))
def test_every_method_beats_the_pseudo_inverse(name):
    s = scores(name)
    for method in METHODS:
        assert float(s[method].mean()) > float(s["pinv"].mean()), f"{name}: {method} ({summary(s)} dB)"


@pytest.mark.parametrize("name", [n for n in TASKS if n not in DPS_AHEAD])
def test_dds_is_not_worse_than_dps(name):
    s = scores(name)
    diff = s["dds"] - s["dps"]
    mean, se = float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))
    assert mean >= -2 * se, f"{name}: DDS − DPS = {mean:+.2f} ± {se:.2f} dB ({summary(s)} dB)"


@pytest.mark.parametrize("name", DPS_AHEAD)
def test_dps_beats_dds_where_documented(name):
    s = scores(name)
    assert float(s["dps"].mean()) > float(s["dds"].mean()), f"{name}: {summary(s)} dB"
