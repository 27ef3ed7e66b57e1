"""Guided-diffusion (ADM) checkpoints converted to diffusers UNet2DModel, checked against the official network.

The oracle is guided-diffusion's own ``UNetModel`` (PyPI ``guided-diffusion-sdk``), built with random weights for
each configuration; its state dict goes through ``diffsolve.adm`` and both networks must compute the same
function. No checkpoint can be downloaded here, so random weights (every parameter drawn, including those
guided-diffusion zero-initialises) stand in for trained ones.
"""

import contextlib
import json
import pickle
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from diffsolve import load_model, sample
from diffsolve.adm import PRESETS, config_from_flags, convert_adm, infer_architecture, mismatch, resolve_config
from diffsolve.cli import main

from conftest import assert_cast_copy, diffusers_log

guided_unet = pytest.importorskip("guided_diffusion.unet")
script_util = pytest.importorskip("guided_diffusion.script_util")

#: create_model's architecture flags (the presets also name the noise schedule)
_MODEL_FLAGS = ("image_size num_channels num_res_blocks channel_mult learn_sigma class_cond attention_resolutions "
                "num_heads num_head_channels use_scale_shift_norm resblock_updown use_new_attention_order").split()

# (official UNetModel arguments, at 16×16 and width 32 so each forward takes milliseconds)
CONFIGS = {
    "legacy-headchannels-updown": dict(num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                                       num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True),
    "new-headcount-conv": dict(num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_heads=2,
                               use_new_attention_order=True),
    "legacy-onehead-classcond": dict(num_res_blocks=3, channel_mult=(1, 1, 2), attention_resolutions=(1, 4),
                                     num_heads=1, use_scale_shift_norm=True, num_classes=10),
    "new-headchannels-classcond-updown": dict(num_res_blocks=2, channel_mult=(1, 2, 3), attention_resolutions=(2, 4),
                                              num_head_channels=32, use_new_attention_order=True,
                                              use_scale_shift_norm=True, resblock_updown=True, num_classes=5),
    "legacy-headcount-3levels-noattn-level0": dict(num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(4,),
                                                    num_heads=4, resblock_updown=True),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (guided-diffusion zero-initialises each block's last layer, which would
    hide a wrong mapping of everything before it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            else:  # norm scales near 1, biases near 0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def official(name: str, dtype=torch.float32, seed: int = 0):
    kwargs = dict(CONFIGS[name])
    model = guided_unet.UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=6,
                                  num_res_blocks=kwargs.pop("num_res_blocks"),
                                  attention_resolutions=kwargs.pop("attention_resolutions"), **kwargs)
    return _randomize(model, seed).to(dtype)


def settings(name: str) -> dict:
    kwargs = CONFIGS[name]
    return dict(image_size=16, num_heads=kwargs.get("num_heads", 1), num_head_channels=kwargs.get("num_head_channels", -1),
                use_new_attention_order=kwargs.get("use_new_attention_order", False), noise_schedule="linear")


@contextlib.contextmanager
def official_in_float64(model):
    """guided-diffusion runs in float32 whatever its weights (fp16 training support): it casts activations to
    ``model.dtype``, GroupNorm inputs and attention logits with ``.float()``, and feeds a float32 timestep
    embedding to its float64 time MLP. For the float64 oracle those casts go; the embedding stays float32, as
    diffusers' UNet2DModel computes it (both cast it to the weights' dtype)."""
    model.dtype = torch.float64
    to_float32 = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else to_float32(self, *a, **k)
    hook = model.time_embed.register_forward_pre_hook(lambda module, args: (args[0].to(torch.float64),))
    try:
        yield
    finally:
        torch.Tensor.float = to_float32
        hook.remove()


def _relative(a, b) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_network_equals_official(name, dtype, tol):
    model = official(name, dtype)
    unet, _, cfg = convert_adm(model.state_dict(), **settings(name))
    assert isinstance(unet, UNet2DModel) and next(unet.parameters()).dtype == dtype
    assert cfg.num_res_blocks == CONFIGS[name]["num_res_blocks"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=dtype)
    t = torch.tensor([0, 417, 999])
    labels = torch.tensor([0, 3, 4]) if "num_classes" in CONFIGS[name] else None
    with torch.no_grad(), (official_in_float64(model) if dtype == torch.float64 else contextlib.nullcontext()):
        expected = model(x, t, labels)
    got = unet(x, t, class_labels=labels).sample
    assert got.shape == expected.shape == (3, 6, 16, 16)
    assert _relative(expected, got) <= tol
    for k in range(3):  # per timestep, so that one step's error cannot hide in the others'
        assert _relative(expected[k], got[k]) <= tol


def test_presets_are_the_official_architectures():
    """Each preset's layout is what guided-diffusion's create_model builds from the published flags (shapes
    only: the networks are built on the meta device), and a state dict alone resolves to its preset."""
    for name, flags in PRESETS.items():
        with torch.device("meta"):
            state = script_util.create_model(**{k: flags[k] for k in _MODEL_FLAGS}).state_dict()
        cfg = config_from_flags(flags)
        assert mismatch(cfg, state) is None, name
        assert infer_architecture(state) == cfg.architecture(), name
        assert resolve_config(state) == cfg, name  # lsun256 and imagenet256-uncond: same network, same settings
        assert resolve_config(state, name) == cfg
    with torch.device("meta"):
        ffhq = script_util.create_model(**{k: PRESETS["ffhq256-dps"][k] for k in _MODEL_FLAGS})
    assert sum(p.numel() for p in ffhq.parameters()) == 93_563_910  # the 93.6 M of DPS's ffhq_10m.pt


def test_inexpressible_configurations_are_errors():
    """guided-diffusion's 128×128 model (4 heads over 512, 768 and 1024 channels) and 512×512 model (first
    channel multiplier 0.5) have no UNet2DModel equivalent."""
    flags = PRESETS["imagenet128-cond"]
    with torch.device("meta"):
        state = script_util.create_model(**{k: flags[k] for k in _MODEL_FLAGS}).state_dict()
    with pytest.raises(ValueError, match=r"one attention head width.*512 channels: 4 heads of 128.*cannot be converted"):
        convert_adm(state, "imagenet128-cond")
    with torch.device("meta"):
        state = script_util.create_model(image_size=512, num_channels=64, num_res_blocks=1, attention_resolutions="16",
                                         num_head_channels=32).state_dict()
    with pytest.raises(ValueError, match="first channel multiplier other than 1"):
        convert_adm(state, image_size=512, num_head_channels=32, use_new_attention_order=False, num_heads=1,
                    noise_schedule="linear")


def test_settings_the_state_dict_does_not_fix():
    state = official("legacy-headchannels-updown").state_dict()
    with pytest.raises(ValueError, match=r"does not fix image_size, num_heads.*no preset has this architecture.*"
                                         r"closest preset"):
        resolve_config(state)
    with pytest.raises(ValueError, match="noise_schedule: expected one of"):
        resolve_config(state, **{**settings("legacy-headchannels-updown"), "noise_schedule": "quadratic"})
    with pytest.raises(TypeError, match=r"unknown ADM setting\(s\) \['num_channels'\]"):
        resolve_config(state, num_channels=32)
    with pytest.raises(ValueError, match="preset: expected one of"):
        resolve_config(state, "ffhq")


def _write_ffhq_like(path, seed=0):
    """A tiny network with the FFHQ preset's settings, saved as a guided-diffusion checkpoint."""
    model = official("legacy-headchannels-updown", seed=seed)
    torch.save(model.state_dict(), path)
    return model


def test_load_model_reads_a_checkpoint(tmp_path):
    model = _write_ffhq_like(tmp_path / "adm.pt")
    dm = load_model(tmp_path / "adm.pt", adm=settings("legacy-headchannels-updown"))
    assert isinstance(dm.net, UNet2DModel) and dm.sample_shape == (3, 16, 16) and dm.num_classes is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.9], dtype=torch.float64)
    pred = dm.predict(x, t)
    with torch.no_grad():  # DiffusionModel keeps the first half (ε) of the learned-σ output
        eps = model(x, dm.schedule.model_time(t).float())[:, :3]
    assert _relative(eps, pred.eps) <= 1e-5
    assert torch.isfinite(sample(dm, "dpm_solver_pp", 2, seeds=[0])).all()


