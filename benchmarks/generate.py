"""Decoding speed: our jitted KV-cache sampler vs transformers `generate` (PyTorch) on the same
weights (a random Flax model exported with export_hf and reloaded by from_pretrained).

    python benchmarks/generate.py --preset tiny                 # CPU, about a minute
    python benchmarks/generate.py --preset dolly-v2-3b --dtype bfloat16   # a GPU

Cases: an image continuation (report->CXR: "<", 256 image tokens, ">", "### End" = 259 new
tokens, our image mode) and a 128-token report (CXR->report, our text mode), each greedy and with
LLM-CXR's top_p 0.92 / top_k 0, at batch 1 and 8. transformers is held to the same number of new
tokens (min_new_tokens); tokens/s counts new tokens per second, prefill included.
Prints a markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

PRESETS = {  # hidden, layers, heads, intermediate
    "tiny": (256, 2, 4, 1024),
    "small": (512, 4, 8, 2048),
    "dolly-v2-3b": (2560, 32, 32, 10240),
}
TEXT, CODES = 50281, 1024  # LLM-CXR's vocabulary: T text ids, then K image ids
EOS, END_KEY, INSTRUCTION_KEY, RESPONSE_KEY = 0, 50277, 50278, 50279  # dolly-v2 tokenizer ids
OPEN, CLOSE = 29, 31  # any two text ids stand in for "<" and ">"


def build_model(preset: str, dtype: str, param_dtype: str = "float32"):
    from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
    from llmcxr_jax.vocab import VocabLayout

    hidden, layers, heads, mlp = PRESETS[preset]
    layout = VocabLayout.create(TEXT, CODES)
    cfg = GPTNeoXConfig(vocab_size=layout.size, padded_vocab_size=layout.padded_size, hidden_size=hidden,
                        num_layers=layers, num_heads=heads, intermediate_size=mlp, rotary_pct=0.25,
                        rotary_base=10000.0, max_position_embeddings=2048, layer_norm_eps=1e-5,
                        use_parallel_residual=True, attention_bias=True, hidden_act="gelu", initializer_range=0.02,
                        dtype=dtype, param_dtype=param_dtype, scan_layers=False, remat_policy="none")
    return init_model(cfg, 0), layout


def load_hf(model, dtype: str):
    """Our model exported with export_hf and reloaded by transformers: (GPTNeoXForCausalLM in eval mode, device)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from llmcxr_jax.convert.hf_gpt_neox import export_hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # XLA:CPU sizes its thread pool by the CPUs this process may run on; the peer gets as many threads.
    from benchmarks.report import usable_cpus

    torch.set_num_threads(usable_cpus())
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    try:
        export_hf(model, tmp, dtype=dtype)
        hf = GPTNeoXForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype)).to(device).eval()
    finally:
        shutil.rmtree(tmp)
    return hf, device


