"""Taming-transformers' PatchGAN discriminator (NLayerDiscriminator, BatchNorm path) in Flax NNX.

Owns the module and its taming state-dict conversion: attribute paths mirror taming's
`main.{i}` nn.Sequential indices, so import and export share one small leaf-name table.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.dtypes import DtypeNames, check_dtypes
from llmcxr_jax.sharding import constrain

KERNEL_SIZE = 4
PADDING = 1
LEAKY_SLOPE = 0.2
BN_MOMENTUM = 0.1  # torch BatchNorm2d: running = (1 - momentum) * running + momentum * batch
BN_EPS = 1e-5
DEFAULT_PREFIX = "loss.discriminator."  # where taming's VQLPIPSWithDiscriminator keeps it in a .ckpt

_ACTIVATION_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig(DtypeNames):
    """Shapes and numerics of the discriminator; every field explicit (configs/ supply values).

    Taming's defaults are input_channels 3, ndf 64, n_layers 3 (LLM-CXR's VQ-GAN uses those).
    dtype is the conv compute dtype; BatchNorm statistics, running stats and the returned
    patch logits are float32 whatever it is.
    """

    input_channels: int
    ndf: int
    n_layers: int
    dtype: str
    param_dtype: str

    def __post_init__(self):
        for name in ("input_channels", "ndf", "n_layers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_dtypes(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One Conv2d of taming's `main` Sequential; a BatchNorm and LeakyReLU follow when `norm`."""

    index: int  # position in `main`
    in_channels: int
    out_channels: int
    stride: int
    bias: bool
    norm: bool


def conv_specs(cfg: DiscriminatorConfig) -> tuple[ConvSpec, ...]:
    """The conv stack exactly as NLayerDiscriminator.__init__ builds it (use_actnorm=False)."""
    specs = [ConvSpec(0, cfg.input_channels, cfg.ndf, 2, bias=True, norm=False)]
    index, mult = 2, 1  # conv 0 is followed by a LeakyReLU only
    for n in range(1, cfg.n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < cfg.n_layers else 1  # the last normalised conv keeps the resolution - 1
        specs.append(ConvSpec(index, cfg.ndf * prev, cfg.ndf * mult, stride, bias=False, norm=True))
        index += 3  # conv, BatchNorm, LeakyReLU
    specs.append(ConvSpec(index, cfg.ndf * mult, 1, 1, bias=True, norm=False))  # 1-channel patch logits
    return tuple(specs)


def _conv_bias_init(fan_in: int):
    """torch Conv2d's default bias init; taming's weights_init leaves conv biases untouched."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv(nnx.Module):
    """Conv2d with torch padding semantics. kernel [kh, kw, in, out], bias [out]."""

    def __init__(self, spec: ConvSpec, cfg: DiscriminatorConfig, rngs: nnx.Rngs | None):
        self.stride = spec.stride
        self.dtype = cfg.compute_dtype
        self.has_bias = spec.bias
        shape = (KERNEL_SIZE, KERNEL_SIZE, spec.in_channels, spec.out_channels)
        w = cfg.weight_dtype
        if rngs is None:  # zeros of the right shapes; from_taming_state_dict fills them
            kernel, bias = jnp.zeros(shape, w), jnp.zeros((spec.out_channels,), w)
        else:
            # drawn flat then reshaped: XLA:CPU takes seconds to compile threefry over a 4-d shape
            kernel = 0.02 * jax.random.normal(rngs.params(), (int(np.prod(shape)),), w).reshape(shape)
            bias = _conv_bias_init(spec.in_channels * KERNEL_SIZE * KERNEL_SIZE)(
                rngs.params(), (spec.out_channels,), w) if spec.bias else None
        self.kernel = nnx.Param(kernel, logical_axes=("conv_height", "conv_width", "conv_in", "conv_out"))
        if spec.bias:
            self.bias = nnx.Param(bias, logical_axes=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [batch, height, width, in] -> float32 [batch, height', width', out]."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel.get_value().astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=((PADDING, PADDING), (PADDING, PADDING)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        if self.has_bias:
            y = y + self.bias.get_value().astype(jnp.float32)
        return constrain(y, _ACTIVATION_AXES)


class BatchNorm(nnx.Module):
    """torch BatchNorm2d (affine, track_running_stats, momentum 0.1, eps 1e-5) over N, H, W.

    train=True normalises with the batch's biased variance and updates the running stats with
    the unbiased one, as torch does; train=False uses the running stats. Under jit with the
    batch sharded, the means below are over the global batch (GSPMD inserts the all-reduce).
    """

    def __init__(self, channels: int, cfg: DiscriminatorConfig, rngs: nnx.Rngs | None):
        self.dtype = cfg.compute_dtype
        w = cfg.weight_dtype
        scale = (1.0 + 0.02 * jax.random.normal(rngs.params(), (channels,), w) if rngs is not None
                 else jnp.ones((channels,), w))
        self.scale = nnx.Param(scale.astype(w), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), w), logical_axes=("norm",))
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), logical_axes=("norm",))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), logical_axes=("norm",))
        # int32 here (x64 is off); exported as torch's int64 scalar
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32), logical_axes=())

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x [batch, height, width, channels] -> same shape in the compute dtype."""
        x32 = x.astype(jnp.float32)
        if train:
            count = x.shape[0] * x.shape[1] * x.shape[2]
            if count < 2:
                raise UsageError(f"BatchNorm in training needs more than 1 value per channel, got input {x.shape}")
            mean = x32.mean(axis=(0, 1, 2))
            var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))  # biased: used to normalise
            unbiased = var * (count / (count - 1))
            self.running_mean.set_value((1 - BN_MOMENTUM) * self.running_mean.get_value() + BN_MOMENTUM * mean)
            self.running_var.set_value((1 - BN_MOMENTUM) * self.running_var.get_value() + BN_MOMENTUM * unbiased)
            self.num_batches_tracked.set_value(self.num_batches_tracked.get_value() + 1)
        else:
            mean, var = self.running_mean.get_value(), self.running_var.get_value()
        y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPS)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(self.dtype)


