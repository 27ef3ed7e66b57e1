"""``diffsolve degrade`` / ``restore`` / ``solvers``, run in-process on a tiny random 3×8×8 model."""

import re

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from diffsolve.cli import main

from conftest import make_tiny_unet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clean_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "clean.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def png(path):
    return np.asarray(Image.open(path))


def test_degrade_writes_a_seeded_measurement(clean_png, tmp_path, capsys):
    out = tmp_path / "sr.png"
    assert main(["degrade", "--task", "sr4", "--input", str(clean_png), "--out", str(out), "--seed", "3"]) == 0
    assert png(out).shape == (2, 2, 3)  # ×4 down from 8×8
    assert "sr4: 3-channel 8×8 -> 3-channel 2×2 measurement" in capsys.readouterr().out
    again = tmp_path / "sr2.png"
    main(["degrade", "--task", "sr4", "--input", str(clean_png), "--out", str(again), "--seed", "3"])
    assert np.array_equal(png(out), png(again))
    other = tmp_path / "sr3.png"
    main(["degrade", "--task", "sr4", "--input", str(clean_png), "--out", str(other), "--seed", "4"])
    assert not np.array_equal(png(out), png(other))


@pytest.mark.parametrize("task,method", [("inpaint_box", "dds"), ("sr4", "dps"), ("motion_blur", "daps_100")])
def test_restore_round_trip(model_dir, clean_png, tmp_path, capsys, task, method):
    degraded, restored = tmp_path / "y.png", tmp_path / "x.png"
    assert main(["degrade", "--task", task, "--input", str(clean_png), "--out", str(degraded), "--mask-seed", "2"]) == 0
    steps = {"dds": "3", "dps": "3", "daps_100": "2"}[method]
    assert main(["restore", "--model", str(model_dir), "--task", task, "--method", method, "--input", str(degraded),
                 "--out", str(restored), "--reference", str(clean_png), "--steps", steps, "--mask-seed", "2",
                 "--quiet"]) == 0
    assert png(restored).shape == (8, 8, 3)
    out = capsys.readouterr().out
    assert re.search(rf"{method} on {task}: \d+ network evaluations", out)
    assert re.search(r"PSNR -?\d+\.\d+ dB, SSIM -?\d\.\d+ \(pseudo-inverse of the measurement: PSNR", out)


@pytest.mark.parametrize("args,message", [
    (["--task", "sr4"], r"--input: expected a 3-channel 2×2 image \(the sr4 measurement of the model's 3-channel 8×8 "
                        r"images\), got a 3-channel 8×8 image \(.*clean\.png\); pass --resize to center-crop and "
                        r"resize it to 2×2$"),
    (["--task", "denoise", "--gray-input"], r"--input: expected a 3-channel 8×8 image .* got a 1-channel 8×8 image "
                                            r"\(.*gray\.png\); pass --resize .* and convert it to 3 channels"),
    (["--task", "denoise", "--method", "dds", "--zeta", "0.1"], r"'zeta' is an option of dps"),
    (["--task", "denoise", "--method", "nope"], "unknown solver 'nope'"),
    (["--task", "blur"], "unknown task 'blur'; valid tasks: inpaint_box, inpaint_random, sr4"),
    (["--task", "denoise", "--sigma-y", "-0.1"], r"--sigma-y: expected a noise level >= 0"),
    (["--task", "denoise", "--steps", "0"], "steps: expected an integer >= 1"),
    (["--task", "denoise", "--reference-small"], r"--reference: expected a 3-channel 8×8 image \(the model's image "
                                                 r"size\), got a 3-channel 4×4 image \(.*small\.png\); pass --resize"),
    (["--task", "denoise", "--missing-input"], "--input: no such file"),
])
def test_restore_errors(model_dir, clean_png, tmp_path, capsys, args, message):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(small)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(gray)
    inp = str(clean_png)
    extra = []
    for a in args:
        if a == "--gray-input":
            inp = str(gray)
        elif a == "--missing-input":
            inp = str(tmp_path / "nothing.png")
        elif a == "--reference-small":
            extra += ["--reference", str(small)]
        else:
            extra.append(a)
    out = tmp_path / "x.png"
    code = main(["restore", "--model", str(model_dir), "--input", inp, "--out", str(out), "--quiet", "--steps", "2"]
                + extra)
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_solvers_lists_methods(capsys):
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    for name in ("dps", "dds", "daps", "daps_100"):
        assert re.search(rf"^{name}\s", out, re.M)
    assert "zeta=1.0" in out and "cg_steps=5" in out and "langevin_steps=100" in out


def test_phase_retrieval_round_trip_through_npy(model_dir, clean_png, tmp_path, capsys):
    """Fourier magnitudes are not an image: degrade writes them unclipped as .npy and restore reads them."""
    degraded, restored = tmp_path / "y.npy", tmp_path / "x.png"
    assert main(["degrade", "--task", "phase_retrieval", "--input", str(clean_png), "--out", str(degraded)]) == 0
    y = np.load(degraded)
    assert y.shape == (3, 12, 12) and y.dtype == np.float64 and float(y.max()) > 1.0  # a PNG would clip these
    assert main(["restore", "--model", str(model_dir), "--task", "phase_retrieval", "--method", "daps_100",
                 "--input", str(degraded), "--out", str(restored), "--reference", str(clean_png), "--steps", "2",
                 "--quiet"]) == 0
    assert png(restored).shape == (8, 8, 3)
    assert "PSNR (up to the measurement's ambiguities)" in capsys.readouterr().out


@pytest.mark.parametrize("task,out,message", [
    ("phase_retrieval", "y.png", r"--out: the phase_retrieval measurement is not an image .* expected a \.npy file"),
    ("sr4", "y.npy", r"--out: the sr4 measurement is an image: expected a \.png file"),
])
def test_degrade_refuses_the_wrong_file_kind(clean_png, tmp_path, capsys, task, out, message):
    assert main(["degrade", "--task", task, "--input", str(clean_png), "--out", str(tmp_path / out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / out).exists()


def test_restore_checks_the_npy_measurement(model_dir, tmp_path, capsys):
    wrong = tmp_path / "y.npy"
    np.save(wrong, np.zeros((3, 8, 8)))
    code = main(["restore", "--model", str(model_dir), "--task", "phase_retrieval", "--method", "daps_100",
                 "--input", str(wrong), "--out", str(tmp_path / "x.png"), "--steps", "2", "--quiet"])
    assert code == 2
    assert re.search(r"--input: expected a real array of shape \(3, 12, 12\) .* got a float64 array of shape "
                     r"\(3, 8, 8\)", capsys.readouterr().err)
