"""FID against an independent formula for pytorch-fid's trace of (S1 S2)^1/2, SSIM against
scikit-image, PSNR against its definition."""
import numpy as np
import pytest
import scipy.linalg

from llmcxr_jax.eval import image_metrics


def _trace_sqrt(s1, s2):
    """Tr (S1 S2)^1/2 without sqrtm: S1 S2 has the eigenvalues of the PSD S1^1/2 S2 S1^1/2."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def _reference_fid(a, b, eps=0.0):
    """||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr ((S1 + eps I)(S2 + eps I))^1/2 (pytorch-fid offsets only the root)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    offset = eps * np.eye(len(s1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt(s1 + offset, s2 + offset))


def test_fid_equals_the_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(loc=0.3, scale=1.4, size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.3
    np.testing.assert_allclose(image_metrics.fid(a, b), _reference_fid(a, b), rtol=1e-6)
    assert abs(image_metrics.fid(a, a)) < 1e-8
    # fewer images than features: singular covariances; sqrtm's root has a tiny imaginary part, dropped
    c, d = rng.normal(size=(40, 64)), rng.normal(loc=0.2, size=(50, 64)) @ rng.normal(size=(64, 64)) * 0.3
    assert np.iscomplexobj(scipy.linalg.sqrtm(np.cov(c, rowvar=False) @ np.cov(d, rowvar=False)))
    np.testing.assert_allclose(image_metrics.fid(c, d), _reference_fid(c, d), rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        image_metrics.fid(a[:1], b)
    with pytest.raises(ValueError, match="covariances"):
        image_metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # "Matrix is singular": the case itself
def test_fid_adds_pytorch_fids_offset_when_the_root_is_not_finite():
    # two images each: rank-1 covariances whose product has no finite sqrtm; pytorch-fid then takes
    # the root of (S1 + eps I)(S2 + eps I). Exactly, with S1 = u u^T / 2, S2 = v v^T / 2, u = (2, -1, 0),
    # v = (-2, 1, -2): |(1, -1, 1)|^2 + (|u|^2 + |v|^2) / 2 - 2 |u . v| / 2 = 3 + 7 - 5 = 5
    a = np.array([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([[-1.0, 1.0, -2.0], [1.0, 0.0, 0.0]])
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert not np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()  # the case takes the offset branch
    assert _reference_fid(a, b) == pytest.approx(5.0, abs=1e-9)
    for eps in (1e-6, 1e-4):
        ours = image_metrics.frechet_distance(a.mean(0), s1, b.mean(0), s2, eps=eps)
        np.testing.assert_allclose(ours, _reference_fid(a, b, eps), rtol=1e-6)
        assert 0 < 5.0 - ours < 20 * eps ** 0.5  # the offset's root adds O(sqrt(eps)) per zero eigenvalue


def test_fid_rejects_a_root_with_a_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary"):
        image_metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))  # not a covariance


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
