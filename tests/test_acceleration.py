"""The stepping core at the cost floor: host-sync-free fixed-grid loops (capture-safe), half-precision networks
with a float32 solver state, and compiled networks that reproduce the eager results."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffsolve
from diffsolve import DiffusionModel, get_sampler, sample
from diffsolve.core import Run, SeededNoise, TimeGrid
from diffsolve.schedules import DiscreteVP, VPLinear, time_grid
from diffsolve.testing import GaussianMixture, random_ems

#: operators that read a tensor's value on the host (.item(), float(t), int(t), bool(t) and so `if t:`) or
#: whose output shape depends on the data: each is a device synchronisation, and illegal in a CUDA graph
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive",
                 "aten::_unique2", "aten::equal", "aten::is_nonzero"}


class NoHostSync(TorchDispatchMode):
    """Raises on any operator that synchronises with the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_SYNC_OPS:
            raise AssertionError(f"host synchronisation inside the sampling loop: {func._schema.name}")
        return func(*args, **(kwargs or {}))


FIXED_GRID = [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {}), ("dpm_solver_pp", {"order": 3}),
              ("pndm", {}), ("pndm", {"method": "s_pndm"}), ("sa_solver", {}), ("bdia", {}),
              ("euler_maruyama", {}), ("dpm_solver_v3", {})]


def test_every_fixed_grid_sampler_is_covered():
    fixed = {n for n in diffsolve.list_samplers() if not get_sampler(n).adaptive
             and get_sampler(n).fn.__module__.startswith("diffsolve.samplers")}  # built-ins, not tests' own
    assert fixed == {name for name, _ in FIXED_GRID}


@pytest.mark.parametrize("name, options", FIXED_GRID)
def test_fixed_grid_loop_never_synchronises_with_the_host(name, options):
    """From the first network evaluation to the end of the sampler, no operator reads a value back: the loop
    can be captured in a CUDA graph and never stalls the device. (Preparation before the first evaluation
    may use the host freely.)"""
    gmm = GaussianMixture.random(4, 3, VPLinear(), seed=0)
    inner = gmm.as_model()
    guard = NoHostSync()
    calls = []

    def network(x, t):
        if not calls:
            guard.__enter__()  # the loop starts with the first evaluation
        calls.append(1)
        return inner.net(x, t)

    model = DiffusionModel(network, inner.schedule, inner.prediction, sample_shape=(4,))
    if name == "dpm_solver_v3":
        options = {"ems": random_ems(model, n_lambda=40)}
    grid = time_grid(model.schedule, 8, "logSNR")
    if name == "dpm_solver_v3":  # its steps must lie on the statistics' grid
        grid = options["ems"].t[::5].flip(0) if options["ems"].t[0] < options["ems"].t[-1] else options["ems"].t[::5]
    run = Run(model, TimeGrid(model.schedule, grid), SeededNoise(range(5)))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = get_sampler(name).fn(run, x, **options)
    finally:
        if calls:
            guard.__exit__(None, None, None)
    assert calls and out.shape == x.shape
    run.check_finite()  # the one read-back, after the loop


def test_the_sync_detector_catches_item_float_and_branches():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: float(x[0]), lambda: bool(x.any()), lambda: 1 if x[0] > 0 else 0,
                 lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="host synchronisation"):
            with NoHostSync():
                read()


def test_nan_is_reported_at_its_step():
    gmm = GaussianMixture.random(2, 2, VPLinear(), seed=0)

    def network(x, t):
        out = gmm.as_model().net(x, t)
        return torch.where(t[:, None] < 0.5, torch.nan, out)  # breaks once t < 0.5

    model = DiffusionModel(network, gmm.schedule, "epsilon", sample_shape=(2,))
    grid = torch.linspace(1.0, 1e-3, 11, dtype=torch.float64)
    first_bad = int((grid[:-1] < 0.5).nonzero()[0])
    with pytest.raises(FloatingPointError, match=f"at step {first_bad} "):
        sample(model, "ddim", 10, grid=grid, seeds=range(3))


# ---- half precision -------------------------------------------------------------------------------------


def _dtype_spy(model):
    """Wrap the model's network to record the dtypes it receives; callbacks record the solver's."""
    seen = {"net_in": set(), "state": set(), "x0": set()}
    net = model.net

    def network(x, t):
        seen["net_in"].add(x.dtype)
        return net(x, t)

    model.net = network
    return seen


@pytest.mark.parametrize("name, options", [("ddim", {}), ("dpm_solver_pp", {}), ("sa_solver", {"tau": 0.0}),
                                           ("pndm", {})])
