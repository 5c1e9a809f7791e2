"""Image metrics: FID between two feature sets (any feature network: the CIP DenseNet with user
weights, Inception, or the project's synthetic-CXR classifier), and PSNR / SSIM of VQ-GAN
reconstructions. numpy only; images are [n, H, W, C] in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of [n, d] features, in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors of shape [n, d], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with Tr((S1 S2)^1/2) computed as the trace of
    the PSD square root of S1^1/2 S2 S1^1/2 (same eigenvalues, no complex sqrtm)."""
    s1 = np.atleast_2d(sigma1)
    root1 = _sqrt_psd(s1)
    inner = root1 @ np.atleast_2d(sigma2) @ root1
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))))
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(np.atleast_2d(sigma2)) - 2.0 * tr_covmean)


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
        raise ValueError(f"SSIM needs two [n, H, W, C] arrays of one shape, got {a.shape} and {b.shape}")
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
