"""The shipped digits16 model: loads as a real diffusers pipeline and samples recognisable digits.

The judge is a logistic-regression classifier trained on the real digits (``diffsolve.data.classify``,
97 % held-out accuracy), which nobody tuned to these samples.
"""

import pytest
import torch

from diffsolve import load_model, sample
from diffsolve.data import classify, digits
from diffsolve.loading import SHIPPED
from diffsolve.schedules import DiscreteVP


@pytest.fixture(scope="module")
def model():
    return load_model("digits16")


def test_shipped_model_is_a_small_diffusers_pipeline(model):
    folder = SHIPPED["digits16"]
    assert (folder / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 5 * 2**20, f"{size / 2**20:.1f} MB"
    assert isinstance(model.schedule, DiscreteVP) and model.schedule.num_train_timesteps == 1000
    assert model.prediction == "epsilon" and model.num_classes == 10 and model.sample_shape == (1, 16, 16)
    assert 0.9e6 <= sum(p.numel() for p in model.net.parameters()) <= 1.3e6


SEEDS = range(500)


def confident(probs):
    return (probs.max(1).values >= 0.9).double()


def smallest_class_share(probs):
    return (torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)).min().item()


@pytest.fixture(scope="module")
def converged(model):
    """Class probabilities of the near-converged PF-ODE solution from the check's seeds: DPM-Solver++ 3M, 50 logSNR
    steps (its classes agree with 100 steps' on 99.6 % of these seeds, its confident share is the same 0.792)."""
    return classify(sample(model, "dpm_solver_pp", 50, seeds=SEEDS, grid="logSNR", order=3, third_order="exact"))


@pytest.mark.slow
def test_unconditional_samples_are_confident_digits_of_every_class(converged):
    """The model's check, on the near-converged solution so that no sampler's grid enters it: ≥ 90 % of the
    held-out real digits' confident share (measured 0.792 against 0.789 required on these 500 seeds; 0.796 ±
    0.009 on 2000, benchmarks/digits16_quality.py; on seeds 500–999 it is 0.77: the threshold sits at the model's
    own level, so this check is about the model and its seeds, not about a sampler). Every class near its share
    0.10: ≥ 0.06, three binomial standard errors (0.013 at n = 500) below it (measured smallest 0.086 here, 0.069–
    0.089 on other sets of 1000)."""
    real_confident = confident(classify(digits("test")[0])).mean().item()
    share = confident(converged).mean().item()
    print(f"\nconverged solution: confident {share:.3f}, smallest class {smallest_class_share(converged):.3f}")
    assert share >= 0.9 * real_confident, f"{share:.3f} of samples vs {real_confident:.3f} of real digits"
    assert smallest_class_share(converged) >= 0.06


@pytest.mark.slow
@pytest.mark.parametrize("sampler,steps", [("dpm_solver_pp", 20), ("dpm_solver_v3", 10)])
def test_default_grid_samples_are_the_converged_digits(model, converged, sampler, steps):
    """Each sampler at the check's step count on its default grid (DPM-Solver++ 2M logSNR at 20 steps, v3
    time-quadratic at 10 NFE), against the near-converged solution from the same seeds: the classifier assigns
    the same class to ≥ 95 % of the samples (measured 0.970 and 0.974), the confident share is not below the
    converged one by more than three paired standard errors (measured −0.012 ± 0.008 and −0.016 ± 0.011), and
    every class keeps ≥ 0.06. Why not the model's threshold on the raw share: the converged solution itself sits
    at it (0.792 vs 0.789), so the share of a 10–20-step run lands above or below it by which samples its grid
    produces: the time-uniform grid gives 0.810 and 0.816 here while being further from the converged solution
    (RMSE 0.032 vs 0.029 for DPM-Solver++ and 0.045 vs 0.037 for v3 on 1000 seeds, benchmarks/RESULTS.md)."""
    probs = classify(sample(model, sampler, steps, seeds=SEEDS))
    agreement = (probs.argmax(1) == converged.argmax(1)).double().mean().item()
    diff = confident(probs) - confident(converged)
    se = diff.std().item() / len(diff) ** 0.5
    print(f"\n{sampler} {steps} on its default grid: same class as the converged solution {agreement:.3f}, confident "
          f"{confident(probs).mean().item():.3f} (converged {confident(converged).mean().item():.3f}; paired "
          f"{diff.mean().item():+.3f} ± {se:.3f}), smallest class {smallest_class_share(probs):.3f}")
    assert agreement >= 0.95, agreement
    assert diff.mean().item() >= -3 * se, (diff.mean().item(), se)
    assert smallest_class_share(probs) >= 0.06


@pytest.mark.slow
def test_guided_samples_have_the_requested_class(model):
    labels = torch.arange(10).repeat_interleave(20)
    x = sample(model, "dpm_solver_pp", 20, seeds=range(200), class_labels=labels, guidance_scale=2.0)
    hit = (classify(x).argmax(1) == labels).float().mean().item()
    assert hit >= 0.95, f"requested class in {hit:.3f} of the samples"
