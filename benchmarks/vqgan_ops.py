"""The VQ-GAN's parts against PyTorch's, one op at a time: a 3x3 convolution, GroupNorm (32 groups) and the
decoder's Upsample (nearest x2 + 3x3 conv) at the f16_1024 (or tiny) decoder's shapes, each jitted alone (ours, NHWC,
the models/vqgan.py modules) beside the torch module (NCHW, torch.inference_mode, the same thread count),
the fastest of --repeats runs. Inputs are on the device before the clock starts on both sides (a numpy
input would time XLA's host-to-device copy: 35 ms of a 256x256x128 batch of 2). Where
benchmarks/vqgan_codec.py's whole-model ratios come from (docs/performance.md, issue 21's profile).

    python benchmarks/vqgan_ops.py [--batch 2] [--repeats 5]
    python benchmarks/vqgan_ops.py --shapes tiny --batch 8 --repeats 10   # the tiny config's levels
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from llmcxr_jax.models.vqgan import GroupNorm, Upsample, VQGANConfig

SHAPES = {  # (height = width, channels) of decoder levels
    "f16_1024": ((256, 128), (128, 256), (32, 512), (16, 512)),
    "tiny": ((64, 32), (32, 32), (16, 64), (8, 64), (4, 128)),
}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # benchmarks.report, run as a script


def fastest_ms(fn, *args, repeats: int) -> float:
    """The fastest call of fn(*args) in ms, its result waited for (the first call compiles / warms up)."""
    from benchmarks.report import fastest

    return fastest(lambda: jax.block_until_ready(fn(*args)), repeats) * 1e3


def main() -> None:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="f16_1024", help="whose decoder levels")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from benchmarks.report import usable_cpus

    torch.set_num_threads(usable_cpus())
    cfg = VQGANConfig(resolution=256, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4),
                      num_res_blocks=2, attn_resolutions=(16,), z_channels=256, embed_dim=256, n_embed=1024,
                      beta=0.25, dropout=0.0, legacy_loss=False, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(0)
    print("| op | shape | ours | PyTorch | ratio |\n| --- | --- | --- | --- | --- |")
    for size, c in SHAPES[args.shapes]:
        x = rng.standard_normal((args.batch, size, size, c), np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        kernel = (rng.standard_normal((3, 3, c, c)) * 0.05).astype(np.float32)
        conv = jax.jit(lambda v, k: jax.lax.conv_general_dilated(v, k, (1, 1), ((1, 1), (1, 1)),
                                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        xj = jnp.asarray(x)
        ours = {"3x3 conv": fastest_ms(conv, xj, jnp.asarray(kernel), repeats=args.repeats)}
        theirs = {}
        modules = {"GroupNorm": (GroupNorm(cfg, c), torch.nn.GroupNorm(32, c, eps=1e-6))}
        if size <= 128:  # the decoder upsamples 16 -> 32, ..., 128 -> 256
            modules["Upsample (x2 + 3x3 conv)"] = (Upsample(cfg, c, nnx.Rngs(0)), torch.nn.Sequential(
                torch.nn.Upsample(scale_factor=2.0, mode="nearest"), torch.nn.Conv2d(c, c, 3, padding=1)))
        for name, (module, _) in modules.items():
            graphdef, state = nnx.split(module)
            ours[name] = fastest_ms(jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v)), state, xj,
                                    repeats=args.repeats)
        with torch.inference_mode():
            theirs["3x3 conv"] = fastest_ms(torch.nn.Conv2d(c, c, 3, padding=1), xt, repeats=args.repeats)
            for name, (_, module) in modules.items():
                theirs[name] = fastest_ms(module, xt, repeats=args.repeats)
        for op, a in ours.items():
            b = theirs[op]
            out = f"{2 * size}x{2 * size}" if op.startswith("Upsample") else f"{size}x{size}"
            print(f"| {op} | {size}x{size} -> {out}, {c} channels | {a:.2f} ms | {b:.2f} ms | {b / a:.2f} |")


if __name__ == "__main__":
    main()
