"""DiffsolveScheduler as a diffusers user drives it: the properties diffusers' scheduler test suite checks
(config round trips, shapes, add_noise, scale_model_input, timestep spacings, fp16, trained_betas, generator
reproducibility, step keywords), diffusers' grids taken over ``from_config`` and reproduced in full sampling
loops next to diffusers' own schedulers (≤ 1e-5 relative, with the network in float64: a float32 network's
round-off depends on the CPU's kernels, and the x0-predicting loops amplify it to ~1e-5 in both libraries alike,
as far from a float64 run as from each other), img2img / inpainting starts part-way, DDIMPipeline
with η. The count of properties per sampler is in benchmarks/RESULTS.md (benchmarks/scheduler_suite.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       SASolverScheduler)

from diffsolve import DiffsolveScheduler, DiffusionModel, sample
from diffsolve.schedules import DiscreteVP

from conftest import make_tiny_unet

#: one configuration per fixed-grid sampler (dpm_solver_v3 needs statistics: tests/test_scheduler_adapter.py)
SAMPLERS = [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {}), ("dpm_solver_pp", {"order": 3}),
            ("pndm", {}), ("pndm", {"skip_prk": True}), ("sa_solver", {"tau": 1.0}), ("bdia", {}),
            ("euler_maruyama", {})]
ONE_EVAL_PER_STEP = [c for c in SAMPLERS if c[0] != "pndm"]


def loop(scheduler, unet, x_T, steps, generator=None, **step_kwargs):
    """A pipeline's denoising loop (DDPMPipeline's), returning the last prev_sample."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if generator is not None:
                step_kwargs["generator"] = generator
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **step_kwargs).prev_sample
    return x


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def unet():
    return make_tiny_unet(seed=2)


@pytest.fixture(scope="module")
def unet64():
    """The same network in float64, for the full-loop comparisons (what is left is the schedulers' round-off)."""
    return make_tiny_unet(seed=2).double()


X_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
X_T64 = X_T.double()


# ---- SchedulerCommonTest's properties -------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,options", SAMPLERS)
def test_config_round_trips_through_other_schedulers(tmp_path, sampler, options):
    ours = DiffsolveScheduler(sampler=sampler, sampler_options=options, beta_schedule="scaled_linear")
    ours.save_config(tmp_path)
    again = DiffsolveScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(ours.config)
    for other in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler):
        there = other.from_config(ours.config)
        back = DiffsolveScheduler.from_config(there.config, sampler=sampler, sampler_options=options, diffusers_grid=None)
        assert back.config.beta_schedule == "scaled_linear" and back.config.sampler_options == options
        ours.set_timesteps(5)
        back.set_timesteps(5)
        assert torch.equal(ours.timesteps, back.timesteps)


@pytest.mark.parametrize("sampler,options", SAMPLERS)
def test_step_shapes_keywords_generator_and_fp16(unet, sampler, options):
    s = DiffsolveScheduler(sampler=sampler, sampler_options=options)
    out = loop(s, unet, X_T, 4, generator=torch.Generator().manual_seed(1))
    assert out.shape == X_T.shape and torch.isfinite(out).all()
    again = loop(s, unet, X_T, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # reproducible with the same generator
    s.set_timesteps(4)
    t = s.timesteps[0]
    first = s.step(torch.zeros_like(X_T), t, X_T, return_dict=False)
    assert isinstance(first, tuple) and first[0].shape == X_T.shape
    s.set_timesteps(4)
    half = s.step(torch.zeros_like(X_T).half(), s.timesteps[0], X_T.half())
    assert half.prev_sample.dtype == torch.float16 and half.prev_sample.shape == X_T.shape
    assert torch.equal(s.scale_model_input(X_T, t, foo=1), X_T)


def test_add_noise_betas_and_trained_betas():
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ours = DiffsolveScheduler.from_config(ddpm.config)
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    assert rel(ours.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t)) <= 1e-6
    assert torch.allclose(ours.betas, ddpm.betas, atol=1e-7) and torch.allclose(ours.alphas_cumprod, ddpm.alphas_cumprod)
    betas = np.linspace(1e-4, 0.03, 1000).tolist()
    trained = DiffsolveScheduler(trained_betas=betas)
    assert torch.allclose(trained.betas.double(), torch.tensor(betas, dtype=torch.float64), atol=1e-7)
    assert json.loads(trained.to_json_string())["trained_betas"] == betas


