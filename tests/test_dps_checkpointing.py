"""DPS ``checkpointing=True``: activation checkpointing of the UNet blocks during the DPS gradient changes the
result by no more than round-off, recomputes each block in the backward pass, and leaves the network as it was."""

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from diffsolve import load_model, solve
from diffsolve.inverse import Inpainting
from diffsolve.schedules import VPLinear
from diffsolve.testing import GaussianMixture


def _count_resnet_forwards(monkeypatch) -> list[int]:
    """Counts ResnetBlock2D.forward runs, the checkpointed recomputations included (they bypass module hooks)."""
    calls, forward = [0], ResnetBlock2D.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock2D, "forward", counted)
    return calls


def test_checkpointing_changes_dps_by_round_off_only(monkeypatch):
    model = load_model("digits16")
    shape = model.sample_shape
    mask = torch.ones(shape)
    mask[:, 4:12, 4:12] = 0
    op = Inpainting(mask)
    y = op.A(torch.rand(2, *shape) * 2 - 1)
    calls = _count_resnet_forwards(monkeypatch)
    plain = solve(model, op, y, "dps", noise=0.05, steps=4, zeta=0.5)
    forward_only = calls[0]
    calls[0] = 0
    checkpointed = solve(model, op, y, "dps", noise=0.05, steps=4, zeta=0.5, checkpointing=True)
    # every ResNet but the middle block's first (10 of 11) runs again in the backward pass: that is
    # the memory saving and its time cost
    assert forward_only == 4 * 11 and calls[0] == forward_only + 4 * 10
    assert not model.net.is_gradient_checkpointing  # restored
    assert torch.isfinite(plain).all()
    scale = plain.abs().max()
    assert (checkpointed - plain).abs().max() <= 1e-6 * scale


def test_checkpointing_needs_a_network_that_supports_it():
    model = GaussianMixture.random(4, 2, VPLinear(), seed=0).as_model()
    op = Inpainting(torch.ones(4))
    with pytest.raises(ValueError, match="checkpointing=True needs a diffusers network"):
        solve(model, op, torch.zeros(1, 4), "dps", noise=0.05, steps=2, checkpointing=True)
    with pytest.raises(ValueError, match="checkpointing: expected True or False, got 1"):
        solve(model, op, torch.zeros(1, 4), "dps", noise=0.05, steps=2, checkpointing=1)
