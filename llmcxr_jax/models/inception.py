"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph as torch-fidelity's FeatureExtractorInceptionV3 and
pytorch-fid's FIDInceptionA/C/E patch it) in Flax NNX, NHWC, float32, BatchNorm in eval mode: uint8-range
pixels -> TF1.x bilinear resize to 299 -> (x - 128) / 128 -> pool3, 2048-d. Weights: convert/inception_weights.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.perceptual import MaxPool

INPUT_SIZE = 299  # FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
BN_EPS = 1e-3  # BasicConv2d's BatchNorm2d(eps=0.001), TensorFlow's
POOL3_FEATURES = 2048
_HIGHEST = jax.lax.Precision.HIGHEST  # FID features stay float32 on accelerators too (no bf16 passes)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _zeros(shape: tuple[int, ...], value: float = 0.0) -> jax.Array:
    """A constant made on the host (no per-shape XLA compile)."""
    return jnp.asarray(np.full(shape, value, np.float32))


# ---------------------------------------------------------------------------------------------
# layers (torch semantics, NHWC)

class Conv(nnx.Module):
    """Bias-free torch Conv2d: kernel [kh, kw, in, out], zero padding (ph, pw) on both sides."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int, padding):
        kh, kw = _pair(kernel)
        self.stride, self.padding = stride, _pair(padding)
        self.kernel = nnx.Param(_zeros((kh, kw, c_in, c_out)))

    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        return jax.lax.conv_general_dilated(x, self.kernel.get_value(), (self.stride, self.stride),
                                            ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=_HIGHEST)


class BatchNorm(nnx.Module):
    """torch BatchNorm2d(eps=0.001) in eval mode: running statistics only."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(_zeros((channels,), 1.0))
        self.bias = nnx.Param(_zeros((channels,)))
        self.running_mean = nnx.BatchStat(_zeros((channels,)))
        self.running_var = nnx.BatchStat(_zeros((channels,), 1.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var.get_value() + BN_EPS) * self.scale.get_value()
        return (x - self.running_mean.get_value()) * inv + self.bias.get_value()


class BasicConv2d(nnx.Module):
    """conv (no bias) - BatchNorm(eps 1e-3) - relu; `conv` and `bn` as torch names them."""

    def __init__(self, c_in: int, c_out: int, kernel, *, stride: int = 1, padding=0):
        self.conv = Conv(c_in, c_out, kernel, stride, padding)
        self.bn = BatchNorm(c_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """F.avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False): each window's mean over
    the pixels inside the image (TensorFlow's SAME average pool)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    rows = np.convolve(np.ones(x.shape[1]), np.ones(3), "same")  # 3 inside, 2 at each edge
    cols = np.convolve(np.ones(x.shape[2]), np.ones(3), "same")
    return total / jnp.asarray(np.outer(rows, cols)[None, :, :, None], x.dtype)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """F.max_pool2d(kernel 3, stride 2): no padding, floor mode."""
    return MaxPool(3, 2, 0)(x)


# ---------------------------------------------------------------------------------------------
# blocks (attribute names are torch-fidelity's state-dict names)

class InceptionA(nnx.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool (padding not counted)-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3_same(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int):
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg pool (padding not counted)-1x1."""

    def __init__(self, c_in: int, channels_7x7: int):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool_3x3_same(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, c_in: int):
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b / Mixed_7c: 1x1 | 1x1-(1x3 | 3x1) | 1x1-3x3-(1x3 | 3x1) | pool-1x1. The pool is TF's:
    a 3x3 average not counting padding in Mixed_7b (InceptionE_1), a 3x3 max pool (stride 1, pad 1)
    in Mixed_7c (InceptionE_2), a quirk of the 2015 graph both FID implementations keep."""

    def __init__(self, c_in: int, pool: str):
        if pool not in ("avg", "max"):
            raise UsageError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3_same(x) if self.pool == "avg" else MaxPool(3, 1, 1)(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], axis=-1)


# ---------------------------------------------------------------------------------------------
# input resize and the network

def resize_like_tf1(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x(align_corners=False, method 'slow'),
    TF1's resize_bilinear: output pixel i samples input position i * in / out (no half-pixel offset),
    the upper neighbour clamped to the last row / column. [b, H, W, c] float32 -> [b, size, size, c].
    (pytorch-fid's F.interpolate uses half-pixel centres instead and gives slightly different pixels.)"""

    def grid(n_in: int):  # float32 products as torch forms them
        pos = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = pos.astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), jnp.asarray(pos - lo.astype(np.float32))

    ylo, yhi, dy = grid(x.shape[1])
    xlo, xhi, dx = grid(x.shape[2])
    top, bottom = x[:, ylo], x[:, yhi]  # [b, size, W, c]
    dx = dx[None, None, :, None]
    row0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    row1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return row0 + (row1 - row0) * dy[None, :, None, None]


class InceptionV3(nnx.Module):
    """FeatureExtractorInceptionV3 up to pool3 (its `fc` logits are not ported: FID uses pool3).
    Attribute paths are the torch state-dict keys (Conv2d_1a_3x3.conv, Mixed_5b.branch1x1.bn, ...).
    Built as zeros (conv) and identity (BatchNorm): a frozen network whose weights always come from
    a file (convert/inception_weights.py), never trained here."""

    def __init__(self):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [b, H, W, 3] float32 in [0, 255] (uint8 values, as torch-fidelity takes them) ->
        pool3 features float32 [b, 2048]. Any H, W: the resize to 299 x 299 is part of the network."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise UsageError(f"InceptionV3 takes NHWC RGB pixels [b, H, W, 3], got shape {pixels.shape}")
        x = resize_like_tf1(pixels.astype(jnp.float32))
        x = (x - 128.0) / 128.0  # torch-fidelity: bit-exact with the graph's (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [b, 147, 147, 64]
        x = _max_pool_3x3_s2(x)  # [b, 73, 73, 64]
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # [b, 35, 35, 192]
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)  # ends [b, 8, 8, 2048]
        return x.mean(axis=(1, 2))
