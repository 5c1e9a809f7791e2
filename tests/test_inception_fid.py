"""The FID Inception-v3 port: parity with torch-fidelity's FeatureExtractorInceptionV3 on random weights
(its TF1 resize and uint8 normalisation included), the weights file's errors, and the input checks."""
import numpy as np
import pytest

from llmcxr_jax.convert import inception_weights as W
from llmcxr_jax.data.images import to_uint8
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.eval import image_metrics
from llmcxr_jax.eval.inception_fid import InceptionFID, load_inception
from llmcxr_jax.models import inception as I  # noqa: E741

RTOL = 1e-5  # float32, one module's parity budget


def _rel_err(got, want) -> float:
    """Largest element error relative to the largest reference element: features are >= 0 averages,
    many near 0, so an element-wise ratio would measure noise where the value is tiny."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _pixels(shape, seed) -> np.ndarray:
    """Random uint8 pixels: smooth blobs plus noise, so the resize sees structure at 64 px."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * yy + rng.uniform(0, 6)) * np.cos(5 * xx + rng.uniform(0, 6))
                     for _ in range(n * c)]).reshape(n, c, h, w).transpose(0, 2, 3, 1)
    return np.clip(127.5 + 90 * base + rng.normal(0, 25, shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    """(torch-fidelity's extractor with random weights and randomised BatchNorm statistics, the path
    of its state dict as torch.save writes it)."""
    torch = pytest.importorskip("torch")
    import inception_refs
    import perceptual_refs

    try:
        module = inception_refs.fidelity_inception()
    except ImportError as e:
        pytest.skip(str(e))
    import tempfile

    folder = tempfile.mkdtemp(prefix="inception_")
    # the reference loads our random weights by its own path argument; its strict load_state_dict
    # proves our torch key set is exactly its own (num_batches_tracked aside)
    start = inception_refs.save_state_dict(inception_refs.random_inception_state_dict(seed=0), f"{folder}/start.pth")
    ref = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=start)
    calibration = torch.from_numpy(_pixels((1, 64, 64, 3), 99)).permute(0, 3, 1, 2).contiguous()
    perceptual_refs.randomise_batchnorm(ref, calibration, seed=1)  # statistics that matter, activations O(1)
    path = f"{folder}/{W.WEIGHTS_FILE}"
    torch.save(ref.state_dict(), path)
    return ref, path


def _torch_pool3(ref, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        (out,) = ref(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    return out.numpy()


@pytest.mark.torch
def test_pool3_parity_with_torch_fidelity(reference, monkeypatch):
    ref, path = reference
    inception = load_inception(path)
    # torch-fidelity takes uint8 [n, 3, H, W]; ours takes [-1, 1] floats [n, H, W, C]: u -> u / 127.5 - 1,
    # which data.images.to_uint8 (what features() applies) maps back to the same u exactly
    u = _pixels((3, 64, 64, 3), 0)
    u[2] = u[2, :, :, :1]  # a grey image (channels equal), scored as itself below
    x = u.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(to_uint8(x), u)
    want = _torch_pool3(ref, u)
    assert want.std() > 0.05 and (want > 0).mean() > 0.5  # the random network is alive, not saturated
    got = inception.features(x, batch=2)  # two batches, the second padded: one compile serves both
    assert got.shape == (3, 2048) and got.dtype == np.float64
    assert _rel_err(got, want) < RTOL
    # a 1-channel image is its RGB repeat, as PIL's convert('RGB') makes it
    assert _rel_err(inception.features(x[2:, :, :, :1]), want[2:]) < RTOL
    # fid() hands both feature sets to image_metrics.fid (its sqrtm on 2048 x 2048 is slow: recorded instead)
    seen = []
    monkeypatch.setattr(image_metrics, "fid", lambda real, fake: seen.append((real, fake)) or 1.5)
    assert inception.fid(x, x[::-1], batch=2) == 1.5
    np.testing.assert_array_equal(seen[0][0], got)
    np.testing.assert_array_equal(seen[0][1], got[::-1])


@pytest.mark.torch
def test_resize_is_torch_fidelitys_tf1_bilinear():
    """TF1 resize_bilinear (no half-pixel centres) up and down to 299, against torch-fidelity's own
    function; pytorch-fid's F.interpolate (half-pixel centres) is told apart by the same check."""
    torch = pytest.importorskip("torch")
    import inception_refs

    try:
        interpolate = inception_refs.fidelity_interpolate()
    except ImportError as e:
        pytest.skip(str(e))
    for shape in ((2, 64, 48, 3), (1, 320, 310, 1)):
        u = _pixels(shape, 5).astype(np.float32)
        nchw = torch.from_numpy(u).permute(0, 3, 1, 2).contiguous()
        want = interpolate(nchw, size=(299, 299), align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(I.resize_like_tf1(u))
        assert got.shape == (shape[0], 299, 299, shape[3])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * 255)
        half_pixel = torch.nn.functional.interpolate(nchw, size=(299, 299), mode="bilinear", align_corners=False)
        assert np.abs(half_pixel.permute(0, 2, 3, 1).numpy() - want).max() > 1.0


def test_avg_pool_does_not_count_padding():
    x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    got = np.asarray(I.avg_pool_3x3_same(x))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    want = np.stack([np.stack([np.nanmean(padded[:, i:i + 3, j:j + 3], axis=(1, 2)) for j in range(5)], 1)
                     for i in range(4)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_weights_file_errors(tmp_path):
    missing = str(tmp_path / W.WEIGHTS_FILE)
    with pytest.raises(MissingInputError, match=f"{W.WEIGHTS_FILE}.*not found") as e:
        load_inception(missing)
    assert missing in str(e.value) and "\n" not in str(e.value)
    sd = W.inception_torch_state_dict(W.inception_arrays(I.InceptionV3()))
    assert len(sd) == 94 * 5 and sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    fine = {**sd, "fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008),
            "Mixed_7c.branch_pool.bn.num_batches_tracked": np.zeros(())}
    assert W.convert_inception(fine).keys() == W.inception_arrays(I.InceptionV3()).keys()
    wrong = {k: v for k, v in fine.items() if k != "Mixed_6e.branch7x7dbl_4.bn.running_var"}
    wrong["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1))  # torchvision's inception_v3 has these
    with pytest.raises(UsageError, match=r"lacks 1 key\(s\), e.g. 'Mixed_6e.branch7x7dbl_4.bn.running_var' and "
                                         r"has 1 unexpected key\(s\), e.g. 'AuxLogits.conv0.conv.weight'") as e:
        W.convert_inception(wrong)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match=r"'Mixed_5b.branch5x5_2.conv.weight' has shape \(64, 48, 3, 3\), expected "
                                         r"\(64, 48, 5, 5\)"):
        W.convert_inception({**sd, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3))})


@pytest.mark.torch
def test_wrong_keys_in_a_weights_file(tmp_path):
    pytest.importorskip("torch")
    import inception_refs

    sd = {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32),
          "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}  # torchvision's inception_v3 has AuxLogits
    path = inception_refs.save_state_dict(sd, str(tmp_path / "inception_v3_google.pth"))
    with pytest.raises(UsageError, match=f"Inception weights {path} lacks 469 key.*'Conv2d_1a_3x3.bn.bias' and has "
                                         "1 unexpected key.*'AuxLogits.fc.weight'"):
        load_inception(path)


def test_bad_images_are_refused():
    inception = InceptionFID(I.InceptionV3())
    for shape in ((2, 64, 64), (2, 64, 64, 4), (0, 64, 64, 3)):
        with pytest.raises(UsageError, match=r"\[n, H, W, 1 or 3\]"):
            inception.features(np.zeros(shape, np.float32))
    with pytest.raises(UsageError, match="batch must be >= 1"):
        inception.features(np.zeros((1, 8, 8, 3), np.float32), batch=0)
