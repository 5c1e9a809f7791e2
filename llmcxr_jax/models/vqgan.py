"""taming-transformers VQ-GAN (VQModel) in Flax NNX: Encoder, Decoder, VectorQuantizer.

Attribute names mirror taming's state-dict keys (encoder.down.0.block.1.conv1, quantize.embedding,
...) so convert/taming_vqgan.py is a rename of leaf names. Images are NHWC in [-1, 1]; codes are
[batch, h*w] in row-major order. GroupNorm and VQ distances run in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.configs import dataclass_from_dict
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.dtypes import DtypeNames, check_dtypes
from llmcxr_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class VQGANConfig(DtypeNames):
    """taming ddconfig + quantizer. LLM-CXR (f16_1024): resolution 256, ch 128, ch_mult
    (1, 1, 2, 2, 4), num_res_blocks 2, attn_resolutions (16,), z_channels 256, embed_dim 256,
    n_embed 1024, beta 0.25, dropout 0.0."""

    resolution: int
    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    embed_dim: int
    n_embed: int
    beta: float
    dropout: float
    legacy_loss: bool  # taming VectorQuantizer2(legacy=True): beta weighs the codebook term
    dtype: str
    param_dtype: str

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % factor:
            raise UsageError(f"resolution {self.resolution} is not divisible by the downsampling factor {factor}")
        for c in [self.ch * m for m in self.ch_mult] + [self.z_channels]:
            if c % 32:
                raise UsageError(f"channel count {c} is not a multiple of GroupNorm's 32 groups")
        check_dtypes(self)

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (self.num_levels - 1)

    @property
    def codes_per_image(self) -> int:
        return self.latent_size ** 2

    def level_has_attention(self, level: int) -> bool:
        return self.resolution // 2 ** level in self.attn_resolutions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        return dataclass_from_dict(cls, d, "VQ-GAN config")

    def replace(self, **kw) -> VQGANConfig:
        return dataclasses.replace(self, **kw)


def _w(cfg):
    return cfg.weight_dtype


def _dt(cfg):
    return cfg.compute_dtype


class Conv(nnx.Module):
    """Conv2d with taming's padding: 'same' for 3x3/1x1, (0,1,0,1) then VALID for stride 2."""

    def __init__(self, cfg: VQGANConfig, c_in: int, c_out: int, k: int, rngs: nnx.Rngs, stride: int = 1):
        self.cfg, self.stride = cfg, stride
        fan_in = c_in * k * k
        bound = 1.0 / np.sqrt(fan_in)  # torch's default Conv2d init
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        self.kernel = nnx.Param(uniform(rngs.params(), (k, k, c_in, c_out), _w(cfg)),
                                logical_axes=("conv_height", "conv_width", "conv_in", "conv_out"))
        self.bias = nnx.Param(uniform(rngs.params(), (c_out,), _w(cfg)), logical_axes=("conv_out",))

    def __call__(self, x, kernel=None, padding=None):
        """kernel: an override of the stored kernel (to differentiate with respect to it alone, or one derived
        from it); padding: ((top, bottom), (left, right)) in place of taming's."""
        dt = _dt(self.cfg)
        kernel = self.kernel.get_value() if kernel is None else kernel
        k = kernel.shape[0]
        if padding is None:
            padding = ((0, 1), (0, 1)) if self.stride == 2 else ((k // 2, k // 2),) * 2
        y = jax.lax.conv_general_dilated(x.astype(dt), kernel.astype(dt), (self.stride,) * 2,
                                         padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias.get_value().astype(dt)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm (32 groups, biased variance) in float32, shaped for XLA:CPU: per-channel sums over
    the image (reductions that keep the channel axis minor), then per group; the variance is of the values
    centred on their group mean (no E[x^2] - E[x]^2 cancellation), and the output (x - mean) * a + bias is
    one elementwise pass with a = scale / std per channel."""

    def __init__(self, cfg: VQGANConfig, channels: int, groups: int = 32, eps: float = 1e-6):
        self.cfg, self.groups, self.eps = cfg, groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), _w(cfg)), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), _w(cfg)), logical_axes=("norm",))

    def __call__(self, x):
        b, h, w, c = x.shape
        per_group = c // self.groups
        count = h * w * per_group

        def group_mean(per_channel_sum):  # [b, c] sums -> [b, 1, 1, c]: the mean of each channel's group
            sums = per_channel_sum.reshape(b, self.groups, per_group).sum(axis=-1)
            return jnp.repeat(sums / count, per_group, axis=1)[:, None, None, :]

        x32 = x.astype(jnp.float32)
        mean = group_mean(x32.sum(axis=(1, 2)))
        var = group_mean(jnp.square(x32 - mean).sum(axis=(1, 2)))
        a = jax.lax.rsqrt(var + self.eps) * self.scale.get_value().astype(jnp.float32)
        return ((x32 - mean) * a + self.bias.get_value().astype(jnp.float32)).astype(_dt(self.cfg))


def swish(x):
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nnx.Module):
    def __init__(self, cfg: VQGANConfig, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cfg, c_in)
        self.conv1 = Conv(cfg, c_in, c_out, 3, rngs)
        self.norm2 = GroupNorm(cfg, c_out)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.conv2 = Conv(cfg, c_out, c_out, 3, rngs)
        self.nin_shortcut = Conv(cfg, c_in, c_out, 1, rngs) if c_in != c_out else None

    def __call__(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = swish(self.norm2(h))
        h = self.conv2(self.dropout(h) if self.dropout is not None else h)
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, cfg: VQGANConfig, c: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = GroupNorm(cfg, c)
        self.q, self.k, self.v = Conv(cfg, c, c, 1, rngs), Conv(cfg, c, c, 1, rngs), Conv(cfg, c, c, 1, rngs)
        self.proj_out = Conv(cfg, c, c, 1, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, h * w, c)
        k = self.k(hn).reshape(b, h * w, c)
        v = self.v(hn).reshape(b, h * w, c)
        scores = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", probs, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    def __init__(self, cfg: VQGANConfig, c: int, rngs: nnx.Rngs):
        self.conv = Conv(cfg, c, c, 3, rngs, stride=2)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv (taming's Upsample with_conv), computed without the x2 image:
    output row 2i + p sees input rows (i - 1, i) for p = 0 and (i, i + 1) for p = 1, so the kernel's three
    rows fold onto two (p = 0: k0, k1 + k2; p = 1: k0 + k1, k2), and likewise its columns. Each of the four
    output phases is a 2x2 conv of the input: 16 taps per input pixel instead of 36 (the same sums, taken
    in another order: float32 results agree to ~1e-6)."""

    def __init__(self, cfg: VQGANConfig, c: int, rngs: nnx.Rngs):
        self.conv = Conv(cfg, c, c, 3, rngs)

    def __call__(self, x):
        k = self.conv.kernel.get_value()
        b, h, w, _ = x.shape

        def fold(k, phase, axis):  # 3 taps -> the 2 that output phase `phase` sees, along kernel axis `axis`
            t = [jax.lax.index_in_dim(k, i, axis) for i in range(3)]
            return jnp.concatenate([t[0], t[1] + t[2]] if phase == 0 else [t[0] + t[1], t[2]], axis=axis)

        pad = ((1, 0), (0, 1))  # phase 0 reaches one pixel back, phase 1 one forward
        rows = [jnp.stack([self.conv(x, kernel=fold(fold(k, py, 0), px, 1), padding=(pad[py], pad[px]))
                           for px in (0, 1)], axis=3)  # [b, h, w, 2 (px), c]
                for py in (0, 1)]
        return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, -1)  # [b, h, 2 (py), w, 2 (px), c] interleaved


class Level(nnx.Module):
    """One resolution: res blocks (each followed by attention where configured) and a resampler."""

    def __init__(self, blocks, attns, resample):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        if resample is not None:
            setattr(self, resample[0], resample[1])

    def blocks_and_attention(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nnx.Module):
    def __init__(self, cfg: VQGANConfig, c: int, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(cfg, c, c, rngs)
        self.attn_1 = AttnBlock(cfg, c, rngs)
        self.block_2 = ResnetBlock(cfg, c, c, rngs)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.conv_in = Conv(cfg, cfg.in_channels, cfg.ch, 3, rngs)
        in_mult = (1,) + cfg.ch_mult
        levels = []
        for i in range(cfg.num_levels):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, c_in, c_out, rngs))
                c_in = c_out
                if cfg.level_has_attention(i):
                    attns.append(AttnBlock(cfg, c_out, rngs))
            down = ("downsample", Downsample(cfg, c_out, rngs)) if i != cfg.num_levels - 1 else None
            levels.append(Level(blocks, attns, down))
        self.down = nnx.List(levels)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = Mid(cfg, c, rngs)
        self.norm_out = GroupNorm(cfg, c)
        self.conv_out = Conv(cfg, c, cfg.z_channels, 3, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level.blocks_and_attention(h)
            if i != self.cfg.num_levels - 1:
                h = level.downsample(h)
            h = constrain(h, ("activation_batch", "activation_height", "activation_width", "activation_channels"))
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = Conv(cfg, cfg.z_channels, c, 3, rngs)
        self.mid = Mid(cfg, c, rngs)
        levels: list[Level | None] = [None] * cfg.num_levels
        for i in reversed(range(cfg.num_levels)):  # built from the lowest resolution up, as taming
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, c, c_out, rngs))
                c = c_out
                if cfg.level_has_attention(i):
                    attns.append(AttnBlock(cfg, c, rngs))
            up = ("upsample", Upsample(cfg, c, rngs)) if i != 0 else None
            levels[i] = Level(blocks, attns, up)
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(cfg, c)
        self.conv_out = Conv(cfg, c, cfg.out_channels, 3, rngs)

    def features(self, z):
        """Everything up to the last conv (taming's adaptive GAN weight is measured there)."""
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.cfg.num_levels)):
            h = self.up[i].blocks_and_attention(h)
            if i != 0:
                h = self.up[i].upsample(h)
            h = constrain(h, ("activation_batch", "activation_height", "activation_width", "activation_channels"))
        return swish(self.norm_out(h))

    def __call__(self, z):
        return self.conv_out(self.features(z))


