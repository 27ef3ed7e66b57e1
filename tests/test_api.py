"""The sampling API: bad input is a clear error before any network call; options, info, conditioning."""

import pytest
import torch

import diffsolve
from diffsolve import DiffusionModel, sample
from diffsolve.schedules import DiscreteVP, VPLinear
from diffsolve.testing import GaussianMixture

from conftest import CountingNet, make_tiny_unet


@pytest.fixture
def counted():
    net = CountingNet()
    return DiffusionModel(net, VPLinear(), "epsilon", sample_shape=(3,)), net


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="nope"), "unknown sampler 'nope'; valid names: .*ddim, .*dpm_solver_pp, .*euler_maruyama"),
    (dict(steps=0), "steps: expected an integer >= 1"),
    (dict(steps=2.5), "steps: expected an integer >= 1"),
    (dict(steps=True), "steps: expected an integer >= 1"),
    (dict(t_start=0.5, t_end=0.6), "t_end must be smaller than t_start"),
    (dict(t_start=1.5), "outside vp_linear's valid time range"),
    (dict(t_end=-0.1), "outside vp_linear's valid time range"),
    (dict(x_T=torch.zeros(2, 4), seeds=None, shape=None), r"x_T: expected shape \(batch, 3\)"),
    (dict(shape=(2, 5)), r"shape: expected \(batch, 3\)"),
    (dict(seeds=[1, 2, 3], shape=(2, 3)), r"seeds: expected one seed per sample \(2\), got 3"),
    (dict(order=2, sampler="ddim"), r"unknown option\(s\) \['order'\]; its options are: eta"),
    (dict(grid="bogus"), "grid: expected one of"),
    (dict(grid=torch.tensor([1.0, 0.5])), r"grid: expected steps \+ 1 = 5 times, got 2"),
    (dict(grid=torch.tensor([1.0, 0.5, 0.6, 0.2, 0.1])), "strictly decreasing"),
    (dict(class_labels=[1, 2]), "not class-conditional"),
    (dict(guidance_scale=3.0), "needs class_labels"),
    (dict(callback=5), "callback: expected a callable"),
])
def test_bad_input_is_a_clear_error_before_any_network_call(counted, kwargs, match):
    model, net = counted
    args = dict(sampler="dpm_solver_pp", steps=4, shape=(2, 3))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sample(model, args.pop("sampler"), args.pop("steps"), **args)
    assert net.calls == 0 and model.nfe == 0


def test_class_label_errors_and_model_type():
    model = DiffusionModel(make_tiny_unet(num_class_embeds=4), VPLinear())
    assert model.num_classes == 3 and model.null_class == 3
    with pytest.raises(ValueError, match=r"class_labels: expected 1 or 2 labels"):
        sample(model, "ddim", 2, shape=(2, 3, 8, 8), class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"class_labels: expected integers in \[0, 3\]"):
        sample(model, "ddim", 2, shape=(2, 3, 8, 8), class_labels=[0, 7])
    with pytest.raises(TypeError, match="model: expected a diffsolve DiffusionModel"):
        sample(object(), "ddim", 2, shape=(2, 3))
    with pytest.raises(ValueError, match="prediction: expected one of"):
        DiffusionModel(lambda x, t: x, VPLinear(), "noise")


def test_registry_lists_and_checks():
    assert {"ddim", "dpm_solver_pp", "euler_maruyama"} <= set(diffsolve.list_samplers())
    spec = diffsolve.get_sampler("dpm_solver_pp")
    assert spec.options == {"order": 2, "solver_type": "midpoint", "lower_order_final": True, "third_order": "diffusers"}
    with pytest.raises(TypeError, match="expected fn"):
        diffsolve.register_sampler("broken")(lambda run, x, order=2: x)


