"""diffsolve drives a Stable-Diffusion-style pipeline: load_model on the pipeline folder, sample(prompt=...)
with CFG batched into one UNet forward, VAE decoding; agreement with the diffusers pipeline itself.

The pipeline is tiny and random (tests/tiny_sd.py), built from configs and saved to disk, so load_model reads
a real pipeline folder (safetensors) without network access.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image pipelines need transformers (pip install -e '.[test]')")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from diffsolve import DiffusionModel, TextToImageModel, load_model, sample  # noqa: E402
from diffsolve.cli import main  # noqa: E402
from diffsolve.schedules import DiscreteVP  # noqa: E402

from conftest import CountingNet, assert_cast_copy, diffusers_log, make_tiny_unet  # noqa: E402
from tiny_sd import LATENT, make_tiny_sd  # noqa: E402

PROMPTS = ["a red cat", "two dogs on grass"]
NEGATIVE = ["blurry", "low quality"]
STEPS = 8


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(the diffusers pipeline, its saved folder, diffsolve's model loaded from that folder)."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = make_tiny_sd(tmp)
    pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
    return pipe, tmp / "pipe", load_model(tmp / "pipe")


def latents(seed=0, batch=2):
    return torch.randn(batch, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def discrete_grid(scheduler):
    """diffusers' inference timesteps as continuous times, ending at t = 0 (final_sigmas_type='zero')."""
    schedule = DiscreteVP.from_config(scheduler.config)
    return torch.cat([schedule.timestep_to_t(scheduler.timesteps), torch.zeros(1, dtype=torch.float64)])


def test_load_model_reads_the_pipeline_folder(sd):
    pipe, folder, model = sd
    assert isinstance(model, TextToImageModel) and model.is_latent
    assert model.sample_shape == (4, LATENT, LATENT) and model.image_shape == (3, 2 * LATENT, 2 * LATENT)
    assert model.prediction == "epsilon" and model.num_classes is None
    for ours, theirs in ((model.net, pipe.unet), (model.vae, pipe.vae), (model.text_encoder, pipe.text_encoder)):
        for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q), name
    assert torch.allclose(model.schedule.alpha(model.schedule.timestep_to_t(torch.arange(1000))) ** 2,
                          pipe.scheduler.alphas_cumprod.double(), rtol=1e-12)
    ids = model.tokenizer(PROMPTS, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                           truncation=True, return_tensors="pt").input_ids)


def test_half_precision_load_casts_every_part_without_diffusers_cast_warning(sd):
    pipe, folder, _ = sd
    with diffusers_log() as messages:
        model = load_model(folder, dtype=torch.bfloat16, device="cpu")
    assert not [m for m in messages if "float32" in m], messages
    for ours, theirs in ((model.net, pipe.unet), (model.vae, pipe.vae), (model.text_encoder, pipe.text_encoder)):
        assert_cast_copy(ours, theirs, torch.bfloat16)


@pytest.mark.parametrize("guidance_scale,negative", [(7.5, NEGATIVE), (3.0, None), (1.0, None)])
def test_dpm_solver_pp_reproduces_the_diffusers_pipeline(sd, guidance_scale, negative):
    """The same tiny pipeline run by diffusers with DPMSolverMultistepScheduler (2M, midpoint, lower-order final,
    final step to σ = 0) and by diffsolve.sample with dpm_solver_pp on the same timesteps from the same latents."""
    pipe, _, model = sd
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    x_T = latents(1)
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance_scale, num_inference_steps=STEPS,
                   latents=x_T, output_type="latent").images
        ref_img = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance_scale, num_inference_steps=STEPS,
                       latents=x_T, output_type="pt").images
    grid = discrete_grid(pipe.scheduler)
    model.reset_nfe()
    ours = sample(model, "dpm_solver_pp", STEPS, x_T=x_T, grid=grid, prompt=PROMPTS, negative_prompt=negative,
                  guidance_scale=guidance_scale, decode=False)
    assert model.nfe == STEPS
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, f"latents: relative difference {rel:.2e}"
    img = sample(model, "dpm_solver_pp", STEPS, x_T=x_T, grid=grid, prompt=PROMPTS, negative_prompt=negative,
                 guidance_scale=guidance_scale)
    assert img.shape == (2, 3, 2 * LATENT, 2 * LATENT)
    diff = ((img / 2 + 0.5).clamp(0, 1) - ref_img).abs().max().item()  # the pipeline's postprocessing
    assert diff <= 1e-5, f"images: max difference {diff:.2e}"


def test_guidance_is_one_batched_forward_and_every_sampler_runs(sd):
    _, _, model = sd
    calls = []
    hook = model.net.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0].shape[0], kwargs["encoder_hidden_states"].shape[0])), with_kwargs=True)
    try:
        x, info = sample(model, "pndm", 5, seeds=[3, 4, 5], prompt="a cat", negative_prompt="a dog",
                         guidance_scale=4.0, return_info=True, method="s_pndm")
    finally:
        hook.remove()
    assert calls == [(6, 6)] * info.nfe and info.nfe == 6  # S-PNDM: steps + 1 evaluations, each one forward
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    for name, options in [("ddim", {"eta": 1.0}), ("sa_solver", {}), ("bdia", {}), ("euler_maruyama", {})]:
        out = sample(model, name, 4, seeds=[0], prompt="a cat", guidance_scale=2.0, decode=False, **options)
        assert out.shape == (1, 4, LATENT, LATENT) and torch.isfinite(out).all(), name


