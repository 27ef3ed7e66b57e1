"""Restoration at the papers' size: the task presets' 256×256 settings (and digits16's, unchanged, at 16×16),
``diffsolve.solve`` and ``python -m diffsolve degrade/restore`` on colour images with a tiny random-weight
256×256 RGB UNet (4–8 channels, no attention: one forward is ~0.1 s on a core), image files (PNG, JPEG,
``--resize``) and the bad-input errors."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffsolve import DiffusionModel, solve
from diffsolve.cli import main
from diffsolve.images import load_image
from diffsolve.inverse import Blur, Inpainting, measure, motion_kernel
from diffsolve.inverse.tasks import get_task
from diffsolve.schedules import DiscreteVP

RGB256 = (3, 256, 256)
ROOT = Path(__file__).resolve().parents[1]


def tiny_rgb_unet(size: int = 256):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False).eval().requires_grad_(False)


def model_folder(folder: Path, size: int = 256) -> Path:
    """A diffusers pipeline folder of the tiny RGB UNet at size×size."""
    DDPMPipeline(unet=tiny_rgb_unet(size), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("models") / "rgb256")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth colour 'photo' of another size and aspect ratio than the model's, as JPEG and PNG."""
    folder = tmp_path_factory.mktemp("img")
    yy, xx = np.mgrid[0:300, 0:400] / 300.0
    rgb = np.stack([np.sin(6 * xx) * 0.5 + 0.5, np.cos(5 * yy) * 0.5 + 0.5, (xx * yy) % 1.0], -1)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8))
    img.save(folder / "photo.jpg", quality=95)
    img.save(folder / "photo.png")
    return folder


# ---- the settings -------------------------------------------------------------------------------------------


