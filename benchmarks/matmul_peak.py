"""What this machine's float32 matrix multiplication allows, in XLA:CPU and in PyTorch: the rates that bound the
codec and the training step (both are matmuls and convolutions), and the sampler's LM head (read whole at every
text token).

    python benchmarks/matmul_peak.py [--json out.json]

Cases: a square 4096 x 4096 x 4096 matmul (the best rate either library reaches here), and the sampler's head,
hidden 256 x the LLM-CXR table of 51,328 rows, at batch 1 and 8 (x [b, 256] @ kernel [256, 51328]; PyTorch also
as F.linear on the transposed kernel, transformers' layout, and the faster of the two counts). Each case is the
fastest of --repeats timed calls after a warm-up. Prints a markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HEAD_ROWS, HEAD_HIDDEN = 51328, 256


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="n of the square n x n x n matmul")
    p.add_argument("--batches", default="1,8", help="batch sizes of the head case")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, ROOT)

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.report import emit, fastest, usable_cpus

    torch.set_num_threads(usable_cpus())
    rng = np.random.default_rng(0)
    matmul = jax.jit(jnp.matmul)
    rows = []

    def case(name, flops, a, b):
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb, tbt = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(np.ascontiguousarray(b.T))
        ours = fastest(lambda: matmul(ja, jb).block_until_ready(), args.repeats)
        with torch.inference_mode():
            mm = fastest(lambda: torch.matmul(ta, tb), args.repeats)
            linear = fastest(lambda: torch.nn.functional.linear(ta, tbt), args.repeats)
        rows.append({"case": name, "flops": flops, "jax_s": ours, "torch_s": min(mm, linear), "torch_matmul_s": mm,
                     "torch_linear_s": linear, "jax_gflops": flops / ours / 1e9,
                     "torch_gflops": flops / min(mm, linear) / 1e9})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    n = args.size
    case(f"matmul {n} x {n} x {n}", 2.0 * n ** 3, rng.standard_normal((n, n), np.float32),
         rng.standard_normal((n, n), np.float32))
    kernel = (rng.standard_normal((HEAD_HIDDEN, HEAD_ROWS)) * 0.02).astype(np.float32)
    for b in (int(v) for v in args.batches.split(",")):
        case(f"LM head, batch {b}: [{b}, {HEAD_HIDDEN}] x [{HEAD_HIDDEN}, {HEAD_ROWS}]",
             2.0 * b * HEAD_HIDDEN * HEAD_ROWS, rng.standard_normal((b, HEAD_HIDDEN), np.float32), kernel)

    result = {"jax_device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "rows": rows,
              "peak_gflops": max(max(r["jax_gflops"], r["torch_gflops"]) for r in rows)}
    print("| case | XLA ms | PyTorch ms | XLA GFLOP/s | PyTorch GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['jax_s'] * 1e3:.3f} | {r['torch_s'] * 1e3:.3f} | {r['jax_gflops']:.0f} | "
              f"{r['torch_gflops']:.0f} |")
    emit(result, args.json)


if __name__ == "__main__":
    main()