@pytest.mark.parametrize("rules", ["DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "SASolverScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_for_every_spacing(rules, spacing):
    cls = {c.__name__: c for c in (DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, SASolverScheduler)}[rules]
    to_one = {"set_alpha_to_one": True} if rules in ("DDIMScheduler", "PNDMScheduler") else {}
    prk = {"skip_prk_steps": True} if rules == "PNDMScheduler" else {}
    theirs = cls(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, **to_one, **prk)
    sampler = {"PNDMScheduler": ("pndm", {"skip_prk": True})}.get(rules, ("ddim", {}))
    ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler[0], sampler_options=sampler[1])
    assert ours.config.diffusers_grid == rules and ours.config.timestep_spacing == spacing
    for steps in (5, 10, 50):
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)  # DDIM's skipping spacings included (ddim's step_to: tests/test_ddim_step_to.py)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist(), (steps, spacing)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_sigma_grid_timesteps_for_every_step_count(flag, beta_schedule):
    """The network's integer timesteps on diffusers' σ grids are rounded or truncated from fractional ones, so the
    last bit of diffusers' float32 σ table decides some of them (σ_max's timestep is 999 or 998): the table is
    computed with torch's float32 kernels as diffusers does (numpy's float32 power differs in that bit on some
    CPUs, e.g. under ATEN_CPU_CAPABILITY=default, which made 999 a 998). SA-Solver's σ grids are refused
    (test_zero_length_final_step_of_multistep_solvers_is_a_clear_error)."""
    theirs = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, final_sigmas_type="zero", **{flag: True})
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp")
    for steps in (*range(2, 31), 50, 100, 250):
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist(), steps


def test_custom_timesteps_and_sigmas(unet):
    ours = DiffsolveScheduler(sampler="dpm_solver_pp", final_sigmas_type="sigma_min", diffusers_grid="DPMSolverMultistepScheduler")
    theirs = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    custom = [999, 700, 420, 200, 90, 30]
    theirs.set_timesteps(timesteps=custom)
    ours.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == custom
    x = X_T.clone()
    with torch.no_grad():
        for t in theirs.timesteps:
            x = theirs.step(unet(x, t).sample, t, x).prev_sample
        y = X_T.clone()
        for t in ours.timesteps:
            y = ours.step(unet(y, t).sample, t, y).prev_sample
    assert rel(y, x) <= 1e-5
    schedule = ours.schedule
    sigmas = (schedule.sigma(torch.tensor([1.0, 0.5, 0.1])) / schedule.alpha(torch.tensor([1.0, 0.5, 0.1]))).tolist()
    ours.set_timesteps(sigmas=sigmas)
    assert torch.allclose(ours.grid[:-1], torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match="exactly one of"):
        ours.set_timesteps(5, timesteps=custom)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ours.set_timesteps(timesteps=[10, 20])
    with pytest.raises(TypeError, match="unsupported argument"):
        ours.set_timesteps(5, mu=0.5)


def test_step_keywords_that_cannot_hold_are_clear_errors():
    s = DiffsolveScheduler(sampler="dpm_solver_pp")
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="has no eta option"):
        s.step(torch.zeros_like(X_T), s.timesteps[0], X_T, eta=0.5)
    with pytest.raises(ValueError, match="use_clipped_model_output and variance_noise are not supported"):
        s.step(torch.zeros_like(X_T), s.timesteps[0], X_T, use_clipped_model_output=True)
    with pytest.raises(ValueError, match="diffusers_grid='DDIMScheduler' fixes the grid"):
        DiffsolveScheduler(diffusers_grid="DDIMScheduler", grid="logSNR")
    with pytest.raises(ValueError, match="timestep_spacing: expected one of"):
        DiffsolveScheduler(diffusers_grid="DDIMScheduler", timestep_spacing="sideways")


