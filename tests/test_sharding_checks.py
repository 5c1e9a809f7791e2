"""check_param_sharding over real GPT-NeoX shapes (abstract only) and global_batch on 8 devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from llmcxr_jax import configs, sharding
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model
from llmcxr_jax.vocab import VocabLayout

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt_neox.py")
MESHES = ["8,1,1", "1,8,1", "2,2,2"]


def neox(variant: str, **changes) -> GPTNeoXConfig:
    c = configs.load_config(f"{CONFIG_FILE}:{variant}")
    layout = VocabLayout.create(c.text_size, c.image_codes, tensor_parallelism=2)
    return GPTNeoXConfig.from_config(c, layout).replace(**changes)


def shard_bytes(params, mesh):
    """Bytes per device and replicated bytes, from what param_shardings actually places."""
    per_device = replicated = 0
    specs = sharding.param_shardings(params, mesh)
    for (_, sh), (_, var) in zip(nnx.to_flat_state(specs), nnx.to_flat_state(params)):
        v = var.get_value()
        full = int(np.prod(v.shape)) * v.dtype.itemsize
        shard = int(np.prod(sh.shard_shape(v.shape))) * v.dtype.itemsize
        per_device += shard
        replicated += full if shard == full else 0
    return per_device, replicated


@pytest.mark.parametrize("variant", ["tiny", "dolly-v2-3b", "pythia-12b"])
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_gpt_neox_parameters_are_covered_and_sharded(variant, mesh_spec):
    mesh = sharding.make_mesh(mesh_spec)
    model = abstract_model(neox(variant))
    params = nnx.state(model, nnx.Param)
    summary = sharding.check_param_sharding(model, mesh)
    total = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(params))
    per_device, replicated = shard_bytes(params, mesh)
    assert summary["param_bytes"] == total
    assert summary["bytes_per_device"] == per_device
    assert summary["replicated_bytes"] == replicated
    if mesh_spec == "8,1,1":  # pure data parallel: everything is replicated, and that is allowed
        assert per_device == total
        assert summary["largest_replicated"][2] == max(v.size * v.dtype.itemsize for v in jax.tree.leaves(params))
    elif variant != "tiny":
        # what stays whole is the biases and norms: a sliver of the model
        assert replicated < total / 1000
        assert summary["largest_replicated"][2] <= sharding.REPLICATED_PARAM_MAX_BYTES


def test_the_check_sees_replicated_parameters():
    # With no size allowance the dolly norms (replicated on purpose) must be reported by path.
    model = abstract_model(neox("dolly-v2-3b"))
    with pytest.raises(ValueError, match=r"final_layer_norm/scale \(2560,\)") as err:
        sharding.check_param_sharding(model, sharding.make_mesh("1,8,1"), min_bytes=0)
    assert "\n" not in str(err.value)
    # ...while a data-only mesh asks nothing to be split
    sharding.check_param_sharding(model, sharding.make_mesh("8,1,1"), min_bytes=0)


def test_mesh_that_does_not_divide_the_model_is_reported():
    # hidden 1020 does not divide over fsdp 8: _fit_spec drops the axis and the matrices replicate
    model = abstract_model(neox("dolly-v2-3b", hidden_size=1020, num_heads=12, num_layers=2, intermediate_size=4080))
    sharding.check_param_sharding(model, sharding.make_mesh("2,2,2"))
    with pytest.raises(ValueError) as err:
        sharding.check_param_sharding(model, sharding.make_mesh("1,8,1"))
    msg = str(err.value)
    assert "6 parameter(s) over 4 MiB replicated" in msg
    assert "embed_in/embedding (51328, 1020)" in msg and "layers/mlp/dense_h_to_4h/kernel (2, 1020, 4080)" in msg
    assert "pick mesh sizes that divide" in msg and "\n" not in msg


class Odd(nnx.Module):
    """A large table whose logical axes map to None, one unnamed param, one unknown name."""

    def __init__(self):
        self.table = nnx.Param(jnp.zeros((2048, 1024)), logical_axes=("conv_in", "conv_out"))  # 8 MiB
        self.bare = nnx.Param(jnp.zeros((3, 4)))
        self.strange = nnx.Param(jnp.zeros((5,)), logical_axes=("wibble",))
        self.small = nnx.Param(jnp.zeros((16, 16)), logical_axes=("conv_in", "conv_out"))
        self.stat = nnx.BatchStat(jnp.zeros((4096, 4096)))  # not a Param: never checked


def test_every_violation_is_listed_in_one_error():
    model = nnx.eval_shape(Odd)
    with pytest.raises(ValueError) as err:
        sharding.check_param_sharding(model, sharding.make_mesh("2,2,2"))
    msg = str(err.value)
    assert "2 parameter(s) not covered by LOGICAL_AXIS_RULES" in msg
    assert "bare (3, 4): logical_axes=None" in msg and "strange (5,): no rule for ['wibble']" in msg
    assert "1 parameter(s) over 4 MiB replicated" in msg and "table (2048, 1024)" in msg
    assert "small" not in msg and "stat" not in msg and "\n" not in msg
    # a data-only mesh still needs every name covered, but nothing split
    with pytest.raises(ValueError, match="not covered") as err:
        sharding.check_param_sharding(model, sharding.make_mesh("8,1,1"))
    assert "replicated on mesh" not in str(err.value)


def test_accepts_module_state_and_train_state():
    class Good(nnx.Module):
        def __init__(self):
            self.table = nnx.Param(jnp.zeros((2048, 1024)), logical_axes=("vocab", "embed"))
            self.stat = nnx.BatchStat(jnp.zeros((4096, 4096)))

    model = nnx.eval_shape(Good)
    mesh = sharding.make_mesh("1,4,2")
    want = sharding.check_param_sharding(model, mesh)
    assert want["param_bytes"] == 8 * 2**20 and want["bytes_per_device"] == 2**20
    assert want["largest_replicated"] is None
    assert sharding.check_param_sharding(nnx.state(model), mesh) == want  # BatchStat filtered out
    assert sharding.check_param_sharding({"params": nnx.state(model, nnx.Param), "step": 0}, mesh) == want
    with pytest.raises(TypeError, match="needs an nnx.Module"):
        sharding.check_param_sharding({"table": np.zeros(3)}, mesh)


def _check_layout(arr, host, mesh, spec):
    assert arr.shape == host.shape and arr.dtype == host.dtype
    assert arr.sharding.spec == spec and arr.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(arr), host)
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])


@pytest.mark.parametrize("mesh_spec,rows_per_device", [("2,2,2", 2), ("8,1,1", 1), ("1,2,4", 4)])
def test_global_batch_values_and_shardings(mesh_spec, rows_per_device):
    mesh = sharding.make_mesh(mesh_spec)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch_shards * rows_per_device
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(0, 1000, (rows, 6)).astype(np.int32),
            "loss_mask": rng.random((rows, 6)) > 0.5}
    out = sharding.global_batch(host, mesh)
    assert set(out) == set(host)
    for key in host:
        _check_layout(out[key], host[key], mesh, PartitionSpec(("data", "fsdp")))
        # each device holds rows_per_device rows; tensor replicas hold the same rows
        assert {s.data.shape[0] for s in out[key].addressable_shards} == {rows_per_device}
        assert len({s.index[0].start for s in out[key].addressable_shards}) == batch_shards


def test_global_batch_with_a_second_sharded_dim():
    mesh = sharding.make_mesh("2,1,4")
    spec = PartitionSpec("data", "tensor")
    host = {"x": np.arange(2 * 8, dtype=np.float32).reshape(2, 8)}
    out = sharding.global_batch(host, mesh, spec)
    _check_layout(out["x"], host["x"], mesh, spec)
    assert out["x"].addressable_shards[0].data.shape == (1, 2)


def test_global_batch_rows_that_do_not_divide_are_one_line_error():
    mesh = sharding.make_mesh("2,2,2")
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] dim 0 has 6 rows on this host.*its 4 shards"
                                         r".*make the per-host batch a multiple of 4") as err:
        sharding.global_batch({"input_ids": np.zeros((6, 3), np.int32)}, mesh)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="has 0 dims but the batch spec"):
        sharding.global_batch({"step": np.asarray(3)}, mesh)
