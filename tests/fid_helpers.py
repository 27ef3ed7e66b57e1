"""Shared pieces of the FID tests: a tiny random 1×16×16 diffusers model (digits-shaped, so the FID-digits
features apply) and a runner for the command line that returns (exit status, stdout, stderr)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_digit_model(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def write_pngs(folder: Path, images: np.ndarray, start: int = 0) -> Path:
    """uint8 (N, H, W) or (N, H, W, 3) arrays as PNG files 000000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{start + i:06d}.png")
    return folder


def env_one_thread() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_module(args: list[str], timeout: float = 120, torchrun: int | None = None):
    """``python -m diffsolve.fid ARGS`` (or under torchrun with N processes) in a subprocess, one thread each."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "diffsolve.fid", "--", *args]
    else:
        cmd = [sys.executable, "-m", "diffsolve.fid", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_one_thread(), cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr
