"""Task presets for image models in [−1, 1] (``diffsolve restore --task …``): the operator, the noise and each
solver's hyperparameters, the papers' settings adapted to the image size (documented per task for the
16×16 ``digits16`` model; the operators scale with ``shape``).

σ_y is given on the [0, 1] pixel range people think in and converted to the model's [−1, 1]
(:func:`sigma_from_pixels`): the papers' σ_y = 0.05 on [−1, 1] is 0.025 here.

How the papers' hyperparameters are adapted (256×256×3 → H×W×C; digits16: 16×16×1):
- geometry: box and blur kernels scale with the image: a 128² box in 256² is a (H/2)² box; the papers'
  Gaussian blur (σ = 3 px at 256², i.e. 0.19 px at 16²) and 61² motion kernels would be invisible at 16²,
  so the blurs are σ = 1.5 px (9×9) and a 9×9 motion kernel of intensity 0.5, which make deblurring a real
  problem at 16² (the Gaussian blur's transfer function is below 1 % on 65 % of the frequencies);
- DPS: ζ = 0.5 × the paper's (SR/deblur 0.3 → 0.15, inpainting 0.5 → 0.25). The step multiplies the
  gradient of the *unsquared* residual norm, a unit-norm direction, so a dimension argument suggests
  ζ·√(M/M_paper) (0.036 × the paper's at 16²: the step relative to the residual left at the noise level,
  σ_y·√M, stays the same); that under-fits the measurement badly here (DPS below the pseudo-inverse on 4 of
  6 tasks). Tuned instead on *training* digits (3 per task, DPS at 250 steps with ζ·steps fixed,
  multipliers ¼, 1, 4, 16, 64 of the dimension-scaled value; PSNR in dB for ×4 / ×16 / ×64: box
  33.5 / 31.8 / 21.8, random 31.0 / 35.1 / 24.6, SR 19.8 / 26.1 / 26.8, Gaussian blur 31.5 / 32.9 / 28.0,
  motion blur 32.5 / 33.1 / 27.4, denoise 25.9 / 24.7 / 21.2; ×¼ and ×1 gave 12–16 dB everywhere): ×16,
  i.e. 0.58 × the paper's ζ, is best or within 1.7 dB of the best on every task; 0.5 × is the preset;
- DDS: the paper's 50 steps and 5 CG steps; γ matched to the noise (see ``dds``); η (the fraction of fresh
  noise, the paper's 0.85) tuned on the same training digits as DPS's ζ (8 per task; PSNR in dB for η = 0 /
  0.5 / 0.85 / 1): box 23.4 / 27.7 / 26.6 / 26.3, random 30.6 / 31.0 / 30.3 / 28.3, SR 23.6 / 25.6 / 26.2 /
  25.0, Gaussian blur 25.5 / 30.1 / 32.3 / 32.8, motion blur 17.9 / 25.4 / 31.6 / 32.9, denoise 15.9 / 19.4 /
  25.5 / 26.4; so η = 0.5 for inpainting, 0.85 for SR, 1 for the blurs and denoising. The official code's constant
  γ = 1 (η = 0.85, an earlier checkpoint of the model) scored 3.9–13.8 dB lower than the matched γ on SR,
  random inpainting, Gaussian blur and denoising, 0.8 dB lower on box inpainting and 2.2 dB higher on
  motion blur;
- DAPS: the official per-task Langevin step (SR, Gaussian blur, random inpainting 1e-4; box inpainting,
  motion blur 5e-5; decaying to 1 %) and likelihood width: the official loss ‖A x − y‖²/τ² with τ = 0.01
  is our ½‖A x − y‖²/τ² with τ = 0.01/√2; these do not depend on the image size (per-pixel quantities).
- denoise (not in the papers): σ_y = 0.2 on [0, 1]; DPS ζ as for deblurring; DAPS uses the
  true σ_y as τ (a τ far below σ_y would fit the noise: there is nothing else to fit) and its default step
  ℓ = τ²/‖A‖² = τ².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .noise import GaussianNoise
from .operators import Blur, Denoising, Inpainting, Operator, SuperResolution

DAPS_TAU = 0.01 / math.sqrt(2)  # the official τ = 0.01 in our ½‖·‖²/τ² convention
#: the DPS step relative to the paper's (see the module docstring)
_DPS_SCALE = 0.5


def sigma_from_pixels(sigma01: float) -> float:
    """σ on the [0, 1] pixel range → σ on the model's [−1, 1] (twice as large)."""
    return 2.0 * float(sigma01)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    #: ``make(shape, seed) -> operator`` (the seed draws masks and motion kernels)
    make: Callable[[tuple, int], Operator]
    #: σ_y on the [0, 1] pixel range
    sigma01: float
    #: per solver family ("dps", "dds", "daps") the options the preset sets
    options: dict = field(default_factory=dict)

    def operator(self, shape=(1, 16, 16), seed: int = 0) -> Operator:
        return self.make(tuple(shape), int(seed))

    def noise(self, sigma01: float | None = None) -> GaussianNoise:
        return GaussianNoise(sigma_from_pixels(self.sigma01 if sigma01 is None else sigma01))

    def solver_options(self, method: str) -> dict:
        family = "daps" if method.startswith("daps") else method
        return dict(self.options.get(family, {}))


def _blur_size(shape) -> int:
    return 2 * max(1, round(shape[-1] * 4 / 16)) + 1  # 9 at 16²


TASKS: dict[str, Task] = {
    t.name: t for t in [
        Task("inpaint_box", "box inpainting: an (H/2)×(W/2) hole at a seeded position, margin H/16 (the papers' "
             "128² hole in 256², margin 16)",
             lambda shape, seed: Inpainting.box(shape, shape[-1] // 2, margin=max(1, shape[-1] // 16), seed=seed),
             0.025, {"dps": {"zeta": 0.5 * _DPS_SCALE}, "dds": {"eta": 0.5}, "daps": {"lr": 5e-5, "tau": DAPS_TAU}}),
        Task("inpaint_random", "random inpainting: 70 % of the pixels missing (seeded)",
             lambda shape, seed: Inpainting.random(shape, 0.7, seed=seed),
             0.025, {"dps": {"zeta": 0.5 * _DPS_SCALE}, "dds": {"eta": 0.5}, "daps": {"lr": 1e-4, "tau": DAPS_TAU}}),
        Task("sr4", "×4 super-resolution, antialiased bicubic",
             lambda shape, seed: SuperResolution(4, "bicubic", shape=shape),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "daps": {"lr": 1e-4, "tau": DAPS_TAU}}),
        Task("gauss_blur", "Gaussian blur σ = 1.5 px (9×9 at 16², scaled with the image), periodic boundary",
             lambda shape, seed: Blur.gaussian(1.5 * shape[-1] / 16, shape=shape, size=_blur_size(shape)),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"lr": 1e-4, "tau": DAPS_TAU}}),
        Task("motion_blur", "motion blur: a seeded 9×9 camera-shake kernel of intensity 0.5, periodic boundary",
             lambda shape, seed: Blur.motion(_blur_size(shape), shape=shape, intensity=0.5, seed=seed),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"lr": 5e-5, "tau": DAPS_TAU}}),
        Task("denoise", "denoising, σ_y = 0.2 on [0, 1]",
             lambda shape, seed: Denoising(shape),
             0.2, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"tau": None, "lr": None}}),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
