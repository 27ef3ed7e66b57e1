"""Image-quality metrics for reconstructions in [−1, 1]: PSNR and SSIM on the [0, 1] pixel range, per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _to_unit(x: Tensor) -> Tensor:
    return ((x.detach().double().cpu() + 1) / 2).clamp(0, 1)


def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """PSNR in dB per sample (B,) of images in [−1, 1], computed on [0, 1] (x clipped to the range, as a
    saved image would be): 10 log10(1 / MSE)."""
    if x.shape != reference.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} and {tuple(reference.shape)}")
    mse = ((_to_unit(x) - _to_unit(reference)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def ssim(x: Tensor, reference: Tensor, window: int = 7, sigma: float = 1.5) -> Tensor:
    """SSIM per sample (B,) of (B, C, H, W) images in [−1, 1], on [0, 1] (data range 1): Wang et al. (2004)
    with a Gaussian window (σ = 1.5, ``window``×``window``, 7 by default since the digits are only 16×16;
    the paper's 11×11 covers most of such an image), K1 = 0.01, K2 = 0.03, over the valid region, averaged
    over channels and positions."""
    if x.shape != reference.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(reference.shape)}")
    a, b = _to_unit(x), _to_unit(reference)
    c = a.shape[1]
    r = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    w = torch.outer(g, g).expand(c, 1, window, window)

    def filt(z):
        return F.conv2d(z, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
