"""A diffusers pipeline drives diffsolve: DiffsolveScheduler inside unmodified DDPMPipeline and Stable-Diffusion-style
pipelines gives what diffsolve.sample gives with the same sampler, steps and noise; config round trips; errors.

Noise: the pipeline draws x_T from its generator; the scheduler draws one seed per sample from the same
generator at its first noise draw (``scheduler.noise_seeds``), so ``diffsolve.sample(x_T=<the same x_T>,
seeds=scheduler.noise_seeds)`` must give the same samples — bitwise on CPU, since the same sampler code runs
on the same network outputs.
"""

import functools
import gc
import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

import diffsolve
from diffsolve import DiffsolveScheduler, DiffusionModel, FixedClassUNet, load_model, sample
from diffsolve.schedules import DiscreteVP

from conftest import make_tiny_unet

STEPS = 6
#: every registered fixed-grid sampler, stochastic ones included (dpm_solver_v3 needs statistics: see below)
CASES = [
    ("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {}), ("dpm_solver_pp", {"order": 3}),
    ("pndm", {}), ("pndm", {"method": "s_pndm"}), ("pndm", {"skip_prk": True}),
    ("sa_solver", {}), ("sa_solver", {"tau": 1.0, "predictor_order": 3, "corrector_order": 1}),
    ("bdia", {}), ("euler_maruyama", {}), ("dpm_solver_v3", {}),
]


def test_cases_cover_every_fixed_grid_sampler():
    built_in = [diffsolve.get_sampler(n) for n in diffsolve.list_samplers()]  # other tests register their own
    fixed = {s.name for s in built_in if s.fn.__module__.startswith("diffsolve.samplers.") and not s.adaptive}
    assert fixed == {name for name, _ in CASES}


def spy_steps(scheduler):
    """Record every prev_sample the pipeline receives (the pipeline itself stays unmodified)."""
    outs, step = [], scheduler.step

    @functools.wraps(step)
    def spy(*args, **kwargs):
        out = step(*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = spy
    return outs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An unconditional tiny v-prediction UNet in a DDPMPipeline (+ the diffsolve model, a folder for EMS)."""
    unet = make_tiny_unet(seed=4)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                                           prediction_type="v_prediction"))
    model = DiffusionModel(unet, DiscreteVP.from_config(pipe.scheduler.config), "v_prediction")
    return pipe, unet, model, tmp_path_factory.mktemp("ems")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The shipped class-conditional digits16 in a DDPMPipeline, through FixedClassUNet (its null class)."""
    model = load_model("digits16")
    from diffsolve.loading import SHIPPED

    scheduler = DDPMScheduler.from_pretrained(SHIPPED["digits16"], subfolder="scheduler")
    pipe = DDPMPipeline(unet=FixedClassUNet(model.net), scheduler=scheduler)
    return pipe, model.net, model, tmp_path_factory.mktemp("ems")


def ems_options(model, folder):
    """Statistics for dpm_solver_v3 that exercise its corrections (not their quality): small random l, s, b on
    the EMS grid of this network (a few-sample estimate would be too noisy to stay finite)."""
    from diffsolve.testing import random_ems

    path = folder / "ems.safetensors"
    if not path.exists():
        random_ems(model, n_lambda=STEPS).save(path)
    return {"ems": str(path)}


def run_both(pipe, unet, model, sampler, options, seed=3, batch=2, ems_dir=None):
    grid = {}
    if sampler == "dpm_solver_v3":  # the small EMS grid holds the steps of a logSNR grid exactly
        options, grid = {**options, **ems_options(model, ems_dir)}, {"grid": "logSNR"}
    scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler=sampler, sampler_options=options, **grid)
    scheduler.set_model(unet)  # only dpm_solver_v3 needs it (its statistics are checked against the network)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    outs = spy_steps(scheduler)
    images = pipe(batch_size=batch, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                  output_type="pt").images
    shape = (batch, *model.sample_shape)
    x_T = randn_tensor(shape, generator=torch.Generator().manual_seed(seed))  # what DDPMPipeline drew
    model.reset_nfe()
    ref, info = sample(model, sampler, STEPS, x_T=x_T, seeds=scheduler.noise_seeds, return_info=True, **grid, **options)
    return scheduler, outs, images, ref, info


def check_same(scheduler, outs, images, ref, info):
    assert len(scheduler.timesteps) == info.nfe == len(outs)  # every network evaluation is a timestep
    assert torch.equal(outs[-1], ref), f"max difference {(outs[-1] - ref).abs().max():.3g}"
    assert torch.equal(images, (ref / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("sampler,options", CASES)
def test_ddpm_pipeline_tiny_unet_matches_sample(tiny, sampler, options):
    pipe, unet, model, ems_dir = tiny
    scheduler, outs, images, ref, info = run_both(pipe, unet, model, sampler, options, ems_dir=ems_dir)
    check_same(scheduler, outs, images, ref, info)
    stochastic = sampler in ("sa_solver", "euler_maruyama") or options.get("eta", 0) > 0
    assert (scheduler.noise_seeds is not None) == stochastic


@pytest.mark.parametrize("sampler,options", CASES)
def test_ddpm_pipeline_digits16_matches_sample(digits, sampler, options):
    pipe, unet, model, ems_dir = digits
    check_same(*run_both(pipe, unet, model, sampler, options, seed=11, batch=3, ems_dir=ems_dir))


def test_learned_variance_output_uses_its_first_channels():
    unet = make_tiny_unet(seed=5, out_channels=6)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned_range"))
    model = DiffusionModel(unet, DiscreteVP.from_config(pipe.scheduler.config))
    check_same(*run_both(pipe, unet, model, "dpm_solver_pp", {}))


def test_timesteps_list_every_network_evaluation():
    config = DDPMScheduler().config
    fpndm = DiffsolveScheduler.from_config(config, sampler="pndm")
    fpndm.set_timesteps(STEPS)
    assert len(fpndm.timesteps) == STEPS + 9 and fpndm.order == 1 and fpndm.num_inference_steps == STEPS
    t = fpndm.timesteps.tolist()
    assert t[1] == t[2] and t[0] > t[1] > t[3]  # two evaluations at each pseudo Runge–Kutta midpoint
    ddim = DiffsolveScheduler.from_config(config, sampler="ddim", grid="leading")
    ddim.set_timesteps(10, device="cpu")
    assert ddim.timesteps.tolist() == pytest.approx(list(range(900, -1, -100)), abs=1e-3)
    assert ddim.init_noise_sigma == 1.0 and torch.equal(ddim.scale_model_input(torch.ones(2), 5), torch.ones(2))


def test_stable_diffusion_pipeline(tmp_path):
    """An SD-style pipeline with CFG and a negative prompt: the adapter's latents equal diffsolve.sample's."""
    pytest.importorskip("transformers")
    from tiny_sd import LATENT, make_tiny_sd

    pipe = make_tiny_sd(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    model = load_model(tmp_path / "pipe")
    prompts, negative = ["a red cat", "a dog"], ["blurry", "dark"]
    for sampler, options in [("dpm_solver_pp", {}), ("sa_solver", {"tau": 1.0}), ("pndm", {})]:
        # diffusers_grid=None: diffsolve's own grid for the sampler, not the DPMSolverMultistepScheduler's grid that
        # from_config of its config takes over (tests/test_scheduler_contract.py checks that one)
        pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler=sampler, sampler_options=options,
                                                        diffusers_grid=None)
        out = pipe(prompts, negative_prompt=negative, guidance_scale=6.0, num_inference_steps=5, output_type="latent",
                   generator=torch.Generator().manual_seed(8)).images
        x_T = randn_tensor((2, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(8))
        ref = sample(model, sampler, 5, x_T=x_T, seeds=pipe.scheduler.noise_seeds, prompt=prompts,
                     negative_prompt=negative, guidance_scale=6.0, decode=False, **options)
        assert torch.allclose(out, ref, rtol=0, atol=1e-6 * ref.abs().max()), sampler


def test_noise_follows_the_pipeline_generator(tiny):
    pipe, unet, model, _ = tiny
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="ddim", sampler_options={"eta": 1.0})
    pipe.set_progress_bar_config(disable=True)

    outs = spy_steps(pipe.scheduler)

    def run(generator):
        pipe(batch_size=2, num_inference_steps=3, generator=generator)
        return outs[-1]  # the last prev_sample (the images are clamped: this random network saturates them)

    first = run(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    randn_tensor((2, 3, 8, 8), generator=gen)
    assert torch.equal(pipe.scheduler.noise_seeds, torch.randint(0, 2**62, (2,), generator=gen))  # the rule
    assert torch.equal(run(torch.Generator().manual_seed(1)), first)  # reproducible
    pipe.scheduler.set_noise_seeds([7, 8])
    fixed = run(torch.Generator().manual_seed(1))
    assert pipe.scheduler.noise_seeds.tolist() == [7, 8] and not torch.equal(fixed, first)
    pipe.scheduler.set_noise_seeds(None)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    run(gens)
    assert len(pipe.scheduler.noise_seeds) == 2


def test_config_round_trip(tiny, tmp_path):
    pipe, unet, model, _ = tiny
    options = {"tau": [0.3, 0.7, 0.5], "predictor_order": 3}
    scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="sa_solver", sampler_options=options,
                                               grid="logSNR", t_end=0.01)
    scheduler.save_config(tmp_path / "sched")
    saved = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DiffsolveScheduler" and saved["sampler"] == "sa_solver"
    assert saved["beta_schedule"] == "squaredcos_cap_v2" and saved["sampler_options"] == options
    for again in (DiffsolveScheduler.from_config(DiffsolveScheduler.load_config(tmp_path / "sched")),
                  DiffsolveScheduler.from_pretrained(tmp_path / "sched")):
        assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
               {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        scheduler.set_timesteps(STEPS)
        again.set_timesteps(STEPS)
        assert torch.equal(again.timesteps, scheduler.timesteps)
    # a whole pipeline saved with it loads back through diffusers (model_index names the diffsolve class)
    # and through diffsolve's load_model (the schedule comes from its config)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.scheduler, DiffsolveScheduler) and loaded.scheduler.config.sampler_options == options
    assert torch.allclose(load_model(tmp_path / "pipe").schedule.alphas_cumprod, model.schedule.alphas_cumprod)
    # and back to a diffusers scheduler
    back = DDPMScheduler.from_config(scheduler.config)
    assert back.config.beta_schedule == "squaredcos_cap_v2"
    # another sampler starts from its own defaults; the same sampler keeps its options
    assert DiffsolveScheduler.from_config(scheduler.config, sampler="pndm").config.sampler_options is None
    assert DiffsolveScheduler.from_config(scheduler.config, grid="time_uniform").config.sampler_options == options


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sampler="adaptive_sde"), ValueError, "chooses its own step sizes per sample.*use diffsolve.sample"),
    (dict(sampler="nope"), ValueError, "unknown sampler 'nope'"),
    (dict(sampler="ddim", sampler_options={"order": 2}), TypeError, r"unknown option\(s\) \['order'\]"),
    (dict(sampler="sa_solver", sampler_options={"tau": abs}), TypeError, "must be JSON values"),
    (dict(sampler="ddim", grid="bogus"), ValueError, "grid: expected one of"),
    (dict(sampler="ddim", t_start=0.5, t_end=0.7), ValueError, "t_end must be smaller than t_start"),
    (dict(sampler="ddim", prediction_type="nonsense"), ValueError, "prediction: expected one of"),
])
def test_bad_scheduler_config_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiffsolveScheduler.from_config(DDPMScheduler().config, **kwargs)


