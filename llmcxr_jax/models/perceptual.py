"""Frozen feature networks of the VQ-GAN loss, in Flax NNX: LPIPS v0.1 (VGG16 trunk + lin heads,
as the `lpips` package and taming compute it) and the CIP network (torchxrayvision's
densenet121-res224-all DenseNet-121, pooled 1024-d features). Weight files: convert/perceptual_weights.py.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.dtypes import DTYPES, check_dtypes
from llmcxr_jax.sharding import constrain

_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
_ACTIVATION_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")
_OIHW_TO_HWIO = (2, 3, 1, 0)
_HWIO_TO_OIHW = (3, 2, 0, 1)
BN_EPS = 1e-5  # torch BatchNorm2d

# lpips v0.1 ScalingLayer: (x - shift) / scale maps [-1, 1] RGB to ImageNet-normalised input
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # lpips.normalize_tensor
# torchvision vgg16 `features` (cfg "D") through relu5_3: indices 0-29; "M" is a 2x2 max-pool
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # features index of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
TAMING_LPIPS_PREFIX = "loss.perceptual_loss."  # where a taming / LLM-CXR .ckpt keeps its LPIPS

CIP_RESOLUTION = 224  # densenet121-res224-all's input_resolution
CIP_INTENSITY = 1024.0  # torchxrayvision pixels span [-1024, 1024]


def _full(shape: tuple[int, ...], value: float, dtype) -> jax.Array:
    """A constant array made on the host: no per-shape XLA compile, unlike jnp.full."""
    return jnp.asarray(np.full(shape, value, np.dtype(dtype)))


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    """LPIPS-VGG16 v0.1 (architecture fixed). dtype is the VGG conv compute dtype; the scaling,
    channel normalisation, lin heads and the returned distance are float32 whatever it is."""

    dtype: str
    param_dtype: str

    def __post_init__(self):
        check_dtypes(self)


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """torchxrayvision DenseNet (BatchNorm in inference mode, drop_rate 0). dtype is the conv
    compute dtype; BatchNorm and the pooled features are float32."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int
    in_channels: int
    dtype: str
    param_dtype: str

    def __post_init__(self):
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        for name in ("growth_rate", "num_init_features", "bn_size", "in_channels"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.block_config or min(self.block_config) < 1:
            raise UsageError(f"block_config {self.block_config} needs at least one block of >= 1 layers")
        check_dtypes(self)

    @property
    def num_features(self) -> int:
        """Width of the pooled feature vector (1024 for DenseNet-121)."""
        c = self.num_init_features
        for i, n in enumerate(self.block_config):
            c += n * self.growth_rate
            if i < len(self.block_config) - 1:
                c //= 2
        return c


def txv_densenet121(dtype: str, param_dtype: str) -> DenseNetConfig:
    """torchxrayvision's DenseNet defaults, the architecture of densenet121-res224-all."""
    return DenseNetConfig(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                          in_channels=1, dtype=dtype, param_dtype=param_dtype)


# ---------------------------------------------------------------------------------------------
# layers (torch semantics, NHWC)

class Conv(nnx.Module):
    """torch Conv2d with symmetric zero padding: kernel [kh, kw, in, out], optional bias [out]."""

    def __init__(self, c_in: int, c_out: int, k: int, *, stride: int, padding: int, bias: bool, cfg,
                 rngs: nnx.Rngs | None):
        self.stride, self.padding, self.dtype = stride, padding, DTYPES[cfg.dtype]
        w, shape = DTYPES[cfg.param_dtype], (k, k, c_in, c_out)
        if rngs is None:  # zeros of the right shapes; the loaders fill them
            kernel = _full(shape, 0.0, w)
        else:  # kaiming normal (fan_in), drawn flat: XLA:CPU compiles threefry over 4-d shapes slowly
            std = np.sqrt(2.0 / (c_in * k * k))
            kernel = (std * jax.random.normal(rngs.params(), (int(np.prod(shape)),), w)).reshape(shape)
        self.kernel = nnx.Param(kernel, logical_axes=_KERNEL_AXES)
        self.bias = nnx.Param(_full((c_out,), 0.0, w), logical_axes=("conv_out",)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, H, W, in] -> [batch, H', W', out] in the compute dtype."""
        p = self.padding
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel.get_value().astype(self.dtype),
                                         (self.stride, self.stride), ((p, p), (p, p)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return constrain(y, _ACTIVATION_AXES)


class BatchNorm(nnx.Module):
    """torch BatchNorm2d in eval mode: running statistics only (these networks stay frozen)."""

    def __init__(self, channels: int, cfg: DenseNetConfig):
        w = DTYPES[cfg.param_dtype]
        self.dtype = DTYPES[cfg.dtype]
        self.scale = nnx.Param(_full((channels,), 1.0, w), logical_axes=("norm",))
        self.bias = nnx.Param(_full((channels,), 0.0, w), logical_axes=("norm",))
        self.running_mean = nnx.BatchStat(_full((channels,), 0.0, jnp.float32), logical_axes=("norm",))
        self.running_var = nnx.BatchStat(_full((channels,), 1.0, jnp.float32), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.running_var.get_value() + BN_EPS) * self.scale.get_value().astype(jnp.float32)
        y = (x.astype(jnp.float32) - self.running_mean.get_value()) * inv + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype)


class ReLU(nnx.Module):
    """Parameterless; present so `features[i]` lines up with torchvision's Sequential index i."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool(nnx.Module):
    """torch MaxPool2d (floor mode; padding acts as -inf)."""

    def __init__(self, window: int, stride: int, padding: int):
        self.window, self.stride, self.padding = window, stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, self.window, self.window, 1),
                                     (1, self.stride, self.stride, 1), ((0, 0), (p, p), (p, p), (0, 0)))


