import contextlib
import logging
import os

# Tests never touch the network: huggingface_hub reads this at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def make_tiny_unet(seed: int = 0, num_class_embeds: int | None = None, out_channels: int = 3):
    """A randomly initialised diffusers UNet2DModel small enough for CPU unit tests."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )
    return unet.eval().requires_grad_(False)


@contextlib.contextmanager
def diffusers_log():
    """The messages diffusers logs inside the block. Its logger does not propagate (a caplog or stderr check
    misses them): a handler on it sees every one."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        yield messages
    finally:
        diffusers_logger.removeHandler(handler)


def assert_cast_copy(module, reference, dtype):
    """Every floating-point tensor of ``module``'s state is ``reference``'s rounded to ``dtype``; others equal."""
    for (name, p), q in zip(module.state_dict().items(), reference.state_dict().values()):
        expected = q.to(dtype) if q.is_floating_point() else q
        assert p.dtype == expected.dtype and torch.equal(p, expected), name


class CountingNet:
    """A plain callable that records its calls (to prove errors come before any network call)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="session")
def fid_model_and_reference(tmp_path_factory):
    """A tiny random digits-shaped diffusers pipeline folder and FID-digits statistics of the held-out digits,
    shared by the FID run, sweep and torchrun tests."""
    from diffsolve.cli import main
    from fid_helpers import make_digit_model

    root = tmp_path_factory.mktemp("fid")
    ref = root / "ref.npz"
    assert main(["fid-ref", "--data", "digits:test", "--out", str(ref)]) == 0
    return make_digit_model(root / "model"), ref
