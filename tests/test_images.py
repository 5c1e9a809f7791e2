"""Image preprocessing: LLM-CXR's resize-shorter-side (Lanczos) + centre crop + [-1, 1]."""
import numpy as np
import pytest
from PIL import Image

from llmcxr_jax.data import images


def _write(path, arr):
    Image.fromarray(arr).save(path)
    return str(path)


def test_shorter_side_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (300, 400), dtype=np.uint8)  # height 300, width 400
    path = _write(tmp_path / "a.png", arr)
    out = images.load_image(path, 150, 1)
    # shorter side 300 -> 150 (factor 0.5): 150 x 200, crop columns 25..175
    ref = np.asarray(Image.fromarray(arr).resize((200, 150), Image.Resampling.LANCZOS), np.float32)[:, 25:175]
    np.testing.assert_allclose(out[..., 0], ref / 255.0 * 2 - 1, atol=1e-6)
    assert out.shape == (150, 150, 1) and out.dtype == np.float32


def test_rgb_repeats_grey_and_range(tmp_path):
    arr = np.array([[0, 255], [128, 64]], np.uint8).repeat(64, 0).repeat(64, 1)
    out = images.load_image(_write(tmp_path / "g.png", arr), 128, 3)
    assert out.shape == (128, 128, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out.min() == -1.0 and out.max() == 1.0
    # bytes give the same result as the path
    data = (tmp_path / "g.png").read_bytes()
    np.testing.assert_array_equal(images.load_image(data, 128, 3), out)


def test_uint8_round_trip(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    out = images.load_image(_write(tmp_path / "r.png", arr), 32, 1)
    np.testing.assert_array_equal(images.to_uint8(out)[..., 0], arr)
    images.save_image(out, str(tmp_path / "back.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back.png")), arr)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", None])
def test_unreadable_images_raise_one_line_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(images.ImageError, match="bad.jpg") as e:
        images.load_image(str(path), 64, 3)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (128, 128), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match="cut.jpg"):
        images.load_image(str(tmp_path / "cut.jpg"), 64, 1)


@pytest.mark.parametrize("fmt, mode, scale", [("png", "I;16", 257), ("png", "I;16", 16), ("tiff", "I", 16),
                                              ("tiff", "F", 1 / 255)])
def test_high_bit_depth_grey_is_stretched_not_clipped(tmp_path, fmt, mode, scale):
    """A 16-bit PNG (full range, or 12-bit DICOM values in 16 bits), a 32-bit TIFF or a float TIFF of a
    grey ramp reads as the 8-bit ramp does; PIL's own convert gave a white image (values clipped at 255)
    or, for floats in [0, 1], a black one."""
    ramp = np.tile(np.arange(256, dtype=np.float64), (96, 1))  # 0..255 across, min 0 and max 255
    Image.fromarray(ramp.astype(np.uint8)).save(tmp_path / "eight.png")
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    wide = Image.fromarray((ramp * scale).astype(dtype), mode=mode if mode != "I;16" else None)
    assert wide.mode == mode
    wide.save(tmp_path / f"wide.{fmt}")
    assert Image.open(tmp_path / f"wide.{fmt}").mode == mode
    want = images.load_image(str(tmp_path / "eight.png"), 64, 3)
    got = images.load_image(str(tmp_path / f"wide.{fmt}"), 64, 3)
    np.testing.assert_array_equal(got, want)
    alone = np.asarray(Image.open(tmp_path / f"wide.{fmt}").convert("L")).mean()  # the ramp's mean is 127.5
    assert abs(alone - 127.5) > 100
