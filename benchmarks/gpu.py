"""Sampling throughput against the bare-network bound: images per second of ``diffsolve.sample`` (DDIM,
DPM-Solver++, DPM-Solver-v3 on random statistics) and of diffusers' pipeline with the same scheduler, next to
"bare network forwards back to back" (NFE forwards of the same network, precision and execution mode, no
sampler), all in one run.

    python benchmarks/gpu.py                        # CUDA: CIFAR-10 DDPM UNet and FFHQ-256 ADM, batch 1/16/256
    OMP_NUM_THREADS=1 python benchmarks/gpu.py --device cpu   # the same table at a small size (CPU)

Networks (random weights: only the shape matters for timing): ``cifar`` is diffusers' ``UNet2DModel`` with
the DDPM-CIFAR10 configuration (35.7 M parameters); ``ffhq`` the FFHQ-256 ADM configuration of DPS/DAPS'
``ffhq_10m.pt`` (128 channels, multipliers 1,1,2,2,4,4, one res-block per level, attention at 16×16, 64-channel
heads, scale-shift norm, res-block up/down-sampling, learned σ) expressed as a ``UNet2DModel``. On CPU both
shrink (``--small``, the default there): a quarter of the channels and half (CIFAR) or a quarter (FFHQ) of the
resolution, so the table
runs in minutes on one thread.

Precisions: the network in float32, bfloat16 or float16 (weights cast; the sampler state stays float32).
Modes: ``eager``; ``compile`` (``sample(..., compile=True)``, diffusers' pipeline with ``torch.compile(unet)``);
``cuda_graph`` (``sample(..., cuda_graph=True)``, CUDA only; diffusers has no counterpart: "–"). The bound
of each mode runs the network the same way (compiled, or replayed from its graph). Targets on a GPU: ≥ 0.95
of the bound at batch 256, ≥ 0.9 at batch 1 with CUDA graphs.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffsolve import DiffusionModel, sample
from diffsolve.model import CapturedNetwork
from diffsolve.schedules import DiscreteVP
from diffsolve.testing import random_ems

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cifar_unet(small: bool) -> UNet2DModel:
    """google/ddpm-cifar10-32's configuration (35.7 M parameters)."""
    width = 32 if small else 128
    return UNet2DModel(
        sample_size=16 if small else 32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8 if small else 32,
    )


def ffhq_adm_unet(small: bool) -> UNet2DModel:
    """DPS/DAPS' FFHQ-256 ADM (guided-diffusion flags of ffhq_10m.pt) as a UNet2DModel of the same shape."""
    width = 32 if small else 128
    return UNet2DModel(
        sample_size=64 if small else 256, in_channels=3, out_channels=6, layers_per_block=1,
        block_out_channels=tuple(width * m for m in (1, 1, 2, 2, 4, 4)),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        attention_head_dim=16 if small else 64, resnet_time_scale_shift="scale_shift",
        downsample_type="resnet", upsample_type="resnet", norm_num_groups=8 if small else 32,
    )


