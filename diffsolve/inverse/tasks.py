"""Task presets for image models in [−1, 1] (``diffsolve restore --task …``): the operator, the noise and each
solver's hyperparameters, at two reference image sizes:

- **256×256, the papers' settings** (DPS, DDS, DAPS on FFHQ/ImageNet): box inpainting with a 128×128 hole
  (seeded position, margin 16), random inpainting with 70 % of the pixels missing, ×4 bicubic
  super-resolution, Gaussian blur with a 61×61 kernel of σ = 3.0 px, motion blur with a 61×61 kernel of
  intensity 0.5, σ_y = 0.05 on [−1, 1]; and the papers' solver options: DPS's ζ of the official configs
  (inpainting 0.5, SR and deblurring 0.3), DDS's η = 0.85, DAPS's official Langevin steps and τ;
- **16×16, the digits16 presets**, tuned on the shipped digits model (below).

Other sizes take the setting of the nearer reference on a log scale, i.e. sides of 64 px and more the papers'
and smaller ones digits16's (64 = √(16·256)), with its pixel lengths scaled by side / reference: box side and
margin (rounded down, at least 1), blur σ and kernel size (rounded to an odd size ≥ 3); the fractions (missing
pixels, SR factor, motion intensity), σ_y and the solver options are those of the reference. So a 512×512
model gets a 256×256 hole and a 121×121 blur of σ = 6, a 64×64 model a 32×32 hole and a 17×17 blur of
σ = 0.75 (the papers' degradations relative to the image), and sizes below 64 what digits16 tuned, as before
the 256×256 settings existed. A setting that does not fit an image (×4 SR of a side not divisible by 4) is an
error naming the task, the size and the setting. The side is min(H, W) of the image (models are square).

A task is one :class:`Task` entry in ``TASKS``: its operator builder, σ_y, the digits16 solver options and,
for tasks whose operator has pixel lengths, a ``geometry`` per reference side; the papers' solver options
follow from the digits16 ones (:func:`papers_options`). A task without ``geometry`` builds the same operator
relative to the image at every size.

σ_y is given on the [0, 1] pixel range people think in and converted to the model's [−1, 1]
(:func:`sigma_from_pixels`): the papers' σ_y = 0.05 on [−1, 1] is 0.025 here.

How the digits16 presets adapt the papers' (256×256×3 → 16×16×1):
- geometry: box and blur kernels scale with the image: a 128² box in 256² is a (H/2)² box; the papers'
  Gaussian blur (σ = 3 px at 256², i.e. 0.19 px at 16²) and 61² motion kernels would be invisible at 16²,
  so the blurs are σ = 1.5 px (9×9) and a 9×9 motion kernel of intensity 0.5, which make deblurring a real
  problem at 16² (the Gaussian blur's transfer function is below 1 % on 65 % of the frequencies);
- DPS: ζ = 0.5 × the paper's (SR/deblur 0.3 → 0.15, inpainting 0.5 → 0.25). The step multiplies the
  gradient of the *unsquared* residual norm, a unit-norm direction, so a dimension argument suggests
  ζ·√(M/M_paper) (0.036 × the paper's at 16²: the step relative to the residual left at the noise level,
  σ_y·√M, stays the same); that under-fits the measurement badly here (DPS below the pseudo-inverse on 4 of
  6 tasks). Tuned instead on *training* digits (``OMP_NUM_THREADS=1 python benchmarks/inverse_tuning.py dps-zeta``:
  3 digits per task, DPS at 250 steps with ζ·steps fixed, multipliers ¼, 1, 4, 16, 64 of the dimension-scaled
  value; PSNR in dB for ×1 / ×4 / ×16 / ×64: box 24.2 / 31.6 / 32.6 / 21.5, random 23.4 / 32.4 / 35.2 / 25.3,
  SR 15.3 / 20.9 / 24.9 / 22.7, Gaussian blur 19.3 / 29.6 / 34.6 / 28.6, motion blur 20.2 / 30.8 / 36.4 / 28.6,
  denoise 18.6 / 26.7 / 26.0 / 17.9; ×¼ gave 12.6–16.6 dB everywhere): ×16, i.e. 0.58 × the paper's ζ, is
  best on five tasks and within 0.7 dB of the best on denoising (3 digits: ± 0.4–1.7 dB); 0.5 × is the preset;
- DDS: the paper's 50 steps and 5 CG steps; γ matched to the noise (see ``dds``); η (the fraction of fresh
  noise, the paper's 0.85) tuned on training digits (``benchmarks/inverse_tuning.py dds-eta``: 8 per task;
  PSNR in dB for η = 0 / 0.5 / 0.85 / 1): box 23.4 / 27.3 / 26.3 / 26.2, random 30.5 / 31.0 / 30.7 / 28.6,
  SR 23.0 / 24.7 / 25.1 / 24.2, Gaussian blur 25.2 / 29.8 / 32.1 / 32.8, motion blur 17.9 / 25.6 / 32.4 / 33.6,
  denoise 16.1 / 19.5 / 25.4 / 26.1; so η = 0.5 for inpainting, 0.85 for SR, 1 for the blurs and denoising.
  The official code's constant γ = 1 (at η = 0.85) scores lower on every task: by 0.6 dB on box inpainting,
  3.1–5.5 dB on random inpainting and the blurs, 7.5 dB on denoising and 13.8 dB on SR;
- DAPS: the official per-task Langevin step (SR, Gaussian blur, random inpainting 1e-4; box inpainting,
  motion blur 5e-5; decaying to 1 %) and likelihood width: the official loss ‖A x − y‖²/τ² with τ = 0.01
  is our ½‖A x − y‖²/τ² with τ = 0.01/√2; these do not depend on the image size (per-pixel quantities).
- denoise (not in the papers): σ_y = 0.2 on [0, 1]; DPS ζ as for deblurring; DAPS uses the
  true σ_y as τ (a τ far below σ_y would fit the noise: there is nothing else to fit) and its default step
  ℓ = τ²/‖A‖² = τ².

The papers' home ground (issue 15), tuned on 8 training digits with ``benchmarks/inverse_tuning.py sweep``
(commands and tables in benchmarks/RESULTS.md, "Inverse problems on the papers' home ground"):
- mri4: single-coil Cartesian MRI of the real image, exactly W/4 lines (:func:`mri_mask`; at 16²: the DC line
  and 3 random ones). A real image's k-space is Hermitian, so a sampled line also fixes its mirror: the
  information is that of ≈ 2× acceleration of a complex image. DPS ζ = 0.3 (of 0.03 / 0.1 / 0.3 / 1:
  28.7 / 33.8 / 35.2 / 25.0 dB), DDS η = 0.5 (0.5 / 0.85 / 1: 32.1 / 32.0 / 31.7), DAPS ℓ = τ²/‖A‖² with the
  official τ (σ_min 0.1: 31.3 against 30.8 at 0.01);
- ct: ``CT_ANGLES`` = 4 parallel-beam angles, 23 detector bins: 92 ray sums for 256 pixels, so A has a null
  space of more than half the image (DDS's sparse-view setting, which at 256² is 8 of ≈ 400 angles a full
  scan needs). DPS ζ = 0.01 (of 0.003 / 0.01 / 0.03 / 0.1: 23.0 / 36.1 / 34.4 / 25.7; ‖A‖ ≈ 8 makes the
  gradient larger than for the ‖A‖ ≈ 1 tasks), DDS η = 1 (35.4 / 35.4 / 35.6), DAPS σ_min = 0.01 (37.9
  against 32.6);
- phase_retrieval: y = |F(pad(u))|, u = (x + 1)/2, oversampling 2 (24² magnitudes of a 16² image), σ_y = 0.05
  on the magnitudes (the DAPS paper's). Scores are taken up to the 180° rotation and 1-px horizontal shifts
  (``Task.align``). DPS ζ = 1 (of 0.1 / 0.3 / 1 / 3: 22.8 / 25.1 / 26.2 / 21.2; the paper's 1.0 under Poisson
  noise), DAPS the official ℓ = 5e-5 and τ, σ_min = 0.01 (25.8 against 24.2). DDS needs a linear operator.
- DDS's step count (``Task.steps``; ``benchmarks/inverse_tuning.py dds-steps``, 8 training digits, DDS at 20 /
  25 / 30 / 40 / 50 steps against 1000-step DPS, the fewest steps within 0.1 dB of DPS, else the best):
  Gaussian blur 20 (+0.14 dB); SR, motion blur, MRI and CT 50, the paper's count (DDS − DPS at 50 steps:
  +0.34, +0.66, −2.36, −1.44 dB; fewer steps lose 0.9–4 dB more); inpainting and denoising keep 50.
- DAPS on the older tasks (same sweep): σ_min = 0.01 beats the official 0.1 on inpainting (box 26.7 vs 24.9,
  random 30.0 vs 27.2) and denoising (22.9 vs 21.4) and loses on SR and the blurs (by 0.5–2.1 dB), so the
  presets take 0.01 there and keep 0.1 elsewhere; τ = σ_y instead of the official τ loses 2–12 dB on every
  task but denoising (with the official ℓ, which is tied to the official τ); the official values stay
  selectable (``--sigma_min 0.1``, ``--tau``). Langevin steps 50 or 200 instead of the official 100 win on
  no task by more than a standard error and lose 0.8–1.4 dB on SR, the blurs and phase retrieval: 100 kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .noise import GaussianNoise
from .operators import CT, MRI, Blur, Denoising, Inpainting, Operator, PhaseRetrieval, SuperResolution

DAPS_TAU = 0.01 / math.sqrt(2)  # the official τ = 0.01 in our ½‖·‖²/τ² convention
#: the DPS step relative to the paper's (see the module docstring)
_DPS_SCALE = 0.5
#: DDS's fraction of fresh noise in the paper
PAPERS_DDS_ETA = 0.85
#: the reference image sides: digits16's tuned presets and the papers' settings
DIGITS16, PAPERS = 16, 256
#: sides from here up take the papers' setting (the geometric mean of the two references)
PAPERS_FROM = 64
#: CT's number of projection angles at any image size: few enough that A has a large null space
CT_ANGLES = 4


def sigma_from_pixels(sigma01: float) -> float:
    """σ on the [0, 1] pixel range → σ on the model's [−1, 1] (twice as large)."""
    return 2.0 * float(sigma01)


