"""FID-digits on the shipped digits16 model: it orders quality as it should — real held-out digits are closest
to the training digits, then 20-step samples, far ahead of 2-step samples and of noise (values printed)."""

import pytest
import torch

from diffsolve import load_model
from diffsolve.data import digits
from diffsolve.fid import ModelSource, Statistics, get_extractor, reference_statistics, to_uint8

N = 300  # as many as the held-out digits: FID's small-sample bias is then the same for every set


@pytest.mark.slow
def test_fid_digits_orders_real_20_step_2_step_and_noise():
    extractor = get_extractor("digits")
    train = reference_statistics("digits:train", extractor)

    def fid(images):
        return Statistics.from_features(extractor(images).numpy(), extractor.id, kid_max=0).fid(train)

    model = load_model("digits16")
    values = {"held-out digits": fid(to_uint8(digits("test")[0]))}
    for steps in (20, 2):
        source = ModelSource("digits16", "dpm_solver_pp", steps)
        source._model = model
        values[f"dpm_solver_pp, {steps} steps"] = fid(source.images(0, N)[0])
    gen = torch.Generator().manual_seed(0)
    values["uniform noise"] = fid(torch.randint(0, 256, (N, 1, 16, 16), generator=gen, dtype=torch.uint8))
    print("FID-digits vs the training digits: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    real, good, bad, noise = values.values()
    assert real < good < bad < noise
    assert real < 5
    assert 3 * good < bad  # 20 steps are far closer than 2 steps