class VectorQuantizer(nnx.Module):
    """Nearest-codebook quantisation with a straight-through gradient (taming VectorQuantizer2)."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        bound = 1.0 / cfg.n_embed
        self.embedding = nnx.Param(
            jax.random.uniform(rngs.params(), (cfg.n_embed, cfg.embed_dim), _w(cfg), -bound, bound),
            logical_axes=("codebook", "codebook_dim"))

    def codes(self, z):
        """z [b, h, w, d] -> nearest code indices [b, h, w] (squared L2, float32)."""
        e = self.embedding.get_value().astype(jnp.float32)
        z = z.astype(jnp.float32)
        d = (jnp.sum(z ** 2, -1, keepdims=True) + jnp.sum(e ** 2, -1)
             - 2.0 * jnp.einsum("bhwd,nd->bhwn", z, e, precision=jax.lax.Precision.HIGHEST))
        return jnp.argmin(d, axis=-1).astype(jnp.int32)

    def lookup(self, codes):
        """codes [...] -> embeddings [..., d] (float32)."""
        return jnp.take(self.embedding.get_value().astype(jnp.float32), codes, axis=0)

    def __call__(self, z):
        """z [b, h, w, d] -> (straight-through z_q, codes [b, h, w], losses dict of float32)."""
        codes = self.codes(z)
        z32 = z.astype(jnp.float32)
        zq = self.lookup(codes)
        to_codebook = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z32)))
        to_encoder = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z32))
        if self.cfg.legacy_loss:  # taming's VQModel: mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)
            loss = to_encoder + self.cfg.beta * to_codebook
        else:
            loss = self.cfg.beta * to_encoder + to_codebook
        zq_st = z32 + jax.lax.stop_gradient(zq - z32)
        return zq_st.astype(z.dtype), codes, {"codebook_loss": to_codebook, "commitment_loss": to_encoder,
                                              "quant_loss": loss}


class VQModel(nnx.Module):
    """encode(images) -> codes, decode(codes) -> images, reconstruct(images)."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.quantize = VectorQuantizer(cfg, rngs)
        self.quant_conv = Conv(cfg, cfg.z_channels, cfg.embed_dim, 1, rngs)
        self.post_quant_conv = Conv(cfg, cfg.embed_dim, cfg.z_channels, 1, rngs)

    def check_images(self, images) -> None:
        r, c = self.cfg.resolution, self.cfg.in_channels
        if images.ndim != 4 or tuple(images.shape[1:]) != (r, r, c):
            raise UsageError(f"images of shape {tuple(images.shape)} do not fit this VQ-GAN; "
                             f"give [batch, {r}, {r}, {c}] (NHWC) in [-1, 1]")

    def encode_latents(self, images):
        """images [b, H, W, C] -> pre-quantisation latents [b, h, w, embed_dim]."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images):
        """images -> (codes [b, h*w] row-major int32, losses)."""
        _, codes, losses = self.quantize(self.encode_latents(images))
        return codes.reshape(codes.shape[0], -1), losses

    def decode_latents(self, zq):
        return self.decoder(self.post_quant_conv(zq)).astype(jnp.float32)

    def decode(self, codes):
        """codes [b, h*w] (must lie in [0, n_embed); see check_codes) -> images [b, H, W, C_out]."""
        n = self.cfg.latent_size
        if codes.ndim != 2 or codes.shape[1] != n * n:
            raise UsageError(f"codes of shape {tuple(codes.shape)} do not fit; give [batch, {n * n}]")
        zq = self.quantize.lookup(codes.reshape(codes.shape[0], n, n))
        return self.decode_latents(zq.astype(_dt(self.cfg)))

    def reconstruct(self, images):
        """images -> (reconstructions, codes [b, h*w], losses); gradients flow straight through."""
        zq, codes, losses = self.quantize(self.encode_latents(images))
        return self.decode_latents(zq), codes.reshape(codes.shape[0], -1), losses

    def last_layer(self) -> nnx.Param:
        """The decoder's last conv kernel: where taming's adaptive GAN weight is measured."""
        return self.decoder.conv_out.kernel


def check_codes(codes, n_embed: int) -> np.ndarray:
    """Host-side validation before decode: an out-of-codebook code is a one-line error."""
    arr = np.asarray(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= n_embed):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise UsageError(f"code {bad} is outside the codebook [0, {n_embed})")
    return arr


def init_vqgan(cfg: VQGANConfig, seed: int) -> VQModel:
    return VQModel(cfg, nnx.Rngs(params=seed, dropout=seed + 1))


def abstract_vqgan(cfg: VQGANConfig) -> VQModel:
    return nnx.eval_shape(lambda: VQModel(cfg, nnx.Rngs(params=0, dropout=1)))