def test_half_precision_checkpoint_load_without_diffusers_cast_warning(tmp_path):
    model = _write_ffhq_like(tmp_path / "adm.pt")
    with diffusers_log() as messages:
        dm = load_model(tmp_path / "adm.pt", adm=settings("legacy-headchannels-updown"), dtype=torch.bfloat16)
    assert not [m for m in messages if "float32" in m], messages
    full = load_model(tmp_path / "adm.pt", adm=settings("legacy-headchannels-updown"))
    assert_cast_copy(dm.net, full.net, torch.bfloat16)


def test_class_conditional_checkpoint_takes_labels(tmp_path):
    model = official("legacy-onehead-classcond")
    torch.save(model.state_dict(), tmp_path / "cond.pth")
    dm = load_model(tmp_path / "cond.pth", adm=settings("legacy-onehead-classcond"))
    assert dm.num_classes == 10 and dm.null_class is None  # all 10 embeddings are classes: no null class
    with pytest.raises(ValueError, match=r"no unconditional class: give one label in \[0, 9\]"):
        sample(dm, "ddim", 2, seeds=[0])
    with pytest.raises(ValueError, match=r"expected integers in \[0, 9\], got \[10\]"):
        sample(dm, "ddim", 2, seeds=[0], class_labels=[10])
    with pytest.raises(ValueError, match="guidance needs an unconditional class"):
        sample(dm, "ddim", 2, seeds=[0], class_labels=[3], guidance_scale=2.0)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([0.5], dtype=torch.float64)
    with torch.no_grad():
        eps = model(x, dm.schedule.model_time(t).float(), torch.tensor([9]))[:, :3]
    assert _relative(eps, dm.predict(x, t, class_labels=torch.tensor([9])).eps) <= 1e-5