# ---- diffusers' grids and full loops ----------------------------------------------------------------------------

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
LOOPS = [
    # (diffusers scheduler, its config, sampler, options, steps)
    (DDIMScheduler, dict(clip_sample=False), "ddim", {}, 10),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing"), "ddim", {}, 10),
    (DDIMScheduler, dict(clip_sample=False, steps_offset=1, set_alpha_to_one=False), "ddim", {}, 10),
    (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False), "ddim", {}, 10),  # zero-length last step
    (DPMSolverMultistepScheduler, dict(), "dpm_solver_pp", {}, 10),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), "dpm_solver_pp", {}, 12),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="leading", steps_offset=1), "dpm_solver_pp", {}, 8),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), "dpm_solver_pp", {}, 10),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "dpm_solver_pp", {}, 10),
    (DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "dpm_solver_pp", {}, 10),
    (DPMSolverMultistepScheduler, dict(use_beta_sigmas=True), "dpm_solver_pp", {}, 10),
    (DPMSolverMultistepScheduler, dict(solver_order=3), "dpm_solver_pp", {"order": 3, "third_order": "diffusers"}, 10),
]


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("cls,config,sampler,options,steps", LOOPS)
def test_full_loop_matches_diffusers(unet64, prediction_type, cls, config, sampler, options, steps):
    theirs = cls(prediction_type=prediction_type, **config)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler, sampler_options=options)
    ref = loop(theirs, unet64, X_T64, steps)
    out = loop(ours, unet64, X_T64, steps)
    assert len(ours.timesteps) == len(theirs.timesteps)
    assert rel(out, ref) <= 1e-5, f"relative difference {rel(out, ref):.2e}"
    # the grid kinds of diffsolve.sample give the same σ grid (the network then sees fractional timesteps)
    kinds = {"use_karras_sigmas": "karras", "use_lu_lambdas": "lu_lambdas", "use_exponential_sigmas": "exponential",
             "use_beta_sigmas": "beta"}
    kind = next((v for k, v in kinds.items() if config.get(k)), None)
    if kind and config.get("final_sigmas_type", "zero") == "zero":
        model = DiffusionModel(unet64, DiscreteVP.from_config(theirs.config), prediction_type)
        from diffsolve.schedules import time_grid

        assert torch.allclose(time_grid(model.schedule, steps, kind, t_end=0.0), ours.grid, rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("cls,config,sampler,options,steps", LOOPS)
def test_float32_loop_matches_diffusers_within_its_own_round_off(unet, unet64, prediction_type, cls, config, sampler,
                                                                 options, steps):
    """The float32 path (network too): within 4× diffusers' own float32 round-off of diffusers' float32 loop, that
    round-off measured on the same machine as the distance of diffusers' float32 loop from its float64 one
    (measured ratio 0.61–2.33 over these loops; two errors of one size differ by up to twice that size). The
    network's kernel round-off, which differs by CPU, sets both sides; a precision loss in the scheduler (model
    outputs rounded to float16: ≈ 150×) does not hide in it."""
    theirs = cls(prediction_type=prediction_type, **config)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler, sampler_options=options)
    ref = loop(theirs, unet, X_T, steps)
    their_round_off = rel(ref, loop(theirs, unet64, X_T64, steps))
    out = loop(ours, unet, X_T, steps)
    assert out.dtype == torch.float32
    assert rel(out, ref) <= 4 * their_round_off, f"{rel(out, ref):.2e} against diffusers' own {their_round_off:.2e}"


@pytest.mark.parametrize("skip_prk", [True, False])
def test_pndm_full_loop_matches_diffusers(unet64, skip_prk):
    theirs = PNDMScheduler(skip_prk_steps=skip_prk, steps_offset=1)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="pndm", sampler_options={"skip_prk": skip_prk})
    assert rel(loop(ours, unet64, X_T64, 10), loop(theirs, unet64, X_T64, 10)) <= 1e-5
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_sa_solver_tau0_full_loop_matches_diffusers(unet64):
    theirs = SASolverScheduler(tau_func=lambda t: 0, predictor_order=3, corrector_order=3)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="sa_solver",
                                          sampler_options={"tau": 0.0, "predictor_order": 3, "corrector_order": 3})
    theirs.set_timesteps(10)
    theirs.sigmas = theirs.sigmas.double()  # diffusers' float32 σ table costs it 1e-4 (tests/test_sa_solver.py)
    x = X_T64.clone()
    with torch.no_grad():
        for t in theirs.timesteps:
            x = theirs.step(unet64(x, t).sample, t, x).prev_sample
    assert rel(loop(ours, unet64, X_T64, 10), x) <= 1e-5


