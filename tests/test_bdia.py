"""BDIA: γ = 0 is DDIM; inversion followed by sampling reproduces x0 to round-off (naive DDIM inversion does
not); bad input is refused before any network call."""

import pytest
import torch

from diffsolve import invert, load_model, sample
from diffsolve.data import digits
from diffsolve.schedules import EDM, VPLinear
from diffsolve.testing import GaussianMixture

# (steps, γ): the paper's two settings. γ < 1 over many steps amplifies round-off by (1/γ)^steps on the way back.
SETTINGS = [(10, 0.5), (50, 1.0)]


def relative_error(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def round_trip(model, x0, steps, gamma, **kw):
    inv = invert(model, x0, "bdia", steps, gamma=gamma, **kw)
    assert inv.x_T.shape == x0.shape and inv.extra["x_next"].shape == x0.shape
    return sample(model, **inv.sample_kwargs(), **kw)


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=repr)
def test_gamma_zero_is_ddim(schedule):
    model = GaussianMixture.random(3, 2, schedule).as_model()
    assert torch.equal(sample(model, "bdia", 10, shape=(5, 3), gamma=0.0), sample(model, "ddim", 10, shape=(5, 3)))
    # γ > 0 differs from DDIM after the first (plain DDIM) step
    assert not torch.allclose(sample(model, "bdia", 10, shape=(5, 3), gamma=0.5), sample(model, "ddim", 10, shape=(5, 3)))


@pytest.mark.parametrize("steps,gamma", SETTINGS)
def test_gmm_round_trip_is_exact(steps, gamma, capsys):
    gmm = GaussianMixture.random(4, 3, VPLinear(), seed=0)
    model = gmm.as_model()
    x0 = gmm.sample_x0(16, seed=1)
    err64 = relative_error(round_trip(model, x0, steps, gamma), x0)
    err32 = relative_error(round_trip(model, x0.float(), steps, gamma), x0.float())
    ddim = invert(model, x0, "ddim", steps)
    err_ddim = relative_error(sample(model, **ddim.sample_kwargs()), x0)
    with capsys.disabled():
        print(f"\nGMM, {steps} steps, γ={gamma}: BDIA round trip {err64:.1e} (float64), {err32:.1e} (float32); "
              f"naive DDIM inversion {err_ddim:.1e}")
    assert err64 <= 1e-10 and err32 <= 1e-5
    assert err_ddim > 1e-3  # the approximate inversion really is approximate here


def test_edm_round_trip_float64():
    gmm = GaussianMixture.random(4, 3, EDM(), seed=0)
    x0 = gmm.sample_x0(8, seed=2)
    for steps, gamma in SETTINGS:
        assert relative_error(round_trip(gmm.as_model(), x0, steps, gamma), x0) <= 1e-10


@pytest.mark.parametrize("steps,gamma", SETTINGS)
def test_digits16_round_trip_is_exact(steps, gamma):
    model = load_model("digits16")
    images, labels = digits("test")
    x0 = images[:8]
    labels = labels[:8]
    err32 = relative_error(round_trip(model, x0, steps, gamma, class_labels=labels), x0)
    model64 = load_model("digits16", dtype=torch.float64)
    err64 = relative_error(round_trip(model64, x0.double(), steps, gamma, class_labels=labels), x0.double())
    assert err32 <= 1e-5 and err64 <= 1e-10, (err32, err64)


def test_inversion_reports_nfe_and_samples_skip_the_first_step():
    model = GaussianMixture.random(2, 2, VPLinear()).as_model()
    inv = invert(model, torch.zeros(3, 2, dtype=torch.float64), "bdia", 10)
    assert inv.nfe == 10 and inv.extra["gamma"] == 0.5  # the paper's γ at 10 steps
    model.reset_nfe()
    sample(model, **inv.sample_kwargs())
    assert model.nfe == 9  # the pair (x_0, x_1) is given: no first DDIM step
    assert invert(model, torch.zeros(3, 2, dtype=torch.float64), "bdia", 11).extra["gamma"] == 1.0


def test_bad_input_before_any_network_call():
    model = GaussianMixture.random(2, 2, VPLinear()).as_model()
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    cases = [
        (dict(sampler="bdia", gamma=0.0), "gamma=0 makes BDIA plain DDIM"),
        (dict(sampler="bdia", gamma=1.5), r"gamma: expected a value in \[0, 1\], got 1.5"),
        (dict(sampler="bdia", gamma=-0.1), r"gamma: expected a value in \[0, 1\]"),
        (dict(sampler="dpm_solver_pp"), "sampler 'dpm_solver_pp' cannot invert; samplers with an inversion: bdia, ddim"),
        (dict(sampler="bdia", steps=1), "at least 2 steps"),
        (dict(sampler="bdia", t_end=0.0), "invert needs t_end > 0"),
        (dict(sampler="ddim", eta=1.0), "needs eta=0"),
    ]
    for kwargs, match in cases:
        kwargs = {"steps": 10, **kwargs}
        with pytest.raises(ValueError, match=match):
            invert(model, x0, kwargs.pop("sampler"), kwargs.pop("steps"), **kwargs)
    with pytest.raises(ValueError, match=r"x_T: expected shape \(batch, 2\)"):
        invert(model, torch.zeros(3, 5), "bdia", 10)
    with pytest.raises(ValueError, match="x_next: expected the shape of x_T"):
        sample(model, "bdia", 10, x_T=x0, x_next=torch.zeros(3, 3))
    assert model.nfe == 0
    with pytest.warns(UserWarning, match="round-off grows"):
        invert(model, x0, "bdia", 30, gamma=0.5)