NETWORKS = {"cifar": cifar_unet, "ffhq": ffhq_adm_unet}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (compilation, graph capture, allocator)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def rows_for(model: DiffusionModel, compiled_unet, batch: int, dtype: torch.dtype, mode: str, steps: int,
             repeats: int, device: torch.device, ems_file: Path):
    """(label, images per second) of every sampler, and the bound, for one network/batch/precision/mode; the
    model and the compiled UNet are made once per network and precision (compilations are reused)."""
    unet = model.net
    shape = (batch, *model.sample_shape)
    flags = {"compile": mode == "compile", "cuda_graph": mode == "cuda_graph"}
    seeds = range(batch)

    # the bound: NFE forwards of the same network run the same way, back to back
    network = model.accelerated_network(**flags) or model.raw_network
    x = torch.randn(shape, device=device, dtype=dtype)
    net_time = torch.full((batch,), 500.0, device=device)
    with torch.no_grad():
        forwards = best_seconds(lambda: [network(x, net_time, {}) for _ in range(steps)], repeats, device)
    rows = [("bare forwards (bound)", batch / forwards)]

    runs = {"diffsolve ddim": ("ddim", {}), "diffsolve dpm_solver_pp": ("dpm_solver_pp", {}),
            "diffsolve dpm_solver_v3": ("dpm_solver_v3", {"ems": str(ems_file), "grid": "logSNR"})}
    for label, (sampler, options) in runs.items():
        seconds = best_seconds(lambda: sample(model, sampler, steps, seeds=seeds, **flags, **options), repeats, device)
        rows.append((label, batch / seconds))

    if mode != "cuda_graph":
        pipe_unet = compiled_unet if mode == "compile" else unet
        for label, scheduler in (("diffusers DDIMScheduler", DDIMScheduler(**SCHEDULE)),
                                 ("diffusers DPMSolverMultistepScheduler", DPMSolverMultistepScheduler(**SCHEDULE))):
            pipe = DDPMPipeline(unet=pipe_unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator(device).manual_seed(0)
            # "pt": the pipeline's numpy conversion fails on half-precision images (its state is in the UNet's dtype)
            run = lambda: pipe(batch_size=batch, num_inference_steps=steps, generator=generator,  # noqa: E731
                               output_type="pt")
            rows.append((label, batch / best_seconds(run, repeats, device)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 16 256 (CUDA), 1 4 (CPU)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                    help="default: all three on CUDA, float32 bfloat16 on CPU")
    ap.add_argument("--modes", nargs="+", default=None, choices=["eager", "compile", "cuda_graph"],
                    help="default: all three on CUDA, eager compile on CPU")
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (CUDA), 5 (CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                    help="quarter-width, lower-resolution networks (default on CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batches = args.batches or ([1, 16, 256] if cuda else [1, 4])
    dtypes = args.dtypes or (list(DTYPES) if cuda else ["float32", "bfloat16"])
    modes = args.modes or (["eager", "compile", "cuda_graph"] if cuda else ["eager", "compile"])
    steps = args.steps or (20 if cuda else 5)
    small = (not cuda) if args.small is None else args.small
    if "cuda_graph" in modes and not cuda:
        raise SystemExit("--modes cuda_graph needs --device cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
          f"{steps} steps, {'small ' if small else ''}networks, best of {args.repeats}; images per second and the "
          "fraction of the bound (bare forwards back to back, NFE = steps)\n")
    print("| network | batch | precision | mode | bound (img/s) | diffsolve ddim | diffsolve dpm_solver_pp "
          "| diffsolve dpm_solver_v3 | diffusers DDIM | diffusers DPM-Solver++ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.networks:
        torch.manual_seed(0)
        base = NETWORKS[name](small).eval().requires_grad_(False).to(device)
        params = sum(p.numel() for p in base.parameters()) / 1e6
        for dtype_name in dtypes:
            unet = copy.deepcopy(base).to(DTYPES[dtype_name])
            if unet.config.out_channels == 2 * unet.config.in_channels:
                # learned σ: diffusers' DDIM/DPM-Solver schedulers expect ε alone (diffsolve drops the rest itself)
                unet.register_forward_hook(lambda module, args, out: UNet2DOutput(out.sample[:, : args[0].shape[1]]))
            model = DiffusionModel(unet, DiscreteVP.from_config(SCHEDULE))
            ems_file = Path(tempfile.mkdtemp()) / "ems.safetensors"  # statistics are tied to the weights' dtype
            random_ems(model, n_lambda=120).save(ems_file)
            compiled_unet = torch.compile(unet) if "compile" in modes else None
            for batch in batches:
                for mode in modes:
                    label = f"| {name} ({params:.1f} M) | {batch} | {dtype_name} | {mode} |"
                    try:
                        rows = dict(rows_for(model, compiled_unet, batch, DTYPES[dtype_name], mode, steps,
                                             args.repeats, device, ems_file))
                    except torch.OutOfMemoryError:
                        print(f"{label} out of memory |||||")
                        torch.cuda.empty_cache()
                        continue
                    bound = rows["bare forwards (bound)"]
                    cells = [f"{rows[k]:.2f} ({rows[k] / bound:.2f})" if k in rows else "–" for k in (
                        "diffsolve ddim", "diffsolve dpm_solver_pp", "diffsolve dpm_solver_v3",
                        "diffusers DDIMScheduler", "diffusers DPMSolverMultistepScheduler")]
                    print(f"{label} {bound:.2f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
