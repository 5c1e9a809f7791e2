"""CXR image files -> model inputs, exactly as LLM-CXR's encoder script prepares them:
decode, grey or RGB, Lanczos resize of the shorter side, centre crop, scale to [-1, 1].
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from llmcxr_jax.errors import UsageError


class ImageError(UsageError):
    """An image file that cannot be used (unreadable, truncated, too small)."""


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image (a PNG / TIFF converted from DICOM) -> 8-bit grey,
    its own minimum to 0 and maximum to 255 (linear, rounded). PIL's convert would clip every value
    above 255 and give a white image; 8-bit images, as LLM-CXR reads them, pass unchanged."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def preprocess(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """PIL image -> [size, size, channels] float32 in [-1, 1].

    Shorter side resized to `size` with Lanczos (new size rounded as torchvision does),
    then a centre crop of size x size. channels 3 converts to RGB (LLM-CXR), 1 to grey; a
    high-bit-depth greyscale image is first stretched to 8 bits (`_eight_bit`).
    """
    if channels not in (1, 3):
        raise ImageError(f"channels must be 1 or 3, got {channels}")
    img = _eight_bit(img).convert("RGB" if channels == 3 else "L")
    w, h = img.size
    s = min(w, h)
    if s <= 0:
        raise ImageError(f"image has an empty side ({w}x{h})")
    r = size / s
    new_w, new_h = round(r * w), round(r * h)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    # torchvision's center_crop: top = round((h - size) / 2), left = round((w - size) / 2)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr * 2.0 - 1.0


def load_image(path_or_bytes, size: int, channels: int) -> np.ndarray:
    """A file path or the file's bytes -> [size, size, channels] float32 in [-1, 1].

    Any decoding failure (missing, truncated, not an image) raises ImageError naming the file.
    """
    name = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    try:
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
        with Image.open(src) as img:
            img.load()
            return preprocess(img, size, channels)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: it is not an image file (empty, or no format PIL "
                         "reads)") from None
    except (OSError, SyntaxError) as e:
        cut = "; the file is cut short, copy it again" if "truncated" in str(e) else ""
        raise ImageError(f"cannot read image {name}: {e}{cut}") from None


ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def image_pixels(image: ImageInput, size: int, channels: int) -> np.ndarray:
    """One input CXR (a path, bytes, a PIL image or a uint8 / uint16 array) -> [size, size, channels] in
    [-1, 1], as every file is read (16-bit greys stretched to 8 bits, shorter side resized, centre crop)."""
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if arr.dtype not in (np.uint8, np.uint16) or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
            raise UsageError(f"an image array must be [H, W] or [H, W, 3] uint8 / uint16 (or [H, W, 1]), got "
                             f"{image.dtype} {image.shape}")
        if arr.dtype == np.uint16 and arr.ndim == 3:
            raise UsageError("a 16-bit image array must be greyscale [H, W]; convert RGB to uint8")
        image = Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(image, Image.Image):
        return preprocess(image, size, channels)
    return load_image(image, size, channels)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] float image -> uint8 in [0, 255] (channel axis kept)."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image(image: np.ndarray, path: str, quality: int = 95) -> None:
    """[-1, 1] float [H, W, C] or uint8 image -> JPEG/PNG file (format from the extension)."""
    arr = image if image.dtype == np.uint8 else to_uint8(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    kwargs = {"quality": quality} if path.lower().endswith((".jpg", ".jpeg")) else {}
    Image.fromarray(arr).save(path, **kwargs)
