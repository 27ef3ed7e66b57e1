"""Feature statistics, the Fréchet distance and KID.

* :func:`frechet_distance` — ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^½ in float64, with the trace term from
  the eigenvalues λᵢ of Σ₁Σ₂: Tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ. Σ₁Σ₂ is similar to Σ₁^½ Σ₂ Σ₁^½ = (Σ₁^½Σ₂^½)(Σ₁^½Σ₂^½)ᵀ, so
  its eigenvalues are real, ≥ 0, and their square roots are exactly the singular values of Σ₁^½Σ₂^½, which
  is how they are computed (Σ^½ from ``eigh``). Taking √ of eigenvalues computed directly (``eigvals(Σ₁Σ₂)``,
  as torch-fidelity does) turns the round-off δ ≈ 1e-16·‖Σ‖² of every zero eigenvalue into √δ ≈ 1e-8·‖Σ‖,
  which for covariances of fewer samples than dimensions gives FID(X, X) ≈ −1e-5 instead of 0; the singular
  values carry only δ. No ``scipy.linalg.sqrtm`` (whose ``disp=`` argument scipy 1.18 removed).
* :func:`kid` — the unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over
  random subsets (torch-fidelity's estimator and subset draws; 100 subsets of 1000 by default).
* :class:`Statistics` — mean, covariance, count and extractor id of a feature set (plus a bounded random
  subset of the features themselves, for KID), saved to / loaded from ``.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write

STATS_FORMAT = "diffsolve-fid-stats-v1"


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64 (see the module docstring)."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means: expected two vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances: expected shape ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    sym = (sigma + sigma.T) / 2.0
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr (Σ₁Σ₂)^½ = Σᵢ √λᵢ(Σ₁Σ₂) = Σᵢ σᵢ(Σ₁^½Σ₂^½) for symmetric PSD Σ₁, Σ₂ (float64)."""
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    return float(np.linalg.svd(psd_sqrt(sigma1) @ psd_sqrt(sigma2), compute_uv=False).sum())


def _mmd2_poly(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(features1, features2, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> tuple[float, float, int]:
    """Kernel Inception Distance: ``(mean, std, subset size used)`` of the unbiased MMD² over ``subsets`` random
    subsets drawn without replacement (numpy ``RandomState(seed)``, torch-fidelity's draws and default seed).
    The subset size is ``min(subset_size, len(features1), len(features2))``; computed in float64."""
    f1, f2 = np.asarray(features1), np.asarray(features2)  # subsets are converted to float64 as drawn
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kid: expected two feature matrices (n, d) of one d, got {f1.shape} and {f2.shape}")
    if subsets < 1:
        raise ValueError(f"kid: subsets must be >= 1, got {subsets}")
    m = min(int(subset_size), len(f1), len(f2))
    if m < 2:
        raise ValueError(f"kid: needs at least 2 features in each set (got {len(f1)} and {len(f2)})")
    gamma = 1.0 / f1.shape[1] if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)].astype(np.float64)
        y = f2[rng.choice(len(f2), m, replace=False)].astype(np.float64)
        mmds[i] = _mmd2_poly(x, y, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std()), m


def mean_and_covariance(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof = 1, as ``np.cov``) in float64, in chunks of rows so that a large
    float32 feature matrix is never copied to float64 whole. Deterministic for a given row order."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"statistics need at least 2 samples, got {n}")
    mu = np.zeros(d)
    for i in range(0, n, chunk):
        mu += features[i:i + chunk].astype(np.float64).sum(0)
    mu /= n
    sigma = np.zeros((d, d))
    for i in range(0, n, chunk):
        c = features[i:i + chunk].astype(np.float64) - mu
        sigma += c.T @ c
    return mu, sigma / (n - 1)


@dataclass
class Statistics:
    """Mean (d,), covariance (d, d), sample count and extractor id of a feature set; ``kid_features`` is a
    seeded random subset of at most ``kid_max`` of the features (sorted by index), or None."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str
    kid_features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features, extractor: str, *, kid_max: int = 10_000, seed: int = 0) -> "Statistics":
        features = np.asarray(features)
        mu, sigma = mean_and_covariance(features)
        keep = None
        if kid_max > 0:
            idx = np.arange(len(features))
            if len(features) > kid_max:
                idx = np.sort(np.random.default_rng(seed).choice(len(features), kid_max, replace=False))
            keep = np.ascontiguousarray(features[idx], dtype=np.float32)
        return cls(mu, sigma, len(features), extractor, keep)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (``.npz``)."""
        arrays = {"format": np.array(STATS_FORMAT), "mu": self.mu, "sigma": self.sigma,
                  "count": np.array(self.count), "extractor": np.array(self.extractor)}
        if self.kid_features is not None:
            arrays["kid_features"] = self.kid_features
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file not found: {str(path)!r} (make one with diffsolve fid-ref)")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != STATS_FORMAT:
                    raise ValueError("not a diffsolve statistics file")
                stats = cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["count"]),
                            str(z["extractor"]), z["kid_features"] if "kid_features" in z else None)
        except ValueError as err:
            raise ValueError(f"{path}: cannot read FID statistics ({err}); make the file with diffsolve fid-ref") from err
        except Exception as err:
            raise ValueError(f"{path}: cannot read FID statistics ({type(err).__name__}: {err}); make the file "
                             "with diffsolve fid-ref") from err
        d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
        if d < 1 or stats.sigma.shape != (d, d):
            raise ValueError(f"{path}: malformed statistics (mu {stats.mu.shape}, sigma {stats.sigma.shape})")
        return stats

    def check_compatible(self, extractor_id: str, where: str = "reference statistics") -> None:
        if self.extractor != extractor_id:
            raise ValueError(f"{where} were made with the feature extractor {self.extractor!r}, but these features "
                             f"come from {extractor_id!r}: make the reference with the same --features (and weights)")

    def fid(self, other: "Statistics") -> float:
        if self.extractor != other.extractor:
            raise ValueError(f"cannot compare statistics of different extractors ({self.extractor!r} vs "
                             f"{other.extractor!r})")
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)
