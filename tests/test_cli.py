"""The diffsolve command line, run in-process through its entry point."""

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from diffsolve.cli import main

from conftest import make_tiny_unet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    DDPMPipeline(unet=make_tiny_unet(num_class_embeds=4), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def test_sample_writes_a_png_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--steps", "3", "--num", "5", "--out", str(out),
                 "--quiet", "--class", "1", "--guidance", "2.0", "--order", "1"]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 10, 3 * 10, 3)  # 5 samples → 2 rows of 3 tiles of 8×8 with 1-pixel borders
    assert "5 samples, 3 network evaluations" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_out_dir_one_png_per_seed(model_dir, tmp_path):
    assert main(["sample", "--model", str(model_dir), "--sampler", "ddim", "--steps", "2", "--num", "3",
                 "--seed", "10", "--out-dir", str(tmp_path / "many"), "--scale", "2", "--quiet", "--eta", "1.0"]) == 0
    files = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert files == ["000010.png", "000011.png", "000012.png"]
    assert np.asarray(Image.open(tmp_path / "many" / "000010.png")).shape == (16, 16, 3)


@pytest.mark.parametrize("args,message", [
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--bogus", "1"], r"unknown option\(s\) \['bogus'\]"),
    (["--steps", "0"], "steps: expected an integer >= 1"),
    (["--model", "/no/such/dir"], "model folder not found"),
])
def test_sample_errors(model_dir, tmp_path, capsys, args, message):
    base = ["sample", "--model", str(model_dir), "--num", "2", "--out", str(tmp_path / "x.png"), "--quiet"]
    assert main(base + args) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_usage_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["sample", "--num", "2"])  # neither --out nor --out-dir
    with pytest.raises(SystemExit):
        main(["samplers", "--extra", "1"])


def test_samplers_lists_options(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    assert "dpm_solver_pp" in out and "order=2" in out and "eta=0.0" in out


@pytest.mark.parametrize("sampler,options", [
    ("pndm", []), ("pndm", ["--method", "s_pndm"]), ("sa_solver", ["--tau", "1.0", "--predictor-order", "3"]),
    ("bdia", ["--gamma", "0.5"]),
])
def test_sample_with_each_sampler(model_dir, tmp_path, sampler, options):
    out = tmp_path / f"{sampler}.png"
    assert main(["sample", "--model", str(model_dir), "--sampler", sampler, "--steps", "5", "--num", "2",
                 "--out", str(out), "--quiet", *options]) == 0
    assert out.is_file()
