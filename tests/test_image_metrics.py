"""FID against the scipy.linalg.sqrtm formula (pytorch-fid's), SSIM against scikit-image, PSNR
against its definition."""
import numpy as np
import pytest
import scipy.linalg

from llmcxr_jax.eval import image_metrics


def _reference_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(loc=0.3, scale=1.4, size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.3
    np.testing.assert_allclose(image_metrics.fid(a, b), _reference_fid(a, b), rtol=1e-6)
    assert abs(image_metrics.fid(a, a)) < 1e-8
    with pytest.raises(ValueError, match="at least 2"):
        image_metrics.fid(a[:1], b)


def test_ssim_equals_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal(scale=0.5, size=(3, 40, 36, 2)), -1, 1)
    y = np.clip(x + rng.normal(scale=0.2, size=x.shape), -1, 1)
    ours = image_metrics.ssim(x, y)
    ref = [metrics.structural_similarity(x[i], y[i], data_range=2.0, channel_axis=-1, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False) for i in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(image_metrics.ssim(x, x), 1.0)


def test_psnr_definition():
    x = np.zeros((2, 8, 8, 1))
    y = x.copy()
    y[0] += 0.2
    y[1] += 2.0
    np.testing.assert_allclose(image_metrics.psnr(x, y), [10 * np.log10(4 / 0.04), 10 * np.log10(4 / 4.0)])