def test_bad_use_is_a_clear_error(tiny):
    pipe, unet, model, _ = tiny
    s = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="dpm_solver_pp")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        s.set_timesteps(0)
    s.set_timesteps(4)
    t = s.timesteps
    with pytest.raises(ValueError, match=r"got timestep .*but this scheduler's timesteps\[0\].*cannot skip"):
        s.step(x, t[1], x)  # img2img-style slicing of the timesteps
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 3, 4, 4\), expected the latents' shape"):
        s.step(torch.zeros(2, 3, 4, 4), t[0], x)  # wrong latent shape
    s.set_timesteps(4)
    prev = s.step(torch.zeros_like(x), t[0], x).prev_sample
    with pytest.raises(ValueError, match="step 1: the sample differs from the prev_sample"):
        s.step(torch.zeros_like(x), t[1], prev + 1.0)
    s.set_timesteps(2)
    y = x
    for ts in s.timesteps:
        y = s.step(torch.zeros_like(x), ts, y).prev_sample
    with pytest.raises(RuntimeError, match="were handed over already"):
        s.step(torch.zeros_like(x), s.timesteps[-1], y)
    bad = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="dpm_solver_pp", sampler_options={"order": 5})
    with pytest.raises(ValueError, match="order: expected 1, 2 or 3"):  # option values: checked by the sampler
        bad.set_timesteps(4)
    v3 = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="dpm_solver_v3")
    with pytest.raises(ValueError, match=r"call scheduler.set_model\(pipe.unet\)"):
        v3.set_timesteps(4)
    with pytest.raises(ValueError, match="FixedClassUNet wraps a class-conditional UNet"):
        FixedClassUNet(unet)


def test_an_abandoned_run_ends_its_worker(tiny):
    pipe, *_ = tiny
    s = DiffsolveScheduler.from_config(pipe.scheduler.config, sampler="pndm")
    s.set_timesteps(5)
    x = torch.randn(1, 3, 8, 8)
    s.step(torch.zeros_like(x), s.timesteps[0], x)
    worker = s._channel.thread
    assert worker.is_alive()
    s.set_timesteps(5)  # a new run cancels the old one
    assert not worker.is_alive()
    s.step(torch.zeros_like(x), s.timesteps[0], x)
    worker = s._channel.thread
    del s
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()  # a dropped scheduler cancels its run
