"""The examples run as a user runs them (``python examples/<name>.py``), in a bounded form: few steps, one
digit, a tiny training run. Each checks what the example promises, not only that it exits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_restore_digits_writes_one_grid_of_every_task_and_method(tmp_path):
    from diffsolve.inverse.tasks import TASKS

    out = tmp_path / "grid.png"
    log = run_example("restore_digits.py", "--out", out, "--num", 1, "--dps-steps", 10, "--scale", 1)
    with Image.open(out) as im:
        width, height = im.size
    # tiles of 16 px with make_grid's padding: 5 columns (clean / measured / DPS / DDS / DAPS), a row per task
    assert 5 * 16 <= width < 5 * 16 + 5 * 4 and len(TASKS) * 16 <= height < len(TASKS) * (16 + 4)
    for name in TASKS:
        assert name in log


def test_edit_by_inversion_reconstructs_its_input(tmp_path):
    log = run_example("edit_by_inversion.py", "--index", 0, 1, "--target", 3, "--steps", 10, "--out-dir", tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"before.png", "reconstructed.png", "after_class3.png"}
    error = float(log.split("reconstruction error ")[1].split(";")[0])
    assert error < 1e-4, log  # BDIA is exactly invertible: float32 round-off only
    with Image.open(tmp_path / "before.png") as a, Image.open(tmp_path / "reconstructed.png") as b:
        assert a.size == b.size


@pytest.mark.slow
def test_train_digits16_resumes_and_writes_a_loadable_pipeline(tmp_path):
    from diffsolve import load_model, sample

    workdir, out = tmp_path / "work", tmp_path / "model"
    first = run_example("train_digits16.py", "--workdir", workdir, "--out", out, "--steps", 2, "--batch", 8,
                        "--checkpoint-every", 1, "--warmup", 1)
    assert "resumed" not in first and (workdir / "checkpoint.pt").exists()
    second = run_example("train_digits16.py", "--workdir", workdir, "--out", out, "--steps", 3, "--batch", 8,
                         "--checkpoint-every", 1, "--warmup", 1, "--force")  # replaces the first run's --out
    assert "resumed from" in second and "at step 2" in second
    model = load_model(str(out))
    x = sample(model, "ddim", 2, seeds=range(2), class_labels=[1, 2])
    assert x.shape == (2, 1, 16, 16) and bool(torch.isfinite(x).all())


def test_train_digits_features_writes_an_extractor_the_fid_code_reads(tmp_path):
    from diffsolve.data import digits
    from diffsolve.fid.features import DigitsFeatures

    out = tmp_path / "features.safetensors"
    log = run_example("train_digits_features.py", "--out", out, "--epochs", 1)
    assert "held-out accuracy" in log
    features = DigitsFeatures(str(out))
    f = features.features(digits("test")[0][:4])
    assert f.shape == (4, 64) and bool(torch.isfinite(f).all())