def test_zero_length_final_step_of_multistep_solvers_is_a_clear_error():
    for theirs in (DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
                   SASolverScheduler(use_karras_sigmas=True)):
        ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp")
        with pytest.raises(ValueError, match="ends with a step of length zero"):
            ours.set_timesteps(10)


def test_dpm_solver_3m_exact_rule_differs_from_diffusers(unet):
    """The exact third-order rule is not diffusers' (and wins on the oracle asymptotically:
    tests/test_convergence.py)."""
    theirs = DPMSolverMultistepScheduler(solver_order=3)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp",
                                          sampler_options={"order": 3, "third_order": "exact"})
    assert rel(loop(ours, unet, X_T, 20), loop(theirs, unet, X_T, 20)) > 1e-4


# ---- part-way starts and DDIMPipeline ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,options", ONE_EVAL_PER_STEP)
def test_begin_index_runs_the_sampler_from_that_grid_point(unet, sampler, options):
    s = DiffsolveScheduler(sampler=sampler, sampler_options=options)
    s.set_timesteps(8)
    s.set_begin_index(3)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x = x_T = s.add_noise(x0, noise, s.timesteps[3:4])
    with torch.no_grad():
        for t in s.timesteps[3:]:
            x = s.step(unet(x, t).sample, t, x, generator=torch.Generator().manual_seed(6)).prev_sample
    model = DiffusionModel(unet, s.schedule, "epsilon")
    assert len(s.grid) == 8 - 3 + 1 and float(s.grid[0]) == pytest.approx(s._times[3])
    ref = sample(model, sampler, 5, x_T=x_T, grid=s.grid, seeds=s.noise_seeds, **options)
    assert rel(x, ref) <= 1e-5
    a = float(s.schedule.alpha(s.grid[:1]))
    assert rel(x_T, a * x0 + float(s.schedule.sigma(s.grid[:1])) * noise) <= 1e-6  # noised to the grid point


def test_begin_index_with_a_warm_up_sampler_is_a_clear_error():
    s = DiffsolveScheduler(sampler="pndm")
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not a grid point|warm-up takes extra evaluations"):
        s.set_begin_index(5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_with_eta(unet, eta):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())  # its __init__ converts any scheduler to DDIM's
    pipe.scheduler = DiffsolveScheduler(sampler="ddim")
    pipe.set_progress_bar_config(disable=True)
    outs = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: outs.append(step(*a, **k)) or outs[-1]
    pipe(batch_size=2, num_inference_steps=5, eta=eta, generator=torch.Generator().manual_seed(3), output_type="np")
    from diffusers.utils.torch_utils import randn_tensor

    x_T = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    model = DiffusionModel(unet, pipe.scheduler.schedule, "epsilon")
    ref = sample(model, "ddim", 5, x_T=x_T, eta=eta, seeds=pipe.scheduler.noise_seeds)
    assert torch.equal(outs[-1].prev_sample, ref)