def _avg_pool2(x: jax.Array) -> jax.Array:
    """torch AvgPool2d(2, 2): [b, H, W, c] -> [b, H // 2, W // 2, c]."""
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4


def _unit_channels(f: jax.Array) -> jax.Array:
    """lpips.normalize_tensor over channels: f / (|f|_2 + 1e-10), float32.

    The norm's argument is floored at 1e-30: a pixel whose channels are all exactly 0 (after ReLU)
    has d sqrt(s)/ds = inf at s = 0, which turns into NaN gradients; the value is unchanged there
    (0 / anything) and moves by < 1e-10 where 0 < s < 1e-30."""
    f = f.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-30))
    return f / (norm + LPIPS_EPS)


# ---------------------------------------------------------------------------------------------
# LPIPS

class NetLinLayer(nnx.Module):
    """lpips NetLinLayer: a bias-free 1x1 conv to one channel (its dropout is off at eval)."""

    def __init__(self, channels: int, cfg: LPIPSConfig, rngs: nnx.Rngs | None):
        w = DTYPES[cfg.param_dtype]
        kernel = (_full((1, 1, channels, 1), 0.0, w) if rngs is None else  # torch's default conv init bound
                  jax.random.uniform(rngs.params(), (1, 1, channels, 1), w, -channels ** -0.5, channels ** -0.5))
        self.kernel = nnx.Param(kernel, logical_axes=_KERNEL_AXES)

    def __call__(self, d: jax.Array) -> jax.Array:
        """float32 [b, H, W, C] -> spatial mean of the weighted channel sum, [b]."""
        per_pixel = jnp.einsum("bhwc,c->bhw", d, self.kernel.get_value()[0, 0, :, 0].astype(jnp.float32))
        return per_pixel.mean(axis=(1, 2))


