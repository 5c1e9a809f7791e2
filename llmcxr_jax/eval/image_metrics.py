"""Image metrics: FID between two feature sets (any feature network: the CIP DenseNet with user
weights, Inception, or the project's synthetic-CXR classifier), and PSNR / SSIM of VQ-GAN
reconstructions; images are [n, H, W, C] in [-1, 1].

FID is pytorch-fid's calculate_frechet_distance: the matrix square root of S1 S2 by
scipy.linalg.sqrtm (without pytorch-fid's disp=False, deprecated since SciPy 1.16: the same root),
an eps * I offset added to both covariances when that root is not finite, and its real part taken
when the imaginary part is negligible. SSIM is numpy code equal to scikit-image's
structural_similarity with Gaussian weights (tests/test_image_metrics.py); PSNR is its definition.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg

from llmcxr_jax.errors import UsageError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of [n, d] features, in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UsageError(f"FID needs at least 2 feature vectors of shape [n, d], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), computed as pytorch-fid does: (S1 S2)^1/2 by
    scipy.linalg.sqrtm; if it is not finite (a singular product), the root of (S1 + eps I)(S2 + eps I)
    instead; a complex root whose diagonal's imaginary part is within 1e-3 of 0 keeps its real part,
    a larger imaginary part is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UsageError(f"FID needs means of one length d and [d, d] covariances, got {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.abs(covmean.imag).max()
            raise ValueError(f"FID: the square root of S1 S2 has an imaginary part up to {largest:g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(real_features), *gaussian_stats(fake_features))


def features_in_batches(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Apply a feature network batch by batch -> [n, d] float64."""
    out = [np.asarray(fn(images[i:i + batch]), np.float64) for i in range(0, len(images), batch)]
    return np.concatenate(out).reshape(len(images), -1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for [-1, 1] images (peak-to-peak 2)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = np.mean(np.square(a - b).reshape(len(a), -1), axis=1)
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter with reflect padding (scipy.ndimage's default), [H, W]."""
    pad = len(g) // 2
    x = np.pad(img, ((pad, pad), (0, 0)), mode="symmetric")
    x = sum(g[i] * x[i:i + img.shape[0]] for i in range(len(g)))
    x = np.pad(x, ((0, 0), (pad, pad)), mode="symmetric")
    return sum(g[i] * x[:, i:i + img.shape[1]] for i in range(len(g)))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range 2
    for [-1, 1] images), averaged over pixels and channels; the window is cropped from the borders
    as scikit-image does."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise UsageError(f"SSIM needs two [n, H, W, C] arrays of one shape, got {a.shape} and {b.shape}")
    g, data_range = _gaussian_window(), 2.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = (len(g) - 1) // 2
    out = np.zeros(len(a))
    for n in range(len(a)):
        vals = []
        for c in range(a.shape[-1]):
            x, y = a[n, ..., c], b[n, ..., c]
            mx, my = _filter(x, g), _filter(y, g)
            sxx = _filter(x * x, g) - mx * mx
            syy = _filter(y * y, g) - my * my
            sxy = _filter(x * y, g) - mx * my
            s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
            vals.append(s[pad:-pad or None, pad:-pad or None].mean())
        out[n] = np.mean(vals)
    return out