def first_sample_spy(scheduler):
    """Record the sample of the first step (the pipeline's noised latents) and every prev_sample."""
    seen, step = [], scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        seen.append(sample)
        out = step(model_output, timestep, sample, *args, **kwargs)
        seen.append(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = spy
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("sampler,options", ONE_EVAL_PER_STEP)
def test_img2img_pipeline_starts_at_the_strength_grid_point(tmp_path, sampler, options):
    """StableDiffusionImg2ImgPipeline (tiny SD, CFG, strength 0.6) with DiffsolveScheduler gives the latents of
    diffsolve.sample on the rest of the grid from the pipeline's noised latents."""
    pytest.importorskip("transformers")
    from diffusers import StableDiffusionImg2ImgPipeline
    from tiny_sd import make_tiny_sd

    from diffsolve import load_model

    base = make_tiny_sd(tmp_path)
    base.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    model = load_model(tmp_path / "pipe")
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DiffsolveScheduler.from_config(base.scheduler.config, sampler=sampler, sampler_options=options,
                                                    diffusers_grid=None)
    seen = first_sample_spy(pipe.scheduler)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = pipe("a cat", image=image, strength=0.6, num_inference_steps=10, guidance_scale=4.0, output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    grid = pipe.scheduler.grid
    assert len(grid) - 1 == 6 and pipe.scheduler.begin_index == 4
    ref = sample(model, sampler, 6, x_T=seen[0], grid=grid, prompt="a cat", guidance_scale=4.0, decode=False,
                 seeds=pipe.scheduler.noise_seeds, **options)
    assert rel(out, ref) <= 1e-5


@pytest.mark.slow
def test_inpaint_pipeline_starts_at_the_strength_grid_point(tmp_path):
    """StableDiffusionInpaintPipeline with a 9-channel (inpainting) UNet, strength 0.7: diffsolve.sample on the rest
    of the grid, from the noised latents, with the same mask and masked-image latents."""
    pytest.importorskip("transformers")
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from tiny_sd import LATENT, make_tiny_sd

    base = make_tiny_sd(tmp_path)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=LATENT, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4).eval()
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DiffsolveScheduler.from_config(base.scheduler.config, sampler="dpm_solver_pp", diffusers_grid=None)
    inputs = []
    forward = unet.forward

    def record(sample, t, *args, **kwargs):
        inputs.append(sample)
        return forward(sample, t, *args, **kwargs)

    unet.forward = record
    seen = first_sample_spy(pipe.scheduler)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    out = pipe("a cat", image=image, mask_image=mask, strength=0.7, num_inference_steps=10, guidance_scale=1.0,
               output_type="latent", generator=torch.Generator().manual_seed(3)).images
    unet.forward = forward
    conditioning = inputs[0][:, 4:]  # the mask and masked-image latents the pipeline concatenates
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
    schedule = pipe.scheduler.schedule

    def net(x, t):
        return unet(torch.cat([x, conditioning], 1), schedule.model_time(t), encoder_hidden_states=embeds).sample

    grid = pipe.scheduler.grid
    assert len(grid) - 1 == 7
    ref = sample(DiffusionModel(net, schedule, "epsilon"), "dpm_solver_pp", 7, x_T=seen[0], grid=grid)
    assert rel(out, ref) <= 1e-5


def test_add_noise_at_the_begin_index_uses_the_grid_sigma():
    """On diffusers' Karras grid the network's timestep is rounded but the step's σ is not: an img2img start is
    noised to the grid's σ, as diffusers' DPMSolverMultistepScheduler.add_noise does."""
    theirs = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp")
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for s in (theirs, ours):
        s.set_timesteps(10)
        s.set_begin_index(4)
    t = theirs.timesteps[4:5]
    assert ours.timesteps[4] == t
    assert rel(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t)) <= 1e-6


