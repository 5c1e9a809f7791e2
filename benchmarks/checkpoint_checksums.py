"""What checksums add to a checkpoint: the save of an LM train state (params + Adam moments + step, sharded
over the devices, asynchronous as training saves) with checksums and without, the restore with its in-memory
check and without, and `llmcxr verify`'s host read of the step.

    python benchmarks/checkpoint_checksums.py                      # CPU: 8 host devices, tiny and ~350 MB
    python benchmarks/checkpoint_checksums.py --presets tiny --repeats 2

"save blocks" is what the training loop waits for (the device->host copies; checksums add their own host copy
of each owned shard); "save total" runs until the step is committed on disk (the sums are computed in the
commit thread). Prints a markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

PRESETS = {  # hidden, layers, text vocabulary (+1024 image codes)
    "tiny": (64, 2, 1000),
    "350MB": (256, 4, 50281),
}


def build_state(preset: str, mesh):
    """A sharded LM train state as training saves it: {"params", "opt" (AdamW), "step"}."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
    from llmcxr_jax.train import state as state_lib
    from llmcxr_jax.vocab import VocabLayout

    hidden, layers, text = PRESETS[preset]
    layout = VocabLayout.create(text, 1024)
    cfg = GPTNeoXConfig(vocab_size=layout.size, padded_vocab_size=layout.padded_size, hidden_size=hidden,
                        num_layers=layers, num_heads=4, intermediate_size=4 * hidden, rotary_pct=0.25,
                        rotary_base=10000.0, max_position_embeddings=2048, layer_norm_eps=1e-5,
                        use_parallel_residual=True, attention_bias=True, hidden_act="gelu", initializer_range=0.02,
                        dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
    tx = optax.adamw(1e-4)
    abstract, shardings = state_lib.state_shardings(cfg, tx, mesh)

    def init():
        params = nnx.state(init_model(cfg, 0), nnx.Param).to_pure_dict()
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    jax.block_until_ready(state)
    return state, abstract


def measure(preset: str, repeats: int, mesh) -> dict:
    import jax

    from llmcxr_jax import checkpoint, checkpoint_checksums, checkpoint_integrity

    state, abstract = build_state(preset, mesh)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    out = {"preset": preset, "state_mb": nbytes / 1e6, "shards": sum(len(x.addressable_shards)
                                                                     for x in jax.tree.leaves(state))}
    tmp = tempfile.mkdtemp(prefix="bench_checksums_")
    try:
        for on in (False, True, False, True):  # interleaved, so drift hits both alike
            checkpoint_checksums._WRITE = on
            key = "with" if on else "without"
            directory = os.path.join(tmp, f"{key}-{len(os.listdir(tmp))}")
            ckpt = checkpoint.TrainCheckpointer(directory, keep=repeats + 1)
            for step in range(1, repeats + 1):
                t0 = time.perf_counter()
                ckpt.save(step, state, {"next_index": step}, {"preset": preset})
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                out.setdefault(f"save_block_{key}", []).append(t1 - t0)
                out.setdefault(f"save_total_{key}", []).append(t2 - t0)
            if on:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(ckpt.restore(repeats, abstract))
                    t1 = time.perf_counter()
                    jax.block_until_ready(ckpt._restore(repeats, abstract, None))
                    t2 = time.perf_counter()
                    out.setdefault("restore_checked", []).append(t1 - t0)
                    out.setdefault("restore_unchecked", []).append(t2 - t1)
                t0 = time.perf_counter()
                status = checkpoint_integrity.verify_step(directory, repeats)
                out.setdefault("verify_host", []).append(time.perf_counter() - t0)
                assert status.state == "intact", status.line()
            ckpt.close()
    finally:
        checkpoint_checksums._WRITE = True
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: statistics.median(v) if isinstance(v, list) else v for k, v in out.items()}


def table(rows: list[dict]) -> str:
    lines = ["| state | device shards | save blocks: without / with | save total: without / with | "
             "restore: unchecked / checked | verify (host) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['preset']} ({r['state_mb']:.1f} MB) | {r['shards']} | {r['save_block_without'] * 1e3:.0f} / "
            f"{r['save_block_with'] * 1e3:.0f} ms | {r['save_total_without'] * 1e3:.0f} / "
            f"{r['save_total_with'] * 1e3:.0f} ms | {r['restore_unchecked'] * 1e3:.0f} / "
            f"{r['restore_checked'] * 1e3:.0f} ms | {r['verify_host'] * 1e3:.0f} ms |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,350MB", help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--repeats", type=int, default=3, help="saves (and restores) per measurement; medians")
    parser.add_argument("--devices", type=int, default=8, help="CPU host devices (ignored on an accelerator)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax

    from llmcxr_jax import distributed, sharding

    distributed.mark_absl_flags_parsed()
    mesh = sharding.make_mesh(args.mesh)
    rows = [measure(p, args.repeats, mesh) for p in args.presets.split(",")]
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} CPU cores, mesh {args.mesh}")
    print(table(rows))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
