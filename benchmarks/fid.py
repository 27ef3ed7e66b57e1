"""FID pipeline benchmark: feature-extraction throughput, the cost of the Fréchet distance, and the wall time of
one ``diffsolve fid`` job on 1 process vs 2 torchrun processes (speed-up, and a check that the FID is identical).

    python benchmarks/fid.py [--num 1000 --steps 10 --model digits16 --inception-weights PATH]

Under other load, use ``--job-repeats 3``: the jobs then run interleaved and the fastest wall time of each is
reported. Throughput is the median of ``--repeats`` timed batches after a warm-up, on the CPU threads torch is given
(``OMP_NUM_THREADS``). The Inception figures use the real weights when ``--inception-weights`` (or
``$DIFFSOLVE_INCEPTION_WEIGHTS``) names them, else a randomly initialised network of the same architecture
(the cost is the same). The scale-out job runs as subprocesses: ``python -m diffsolve.fid`` with 1 thread,
the same with 2 threads, and ``torchrun --nproc_per_node 2`` (1 thread each, gloo), each in a fresh workdir;
wall time includes process start-up and model loading, as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def throughput(extractor, images: torch.Tensor, repeats: int) -> float:
    extractor(images[:2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def run_job(cmd: list[str], threads: int) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits16")
    parser.add_argument("--sampler", default="dpm_solver_pp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=125)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--job-repeats", type=int, default=1,
                        help="run the scale-out jobs this many times, interleaved, and report the fastest")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--skip-inception", action="store_true")
    args = parser.parse_args()

    from diffsolve.fid import DigitsFeatures, InceptionFeatures, frechet_distance, reference_statistics
    from diffsolve.fid.features import INCEPTION_ENV, save_random_inception_weights

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs\n")
    gen = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="diffsolve-fid-bench-"))
    rows = []
    digits = DigitsFeatures()
    imgs = torch.randint(0, 256, (1000, 1, 16, 16), generator=gen, dtype=torch.uint8)
    rows.append(("FID-digits CNN (64-d)", "16×16 grey", 1000, throughput(digits, imgs, args.repeats)))
    if not args.skip_inception:
        weights = args.inception_weights or os.environ.get(INCEPTION_ENV)
        label = "real weights"
        if not weights:
            weights, label = save_random_inception_weights(tmp / "random_inception.pth"), "random weights"
        inception = InceptionFeatures(weights)
        for size, batch in ((16, 32), (64, 32)):
            imgs = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)
            rows.append((f"Inception-v3 pool3 (2048-d, {label})", f"{size}×{size} RGB → 299²", batch,
                         throughput(inception, imgs, args.repeats)))
    print("| extractor | input | batch | images / s |\n|---|---|---:|---:|")
    for name, inp, batch, ips in rows:
        print(f"| {name} | {inp} | {batch} | {ips:.1f} |")

    print("\n| Fréchet distance | seconds |\n|---|---:|")
    rng = np.random.default_rng(0)
    for d in (64, 2048):
        x = rng.normal(size=(max(2 * d, 500), d))
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        start = time.perf_counter()
        frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1)
        print(f"| d = {d} | {time.perf_counter() - start:.2f} |")

    ref = tmp / "ref.npz"
    reference_statistics("digits", digits).save(ref)
    job = ["--model", args.model, "--sampler", args.sampler, "--steps", str(args.steps), "--num", str(args.num),
           "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size), "--ref", str(ref), "--quiet"]
    runs = [("1 process, 1 thread", [sys.executable, "-m", "diffsolve.fid"], 1),
            ("1 process, 2 threads", [sys.executable, "-m", "diffsolve.fid"], 2),
            ("torchrun, 2 processes × 1 thread (gloo)",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffsolve.fid",
              "--"], 1)]
    print(f"\nJob: {args.model}, {args.sampler}, {args.steps} steps, {args.num} samples, shards of {args.shard_size}, "
          "FID-digits\n")
    print("| run | wall s | speed-up vs 1 process × 1 thread | FID |\n|---|---:|---:|---:|")
    walls, fids = {name: [] for name, _, _ in runs}, []
    for rep in range(args.job_repeats):
        for i, (name, cmd, threads) in enumerate(runs):
            workdir = tmp / f"work{rep}-{i}"
            wall, _ = run_job([*cmd, *job, "--workdir", str(workdir)], threads)
            walls[name].append(wall)
            fids.append(json.loads((workdir / "result.json").read_text())["fid"])
    base = min(walls[runs[0][0]])
    for name, _, _ in runs:
        best = min(walls[name])
        print(f"| {name} | {best:.1f} | {base / best:.2f}× | {fids[[n for n, _, _ in runs].index(name)]!r} |")
    print(f"\nFID identical across the runs: {len(set(fids)) == 1}")


if __name__ == "__main__":
    main()
