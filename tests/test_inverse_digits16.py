"""End to end on the shipped digits16 model and held-out test digits, every ``diffsolve restore`` task with
its preset and every solver as benchmarked (``benchmarks/inverse.py``: DPS at its 1000 steps, DDS at the
task's preset step count, DAPS-100), on the benchmark's first 8 digits with its measurement seeds
(1000 + k) and solver seeds (k), so these are that benchmark's first 8 one-sample restorations exactly (every
sample depends only on its own seeds). Phase retrieval is scored up to its ambiguities (``Task.align``).

Two yardsticks a solver must beat, so that one that ignores y cannot pass:

- the measurement's own pseudo-inverse A⁺y (a solver ignoring y can beat it: DDS with γ = 0 scored 11.2 dB
  against the pseudo-inverse's 9.8 dB on random inpainting);
- the model's unconditional samples with the same seeds (DDIM, 50 steps), i.e. what ignoring y gives:
  every method must be at least ``PRIOR_MARGIN_DB`` above them on average.

DDS against DPS (issue 15's "home ground"): on the tasks where the benchmark (32 digits, benchmarks/RESULTS.md)
finds DDS within 0.3 dB of DPS, the test asserts the mean difference DDS − DPS over these 8 digits is at
least −``DDS_MARGIN_DB``: a stated margin, not a multiple of a standard error. On the tasks where DPS is ahead
in the benchmark (inpainting, denoising, and, against the DDS paper's claim, MRI at this size), it
asserts that order (``DPS_AHEAD``), so a change that closes or reverses a gap shows up. Why DDS trails
there: diffsolve/inverse/dds.py and README ("Inverse problems on the papers' home ground").

Slow (about 30 s per task on one core: DPS's 1000 steps with back-propagation on 8 digits).
"""

from functools import lru_cache

import pytest

from diffsolve import load_model, sample, solve
from diffsolve.data import digits
from diffsolve.inverse import measure, psnr
from diffsolve.inverse.tasks import TASKS, get_task
from diffsolve.loading import SHIPPED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHIPPED["digits16"].exists(), reason="the digits16 model is not trained yet")]

NUM = 8
METHODS = ("dps", "dds", "daps_100")
PRIOR_STEPS = 50
#: every method's mean PSNR exceeds that of unconditional samples by at least this
PRIOR_MARGIN_DB = 3.0
#: DDS's mean PSNR is at most this far below DPS's on DDS_HOME
DDS_MARGIN_DB = 0.5
#: where the benchmark finds DDS within 0.3 dB of DPS (see the module docstring)
DDS_HOME = ("sr4", "gauss_blur", "motion_blur", "ct")
#: where DPS is ahead of DDS in the benchmark (MRI too, on training and held-out digits alike)
DPS_AHEAD = ("inpaint_box", "inpaint_random", "denoise", "mri4")


@lru_cache(maxsize=None)
def scores(name: str) -> dict:
    """Per-digit PSNR (dB) of the pseudo-inverse, of unconditional samples and of each method on one task."""
    model = load_model("digits16")
    clean = digits("test")[0][:NUM]
    task = get_task(name)
    op = task.operator(model.sample_shape, seed=0)
    noise = task.noise()
    y = measure(op, clean.double(), noise, seed=1000)

    def score(x):
        return psnr(task.align(x.to(clean.dtype), clean), clean)

    out = {"pinv": score(op.A_pinv(y)), "prior": score(sample(model, "ddim", PRIOR_STEPS, seeds=range(NUM)))}
    for method in METHODS:
        if method == "dds" and not op.linear:
            continue
        x = solve(model, op, y, method, noise=noise, steps=task.solver_steps(method), seeds=range(NUM),
                  **task.solver_options(method))
        out[method] = score(x)
    return out


def summary(s: dict) -> str:
    return ", ".join(f"{k} {float(v.mean()):.2f}" for k, v in s.items())


@pytest.mark.parametrize("name", list(TASKS))
def test_every_method_beats_the_pseudo_inverse_and_the_prior(name):
    s = scores(name)
    for method in METHODS:
        if method not in s:
            continue
        mean = float(s[method].mean())
        assert mean > float(s["pinv"].mean()), f"{name}: {method} below the pseudo-inverse ({summary(s)} dB)"
        assert mean >= float(s["prior"].mean()) + PRIOR_MARGIN_DB, \
            f"{name}: {method} within {PRIOR_MARGIN_DB} dB of unconditional samples ({summary(s)} dB)"


def test_dds_refuses_a_nonlinear_task():
    model = load_model("digits16")
    task = get_task("phase_retrieval")
    op = task.operator(model.sample_shape)
    y = measure(op, digits("test")[0][:1].double(), task.noise(), seed=1000)
    with pytest.raises(ValueError, match="solver 'dds' needs a linear operator; PhaseRetrieval is nonlinear"):
        solve(model, op, y, "dds", noise=task.noise())


@pytest.mark.parametrize("name", DDS_HOME)
def test_dds_is_within_the_margin_of_dps(name):
    s = scores(name)
    diff = float((s["dds"] - s["dps"]).mean())
    assert diff >= -DDS_MARGIN_DB, f"{name}: DDS − DPS = {diff:+.2f} dB ({summary(s)} dB)"


@pytest.mark.parametrize("name", DPS_AHEAD)
def test_dps_beats_dds_where_documented(name):
    s = scores(name)
    assert float(s["dps"].mean()) > float(s["dds"].mean()), f"{name}: {summary(s)} dB"
