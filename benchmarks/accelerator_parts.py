"""The parts of benchmarks/accelerator_check.py, each a function (shape, deadline, emit) -> result dict that
benchmarks/accelerator_check.py runs in its own process: our LM train step (per model.attention), transformers'
train step, our sampler vs transformers `generate`, our VQ-GAN vs diffusers. `emit(partial)` records what a part
has so far (kept if the part is stopped at its time limit); `deadline` (time.monotonic()) ends timing loops early.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import types

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
STAGE1 = os.path.join(ROOT, "configs", "llmcxr_stage1.py")
PARTS = ("lm_train_xla", "lm_train_cudnn", "lm_train_torch", "generate", "vqgan")
FULL = dict(variant="3b", batch=2, seq=2048, dtype="bfloat16", remat="dots_no_batch", steps=8, warmup=2,
            gen_preset="dolly-v2-3b", image_tokens=256, gen_prompt=64, gen_repeats=1, samplers=("greedy", "top_p"),
            vqgan="f16_1024", vqgan_batch=8, vqgan_steps=5, vqgan_model={})
# --smoke: the same code on tiny shapes (float32: XLA:CPU compiles bf16 slowly; a 16 px, two-level VQ-GAN)
SMOKE = dict(variant="tiny", batch=2, seq=64, dtype="float32", remat="dots_no_batch", steps=2, warmup=1,
             gen_preset="tiny", image_tokens=8, gen_prompt=8, gen_repeats=1, samplers=("greedy",),
             vqgan="tiny", vqgan_batch=2, vqgan_steps=1,
             vqgan_model={"resolution": 16, "ch_mult": (1, 1), "attn_resolutions": ()})
EXAMPLES_PER_ROW = 4  # the synthetic batch packs this many examples into each row


def lm_config(shape: dict, attention: str):
    from llmcxr_jax import configs

    return configs.load_config(f"{STAGE1}:{shape['variant']}", [
        f"model.attention={attention}", f"model.dtype={shape['dtype']}", "model.scan_layers=True",
        f"model.remat_policy={shape['remat']}", f"train.batch_size={shape['batch']}", "train.grad_accum=1",
        f"data.seq_len={shape['seq']}", f"data.max_length={shape['seq']}", "train.mesh=1,1,1"])


def synthetic_batch(rows: int, seq: int, text_size: int, image_codes: int, seed: int = 0) -> dict:
    """A packed batch as packing.BATCH_SPEC lays it out (with example_ids, as the loader's): EXAMPLES_PER_ROW
    examples per row, each a random text prompt then a random image-code response, the response's tokens trained
    (report->CXR, as the stage-1 mix's image half)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per = seq // EXAMPLES_PER_ROW
    pos = np.broadcast_to(np.arange(seq) % per, (rows, seq))  # position in its example
    response = pos >= per // 2
    ids = np.where(response, text_size + rng.integers(0, image_codes, (rows, seq)),
                   rng.integers(0, text_size, (rows, seq)))
    last = pos == per - 1
    targets = np.where(last, 0, np.roll(ids, -1, axis=1))  # the next token of the same example
    trained = (pos >= per // 2 - 1) & ~last  # positions whose target is a response token
    return {"input_ids": ids.astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": trained.astype(np.float32),
            "segment_ids": (np.broadcast_to(np.arange(seq), (rows, seq)) // per + 1).astype(np.int32),
            "positions": pos.astype(np.int32), "modality": trained.astype(np.int8),
            "example_ids": np.arange(rows * EXAMPLES_PER_ROW, dtype=np.int32).reshape(rows, EXAMPLES_PER_ROW)}


def timed_steps(step, warmup: int, steps: int, deadline: float) -> tuple[list[float], float]:
    """Call `step()` (which must block until done) once, `warmup` more times, then `steps` timed times; stop early
    (after one timed call) past the deadline. -> (seconds of each timed call, seconds of the first call)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for n in range(warmup + steps):
        if n > warmup and time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        step()
        if n >= warmup:
            times.append(time.perf_counter() - t0)
    return times, first


def rate_fields(tokens_per_step: int, times: list[float], flops_per_token: float, peak: float) -> dict:
    step_s = statistics.median(times)
    out = {"step_time_s": step_s, "tokens_per_s": tokens_per_step / step_s, "timed_steps": len(times),
           "step_times_s": times, "flops_per_token": flops_per_token, "peak_flops": peak or None, "mfu": None}
    if peak:
        out["mfu"] = out["tokens_per_s"] * flops_per_token / peak
    return out


def part_lm_train_ours(shape: dict, attention: str, deadline: float, emit) -> dict:
    import jax

    from llmcxr_jax import sharding, vocab
    from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, model_flops_per_token
    from llmcxr_jax.train import lm, topologies
    from llmcxr_jax.train import state as state_lib

    cfg = lm_config(shape, attention)
    device = jax.devices()[0]
    mesh = sharding.make_mesh("1,1,1", devices=[device])  # one chip: a per-chip number
    layout = vocab.VocabLayout.create(int(cfg.model.text_size), int(cfg.model.image_codes), 1)
    model_cfg = GPTNeoXConfig.from_config(cfg.model, layout)
    result = {"attention": attention, "logits_chunk": int(cfg.train.get("logits_chunk", 0)),
              "remat_policy": cfg.model.remat_policy, "scan_layers": True, "device": device.device_kind}
    emit(result)
    with jax.set_mesh(mesh):
        step = lm.jit_train_step(cfg, model_cfg, layout, mesh)
        t0 = time.perf_counter()  # compiled before any state exists: a kernel that cannot run fails here, fast
        compiled = step.fn.lower(step.abstract_state, lm.abstract_batch(cfg, step.batch_sharding)).compile()
        result["compile_s"] = time.perf_counter() - t0
        emit(result)
        start = state_lib.Start(model_cfg, layout, None, None, {}, None, "scratch")
        state = {"now": state_lib.create_state(start, step.tx, mesh, 0)}
        host = synthetic_batch(shape["batch"], shape["seq"], layout.text_size, layout.image_codes)
        batch = lm.global_batch(host, mesh)

        def one():
            state["now"], metrics = compiled(state["now"], batch)
            state["loss"] = float(metrics["loss"])  # waits for the step

        times, first = timed_steps(one, shape["warmup"], shape["steps"], deadline)
    result.update(rate_fields(shape["batch"] * shape["seq"], times, model_flops_per_token(model_cfg, shape["seq"]),
                              topologies.peak_flops(device)))
    result.update(first_call_s=first, loss=state["loss"], peak_memory_bytes=_jax_peak_memory(device))
    return result


def _jax_peak_memory(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def part_lm_train_torch(shape: dict, deadline: float, emit) -> dict:
    import torch
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM

    from llmcxr_jax import vocab
    from llmcxr_jax.convert.hf_gpt_neox import hf_config_from_model
    from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, model_flops_per_token
    from llmcxr_jax.train import topologies

    cfg = lm_config(shape, "xla")
    layout = vocab.VocabLayout.create(int(cfg.model.text_size), int(cfg.model.image_codes), 1)
    model_cfg = GPTNeoXConfig.from_config(cfg.model, layout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = HFConfig.from_dict({**hf_config_from_model(model_cfg, None, "float32"), "use_cache": False})
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.learning_rate), fused=device == "cuda")
    host = synthetic_batch(shape["batch"], shape["seq"], layout.text_size, layout.image_codes)
    ids = torch.tensor(host["input_ids"], dtype=torch.long, device=device)
    targets = torch.tensor(host["targets"], dtype=torch.long, device=device)
    mask = torch.tensor(host["loss_mask"], device=device)
    result = {"attention": "sdpa", "precision": "float32 weights, bf16 autocast", "gradient_checkpointing": True,
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__}
    emit(result)
    state = {}

    def one():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        loss = (ce * mask.flatten()).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = float(loss)  # waits for the step

    times, first = timed_steps(one, shape["warmup"], shape["steps"], deadline)
    chip = topologies.gpu_type_of(types.SimpleNamespace(device_kind=result["device"]))  # the table JAX's MFU uses
    peak = topologies.GPU_CHIPS[chip].peak_flops if chip else 0.0
    result.update(rate_fields(shape["batch"] * shape["seq"], times, model_flops_per_token(model_cfg, shape["seq"]),
                              peak))
    result.update(first_call_s=first, loss=state["loss"],
                  peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    return result


def part_generate(shape: dict, deadline: float, emit) -> dict:
    import numpy as np

    sys.path.insert(0, BENCH)
    import generate as gen

    dtype = "float32" if shape["gen_preset"] == "tiny" else "bfloat16"
    model, layout = gen.build_model(shape["gen_preset"], dtype, param_dtype=dtype)  # the same weight bytes as HF's
    hf, device = gen.load_hf(model, dtype)
    prompt = np.random.default_rng(0).integers(100, gen.TEXT - 100, (1, shape["gen_prompt"])).astype(np.int32)
    mask = np.ones_like(prompt, bool)
    new_tokens = shape["image_tokens"] + 3  # "<", the codes, ">", "### End"
    result = {"preset": shape["gen_preset"], "dtype": dtype, "weights": dtype, "batch": 1,
              "prompt": shape["gen_prompt"], "image_codes": shape["image_tokens"], "new_tokens": new_tokens, "rows": []}
    for sampler in shape["samplers"]:
        if result["rows"] and time.monotonic() > deadline:
            break
        ours, compile_s, ours_tokens = gen.bench_ours(model, layout, prompt, mask, "image", sampler, new_tokens,
                                                      shape["gen_repeats"])
        theirs, theirs_tokens = gen.bench_torch(hf, prompt, mask, sampler, new_tokens, shape["gen_repeats"], device)
        result["rows"].append({"sampler": sampler, "ours_tokens_per_s": ours, "hf_tokens_per_s": theirs,
                               "ratio": ours / theirs, "ours_tokens": ours_tokens, "hf_tokens": theirs_tokens,
                               "ours_first_call_s": compile_s})
        emit(result)
    return result


def part_vqgan(shape: dict, deadline: float, emit) -> dict:
    sys.path.insert(0, BENCH)
    import vqgan_codec

    dtype = "float32" if shape["vqgan"] == "tiny" else "bfloat16"
    return {**vqgan_codec.measure(shape["vqgan"], shape["vqgan_batch"], dtype, shape["vqgan_steps"], warmup=1,
                                  model_overrides=shape["vqgan_model"]), "model_overrides": shape["vqgan_model"]}


def run_part(name: str, shape: dict, deadline: float, emit) -> dict:
    if name.startswith("lm_train_") and name != "lm_train_torch":
        return part_lm_train_ours(shape, name.removeprefix("lm_train_"), deadline, emit)
    return {"lm_train_torch": part_lm_train_torch, "generate": part_generate, "vqgan": part_vqgan}[name](
        shape, deadline, emit)