def test_bfloat16_gmm_samples_match_float32(name, options):
    schedule = DiscreteVP.from_config({"beta_schedule": "linear"})
    gmm = GaussianMixture.random(8, 4, schedule, seed=2)
    model = gmm.as_model()
    seen = _dtype_spy(model)
    x_T = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # exact in both
    full = sample(model, name, 20, x_T=x_T.float(), **options)
    callback = lambda i, t, x, x0: (seen["state"].add(x.dtype), seen["x0"].add(x0.dtype))  # noqa: E731
    half = sample(model, name, 20, x_T=x_T, dtype=torch.bfloat16, callback=callback, **options)
    assert half.dtype == torch.float32 and seen["state"] == seen["x0"] == {torch.float32}
    assert seen["net_in"] == {torch.float32, torch.bfloat16}  # the float32 run, then the bfloat16 one
    # the stated tolerance: bfloat16 rounds every network input and output by up to 2^-9 relative; over the
    # 20-29 evaluations of a run that moves the samples by at most 6e-2 RMS (measured at seed 2: DPM-Solver++,
    # SA-Solver 5e-3, DDIM 3.1e-2, PNDM 4.2e-2 — the ε-only multistep rules carry the rounding of early
    # evaluations furthest)
    exact = gmm.ode_solution(x_T.double(), *schedule.default_range).float()
    rms = lambda d: d.square().mean().sqrt()  # noqa: E731
    solver_error, half_cost = rms(full - exact), rms(half - full)
    assert 0 < half_cost < 6e-2, half_cost


def test_half_precision_never_leaks_into_the_state():
    """A network that answers in bfloat16 and a bfloat16 x_T: the state and x̂0 the callback sees are float32,
    and the multistep history is float32 (the result differs from a float32 network only by the output's
    rounding)."""
    gmm = GaussianMixture.random(4, 2, VPLinear(), seed=1)
    model = DiffusionModel(lambda x, t: gmm.as_model().net(x, t).to(torch.bfloat16), gmm.schedule, "epsilon",
                           sample_shape=(4,))
    dtypes = set()
    out = sample(model, "dpm_solver_pp", 10, x_T=torch.randn(3, 4).to(torch.bfloat16),
                 callback=lambda i, t, x, x0: dtypes.update({x.dtype, x0.dtype}))
    assert out.dtype == torch.float32 and dtypes == {torch.float32}


def test_bfloat16_digits16_matches_float32():
    model = diffsolve.load_model("digits16")
    seeds = range(8)
    full = sample(model, "dpm_solver_pp", 10, seeds=seeds)
    half = sample(model, "dpm_solver_pp", 10, seeds=seeds, dtype=torch.bfloat16)
    loaded = diffsolve.load_model("digits16", dtype=torch.bfloat16)
    native = sample(loaded, "dpm_solver_pp", 10, seeds=seeds)
    assert half.dtype == native.dtype == torch.float32
    # the stated tolerance: images in [−1, 1]; bfloat16 activations shift pixels by a few 1e-2 at most, and the
    # RMSE stays below 1/128 of the range's half-width ×4 (3e-2), invisible at 8-bit quantisation steps of 8e-3
    for other in (half, native):
        diff = other - full
        assert 0 < diff.square().mean().sqrt() < 3e-2, diff.square().mean().sqrt()
        assert diff.abs().max() < 0.25


def test_dtype_and_acceleration_arguments_are_checked():
    gmm = GaussianMixture.random(2, 2, VPLinear(), seed=0)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        sample(gmm.as_model(), "ddim", 5, shape=(2, 2), dtype=torch.int8)
    with pytest.raises(TypeError, match="compile: expected True or False"):
        sample(gmm.as_model(), "ddim", 5, shape=(2, 2), compile="yes")
    with pytest.raises(ValueError, match="cuda_graph=True .* needs a CUDA device; this run is on cpu"):
        sample(gmm.as_model(), "ddim", 5, shape=(2, 2), cuda_graph=True)
    loaded = diffsolve.load_model("digits16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weights are torch.bfloat16"):
        sample(loaded, "ddim", 5, seeds=[0], dtype=torch.float32)


# ---- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_network_matches_eager_to_round_off():
    """compile=True on a tiny random UNet: the same samples as eager to float32 round-off (bounded: one small
    compilation, reused by the second run)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval().requires_grad_(False)
    model = DiffusionModel(unet, DiscreteVP.from_config({"beta_schedule": "linear"}))
    eager = sample(model, "dpm_solver_pp", 6, seeds=range(2))
    compiled = sample(model, "dpm_solver_pp", 6, seeds=range(2), compile=True)
    again = sample(model, "ddim", 6, seeds=range(2), compile=True)  # the compiled network is reused
    assert model.accelerated_network(compile=True) is model.accelerated_network(compile=True)
    # an untrained UNet drives the samples to |x| ~ 300: round-off is relative to that scale
    for ours, reference in ((compiled, eager), (again, sample(model, "ddim", 6, seeds=range(2)))):
        assert 0 < reference.abs().max() and (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