def bench_ours(model, layout, prompt, mask, case, sampler, new_tokens, repeats):
    import jax

    from llmcxr_jax.infer.generate import generate
    from llmcxr_jax.infer.sampling import SamplingConfig
    from llmcxr_jax.vocab import SpecialTokens

    special = SpecialTokens(eos_id=EOS, pad_id=EOS, end_key_id=END_KEY, instruction_key_id=INSTRUCTION_KEY,
                            response_key_id=RESPONSE_KEY)
    make = SamplingConfig.greedy_decoding if sampler == "greedy" else SamplingConfig.llmcxr
    kw = dict(layout=layout, special=special, sampling=make(new_tokens))
    if case == "image":
        kw.update(mode="image", image_tokens=new_tokens - 3, open_id=OPEN, close_id=CLOSE)
    else:
        kw.update(mode="text")

    def once(seed):
        out = generate(model, prompt, mask, rng=jax.random.key(seed), **kw)
        return int(np.asarray(out.lengths).sum())

    t0 = time.perf_counter()
    once(0)  # compiles (and runs once)
    compile_s = time.perf_counter() - t0
    times, tokens = [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        tokens = once(r + 1)
        times.append(time.perf_counter() - t0)
    return tokens / min(times), compile_s, tokens


def bench_torch(hf, prompt, mask, sampler, new_tokens, repeats, device):
    import torch

    ids = torch.tensor(prompt, device=device)
    att = torch.tensor(mask.astype(np.int64), device=device)
    kw = dict(do_sample=False) if sampler == "greedy" else dict(do_sample=True, top_p=0.92, top_k=0)

    def once(n):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=[EOS, END_KEY], pad_token_id=EOS, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    once(2)  # warm-up
    times, tokens = [], 0
    for r in range(repeats):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        tokens = once(new_tokens)
        times.append(time.perf_counter() - t0)
    return tokens / min(times), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--image-tokens", type=int, default=256, help="h*w codes of the image continuation")
    p.add_argument("--report-tokens", type=int, default=128)
    p.add_argument("--image-prompt", type=int, default=64, help="prompt tokens of report->CXR (a report)")
    p.add_argument("--report-prompt", type=int, default=320, help="prompt tokens of CXR->report (holds an image)")
    p.add_argument("--samplers", default="greedy,top_p")
    p.add_argument("--cases", default="image,report")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the fastest counts")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    sys.path.insert(0, ROOT)

    import jax

    if args.preset == "dolly-v2-3b" and jax.default_backend() == "cpu":
        sys.exit("the dolly-v2-3b preset needs a GPU or TPU; use --preset tiny or small on a CPU")
    model, layout = build_model(args.preset, args.dtype)
    hf, device = (None, None) if args.skip_torch else load_hf(model, args.dtype)
    torch_threads = None
    if hf is not None:
        import torch

        torch_threads = torch.get_num_threads()

    rng = np.random.default_rng(0)
    rows = []
    for case in args.cases.split(","):
        new_tokens = args.image_tokens + 3 if case == "image" else args.report_tokens
        prompt_len = args.image_prompt if case == "image" else args.report_prompt
        for sampler in args.samplers.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                prompt = rng.integers(100, TEXT - 100, (batch, prompt_len)).astype(np.int32)
                mask = np.ones_like(prompt, bool)
                mask[0, :prompt_len // 4] = False  # left padding on one row
                ours, compile_s, ours_tokens = bench_ours(model, layout, prompt, mask, case, sampler, new_tokens,
                                                          args.repeats)
                row = dict(case=case, sampler=sampler, batch=batch, prompt=prompt_len, new_tokens=new_tokens,
                           ours_tokens=ours_tokens, ours_tokens_per_s=ours, ours_compile_s=compile_s)
                if hf is not None:
                    theirs, theirs_tokens = bench_torch(hf, prompt, mask, sampler, new_tokens, args.repeats, device)
                    row.update(hf_tokens=theirs_tokens, hf_tokens_per_s=theirs, ratio=ours / theirs)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    result = {"preset": args.preset, "shape": dict(zip(("hidden", "layers", "heads", "intermediate"),
                                                       PRESETS[args.preset])),
              "vocab": layout.size, "dtype": args.dtype, "jax_device": jax.devices()[0].device_kind,
              "torch_device": device, "cpu_count": os.cpu_count(),
              "torch_threads": torch_threads, "rows": rows}
    print(f"\n{args.preset} {result['shape']}, vocab {layout.size}, {args.dtype}, "
          f"jax on {result['jax_device']}, torch on {device}\n")
    print("| case | sampler | batch | prompt | new tokens | ours tok/s | HF tok/s | ours / HF | our first call s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hf_cell = f"{r['hf_tokens_per_s']:.0f}" if "hf_tokens_per_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        print(f"| {r['case']} | {r['sampler']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | "
              f"{r['ours_tokens_per_s']:.0f} | {hf_cell} | {ratio} | {r['ours_compile_s']:.1f} |")
    from benchmarks.report import emit

    emit(result, args.json)


if __name__ == "__main__":
    main()