class LeakyReLU(nnx.Module):
    """Parameterless; present so `main[i]` lines up with taming's Sequential index i."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(x, LEAKY_SLOPE)


class NLayerDiscriminator(nnx.Module):
    """PatchGAN: images [batch, H, W, C] -> float32 patch logits [batch, H/2^n - 2, W/2^n - 2, 1].

    Call with train=True in the discriminator step (batch statistics; running stats are
    updated in place, so under jit return nnx.state(model, nnx.BatchStat) with the loss) and
    train=False to score with the running statistics. `main` mirrors taming's Sequential.
    """

    def __init__(self, cfg: DiscriminatorConfig, rngs: nnx.Rngs | None):
        self.cfg = cfg
        specs = conv_specs(cfg)
        layers: list[nnx.Module] = []
        for spec in specs:
            layers.append(Conv(spec, cfg, rngs))
            if spec.norm:
                layers.append(BatchNorm(spec.out_channels, cfg, rngs))
            if spec is not specs[-1]:
                layers.append(LeakyReLU())
        self.main = nnx.List(layers)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        x = constrain(images, _ACTIVATION_AXES)
        for layer in self.main:
            x = layer(x, train=train) if isinstance(layer, BatchNorm) else layer(x)
        return x.astype(jnp.float32)


def init_discriminator(cfg: DiscriminatorConfig, seed: int) -> NLayerDiscriminator:
    return NLayerDiscriminator(cfg, nnx.Rngs(params=seed))


# ---------------------------------------------------------------------------------------------
# taming state dict <-> NNX. Paths are equal up to the leaf name; only conv kernels change layout.

# our leaf name -> taming leaf name
_LEAF_TO_TAMING = {
    "kernel": "weight",  # conv: [kh, kw, in, out] here, [out, in, kh, kw] in torch
    "scale": "weight",  # BatchNorm affine weight
    "bias": "bias",
    "running_mean": "running_mean",
    "running_var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
_HWIO_TO_OIHW = (3, 2, 0, 1)
_OIHW_TO_HWIO = (2, 3, 1, 0)


def _flat_variables(model: NLayerDiscriminator) -> list[tuple[str, tuple, nnx.Variable]]:
    """(taming key without prefix, our path, variable) for every Param and BatchStat."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        key = ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_TAMING[path[-1]]
        out.append((key, path, var))
    return out


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return np.ascontiguousarray(np.transpose(value, _HWIO_TO_OIHW))
    if leaf == "num_batches_tracked":
        return np.asarray(value, np.int64)
    return value