def test_prompts_condition_and_no_prompt_is_the_empty_prompt(sd):
    _, _, model = sd
    x_T = latents(2, batch=1)
    a = sample(model, "ddim", 3, x_T=x_T, prompt="a cat", decode=False)
    b = sample(model, "ddim", 3, x_T=x_T, prompt=["a dog"], decode=False)
    assert (a - b).abs().max() > 1e-4  # the text reaches the UNet
    empty = sample(model, "ddim", 3, x_T=x_T, prompt="", decode=False)
    assert torch.equal(sample(model, "ddim", 3, x_T=x_T, decode=False), empty)
    per_sample = sample(model, "ddim", 3, x_T=torch.cat([x_T, x_T]), prompt=["a cat", "a dog"], decode=False)
    assert torch.allclose(per_sample, torch.cat([a, b]), atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_labels=[1, 2]), "this model is text-conditional: pass prompt"),
    (dict(x_T=torch.zeros(2, 3, 16, 16)), r"x_T: expected shape \(batch, 4, 8, 8\).*samples latents.*\(3, 16, 16\)"),
    (dict(shape=(2, 4, 16, 16)), r"shape: expected \(batch, 4, 8, 8\).*latents"),
    (dict(prompt=["a", "b", "c"]), r"prompt: expected 1 or 2 prompts \(one per sample\), got 3"),
    (dict(prompt=5), "prompt: expected a string or a list of strings"),
    (dict(prompt="a", negative_prompt="b"), "negative_prompt acts only through classifier-free guidance"),
    (dict(guidance_scale=3.0), "need a prompt"),
    (dict(negative_prompt="b", guidance_scale=3.0), "need a prompt"),
    (dict(prompt="a", decode="yes"), "decode: expected True or False"),
])
def test_bad_text_input_is_a_clear_error_before_any_network_call(sd, kwargs, match):
    _, _, model = sd
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (model.net, model.text_encoder, model.vae)]
    args = dict(shape=(2, 4, LATENT, LATENT))
    args.update(kwargs)
    if "x_T" in kwargs:
        args.pop("shape")
    try:
        with pytest.raises((ValueError, TypeError), match=match):
            sample(model, "dpm_solver_pp", 3, **args)
    finally:
        for h in hooks:
            h.remove()
    assert not calls


@pytest.mark.parametrize("kwargs", [dict(prompt="a cat"), dict(negative_prompt="a dog", guidance_scale=2.0)])
def test_prompt_for_an_unconditional_model_is_an_error(kwargs):
    net = CountingNet()
    model = DiffusionModel(net, DiscreteVP.from_config({}), sample_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="the model is not text-conditional"):
        sample(model, "ddim", 3, seeds=[0], **kwargs)
    unet_model = DiffusionModel(make_tiny_unet(num_class_embeds=4), DiscreteVP.from_config({}))
    with pytest.raises(ValueError, match="the model is not text-conditional"):
        sample(unet_model, "ddim", 3, seeds=[0], **kwargs)
    assert net.calls == 0 and model.nfe == 0 and unet_model.nfe == 0


def test_invert_refuses_latent_pipelines(sd):
    _, _, model = sd
    with pytest.raises(ValueError, match="latent.*not supported"):
        from diffsolve import invert

        invert(model, latents(0), "bdia", 4)


def test_unsupported_pipeline_folders_are_clear_errors(sd, tmp_path):
    import json
    import shutil

    _, folder, _ = sd
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(ValueError, match="text_encoder_2.*not supported"):
        load_model(copy)
    (copy / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    with pytest.raises(ValueError, match="vae is a AutoencoderTiny"):
        load_model(copy)
    (copy / "model_index.json").write_text(json.dumps(index))
    (copy / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder: no .safetensors weights"):
        load_model(copy)


def test_cli_prompt(sd, tmp_path, capsys):
    from PIL import Image

    _, folder, _ = sd
    out = tmp_path / "cats.png"
    assert main(["sample", "--model", str(folder), "--prompt", "a cat", "--negative-prompt", "a dog",
                 "--guidance", "3.0", "--steps", "3", "--num", "2", "--out", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (2 * 18, 18)  # two 16 × 16 decoded images with 1-pixel borders
    assert "2 samples, 3 network evaluations" in capsys.readouterr().out
    pixel = tmp_path / "pixel"
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(pixel)
    assert main(["sample", "--model", str(pixel), "--prompt", "a cat", "--steps", "2", "--num", "1",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert "prompt was given, but the model is not text-conditional" in capsys.readouterr().err
