"""Measurement noise models and ``measure``: y = A(x) + n from per-sample seeds.

σ_y always refers to the model's data space (for image models trained on [−1, 1], the papers' σ_y = 0.05
is on [−1, 1]; ``diffsolve.inverse.tasks.sigma_from_pixels`` converts a σ on the [0, 1] pixel range people
think in). Noise is drawn with :class:`diffsolve.core.SeededNoise`: sample k depends only on its seed, the
same for any batch size and on any device.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..core import SeededNoise
from .operators import Operator

Tensor = torch.Tensor

#: the SeededNoise stream of measurement noise (x_T uses step −1, sampler/solver steps use 0, 1, …)
MEASUREMENT_STREAM = -1000


def _seeds(seed, batch: int) -> Tensor:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return torch.arange(batch, dtype=torch.int64) + int(seed)
    seeds = torch.as_tensor(seed, dtype=torch.int64).reshape(-1)
    if len(seeds) != batch:
        raise ValueError(f"seed: expected an integer or one seed per sample ({batch}), got {len(seeds)}")
    return seeds


class GaussianNoise:
    """n ~ N(0, σ² I) in the data space; σ = 0 is a noiseless measurement. For complex measurements the real
    and imaginary parts each get std σ (so E|n|² = 2σ²), which keeps the likelihood exp(−‖y − Ax‖²/(2σ²)) the
    same on the real and imaginary parts."""

    def __init__(self, sigma: float):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)) or not math.isfinite(sigma) \
                or sigma < 0:
            raise ValueError(f"sigma: expected a finite noise level >= 0 (sigma_y in the model's data space), "
                             f"got {sigma!r}")
        self.sigma = float(sigma)

    def add(self, y_clean: Tensor, noise: SeededNoise) -> Tensor:
        if self.sigma == 0:
            return y_clean
        n = noise.normal(y_clean.shape[1:], step=MEASUREMENT_STREAM, sub=0, dtype=torch.float64)
        if y_clean.is_complex():
            n = torch.complex(n, noise.normal(y_clean.shape[1:], step=MEASUREMENT_STREAM, sub=1, dtype=torch.float64))
        return y_clean + (self.sigma * n).to(device=y_clean.device, dtype=y_clean.dtype)

    def std(self, y: Tensor) -> float:
        """The likelihood's standard deviation per measurement element (a scalar here)."""
        return self.sigma

    def __repr__(self):
        return f"GaussianNoise(sigma={self.sigma})"


class PoissonNoise:
    """Photon-counting noise on a measurement in [``low``, ``high``]: with u = (A x − low)/(high − low) (≥ 0;
    negative values clipped), counts k ~ Poisson(rate · u) and y = low + (high − low) · k / rate. ``rate`` is
    the expected count at u = 1. (The DPS code's ``PoissonNoise(rate)`` multiplies by 255 as well: its rate
    1.0 is ``rate=255`` here; it also clips y to [−1, 1], which this does not, so that measurements with
    values above ``high``, such as Fourier magnitudes, keep their information.) Real measurements only.

    Solvers use the Gaussian approximation of the likelihood with per-element variance
    (high − low) · (y − low)/rate, floored at one count, (high − low)²/rate², and as σ_y of each sample the
    RMS of its own per-element stds (never a batch statistic: a sample's run depends on its measurement alone)."""

    def __init__(self, rate: float, *, low: float = -1.0, high: float = 1.0):
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not math.isfinite(rate) \
                or rate <= 0:
            raise ValueError(f"rate: expected a finite photon count > 0, got {rate!r}")
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"low, high: expected finite values with high > low, got low={low}, high={high}")
        self.rate, self.low, self.high = float(rate), float(low), float(high)

    def add(self, y_clean: Tensor, noise: SeededNoise) -> Tensor:
        from scipy.stats import norm, poisson

        if y_clean.is_complex():
            raise ValueError("PoissonNoise: the measurement is complex; Poisson noise needs real intensities")
        span = self.high - self.low
        lam = (self.rate * ((y_clean.double().cpu() - self.low) / span).clamp_min(0)).numpy()
        # inverse-CDF sampling from the seeded normal stream: batch-size invariant and vectorised
        u = norm.cdf(noise.normal(y_clean.shape[1:], step=MEASUREMENT_STREAM, dtype=torch.float64).numpy())
        counts = poisson.ppf(u, lam)
        counts = np.where(lam > 0, counts, 0.0)
        y = self.low + span * torch.from_numpy(counts) / self.rate
        return y.to(device=y_clean.device, dtype=y_clean.dtype)

    def std(self, y: Tensor) -> Tensor:
        span = self.high - self.low
        var = (span * (y - self.low) / self.rate).clamp_min(span**2 / self.rate**2)
        return var.sqrt()

    def __repr__(self):
        return f"PoissonNoise(rate={self.rate}, low={self.low}, high={self.high})"


def as_noise(noise) -> GaussianNoise | PoissonNoise:
    """A noise model from a noise model or a number (σ_y of Gaussian noise)."""
    if isinstance(noise, (GaussianNoise, PoissonNoise)):
        return noise
    if isinstance(noise, (int, float, np.floating)) and not isinstance(noise, bool):
        return GaussianNoise(float(noise))
    raise TypeError(f"noise: expected GaussianNoise(sigma), PoissonNoise(rate) or a number (sigma_y of Gaussian "
                    f"noise), got {noise!r}")


def measure(operator: Operator, x: Tensor, noise, seed: int | Sequence[int] = 0) -> Tensor:
    """y = A(x) + n. ``noise``: a noise model or σ_y (Gaussian). ``seed``: an integer (sample k uses
    seed + k) or one seed per sample; the noise of a sample depends only on its seed."""
    if not isinstance(operator, Operator):
        raise TypeError(f"operator: expected a diffsolve.inverse operator, got {type(operator).__name__}")
    noise = as_noise(noise)
    seeds = _seeds(seed, x.shape[0])
    with torch.no_grad():
        y = operator.A(x)
        return noise.add(y, SeededNoise(seeds, device="cpu"))
