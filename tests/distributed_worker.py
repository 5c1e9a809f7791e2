"""One process of the multi-process test (tests/test_distributed.py): SGD steps of a tiny GPT-NeoX.

Run as `python tests/distributed_worker.py OUT.npz`. With LLMCXR_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID set it joins a jax.distributed job (CPU collectives over gloo); without, it runs
alone over whatever devices XLA_FLAGS gives it. Process 0 writes, per mesh, the final params,
the losses and the global batch read back from the devices.
"""
import os
import sys
import time

# First, before anything touches a JAX backend (XLA_FLAGS from the test sets the device count).
from llmcxr_jax.distributed import initialize_distributed

INFO = initialize_distributed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from llmcxr_jax import configs, sharding  # noqa: E402
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model  # noqa: E402
from llmcxr_jax.vocab import VocabLayout  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

MESHES = {"data4": "4,1,1", "data2_fsdp2": "2,2,1"}
ROWS, LENGTH, STEPS, LR = 8, 16, 3, 0.5
BATCH_SPEC = PartitionSpec(("data", "fsdp"))


def tiny_config() -> GPTNeoXConfig:
    c = configs.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt_neox.py") + ":tiny")
    layout = VocabLayout.create(c.text_size, c.image_codes)
    return GPTNeoXConfig.from_config(c, layout).replace(dtype="float32")


def loss_fn(params, rest, graphdef, input_ids):
    logits = nnx.merge(graphdef, params, rest)(input_ids)  # [batch, length, padded_vocab] float32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return nll.mean()


def host_init(abstract: nnx.State) -> nnx.State:
    """Same numbers in every process without compiling an RNG program (init_model costs 7-10 s
    of compilation per process on a loaded CPU): N(0, 0.02) weights, unit LayerNorm scales."""
    rng = np.random.default_rng(0)

    def one(path, var):
        shape = var.get_value().shape
        value = np.ones(shape) if path[-1] == "scale" else rng.normal(0.0, 0.02, shape)
        return var.replace(value.astype(np.float32))

    return nnx.map_state(one, abstract)


def host_rows(mesh, global_rows: int) -> np.ndarray:
    """Global row indices this process must supply, in the order its devices hold them."""
    index_map = NamedSharding(mesh, BATCH_SPEC).addressable_devices_indices_map((global_rows, LENGTH))
    row_slices = sorted({(idx[0].start, idx[0].stop) for idx in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in row_slices])


def run(mesh_spec: str) -> dict[str, np.ndarray]:
    cfg = tiny_config()
    mesh = sharding.make_mesh(mesh_spec)
    graphdef, abstract, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    summary = sharding.check_param_sharding(abstract, mesh)
    param_sh = sharding.param_shardings(abstract, mesh)
    shard_of = dict(nnx.to_flat_state(param_sh))
    params = nnx.map_state(lambda path, var: var.replace(jax.make_array_from_callback(
        var.get_value().shape, shard_of[path], lambda idx: var.get_value()[idx])), host_init(abstract))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    rows = host_rows(mesh, ROWS)
    batch = sharding.global_batch({"input_ids": ids[rows]}, mesh, BATCH_SPEC)["input_ids"]

    def step(params, input_ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, graphdef, input_ids)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss

    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        step_fn = jax.jit(step, in_shardings=(param_sh, batch.sharding), out_shardings=(param_sh, replicated),
                          donate_argnums=(0,))
        losses = []
        for _ in range(STEPS):
            params, loss = step_fn(params, batch)
            losses.append(float(loss))
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(params)}
    gathered = multihost_utils.process_allgather(flat, tiled=True)
    out = {f"param:{k}": np.asarray(v) for k, v in gathered.items()}
    out["losses"] = np.asarray(losses)
    out["batch"] = np.asarray(multihost_utils.process_allgather(batch, tiled=True))
    out["expected_batch"] = ids
    out[f"rows_process{jax.process_index()}"] = rows
    out["replicated_bytes"] = np.asarray(summary["replicated_bytes"])
    return out


def main(path: str) -> None:
    t0 = time.time()
    assert jax.device_count() == 4, f"expected 4 global devices, got {jax.device_count()}"
    result = {"process_count": np.asarray(jax.process_count())}
    for name, spec in MESHES.items():
        result.update({f"{name}/{k}": v for k, v in run(spec).items()})
    # every process's row choice, so the test can see each host fed disjoint rows
    for name in MESHES:
        mine = result[f"{name}/rows_process{jax.process_index()}"]
        every = multihost_utils.process_allgather(mine[None], tiled=True)
        result[f"{name}/rows_all"] = np.asarray(every)
    if jax.process_index() == 0:
        np.savez(path, **result)
    print(f"process {jax.process_index()}/{jax.process_count()} {INFO['mode']} done in {time.time() - t0:.1f}s",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