def papers_options(options: dict) -> dict:
    """The papers' solver options from a task's digits16 ones: DPS's ζ of the official configs (the digits16
    ζ is ``_DPS_SCALE`` × it) and DDS's η = 0.85; DAPS's are the official ones at both sizes, except σ_min, which
    digits16 lowers to 0.01 on some tasks (chosen on training digits) and the papers keep at 0.1."""
    out = {family: dict(opts) for family, opts in options.items()}
    out.get("daps", {}).pop("sigma_min", None)
    if "zeta" in out.get("dps", {}):
        out["dps"]["zeta"] = out["dps"]["zeta"] / _DPS_SCALE
    if "dds" in out:
        out["dds"]["eta"] = PAPERS_DDS_ETA
    return out


def _scaled_length(key: str, value, scale: float):
    """A pixel length of a task's geometry at ``scale`` × its reference size (see the module docstring)."""
    if key in ("box", "margin"):
        return max(1, math.floor(value * scale))
    if key == "kernel":  # odd, ≥ 3: 2·round(half-width · scale) + 1
        return 2 * max(1, round((value - 1) / 2 * scale)) + 1
    if key == "sigma":
        return value * scale
    raise KeyError(f"{key!r} is not a pixel length of a task geometry (box, margin, kernel, sigma)")