def test_papers_settings_at_256():
    """At 256×256 each task is the papers' operator, against oracles built here from the papers' numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *RGB256, generator=g, dtype=torch.float64)

    box = get_task("inpaint_box").operator(RGB256, seed=5)
    hole = box.mask == 0
    assert int(hole.sum()) == 3 * 128 * 128 and torch.equal(hole[0], hole[2])  # 128×128, every channel
    rows, cols = hole[0].any(1).nonzero().flatten(), hole[0].any(0).nonzero().flatten()
    assert len(rows) == len(cols) == 128 and rows[0] >= 16 and rows[-1] <= 255 - 16 and cols[0] >= 16
    assert box.box_position == Inpainting.box(RGB256, 128, margin=16, seed=5).box_position

    rand = get_task("inpaint_random").operator(RGB256, seed=5)
    assert int((rand.mask[0] == 0).sum()) == round(0.7 * 256 * 256) and torch.equal(rand.mask[0], rand.mask[1])

    sr = get_task("sr4").operator(RGB256)
    assert sr.shape_out == (3, 64, 64)
    ref = F.interpolate(x, size=(64, 64), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(sr.A(x), ref, atol=1e-10)

    gauss = get_task("gauss_blur").operator(RGB256)
    delta = np.zeros((61, 61))
    delta[30, 30] = 1.0  # scipy's Gaussian of a delta, radius 30 = truncate·σ: the papers' 61×61, σ = 3 kernel
    oracle = scipy.ndimage.gaussian_filter(delta, 3.0, truncate=10.0, mode="constant")
    assert gauss.kernel.shape == (61, 61) and np.allclose(gauss.kernel.numpy(), oracle, atol=1e-12)
    assert gauss.padding == "circular"

    motion = get_task("motion_blur").operator(RGB256, seed=7)
    assert torch.equal(motion.kernel, motion_kernel(61, 0.5, seed=7))

    for name in ("inpaint_box", "inpaint_random", "sr4", "gauss_blur", "motion_blur"):
        assert get_task(name).noise().sigma == pytest.approx(0.05)  # σ_y = 0.05 on [−1, 1]
    # the papers' solver options: DPS's ζ of the official configs, DDS's η = 0.85, DAPS's official ones
    zeta = {"inpaint_box": 0.5, "inpaint_random": 0.5, "sr4": 0.3, "gauss_blur": 0.3, "motion_blur": 0.3}
    for name, z in zeta.items():
        task = get_task(name)
        assert task.solver_options("dps", RGB256) == {"zeta": pytest.approx(z)}
        assert task.solver_options("dds", RGB256).get("eta", 0.85) == 0.85
        papers_daps = task.solver_options("daps", RGB256)
        # σ_min: the official 0.1 (the solver's default); digits16 lowers it to 0.01 on some tasks
        assert papers_daps.get("sigma_min", 0.1) == 0.1
        assert papers_daps == {k: v for k, v in task.solver_options("daps").items() if k != "sigma_min"}
        assert "the papers' 256×256 setting" in str(task.setting(RGB256))


def test_digits16_presets_unchanged():
    """The tuned 16×16 presets, number by number as they were before the 256×256 settings."""
    shape = (1, 16, 16)
    box = get_task("inpaint_box").operator(shape, seed=3)
    assert int((box.mask == 0).sum()) == 64 and box.box_position == Inpainting.box(shape, 8, margin=1, seed=3).box_position
    assert torch.equal(get_task("gauss_blur").operator(shape).kernel, Blur.gaussian(1.5, shape=shape, size=9).kernel)
    assert torch.equal(get_task("motion_blur").operator(shape, seed=2).kernel, motion_kernel(9, 0.5, seed=2))
    assert get_task("sr4").operator(shape).shape_out == (1, 4, 4)
    assert get_task("denoise").noise().sigma == pytest.approx(0.4)
    expected = {
        "inpaint_box": ({"zeta": 0.25}, {"eta": 0.5}, {"lr": 5e-5}),
        "inpaint_random": ({"zeta": 0.25}, {"eta": 0.5}, {"lr": 1e-4}),
        "sr4": ({"zeta": 0.15}, {}, {"lr": 1e-4}),
        "gauss_blur": ({"zeta": 0.15}, {"eta": 1.0}, {"lr": 1e-4}),
        "motion_blur": ({"zeta": 0.15}, {"eta": 1.0}, {"lr": 5e-5}),
        "denoise": ({"zeta": 0.15}, {"eta": 1.0}, {"lr": None}),
    }
    for name, (dps, dds, daps) in expected.items():
        task = get_task(name)
        assert task.solver_options("dps") == pytest.approx(dps) and task.solver_options("dds") == dds
        assert task.solver_options("daps_100")["lr"] == daps["lr"]
        assert task.solver_options("dps", (3, 16, 16)) == task.solver_options("dps")


def test_other_sizes_scale_the_nearer_reference():
    """Sides ≥ 64 scale the papers' lengths, smaller sides digits16's (the rule of the tasks module)."""
    s64, s512, s8 = (t.setting((3, n, n)) for t, n in ((get_task("inpaint_box"), 64), (get_task("gauss_blur"), 512),
                                                       (get_task("motion_blur"), 8)))
    assert s64.geometry == {"box": 32, "margin": 4} and s64.reference == 256
    assert s512.geometry == {"sigma": 6.0, "kernel": 121}
    assert s8.geometry == {"kernel": 5} and s8.reference == 16
    assert get_task("gauss_blur").setting((3, 63, 63)).reference == 16
    # kernel half-widths round to nearest (as the digits16 rule always did: 14 px → half-width 3.5 → 9×9)
    assert get_task("gauss_blur").setting((3, 64, 64)).geometry == {"sigma": 0.75, "kernel": 17}
    assert get_task("motion_blur").operator((1, 14, 14)).kernel.shape == (9, 9)
    assert int((get_task("inpaint_box").operator((3, 64, 64)).mask[0] == 0).sum()) == 32 * 32


def test_a_setting_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match=r"task sr4: its setting for 3×250×250 images, the papers' 256×256 setting "
                                         r"scaled ×0\.976562, does not fit them \(shape: .*divisible by 4.*--resize"):
        get_task("sr4").operator((3, 250, 250))


# ---- solve() and the command line at 256×256 ---------------------------------------------------------------


@pytest.mark.parametrize("task,method,steps,extra", [("inpaint_box", "dds", 2, {}), ("sr4", "dps", 2, {}),
                                                     ("inpaint_random", "daps_100", 1, {"langevin_steps": 5})])
def test_solve_restores_rgb_256(task, method, steps, extra):
    """The Python API on a 256×256 colour image with each task's 256×256 preset: shapes, finiteness, seeding
    (DAPS with 5 of its 100 Langevin steps: 100 draws of a 256×256×3 image take seconds on a core)."""
    model = DiffusionModel(tiny_rgb_unet(), DiscreteVP.from_config({}), "epsilon")
    assert model.sample_shape == RGB256
    t = get_task(task)
    op = t.operator(model.sample_shape, seed=1)
    x = torch.rand(1, *RGB256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = measure(op, x.double(), t.noise(), seed=0).float()
    options = {**t.solver_options(method, RGB256), **extra}
    out = solve(model, op, y, method, noise=t.noise(), steps=steps, seeds=[3], **options)
    assert out.shape == (1, *RGB256) and bool(torch.isfinite(out).all())
    again = solve(model, op, y, method, noise=t.noise(), steps=steps, seeds=[3], **options)
    assert torch.equal(out, again)


def test_dds_keeps_the_observed_pixels_at_256():
    """Noiseless box inpainting: DDS's last data-consistency step is the exact projection, so the observed
    pixels of the result are y's (y reaches the solver through the 256×256 operator)."""
    model = DiffusionModel(tiny_rgb_unet(), DiscreteVP.from_config({}), "epsilon")
    op = get_task("inpaint_box").operator(RGB256, seed=0)
    x = torch.rand(1, *RGB256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = solve(model, op, op.A(x), "dds", noise=0, steps=2)
    observed = op.mask > 0
    assert torch.allclose(out[0][observed], x[0][observed], atol=1e-4)
    assert not torch.allclose(out[0][~observed], x[0][~observed], atol=0.1)


def test_load_image_reads_jpeg_and_png_and_center_crops(photo):
    png, jpg = load_image(photo / "photo.png"), load_image(photo / "photo.jpg")
    assert png.shape == jpg.shape == (1, 3, 300, 400) and float((png - jpg).abs().mean()) < 0.02
    fit = load_image(photo / "photo.png", size=(256, 256))
    # center crop: the middle 300×300 of the 400 columns, then resized; the oracle is PIL's crop then resize,
    # equal inside (at the border ImageOps.fit's kernel also reads the pixels just outside the crop: ≤ 1 level)
    ref = Image.open(photo / "photo.png").crop((50, 0, 350, 300)).resize((256, 256), Image.Resampling.BICUBIC)
    assert fit.shape == (1, 3, 256, 256)
    diff = np.abs(((fit[0].permute(1, 2, 0).numpy() + 1) * 127.5).round() - np.asarray(ref))
    assert diff[4:-4, 4:-4].max() == 0 and diff.max() <= 1
    assert load_image(photo / "photo.jpg", size=(16, 16), channels=1).shape == (1, 1, 16, 16)


@pytest.mark.slow
def test_command_line_degrade_restore_256(model_dir, photo, tmp_path):
    """``python -m diffsolve`` end to end on a JPEG photo resized to the model's 256×256 (two fresh
    interpreters: 10–30 s, mostly importing torch and diffusers)."""
    y, x = tmp_path / "y.png", tmp_path / "x.png"
    run = [sys.executable, "-m", "diffsolve"]
    done = subprocess.run(run + ["degrade", "--task", "sr4", "--input", str(photo / "photo.jpg"), "--resize", "256",
                                 "--out", str(y), "--mask-seed", "1"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "sr4: 3-channel 256×256 -> 3-channel 64×64 measurement, the papers' 256×256 setting" in done.stdout
    assert np.asarray(Image.open(y)).shape == (64, 64, 3)
    done = subprocess.run(run + ["restore", "--model", str(model_dir), "--task", "sr4", "--method", "dds", "--input",
                                 str(y), "--out", str(x), "--steps", "2", "--quiet", "--reference",
                                 str(photo / "photo.png"), "--resize"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"dds on sr4: 2 network evaluations, .* the papers' 256×256 setting", done.stdout)
    assert re.search(r"PSNR -?\d+\.\d+ dB", done.stdout)
    assert Image.open(x).format == "PNG" and np.asarray(Image.open(x)).shape == (256, 256, 3)


# ---- bad input (each case well under a second: the errors come before any network call) ----------------------


@pytest.mark.parametrize("case,message", [
    ("wrong size", r"--input: expected a 3-channel 256×256 image \(the denoise measurement of the model's 3-channel "
                   r"256×256 images\), got a 3-channel 300×400 image \(.*photo\.png\); pass --resize to center-crop "
                   r"and resize it to 256×256$"),
    ("grey", r"--input: expected a 3-channel 256×256 image .*, got a 1-channel 256×256 image \(.*grey\.png\); pass "
             r"--resize to center-crop and resize it to 256×256 and convert it to 3 channels"),
    ("reference size", r"--reference: expected a 3-channel 256×256 image \(the model's image size\), got a 3-channel "
                       r"300×400 image \(.*photo\.png\)"),
    ("jpeg out", r"--out: '.*x\.jpg': expected a file name ending in \.png \(the format written\), got \.jpg"),
    ("out is input", r"--out: .*clean\.png is the --input file; choose another path"),
    ("not an image", r"--input: cannot read .*notes\.png as an image"),
])
def test_restore_bad_images(model_dir, photo, tmp_path, capsys, case, message):
    clean = tmp_path / "clean.png"
    Image.fromarray(np.full((256, 256, 3), 100, dtype=np.uint8)).save(clean)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((256, 256), dtype=np.uint8)).save(grey)
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    inp, out, extra = str(clean), str(tmp_path / "x.png"), []
    if case == "wrong size":
        inp = str(photo / "photo.png")
    elif case == "grey":
        inp = str(grey)
    elif case == "reference size":
        extra = ["--reference", str(photo / "photo.png")]
    elif case == "jpeg out":
        out = str(tmp_path / "x.jpg")
    elif case == "out is input":
        out = inp
    elif case == "not an image":
        inp = str(notes)
    before = clean.read_bytes()
    code = main(["restore", "--model", str(model_dir), "--task", "denoise", "--input", inp, "--out", out, "--quiet",
                 "--steps", "1"] + extra)
    assert code == 2
    assert re.search(message, capsys.readouterr().err.strip())
    assert clean.read_bytes() == before and not (tmp_path / "x.png").exists() and not (tmp_path / "x.jpg").exists()


def test_resize_fixes_what_the_error_names(model_dir, photo, tmp_path):
    """With --resize the same photo and a small grey image are center-cropped, resized and converted to the
    model's 3×256×256 (one DDS step)."""
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((100, 120), dtype=np.uint8)).save(grey)
    for inp in (photo / "photo.png", grey):
        assert main(["restore", "--model", str(model_dir), "--task", "denoise", "--method", "dds", "--input", str(inp),
                     "--out", str(tmp_path / "x.png"), "--quiet", "--steps", "1", "--resize"]) == 0
        assert np.asarray(Image.open(tmp_path / "x.png")).shape == (256, 256, 3)


def test_task_that_does_not_fit_the_model(tmp_path, capsys):
    folder = model_folder(tmp_path / "rgb250", 250)
    img = tmp_path / "y.png"
    Image.fromarray(np.zeros((62, 62, 3), dtype=np.uint8)).save(img)
    code = main(["restore", "--model", str(folder), "--task", "sr4", "--input", str(img), "--out",
                 str(tmp_path / "x.png"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "task sr4: its setting for 3×250×250 images, the papers' 256×256 setting scaled" in err
    assert "divisible by 4" in err and not (tmp_path / "x.png").exists()


def test_degrade_resize_errors(photo, tmp_path, capsys):
    out = tmp_path / "y.png"
    assert main(["degrade", "--task", "sr4", "--input", str(photo / "photo.png"), "--out", str(out),
                 "--resize", "0"]) == 2
    assert "--resize: expected an integer >= 1 (the image side in pixels), got '0'" in capsys.readouterr().err
    assert main(["degrade", "--task", "sr4", "--input", str(photo / "photo.png"), "--out", str(out),
                 "--resize", "250"]) == 2
    assert re.search(r"task sr4: its setting for 3×250×250 images.*divisible by 4", capsys.readouterr().err)
    assert not out.exists()


def test_python_api_wrong_image_size_says_how_to_load_one():
    model = DiffusionModel(tiny_rgb_unet(), DiscreteVP.from_config({}), "epsilon")
    task = get_task("sr4")
    op = task.operator(model.sample_shape)
    photo = torch.zeros(1, 3, 300, 400)
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 3, 256, 256\), got \(1, 3, 300, 400\); an image "
                                         r"file loads at 3×256×256, .*load_image\(path, size=\(256, 256\), channels=3\)"):
        measure(op, photo, task.noise())
    with pytest.raises(ValueError, match=r"y: expected shape \(batch, 3, 64, 64\) .*got \(1, 1, 64, 64\); an image "
                                         r"file loads at 3×64×64, .*size=\(64, 64\), channels=3\)"):
        solve(model, op, torch.zeros(1, 1, 64, 64), "dds", noise=task.noise())
    with pytest.raises(ValueError, match=r"operator: SuperResolution takes samples of shape \(1, 256, 256\), but the "
                                         r"model makes samples of shape \(3, 256, 256\)"):
        solve(model, task.operator((1, 256, 256)), torch.zeros(1, 1, 64, 64), "dds", noise=task.noise())