def to_taming_state_dict(model: NLayerDiscriminator, prefix: str = DEFAULT_PREFIX) -> dict[str, np.ndarray]:
    """Torch-layout numpy arrays keyed as in a taming checkpoint (params in param_dtype)."""
    out = {}
    for key, path, var in _flat_variables(model):
        value = np.array(jax.device_get(var.get_value()))  # a writable copy, not a view of the device buffer
        if value.dtype == jnp.bfloat16:
            value = value.astype(np.float32)  # torch/numpy checkpoints have no bfloat16 numpy dtype
        out[prefix + key] = _to_torch_layout(path[-1], value)
    return out


def config_from_taming_state_dict(state_dict: Mapping[str, Any], prefix: str = DEFAULT_PREFIX, *,
                                  dtype: str, param_dtype: str) -> DiscriminatorConfig:
    """input_channels, ndf and n_layers from the conv weight shapes under `prefix`."""
    first = prefix + "main.0.weight"
    if first not in state_dict:
        raise UsageError(f"taming state dict has no {first!r}; is the prefix {prefix!r} right?")
    ndf, input_channels = np.shape(state_dict[first])[:2]
    convs = [k for k in state_dict if k.startswith(prefix + "main.") and k.endswith(".weight")
             and np.ndim(state_dict[k]) == 4]
    n_layers = len(convs) - 2
    if n_layers < 1:
        raise UsageError(f"taming state dict under {prefix!r} has {len(convs)} conv weights; need at least 3")
    return DiscriminatorConfig(input_channels=int(input_channels), ndf=int(ndf), n_layers=n_layers,
                               dtype=dtype, param_dtype=param_dtype)


def from_taming_state_dict(state_dict: Mapping[str, Any], cfg: DiscriminatorConfig,
                           prefix: str = DEFAULT_PREFIX) -> NLayerDiscriminator:
    """A model holding the taming weights and running stats; keys outside `prefix` are ignored.

    Values are numpy arrays or anything np.asarray takes (float32 torch CPU tensors included).

    Raises ValueError naming the first missing key, unexpected key or mismatched shape.
    """
    model = NLayerDiscriminator(cfg, rngs=None)
    variables = _flat_variables(model)
    expected = {prefix + key for key, _, _ in variables}
    present = {k for k in state_dict if k.startswith(prefix)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise UsageError(f"taming state dict lacks {missing[0]!r} ({len(missing)} missing) for {cfg.to_dict()}")
    if unexpected:
        raise UsageError(f"taming state dict has unexpected key {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected) for {cfg.to_dict()}")
    for key, path, var in variables:
        value = np.asarray(state_dict[prefix + key])
        shape = var.get_value().shape
        want = tuple(shape[i] for i in _HWIO_TO_OIHW) if path[-1] == "kernel" else shape
        if value.shape != want:
            raise UsageError(f"taming {prefix + key!r} has shape {value.shape}, expected {want} for {cfg.to_dict()}")
        if path[-1] == "kernel":
            value = np.transpose(value, _OIHW_TO_HWIO)
        # copy: on CPU jnp.asarray may alias the caller's buffer (e.g. a torch tensor's .numpy())
        var.set_value(jnp.array(np.array(value), var.get_value().dtype))
    return model