def test_register_a_custom_sampler_and_info():
    @diffsolve.register_sampler("test_euler_x0")
    def euler_x0(run, x, *, scale: float = 1.0):
        """Plain Euler in λ on x̂0 (a test sampler)."""
        g = run.grid
        for i in run.steps():
            pred = run.predict(x, i)
            x = g.alpha[i + 1] * pred.x0 + g.sigma[i + 1] * pred.eps * scale
            run.step_done(i, x, pred.x0)
        return x

    gmm = GaussianMixture.random(2, 2, VPLinear())
    seen = []
    x, info = sample(gmm.as_model(), "test_euler_x0", 5, shape=(4, 2), return_info=True,
                     callback=lambda i, t, x, x0: seen.append((i, t)))
    ddim = sample(gmm.as_model(), "ddim", 5, shape=(4, 2))
    assert torch.equal(x, ddim)  # the same update as DDIM with η = 0
    assert info.nfe == 5 and info.sampler == "test_euler_x0" and info.wall_time > 0
    assert info.nfe_per_sample is None and len(info.grid) == 6 and info.grid[0] == 1.0
    assert [i for i, _ in seen] == list(range(5)) and seen[-1][1] == pytest.approx(1e-3)


def test_non_finite_values_name_the_step():
    def exploding(x, t):
        return torch.where(t[:, None] <= 0.5, torch.full_like(x, float("nan")), torch.zeros_like(x))

    model = DiffusionModel(exploding, VPLinear(), sample_shape=(2,))
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 5 \(t = 0.5"):
        sample(model, "ddim", 10, shape=(3, 2), t_end=0.0)


def test_classifier_free_guidance_is_one_batched_forward():
    unet = make_tiny_unet(num_class_embeds=4)
    model = DiffusionModel(unet, DiscreteVP.from_config({"beta_schedule": "linear"}))
    x = torch.randn(2, 3, 8, 8)
    t = torch.full((2,), 0.5)
    labels = torch.tensor([0, 2])
    calls = []
    hook = unet.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    with torch.no_grad():
        guided = model.output(x, t, labels, guidance_scale=3.0)
        cond = model.output(x, t, labels)
        uncond = model.output(x, t)  # no labels: the null class
    hook.remove()
    assert calls == [4, 2, 2] and model.nfe == 3
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    with torch.no_grad():
        null = unet(x, model.schedule.model_time(t), class_labels=torch.full((2,), 3)).sample
    assert torch.allclose(uncond, null)


def test_learned_variance_output_uses_the_first_channels():
    unet = make_tiny_unet(out_channels=6)
    model = DiffusionModel(unet, DiscreteVP.from_config({"beta_schedule": "linear"}))
    x = torch.randn(2, 3, 8, 8)
    t = torch.full((2,), 0.3)
    with torch.no_grad():
        full = unet(x, model.schedule.model_time(t)).sample
        assert torch.equal(model.output(x, t), full[:, :3])


def test_batch_invariance_through_a_unet():
    # float64 network: the kernels' batch-size-dependent summation order is far below the tolerance
    unet = make_tiny_unet().double()
    model = DiffusionModel(unet, DiscreteVP.from_config({"beta_schedule": "linear"}))
    seeds = [3, 1, 4, 1, 5, 9, 2, 6]
    for sampler, options in [("dpm_solver_pp", {}), ("ddim", {"eta": 1.0})]:
        full = sample(model, sampler, 6, seeds=seeds, **options)
        for size in (1, 3):
            parts = torch.cat([sample(model, sampler, 6, seeds=seeds[i:i + size], **options) for i in range(0, 8, size)])
            assert (parts - full).abs().max() <= 1e-9
    # float32: the same to float32 round-off (amplified by x̂0 = (x − σε̂)/α at high noise)
    model32 = DiffusionModel(make_tiny_unet(), DiscreteVP.from_config({"beta_schedule": "linear"}))
    full = sample(model32, "dpm_solver_pp", 6, seeds=seeds)
    alone = torch.cat([sample(model32, "dpm_solver_pp", 6, seeds=[s]) for s in seeds])
    assert (alone - full).abs().max() <= 1e-3 * full.abs().max()