def test_convert_command_writes_a_pipeline_folder(tmp_path, capsys):
    model = _write_ffhq_like(tmp_path / "adm.pt")
    flags = ["--image-size", "16", "--num-head-channels", "16", "--attention-order", "legacy", "--noise-schedule",
             "cosine"]
    assert main(["convert", str(tmp_path / "adm.pt"), str(tmp_path / "out"), *flags]) == 0
    assert "UNet2DModel" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"][1] == "DDPMScheduler"
    assert list((tmp_path / "out" / "unet").glob("*.safetensors"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        expected = model(x, t)
    dm = load_model(tmp_path / "out")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "out")
    for unet in (dm.net, pipe.unet):
        assert _relative(expected, unet(x, t).sample) <= 1e-5
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.scheduler.config.variance_type == "learned_range"  # DDPMPipeline's step splits the 6 channels
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    # never overwrites: an existing non-empty folder is refused before anything is read
    assert main(["convert", str(tmp_path / "adm.pt"), str(tmp_path / "out"), *flags]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


class _NotATensor:
    pass


def test_bad_files_and_state_dicts(tmp_path):
    good = official("legacy-headchannels-updown").state_dict()
    # a diffusers folder's safetensors
    unet, _, _ = convert_adm(good, **settings("legacy-headchannels-updown"))
    unet.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    with pytest.raises(ValueError, match=r"a \.safetensors file is not a guided-diffusion checkpoint"):
        load_model(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    # an arbitrary pickle: weights_only refuses to build its objects
    with open(tmp_path / "object.pt", "wb") as f:
        pickle.dump({"x": _NotATensor()}, f)
    with pytest.raises(ValueError, match=r"object.pt: not a PyTorch state dict that torch.load\(weights_only=True\)"):
        load_model(tmp_path / "object.pt")
    torch.save({"x": _NotATensor()}, tmp_path / "object2.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_model(tmp_path / "object2.pt")
    # a truncated checkpoint
    torch.save(good, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a PyTorch state dict"):
        load_model(tmp_path / "cut.pt")
    # tensors, but not guided-diffusion's
    torch.save(unet.state_dict(), tmp_path / "diffusers.pt")
    with pytest.raises(ValueError, match="not a guided-diffusion \\(ADM\\) UNetModel state dict: no 'time_embed.0.weight'"):
        load_model(tmp_path / "diffusers.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict .* got list"):
        load_model(tmp_path / "list.pt")
    # shapes that fit no layout: the first mismatching key is named
    broken = dict(good)
    broken["input_blocks.1.0.out_layers.3.weight"] = torch.zeros(32, 32, 3, 1)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"fits no guided-diffusion layout \(key 'input_blocks.1.0.out_layers.3.weight' "
                                         r"has shape \(32, 32, 3, 1\), expected \(32, 32, 3, 3\)\)"):
        load_model(tmp_path / "broken.pt", adm=settings("legacy-headchannels-updown"))
    extra = {**good, "ema_rate": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected key 'ema_rate'"):
        resolve_config(extra, **settings("legacy-headchannels-updown"))
    # a preset that contradicts the state dict
    with pytest.raises(ValueError, match=r"preset 'ffhq256-dps' contradicts the state dict: key 'time_embed.0.weight' "
                                         r"has shape \(128, 32\), expected \(512, 128\)"):
        load_model(tmp_path / "full.pt", adm="ffhq256-dps")
    with pytest.raises(ValueError, match="scheduler_config: a guided-diffusion checkpoint's noise schedule"):
        load_model(tmp_path / "full.pt", scheduler_config={"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="adm: settings for a guided-diffusion checkpoint file"):
        load_model("digits16", adm="ffhq256-dps")
    with pytest.raises(FileNotFoundError, match="ADM checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    assert main(["convert", str(tmp_path / "cut.pt"), str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


# ---- the full-size FFHQ-256 network of DPS and DAPS -----------------------------------------------------------

def _ffhq_official():
    """guided-diffusion's network with ffhq_10m.pt's flags, random weights (its zero-initialised last layers
    drawn too, so that the output depends on every block)."""
    flags = PRESETS["ffhq256-dps"]
    torch.manual_seed(0)
    model = script_util.create_model(**{k: flags[k] for k in _MODEL_FLAGS}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, p[0].numel() ** -0.5)
    return model


@pytest.mark.slow
def test_ffhq256_full_size_equals_official():
    model = _ffhq_official()
    unet, _, cfg = convert_adm(model.state_dict())  # no preset: the state dict resolves to ffhq256-dps
    assert cfg == config_from_flags(PRESETS["ffhq256-dps"])
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([600])
    with torch.no_grad():
        expected = model(x, t)
        got = unet(x, t).sample
    assert _relative(expected, got) <= 1e-5


@pytest.mark.slow
def test_convert_and_solve_at_256_in_colour(tmp_path):
    """``python -m diffsolve convert`` on an FFHQ-256 checkpoint, then DPS, DDS and DAPS at 256×256 RGB
    (2 steps each: the plumbing and the shapes, not the quality)."""
    from diffsolve.inverse import Inpainting, solve

    torch.save(_ffhq_official().state_dict(), tmp_path / "ffhq_10m.pt")
    done = subprocess.run([sys.executable, "-m", "diffsolve", "convert", str(tmp_path / "ffhq_10m.pt"),
                           str(tmp_path / "ffhq"), "--preset", "ffhq256-dps"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = load_model(tmp_path / "ffhq")
    assert model.sample_shape == (3, 256, 256)
    mask = torch.ones(3, 256, 256)
    mask[:, 64:192, 64:192] = 0
    op = Inpainting(mask)
    clean = torch.rand(1, 3, 256, 256) * 2 - 1
    y = op.A(clean)
    for method, options in [("dps", {}), ("dds", {}), ("daps_100", {"ode_steps": 1, "langevin_steps": 2})]:
        x, info = solve(model, op, y, method, noise=0.05, steps=2, return_info=True, **options)
        assert x.shape == (1, 3, 256, 256) and torch.isfinite(x).all(), method
        assert info.nfe >= 2, method


@pytest.mark.slow
def test_convert_degrade_restore_commands_at_256(tmp_path):
    """The README's photo walk-through as commands: ``convert`` a random-weight FFHQ-256 checkpoint, ``degrade``
    a photo of another size (``--resize 256``), ``restore`` it with DDS and with checkpointed DPS (2 steps each:
    plumbing and shapes at the papers' size, not quality)."""
    from PIL import Image

    torch.save(_ffhq_official().state_dict(), tmp_path / "ffhq_10m.pt")
    photo = tmp_path / "face.jpg"
    Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy()).save(photo)

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "diffsolve", *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("convert", tmp_path / "ffhq_10m.pt", tmp_path / "ffhq")
    run("degrade", "--task", "inpaint_box", "--input", photo, "--resize", 256, "--out", tmp_path / "y.png")
    assert Image.open(tmp_path / "y.png").size == (256, 256)
    for method, extra in [("dds", []), ("dps", ["--checkpointing", "True"])]:
        out = tmp_path / f"{method}.png"
        report = run("restore", "--model", tmp_path / "ffhq", "--task", "inpaint_box", "--method", method,
                     "--input", tmp_path / "y.png", "--reference", photo, "--resize", "--steps", 2,
                     "--out", out, "--quiet", *extra)
        assert "PSNR" in report, report
        restored = Image.open(out)
        assert restored.size == (256, 256) and restored.mode == "RGB", method
