"""VQ-GAN encode (images -> codes) and decode (codes -> images) throughput: our jitted Flax
model vs diffusers' VQModel (PyTorch) on the same weights and batch, side by side.

    python benchmarks/vqgan_codec.py                      # tiny config (64 px), CPU
    python benchmarks/vqgan_codec.py --variant f16_1024 --batch 8   # LLM-CXR's 256 px tokenizer
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(variant: str, batch: int, dtype: str, steps: int, warmup: int, model_overrides: dict | None = None) -> dict:
    """Encode and decode images/s of one random VQ-GAN (configs/vqgan_f16_1024.py:variant, its model section
    updated by model_overrides) in both frameworks."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import VQModel
    from flax import nnx

    from llmcxr_jax import configs
    from llmcxr_jax.convert import diffusers_vqgan
    from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan

    c = configs.load_config(os.path.join(ROOT, "configs", f"vqgan_f16_1024.py:{variant}"))
    cfg = VQGANConfig(**{**c.model.to_dict(), **(model_overrides or {}), "dtype": dtype})
    ours = init_vqgan(cfg, 0)
    with tempfile.TemporaryDirectory() as d:  # the same weights in both frameworks
        diffusers_vqgan.export_diffusers(ours, d)
        ref = VQModel.from_pretrained(d).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = ref.to(device)
    # XLA:CPU sizes its thread pool by the CPUs this process may run on; the peer gets as many threads.
    from benchmarks.report import usable_cpus

    torch.set_num_threads(usable_cpus())
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    r = cfg.resolution
    x = np.random.default_rng(0).uniform(-1, 1, (batch, r, r, cfg.in_channels)).astype(np.float32)
    graphdef, state = nnx.split(ours)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    decode = jax.jit(lambda s, c: nnx.merge(graphdef, s).decode(c))
    xj = jnp.asarray(x)
    codes = encode(state, xj)
    jax_enc = timed(lambda: jax.block_until_ready(encode(state, xj)), steps, warmup)
    jax_dec = timed(lambda: jax.block_until_ready(decode(state, codes)), steps, warmup)

    xt = torch.tensor(x.transpose(0, 3, 1, 2).copy(), device=device)
    n = cfg.latent_size
    codes_t = torch.tensor(np.asarray(codes), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def t_encode():
        with torch.autocast(device_type=device, dtype=tdtype, enabled=dtype != "float32"):
            h = ref.encode(xt).latents
            ref.quantize(h)
        sync()

    @torch.inference_mode()
    def t_decode():
        with torch.autocast(device_type=device, dtype=tdtype, enabled=dtype != "float32"):
            z = ref.quantize.embedding(codes_t).reshape(batch, n, n, -1).permute(0, 3, 1, 2)
            ref.decode(z, force_not_quantize=True)
        sync()

    torch_enc = timed(t_encode, steps, warmup)
    torch_dec = timed(t_decode, steps, warmup)
    flops = model_flops(ref, xt[:1], codes_t[:1], n)
    return {
        "variant": variant, "resolution": r, "batch": batch, "dtype": dtype,
        "jax_device": jax.devices()[0].device_kind, "torch_device": device, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "encode_images_per_s": {"jax": batch / jax_enc, "torch": batch / torch_enc, "ratio": torch_enc / jax_enc},
        "decode_images_per_s": {"jax": batch / jax_dec, "torch": batch / torch_dec, "ratio": torch_dec / jax_dec},
        "model_flops_per_image": flops,
    }


def model_flops(ref, image, codes, n: int) -> dict:
    """The model FLOPs of encoding and decoding one image, as PyTorch's FlopCounterMode counts them on the diffusers
    model (its convolutions, matmuls and attention; elementwise work is not counted): the work both frameworks do,
    however each carries it out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            ref.quantize(ref.encode(image).latents)
        counts["encode"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            z = ref.quantize.embedding(codes).reshape(1, n, n, -1).permute(0, 3, 1, 2)
            ref.decode(z, force_not_quantize=True)
        counts["decode"] = counter.get_total_flops()
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny", choices=("tiny", "f16_1024"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    result = measure(args.variant, args.batch, args.dtype, args.steps, args.warmup)
    from benchmarks.report import emit

    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
