"""DiffsolveScheduler against diffusers' scheduler contract: the properties diffusers' ``SchedulerCommonTest``
checks, counted per sampler, and full sampling loops next to diffusers' own schedulers per grid option.

    python benchmarks/scheduler_suite.py

Table 1: per fixed-grid sampler, how many properties hold, how many are refused with a clear error by design
(the error named), and which fail. Table 2: the largest relative difference |ours − diffusers| / max|diffusers|
of the final sample of a 10-step loop of a random tiny UNet2DModel (tests/conftest.py's), per diffusers
scheduler config and prediction type. The same checks, asserted, are tests/test_scheduler_contract.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, SASolverScheduler

from diffsolve import DiffsolveScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny_unet  # noqa: E402

SAMPLERS = [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm_solver_pp", {}), ("dpm_solver_pp", {"order": 3}),
            ("pndm", {}), ("pndm", {"skip_prk": True}), ("sa_solver", {"tau": 1.0}), ("bdia", {}),
            ("euler_maruyama", {})]
X_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def loop(scheduler, unet, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = X_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **step_kwargs).prev_sample
    return x


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def properties(unet, sampler: str, options: dict) -> dict:
    """name → a callable that returns True when the property holds (or raises the by-design error)."""

    def make(**kw):
        return DiffsolveScheduler(sampler=sampler, sampler_options=options, **kw)

    def saved_round_trip():
        with tempfile.TemporaryDirectory() as folder:
            make().save_config(folder)
            return public(DiffsolveScheduler.from_pretrained(folder).config) == public(make().config)

    def through(cls):
        def check():
            ours = make(beta_schedule="scaled_linear")
            back = DiffsolveScheduler.from_config(cls.from_config(ours.config).config, sampler=sampler,
                                                  sampler_options=options, diffusers_grid=None)
            ours.set_timesteps(5)
            back.set_timesteps(5)
            return back.config.beta_schedule == "scaled_linear" and torch.equal(ours.timesteps, back.timesteps)
        return check

    def shapes():
        s = make()
        s.set_timesteps(4)
        out = s.step(torch.zeros_like(X_T), s.timesteps[0], X_T)
        return out.prev_sample.shape == X_T.shape and out.pred_original_sample.shape == X_T.shape

    def tuple_output():
        s = make()
        s.set_timesteps(4)
        out = s.step(torch.zeros_like(X_T), s.timesteps[0], X_T, return_dict=False)
        return isinstance(out, tuple) and out[0].shape == X_T.shape

    def fp16():
        s = make()
        s.set_timesteps(4)
        return s.step(torch.zeros_like(X_T).half(), s.timesteps[0], X_T.half()).prev_sample.dtype == torch.float16

    def generator():
        s = make()
        a = loop(s, unet, 4, generator=torch.Generator().manual_seed(1))
        return torch.equal(a, loop(s, unet, 4, generator=torch.Generator().manual_seed(1)))

    def scale_model_input():
        return torch.equal(make().scale_model_input(X_T, 10, extra=1), X_T)

    def add_noise():
        x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
        ref = DDPMScheduler().add_noise(x0, noise, t)
        return ((make().add_noise(x0, noise, t) - ref).abs().max() / ref.abs().max()).item() <= 1e-6

    def trained_betas():
        betas = np.linspace(1e-4, 0.03, 1000).tolist()
        s = make(trained_betas=betas)
        return torch.allclose(s.betas.double(), torch.tensor(betas, dtype=torch.float64), atol=1e-7)

    def spacing(name):
        def check():
            theirs = DPMSolverMultistepScheduler(timestep_spacing=name)
            ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler, sampler_options=options)
            theirs.set_timesteps(10)
            ours.set_timesteps(10)
            if sampler == "pndm":  # evaluations beyond one per step: the grid points are DPM-Solver's
                return set(theirs.timesteps.tolist()) <= set(ours.timesteps.tolist())
            return ours.timesteps.tolist() == theirs.timesteps.tolist()
        return check

    def custom_timesteps():
        s = make()
        s.set_timesteps(timesteps=[999, 600, 300, 100])
        return s.timesteps.tolist()[0] == 999 and torch.isfinite(loop_custom(s)).all()

    def loop_custom(s):
        x = X_T.clone()
        with torch.no_grad():
            for t in s.timesteps:
                x = s.step(unet(x, t).sample, t, x).prev_sample
        return x

    def begin_index():
        s = make()
        s.set_timesteps(8)
        s.set_begin_index(3)
        x = s.add_noise(X_T, X_T, s.timesteps[3:4])
        with torch.no_grad():
            for t in s.timesteps[3:]:
                x = s.step(unet(x, t).sample, t, x).prev_sample
        return torch.isfinite(x).all().item()

    def eta():
        s = make()
        return torch.isfinite(loop(s, unet, 4, eta=1.0 if sampler == "ddim" else 0.0)).all().item()

    checks = {"config save/load": saved_round_trip, "via DDPMScheduler": through(DDPMScheduler),
              "via DDIMScheduler": through(DDIMScheduler), "via DPMSolverMultistepScheduler":
              through(DPMSolverMultistepScheduler), "via PNDMScheduler": through(PNDMScheduler),
              "step shapes": shapes, "return_dict=False": tuple_output, "fp16": fp16, "generator": generator,
              "scale_model_input(**kw)": scale_model_input, "add_noise": add_noise, "trained_betas": trained_betas,
              "custom timesteps": custom_timesteps, "set_begin_index": begin_index, "step(eta=)": eta}
    checks.update({f"timestep_spacing={n}": spacing(n) for n in ("leading", "trailing", "linspace")})
    return checks


LOOPS = [
    ("DDIM leading", DDIMScheduler, dict(clip_sample=False), "ddim", {}),
    ("DDIM trailing", DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing"), "ddim", {}),
    ("DDIM steps_offset=1, set_alpha_to_one=False", DDIMScheduler,
     dict(clip_sample=False, steps_offset=1, set_alpha_to_one=False), "ddim", {}),
    ("DDIM set_alpha_to_one=False (zero-length last step)", DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False),
     "ddim", {}),
    ("DPM-Solver++ 2M linspace", DPMSolverMultistepScheduler, dict(), "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M trailing, sigma_min", DPMSolverMultistepScheduler,
     dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"), "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M leading, steps_offset=1", DPMSolverMultistepScheduler, dict(timestep_spacing="leading", steps_offset=1),
     "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M karras", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M lu_lambdas", DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M exponential", DPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "dpm_solver_pp", {}),
    ("DPM-Solver++ 2M beta", DPMSolverMultistepScheduler, dict(use_beta_sigmas=True), "dpm_solver_pp", {}),
    ("DPM-Solver++ 3M, third_order=diffusers", DPMSolverMultistepScheduler, dict(solver_order=3), "dpm_solver_pp",
     {"order": 3, "third_order": "diffusers"}),
    ("DPM-Solver++ 3M, third_order=exact", DPMSolverMultistepScheduler, dict(solver_order=3), "dpm_solver_pp",
     {"order": 3, "third_order": "exact"}),
    ("PNDM (PRK + PLMS), steps_offset=1", PNDMScheduler, dict(steps_offset=1), "pndm", {}),
    ("PNDM skip_prk_steps, steps_offset=1", PNDMScheduler, dict(steps_offset=1, skip_prk_steps=True), "pndm",
     {"skip_prk": True}),
    ("SA-Solver 3/3, τ = 0 (float64 σ table)", SASolverScheduler,
     dict(tau_func=lambda t: 0, predictor_order=3, corrector_order=3), "sa_solver",
     {"tau": 0.0, "predictor_order": 3, "corrector_order": 3}),
]


def main() -> None:
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()  # the config keys each scheduler ignores, by design
    unet = make_tiny_unet(seed=2)
    print("| sampler | options | properties checked | hold | refused by design | failing |")
    print("|---|---|---|---|---|---|")
    for sampler, options in SAMPLERS:
        checks = properties(unet, sampler, options)
        hold, refused, failing = 0, [], []
        for name, check in checks.items():
            try:
                if check():
                    hold += 1
                else:
                    failing.append(name)
            except (ValueError, TypeError) as err:  # a clear error where a property cannot hold by design
                refused.append(f"{name}: {str(err).split('): ', 1)[-1][:110]}…")
        print(f"| {sampler} | {options or ''} | {len(checks)} | {hold} | {'; '.join(refused) or 0} | "
              f"{', '.join(failing) or 0} |")
    print("\n| diffusers scheduler config (10 steps) | epsilon | v_prediction | sample |")
    print("|---|---|---|---|")
    for name, cls, config, sampler, options in LOOPS:
        cells = []
        for prediction in ("epsilon", "v_prediction", "sample"):
            if cls is PNDMScheduler and prediction != "epsilon":
                cells.append("— (diffusers' v/x0 conversion differs)")
                continue
            theirs = cls(prediction_type=prediction, **config)
            ours = DiffsolveScheduler.from_config(theirs.config, sampler=sampler, sampler_options=options)
            theirs.set_timesteps(10)
            if cls is SASolverScheduler:
                theirs.sigmas = theirs.sigmas.double()
            x = X_T.clone()
            with torch.no_grad():
                for t in theirs.timesteps:
                    x = theirs.step(unet(x, t).sample, t, x).prev_sample
            out = loop(ours, unet, 10)
            cells.append(f"{((out - x).abs().max() / x.abs().max()).item():.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