@pytest.mark.parametrize("flag", ["use_lu_lambdas", "use_karras_sigmas"])
def test_sigma_grids_with_sigma_min_end_in_a_zero_step(flag):
    """diffusers' DPM-Solver++ 3M on a σ grid with final_sigmas_type="sigma_min" repeats σ_min: its last step has
    length zero, and from 15 steps on (no lower-order final step) its third-order update divides by it (NaN, on
    the Gaussian-mixture oracle). DiffsolveScheduler refuses that config with the reason; with
    final_sigmas_type="zero" it follows diffusers, finite."""
    from diffsolve.testing import GaussianMixture

    schedule = DiscreteVP.from_config(DDPMScheduler().config)
    gmm = GaussianMixture.random(4, 3, schedule, seed=0)
    x_T = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(scheduler):
        scheduler.set_timesteps(15)
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(gmm.eps(x, schedule.timestep_to_t(t).expand(len(x))), t, x).prev_sample
        return x

    theirs = DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min", **{flag: True})
    assert not torch.isfinite(run(theirs)).all()
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp", sampler_options={"order": 3})
    with pytest.raises(ValueError, match="ends with a step of length zero"):
        ours.set_timesteps(15)
    theirs = DPMSolverMultistepScheduler(solver_order=3, **{flag: True})
    ours = DiffsolveScheduler.from_config(theirs.config, sampler="dpm_solver_pp", sampler_options={"order": 3})
    out = run(ours)
    assert torch.isfinite(out).all() and rel(out, run(theirs)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("cls,config,sampler,options", [
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing"), "ddim", {}),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), "dpm_solver_pp", {}),
    (DPMSolverMultistepScheduler, dict(solver_order=3, use_beta_sigmas=True), "dpm_solver_pp", {"order": 3}),
    (PNDMScheduler, dict(steps_offset=1, skip_prk_steps=True), "pndm", {"skip_prk": True}),
])
def test_full_loop_matches_diffusers_on_digits16(cls, config, sampler, options):
    """The shipped digits16 network (its null class) in 10-step loops: ≤ 1e-5 against diffusers' schedulers. Run in
    float64: in float32 this trained network amplifies round-off over the last steps to 1–3e-5 for both
    schedulers alike (measured), while in float64 only diffusers' float32 ᾱ table is left (≤ 6e-6)."""
    from diffsolve import FixedClassUNet, load_model
    from diffsolve.loading import SHIPPED

    net = FixedClassUNet(load_model("digits16").net.double())
    base = DDPMScheduler.from_pretrained(SHIPPED["digits16"], subfolder="scheduler").config
    theirs = cls.from_config(base, **config)
    ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler, sampler_options=options)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(10)
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, t).sample, t, x).prev_sample
        results.append(x)
    assert rel(results[1], results[0]) <= 1e-5


@pytest.mark.parametrize("skip_prk", [True, False])
def test_pndm_v_prediction_diffusers_conversion(unet, skip_prk):
    """diffusers' PNDMScheduler with v-prediction combines raw v outputs and converts them with the step's start
    sample: pndm(v_conversion="diffusers") reproduces it; the default converts each output where it was made."""
    theirs = PNDMScheduler(skip_prk_steps=skip_prk, steps_offset=1, prediction_type="v_prediction")
    options = {"skip_prk": skip_prk}
    compatible = DiffsolveScheduler.from_config(theirs.config, sampler="pndm",
                                                sampler_options={**options, "v_conversion": "diffusers"})
    exact = DiffsolveScheduler.from_config(theirs.config, sampler="pndm", sampler_options=options)
    ref = loop(theirs, unet, X_T, 10)
    assert rel(loop(compatible, unet, X_T, 10), ref) <= 1e-5
    assert rel(loop(exact, unet, X_T, 10), ref) > 1e-3


@pytest.mark.parametrize("skip_prk", [True, False])
def test_pndm_v_conversion_on_the_oracle(skip_prk):
    """On the Gaussian mixture the exact conversion makes a v-prediction network sample as its ε-prediction twin
    (the method does not depend on how the network parameterises its output); diffusers' rule does not, and
    its error to the exact ODE solution is larger."""
    from diffsolve.schedules import VPLinear
    from diffsolve.testing import GaussianMixture

    schedule = VPLinear()
    gmm = GaussianMixture.random(4, 3, schedule, seed=1)
    x_T = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = gmm.ode_solution(x_T, *schedule.default_range)
    runs = {(prediction, rule): sample(gmm.as_model(prediction), "pndm", 20, x_T=x_T, skip_prk=skip_prk,
                                       v_conversion=rule)
            for prediction in ("epsilon", "v") for rule in ("exact", "diffusers")}
    assert rel(runs["v", "exact"], runs["epsilon", "exact"]) <= 1e-10
    assert rel(runs["epsilon", "diffusers"], runs["epsilon", "exact"]) <= 1e-12  # ε networks: the same rule

    def error(x):
        return ((x - exact) ** 2).mean().sqrt().item()

    assert error(runs["v", "diffusers"]) > 1.5 * error(runs["v", "exact"]), (error(runs["v", "diffusers"]),
                                                                           error(runs["v", "exact"]))