@dataclass(frozen=True)
class Setting:
    """A task resolved for one image size: which reference it scales, the operator's geometry and the solver
    options."""

    reference: int
    scale: float
    geometry: dict
    options: dict

    def __str__(self) -> str:
        what = "the papers' 256×256 setting" if self.reference == PAPERS else "the digits16 16×16 preset"
        if self.scale != 1:
            what += f" scaled ×{self.scale:g}"
        numbers = ", ".join(f"{k} {v:g}" for k, v in self.geometry.items())
        return f"{numbers} ({what})" if numbers else what


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    #: ``make(shape, seed, **geometry) -> operator`` (the seed draws masks and motion kernels)
    make: Callable[..., Operator]
    #: σ_y on the [0, 1] pixel range
    sigma01: float
    #: per solver family ("dps", "dds", "daps") the options of the digits16 preset (the papers' follow from
    #: them: :func:`papers_options`)
    options: dict = field(default_factory=dict)
    #: per reference side (DIGITS16, PAPERS) the operator's pixel lengths there (box, margin, kernel, sigma);
    #: empty: the operator is the same relative to the image at every size
    geometry: dict = field(default_factory=dict)
    #: per solver name the step count the digits16 preset sets (others, and every solver at the papers' size,
    #: run their solver's default)
    steps: dict = field(default_factory=dict)
    #: ``ambiguities(x) -> [x, T1(x), …]``: the transforms of x that give the same measurement (phase
    #: retrieval's 180° rotation and shifts); restorations are scored against the closest one
    ambiguities: Callable[[torch.Tensor], list] | None = None
    #: whether y is an image of the sample's grid (shown and written as a PNG), not k-space, a sinogram or
    #: Fourier magnitudes
    image_measurement: bool = True
    #: the solver options at the papers' size where they do not follow from the digits16 ones by
    #: :func:`papers_options` (a task whose digits16 ζ is not ``_DPS_SCALE`` × the paper's)
    papers: dict | None = None

    def setting(self, shape=(1, 16, 16)) -> Setting:
        """The geometry and solver options for images of ``shape`` (…, H, W)."""
        side = min(int(s) for s in tuple(shape)[-2:])
        reference = PAPERS if side >= PAPERS_FROM else DIGITS16
        scale = side / reference
        geometry = {k: _scaled_length(k, v, scale) for k, v in self.geometry.get(reference, {}).items()}
        if reference == DIGITS16:
            options = self.options
        else:
            options = papers_options(self.options) if self.papers is None else self.papers
        return Setting(reference, scale, geometry, options)

    def operator(self, shape=(1, 16, 16), seed: int = 0) -> Operator:
        shape = tuple(shape)
        setting = self.setting(shape)
        try:
            return self.make(shape, int(seed), **setting.geometry)
        except ValueError as err:
            size = "×".join(map(str, shape))
            raise ValueError(f"task {self.name}: its setting for {size} images, {setting}, does not fit them ({err}); "
                             f"resize the images (diffsolve degrade/restore --resize) or build the operator for this "
                             f"size yourself (diffsolve.inverse)") from None

    def solver_steps(self, method: str, shape=(1, 16, 16)) -> int | None:
        return self.steps.get(method) if self.setting(shape).reference == DIGITS16 else None

    def align(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """x, each sample replaced by its version among ``ambiguities`` closest to the reference (x itself for
        tasks without ambiguities): what PSNR, SSIM and the classifier see."""
        if self.ambiguities is None:
            return x
        candidates = torch.stack([c.to(reference.dtype) for c in self.ambiguities(x)])  # (T, B, …)
        err = (candidates - reference).pow(2).flatten(2).mean(2)  # (T, B)
        best = err.argmin(0)
        return candidates[best, torch.arange(x.shape[0])]

    def noise(self, sigma01: float | None = None) -> GaussianNoise:
        return GaussianNoise(sigma_from_pixels(self.sigma01 if sigma01 is None else sigma01))

    def solver_options(self, method: str, shape=(1, 16, 16)) -> dict:
        family = "daps" if method.startswith("daps") else method
        return dict(self.setting(shape).options.get(family, {}))


def mri_mask(shape, acceleration: int = 4, center_fraction: float = 0.08, seed: int = 0) -> torch.Tensor:
    """A Cartesian k-space mask (H, W) of exactly round(W/acceleration) phase-encoding lines (columns): the
    centre max(1, round(center_fraction·W)) plus lines drawn without replacement from ``seed``. Unlike
    ``MRI.cartesian_mask`` (each line kept with a probability, fastMRI's RandomMaskFunc), the acceleration
    is exact, which matters at 16 lines (that mask keeps 3–6 of 16 for seeds 0–3)."""
    h, w = shape[-2:]
    center = max(1, round(center_fraction * w))
    start = (w - center + 1) // 2
    cols = np.zeros(w, dtype=bool)
    cols[start:start + center] = True
    rest = np.flatnonzero(~cols)
    cols[np.random.default_rng(seed).choice(rest, max(round(w / acceleration) - center, 0), replace=False)] = True
    return torch.from_numpy(np.broadcast_to(cols, (h, w)).astype(np.float64).copy())


def _rotations_and_shifts(x: torch.Tensor) -> list:
    """x and its 180° rotation, each also shifted by one pixel left and right (cyclically in the frame). The
    rotation leaves Fourier magnitudes unchanged for any image; a shift does when the column it moves out is
    background (u = 0), as for 88–99 % of the digits (their first and last columns are blank after the 8 → 16
    upsampling); vertical shifts almost never do."""
    return [v.roll(s, -1) for v in (x, x.flip(-2, -1)) for s in (0, -1, 1)]


TASKS: dict[str, Task] = {
    t.name: t for t in [
        Task("inpaint_box", "box inpainting: a square hole at a seeded position (papers: 128×128 in 256×256, "
             "margin 16; digits16: 8×8, margin 1)",
             lambda shape, seed, box, margin: Inpainting.box(shape, box, margin=margin, seed=seed),
             0.025, {"dps": {"zeta": 0.5 * _DPS_SCALE}, "dds": {"eta": 0.5}, "daps": {"lr": 5e-5, "tau": DAPS_TAU, "sigma_min": 0.01}},
             {DIGITS16: {"box": 8, "margin": 1}, PAPERS: {"box": 128, "margin": 16}}),
        Task("inpaint_random", "random inpainting: 70 % of the pixels missing (seeded)",
             lambda shape, seed: Inpainting.random(shape, 0.7, seed=seed),
             0.025, {"dps": {"zeta": 0.5 * _DPS_SCALE}, "dds": {"eta": 0.5}, "daps": {"lr": 1e-4, "tau": DAPS_TAU, "sigma_min": 0.01}}),
        Task("sr4", "×4 super-resolution, antialiased bicubic",
             lambda shape, seed: SuperResolution(4, "bicubic", shape=shape),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "daps": {"lr": 1e-4, "tau": DAPS_TAU}}),
        Task("gauss_blur", "Gaussian blur, periodic boundary (papers: σ = 3 px, 61×61; digits16: σ = 1.5 px, 9×9)",
             lambda shape, seed, sigma, kernel: Blur.gaussian(sigma, shape=shape, size=kernel),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"lr": 1e-4, "tau": DAPS_TAU}},
             {DIGITS16: {"sigma": 1.5, "kernel": 9}, PAPERS: {"sigma": 3.0, "kernel": 61}}, steps={"dds": 20}),
        Task("motion_blur", "motion blur: a seeded camera-shake kernel of intensity 0.5, periodic boundary (papers: "
             "61×61; digits16: 9×9)",
             lambda shape, seed, kernel: Blur.motion(kernel, shape=shape, intensity=0.5, seed=seed),
             0.025, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"lr": 5e-5, "tau": DAPS_TAU}},
             {DIGITS16: {"kernel": 9}, PAPERS: {"kernel": 61}}),
        Task("denoise", "denoising, σ_y = 0.2 on [0, 1] (not a papers' task: the same at every size)",
             lambda shape, seed: Denoising(shape),
             0.2, {"dps": {"zeta": 0.3 * _DPS_SCALE}, "dds": {"eta": 1.0}, "daps": {"tau": None, "lr": None, "sigma_min": 0.01}}),
        Task("mri4", "single-coil Cartesian MRI of the (real) image, 4× acceleration: W/4 k-space lines, the "
             "centre 8 % (at least one) plus seeded random ones; complex k-space with noise σ_y on each part",
             lambda shape, seed: MRI(mri_mask(shape, 4, 0.08, seed), complex_input=False),
             0.025, {"dps": {"zeta": 0.3}, "dds": {"eta": 0.5}, "daps": {"lr": None, "tau": DAPS_TAU}},
             image_measurement=False,  # no papers' DPS setting: digits16's ζ, the papers' DDS η
             papers={"dps": {"zeta": 0.3}, "dds": {"eta": PAPERS_DDS_ETA}, "daps": {"lr": None, "tau": DAPS_TAU}}),
        Task("ct", f"sparse-view parallel-beam CT: {CT_ANGLES} angles in [0, π) × ⌈√2·W⌉ detector bins "
             "(92 ray sums for 256 pixels at 16²), noise σ_y per ray sum",
             lambda shape, seed: CT(CT_ANGLES, shape[-1]),
             0.025, {"dps": {"zeta": 0.01}, "dds": {"eta": 1.0}, "daps": {"lr": None, "tau": DAPS_TAU, "sigma_min": 0.01}},
             image_measurement=False,  # no papers' DPS/DAPS setting: digits16's ζ, the papers' DDS η and DAPS σ_min
             papers={"dps": {"zeta": 0.01}, "dds": {"eta": PAPERS_DDS_ETA}, "daps": {"lr": None, "tau": DAPS_TAU}}),
        Task("phase_retrieval", "Fourier phase retrieval, oversampling 2: |F(pad((x + 1)/2))|, the papers' "
             "mapping to [0, 1]; scored up to the 180° rotation and 1-px horizontal shifts",
             lambda shape, seed: PhaseRetrieval(2.0, shape=shape),
             0.025, {"dps": {"zeta": 1.0}, "daps": {"lr": 5e-5, "tau": DAPS_TAU, "sigma_min": 0.01}},
             ambiguities=_rotations_and_shifts, image_measurement=False,
             papers={"dps": {"zeta": 1.0}, "daps": {"lr": 5e-5, "tau": DAPS_TAU}}),  # the official configs
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