class LPIPS(nnx.Module):
    """lpips.LPIPS(net='vgg', version='0.1') / taming's LPIPS: (images, targets) -> distance [batch].

    Inputs NHWC in [-1, 1] with 3 channels (1-channel inputs are repeated to RGB), at least 16 px
    (relu5_3 sits after four 2x2 pools). torch returns [batch, 1, 1, 1]; this returns [batch] float32.
    `features` mirrors torchvision's vgg16.features[0:30]; lin0..lin4 are lpips' heads.
    """

    def __init__(self, cfg: LPIPSConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        layers: list[nnx.Module] = []
        c_in = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(MaxPool(2, 2, 0))
            else:
                layers += [Conv(c_in, v, 3, stride=1, padding=1, bias=True, cfg=cfg, rngs=rngs), ReLU()]
                c_in = v
        self.features = nnx.List(layers)
        for k, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c, cfg, rngs))

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """Scaled input [b, H, W, 3] -> the five relu{1..5}_{2,2,3,3,3} maps."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def __call__(self, images: jax.Array, targets: jax.Array) -> jax.Array:
        if images.shape != targets.shape or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UsageError(f"LPIPS takes two equal NHWC batches with 1 or 3 channels, got {images.shape} "
                             f"and {targets.shape}")
        if min(images.shape[1:3]) < 16:
            raise UsageError(f"LPIPS-VGG16 needs images of at least 16x16 pixels, got {images.shape[1:3]}")
        b = images.shape[0]
        x = jnp.concatenate([images, targets]).astype(jnp.float32)  # one trunk pass: [2b, H, W, C]
        x = jnp.broadcast_to(x, x.shape[:3] + (3,))
        x = (x - jnp.asarray(LPIPS_SHIFT, jnp.float32)) / jnp.asarray(LPIPS_SCALE, jnp.float32)
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(self.taps(constrain(x, _ACTIVATION_AXES))):
            f = _unit_channels(f)
            total = total + getattr(self, f"lin{k}")(jnp.square(f[:b] - f[b:]))
        return total


# ---------------------------------------------------------------------------------------------
# torchxrayvision DenseNet

class DenseLayer(nnx.Module):
    """norm1-relu-conv1 (1x1 to bn_size*growth) - norm2-relu-conv2 (3x3 to growth), concatenated on."""

    def __init__(self, c_in: int, cfg: DenseNetConfig, rngs: nnx.Rngs | None):
        mid = cfg.bn_size * cfg.growth_rate
        self.norm1 = BatchNorm(c_in, cfg)
        self.conv1 = Conv(c_in, mid, 1, stride=1, padding=0, bias=False, cfg=cfg, rngs=rngs)
        self.norm2 = BatchNorm(mid, cfg)
        self.conv2 = Conv(mid, cfg.growth_rate, 3, stride=1, padding=1, bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        new = self.conv2(jax.nn.relu(self.norm2(self.conv1(jax.nn.relu(self.norm1(x))))))
        return jnp.concatenate([x, new], axis=-1)  # [b, H, W, c_in + growth]


class DenseBlock(nnx.Module):
    def __init__(self, num_layers: int, c_in: int, cfg: DenseNetConfig, rngs: nnx.Rngs | None):
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"denselayer{i + 1}", DenseLayer(c_in + i * cfg.growth_rate, cfg, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = getattr(self, f"denselayer{i + 1}")(x)
        return x


class Transition(nnx.Module):
    """norm-relu-conv (1x1, halves the channels) - 2x2 average pool."""

    def __init__(self, c_in: int, cfg: DenseNetConfig, rngs: nnx.Rngs | None):
        self.norm = BatchNorm(c_in, cfg)
        self.conv = Conv(c_in, c_in // 2, 1, stride=1, padding=0, bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _avg_pool2(self.conv(jax.nn.relu(self.norm(x))))


class DenseNet(nnx.Module):
    """torchxrayvision models.DenseNet without its classifier; attribute paths are its
    `features.*` state-dict keys less that prefix (conv0, norm0, denseblock1.denselayer1.norm1, ...)."""

    def __init__(self, cfg: DenseNetConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.conv0 = Conv(cfg.in_channels, cfg.num_init_features, 7, stride=2, padding=3, bias=False, cfg=cfg,
                          rngs=rngs)
        self.norm0 = BatchNorm(cfg.num_init_features, cfg)
        self.pool0 = MaxPool(3, 2, 1)
        c = cfg.num_init_features
        for i, n in enumerate(cfg.block_config):
            setattr(self, f"denseblock{i + 1}", DenseBlock(n, c, cfg, rngs))
            c += n * cfg.growth_rate
            if i < len(cfg.block_config) - 1:
                setattr(self, f"transition{i + 1}", Transition(c, cfg, rngs))
                c //= 2
        self.norm5 = BatchNorm(c, cfg)

    def features(self, x: jax.Array) -> jax.Array:
        """torchxrayvision DenseNet.features2: [b, H, W, in_channels] in [-1024, 1024] (use
        cip_preprocess) -> relu(norm5 map) averaged over H, W: float32 [b, num_features]."""
        if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
            raise UsageError(f"DenseNet takes NHWC images with {self.cfg.in_channels} channel(s), got {x.shape}")
        h = self.pool0(jax.nn.relu(self.norm0(self.conv0(constrain(x, _ACTIVATION_AXES)))))
        for i in range(len(self.cfg.block_config)):
            h = getattr(self, f"denseblock{i + 1}")(h)
            if i < len(self.cfg.block_config) - 1:
                h = getattr(self, f"transition{i + 1}")(h)
        return jax.nn.relu(self.norm5(h).astype(jnp.float32)).mean(axis=(1, 2))


def cip_preprocess(images: jax.Array) -> jax.Array:
    """VQ-GAN images [b, S, S, 1 or 3] in [-1, 1] -> float32 [b, 224, 224, 1] in [-1024, 1024].

    Grayscale is the channel mean, then jax.image.resize 'bilinear' with antialiasing (which
    equals torchxrayvision's own fix_resolution, F.interpolate(bilinear, antialias=True), to
    float rounding), then x 1024 (xrv.datasets.normalize's range). Non-square images are
    refused, as fix_resolution refuses them."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise UsageError(f"cip_preprocess takes square NHWC images with 1 or 3 channels, got {images.shape}")
    gray = images.astype(jnp.float32).mean(axis=-1, keepdims=True)
    b = images.shape[0]
    gray = jax.image.resize(gray, (b, CIP_RESOLUTION, CIP_RESOLUTION, 1), "bilinear", antialias=True)
    return gray * CIP_INTENSITY


def frozen_apply(model: nnx.Module, method: str) -> tuple[Callable[..., Any], nnx.State]:
    """(apply, state) with apply(state, *inputs) = model.<method>(*inputs) and no gradient into
    the weights: a pure function to jit; pass state as an argument rather than closing over it."""
    graphdef, state = nnx.split(model)

    def apply(state, *inputs):
        return getattr(nnx.merge(graphdef, jax.lax.stop_gradient(state)), method)(*inputs)

    return apply, state
