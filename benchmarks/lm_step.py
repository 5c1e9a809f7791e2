"""Forward+backward step of the same GPT-NeoX in our jitted Flax model and in transformers (PyTorch).

    python benchmarks/lm_step.py                      # CPU, a small LLM-CXR-vocabulary model
    python benchmarks/lm_step.py --preset dolly-v2-3b --batch 2 --seq 2048 --dtype bfloat16   # a GPU

Prints tokens/s for both frameworks and their ratio, plus model-FLOPs utilisation when a peak
is known (GPU/TPU) or given with --peak-tflops. Both run the same shapes, the same tokens and
the same loss (mean next-token cross-entropy over the LLM-CXR vocabulary T + K = 51305).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PRESETS = {  # hidden, layers, heads, intermediate
    "small": (512, 4, 8, 2048),
    "dolly-v2-3b": (2560, 32, 32, 10240),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # benchmarks.report, run as a script


def model_flops_per_token(hidden, layers, intermediate, vocab, seq) -> float:
    """6 x matmul parameters (fwd + bwd) plus causal-free attention score/value matmuls, per token."""
    matmul_params = layers * (4 * hidden * hidden + 2 * hidden * intermediate) + hidden * vocab
    attention = layers * 2 * 2 * seq * hidden  # QK^T and PV, forward
    return 6 * matmul_params + 3 * attention


def bench_jax(args, shape, vocab_size, tokens):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
    from llmcxr_jax.train.chunked_loss import token_cross_entropy
    from llmcxr_jax.vocab import VocabLayout

    hidden, layers, heads, mlp = shape
    layout = VocabLayout.create(vocab_size - 1024, 1024)
    cfg = GPTNeoXConfig(vocab_size=layout.size, padded_vocab_size=layout.padded_size, hidden_size=hidden,
                        num_layers=layers, num_heads=heads, intermediate_size=mlp, rotary_pct=0.25,
                        rotary_base=10000.0, max_position_embeddings=max(2048, args.seq), layer_norm_eps=1e-5,
                        use_parallel_residual=True, attention_bias=True, hidden_act="gelu", initializer_range=0.02,
                        dtype=args.dtype, param_dtype="float32", scan_layers=args.scan,
                        remat_policy=args.remat)
    model = init_model(cfg, 0)
    graphdef, params = nnx.split(model)

    def loss_fn(params, ids):
        model = nnx.merge(graphdef, params)
        if args.logits_chunk:  # the same mean cross entropy, the head's logits a slice of positions at a time
            x = model.hidden_states(ids[:, :-1])
            return token_cross_entropy(model.head_logits, x, ids[:, 1:], args.logits_chunk).mean()
        logits = model(ids[:, :-1])[..., : layout.size]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    ids = jnp.asarray(tokens)
    for _ in range(args.warmup):
        jax.block_until_ready(step(params, ids))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss, grads = step(params, ids)
    jax.block_until_ready((loss, grads))
    return time.perf_counter() - t0, float(loss), jax.devices()[0].device_kind


def bench_torch(args, shape, vocab_size, tokens):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, mlp = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # XLA:CPU sizes its thread pool by the CPUs this process may run on; the peer gets as many threads (it
    # trains, so it keeps autograd: no inference_mode here).
    from benchmarks.report import usable_cpus

    torch.set_num_threads(usable_cpus())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=mlp, rotary_pct=0.25,
                        max_position_embeddings=max(2048, args.seq))
    model = GPTNeoXForCausalLM(cfg).to(device)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.tensor(tokens, device=device)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=args.dtype != "float32"):
            logits = model(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float(loss), device, torch.get_num_threads()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per row (the step sees seq, predicts seq)")
    p.add_argument("--vocab", type=int, default=51305, help="T + K (LLM-CXR: 50281 + 1024)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", default="none", help="our remat policy; torch uses gradient checkpointing when set")
    p.add_argument("--scan", action="store_true", help="scan over layers in the Flax model")
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="our loss over this many positions at a time (train.logits_chunk); 0: whole rows")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs/TPUs)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()
    sys.path.insert(0, ROOT)

    import numpy as np

    shape = PRESETS[args.preset]
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1))
    n_tokens = args.batch * args.seq * args.steps
    result = {"preset": args.preset, "shape": dict(zip(("hidden", "layers", "heads", "intermediate"), shape)),
              "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "dtype": args.dtype, "steps": args.steps,
              "logits_chunk": args.logits_chunk,
              "cpu_count": os.cpu_count()}
    seconds, loss, kind = bench_jax(args, shape, args.vocab, tokens)
    result.update(jax_tokens_per_s=n_tokens / seconds, jax_loss=loss, jax_device=kind)
    if not args.skip_torch:
        t_seconds, t_loss, t_device, t_threads = bench_torch(args, shape, args.vocab, tokens)
        result.update(torch_tokens_per_s=n_tokens / t_seconds, torch_loss=t_loss, torch_device=t_device,
                      torch_threads=t_threads,
                      speedup=result["jax_tokens_per_s"] / (n_tokens / t_seconds))
    flops = model_flops_per_token(shape[0], shape[1], shape[3], args.vocab, args.seq)
    result["model_flops_per_token"] = flops
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if peak:
        result["jax_mfu"] = result["jax_tokens_per_s"] * flops / (peak * 1e12)
        if "torch_tokens_per_s" in result:
            result["torch_mfu"] = result["torch_tokens_per_s"] * flops / (peak * 1e12)
    from benchmarks.report import emit

    emit(result, args.json)


if __name__ == "__main__":
    main()
