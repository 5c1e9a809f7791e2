"""The VQ-GAN's parts against PyTorch's, one op at a time: a 3x3 convolution and GroupNorm (32 groups) at
the f16_1024 decoder's shapes, each jitted alone (ours, NHWC as models/vqgan.py runs them) beside the torch
module (NCHW, torch.inference_mode, the same thread count), the fastest of --repeats runs. Where
benchmarks/vqgan_codec.py's whole-model ratios come from (docs/performance.md, issue 21's profile).

    python benchmarks/vqgan_ops.py [--batch 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from llmcxr_jax.models.vqgan import GroupNorm, VQGANConfig

SHAPES = ((256, 128), (128, 256), (32, 512), (16, 512))  # (height = width, channels) of decoder levels


def fastest_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    import torch
    from flax import nnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = VQGANConfig(resolution=256, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4),
                      num_res_blocks=2, attn_resolutions=(16,), z_channels=256, embed_dim=256, n_embed=1024,
                      beta=0.25, dropout=0.0, legacy_loss=False, dtype="float32", param_dtype="float32")
    rng = np.random.default_rng(0)
    print("| op | shape | ours | PyTorch | ratio |\n| --- | --- | --- | --- | --- |")
    for size, c in SHAPES:
        x = rng.standard_normal((args.batch, size, size, c), np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        kernel = (rng.standard_normal((3, 3, c, c)) * 0.05).astype(np.float32)
        conv = jax.jit(lambda v, k: jax.lax.conv_general_dilated(v, k, (1, 1), ((1, 1), (1, 1)),
                                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        ours = fastest_ms(conv, x, kernel, repeats=args.repeats)
        torch_conv = torch.nn.Conv2d(c, c, 3, padding=1)
        norm = GroupNorm(cfg, c)
        graphdef, state = nnx.split(norm)
        apply = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v))
        ours_norm = fastest_ms(apply, state, x, repeats=args.repeats)
        torch_norm = torch.nn.GroupNorm(32, c, eps=1e-6)
        with torch.inference_mode():
            theirs = fastest_ms(torch_conv, xt, repeats=args.repeats)
            theirs_norm = fastest_ms(torch_norm, xt, repeats=args.repeats)
        for op, a, b in (("3x3 conv", ours, theirs), ("GroupNorm", ours_norm, theirs_norm)):
            print(f"| {op} | {size}x{size}, {c} channels | {a:.1f} ms | {b:.1f} ms | {b / a:.2f} |")


if __name__ == "__main__":
    main()
