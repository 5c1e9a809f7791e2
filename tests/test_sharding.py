"""Mesh construction (multi-slice meshes too, over two real processes) and the logical-axis rules table."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax import configs, sharding
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model
from llmcxr_jax.vocab import VocabLayout


def test_fit_batch_moves_spare_devices_to_tensor():
    assert sharding.fit_batch("1,-1,1", 4, 8) == "1,4,2"
    assert sharding.fit_batch("-1,1,1", 4, 8) == "4,1,2"
    assert sharding.fit_batch("1,-1,1", 8, 8) == "1,-1,1"  # fits: unchanged
    assert sharding.fit_batch("1,-1,1", 4, 1) == "1,-1,1"
    assert sharding.fit_batch([2, 2, 2], 4, 8) == "2,2,2"
    assert sharding.fit_batch("1,-1,1", 6, 8) == "1,2,4"
    assert sharding.fit_batch("2,2,2", 2, 8) == "2,1,4"
    for devices in (1, 2, 3, 4, 6, 8, 16):
        for batch in range(1, 17):
            for spec in ("1,-1,1", "-1,1,1"):
                fitted = sharding.fit_batch(spec, batch, devices)
                data, fsdp, tensor = sharding.parse_mesh_shape(fitted, devices)
                assert data * fsdp * tensor == devices and batch % (data * fsdp) == 0, (spec, batch, devices)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.fit_batch("3,-1,1", 4, 8)


def test_mesh_shape_inference_and_errors():
    assert sharding.parse_mesh_shape("1,-1,2", 8) == (1, 4, 2)
    assert sharding.parse_mesh_shape([2, 2, 2], 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="uses 4 devices but 8 are present"):
        sharding.parse_mesh_shape("1,2,2", 8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.parse_mesh_shape("3,-1,1", 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.parse_mesh_shape("-1,-1,1", 8)
    with pytest.raises(ValueError, match="needs 3 sizes"):
        sharding.parse_mesh_shape("8", 8)
    mesh = sharding.make_mesh("2,-1,2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(UsageError, match="logical axis 'wibble' has no sharding rule"):
        sharding.logical_to_spec(("embed", "wibble"))


def test_parameter_without_names_is_an_error():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((4, 4), np.float32))

    with pytest.raises(ValueError, match="w has no logical axis names"):
        sharding.param_logical_axes(nnx.state(Bare(), nnx.Param))


def test_every_large_parameter_of_dolly_3b_is_sharded():
    c = configs.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "gpt_neox.py") + ":dolly-v2-3b")
    layout = VocabLayout.create(c.text_size, c.image_codes, tensor_parallelism=2)
    cfg = GPTNeoXConfig.from_config(c, layout)
    params = nnx.state(abstract_model(cfg), nnx.Param)
    mesh = sharding.make_mesh("1,4,2")
    specs = sharding.param_shardings(params, mesh)
    for (path, sh), (_, v) in zip(jax.tree.leaves_with_path(specs), jax.tree.leaves_with_path(params)):
        size = int(np.prod(v.shape))
        axes = [a for axis in sh.spec if axis for a in ((axis,) if isinstance(axis, str) else axis)]
        shards = np.prod([mesh.shape[a] for a in axes])
        if size >= 1_000_000:
            assert shards == 8, (jax.tree_util.keystr(path), sh.spec)


def test_multislice_mesh_in_one_process_is_refused_with_what_to_set():
    """Without TPU slice_index each process is a slice: one process cannot hold two."""
    with pytest.raises(UsageError, match=r"train.num_slices=2 but the 8 devices span 1 processes .*; set "
                                         r"train.num_slices=1"):
        sharding.make_mesh("2,-1,1", num_slices=2)
    with pytest.raises(UsageError, match="train.num_slices must be a positive integer, got 0"):
        sharding.make_mesh("1,-1,1", num_slices=0)
    assert dict(sharding.make_mesh("2,-1,1", num_slices=1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


# Each of two processes (2 CPU devices each, no collectives needed) builds meshes with num_slices=2 and prints,
# per mesh, the process that owns each device along each axis; then the refusals.
_TWO_PROCESS_MESHES = """
import json, os, sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]), cluster_detection_method="deactivate")
import numpy as np
from llmcxr_jax import sharding
from llmcxr_jax.errors import UsageError
out = {}
for spec in ("4,1,1", "2,2,1", "2,1,2", "-1,1,1"):
    mesh = sharding.make_mesh(spec, num_slices=2)
    out[spec] = {"shape": dict(mesh.shape), "process": np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()}
for spec, n in (("1,4,1", 2), ("4,1,1", 4), ("4,1,1", 1)):
    try:
        out[f"{spec} x{n}"] = sharding.make_mesh(spec, num_slices=n).shape["data"]
    except UsageError as e:
        out[f"{spec} x{n}"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
"""


def test_two_processes_are_two_slices_on_the_data_axis(tmp_path):
    """CPU/GPU devices have no slice_index: each process is a slice, and only 'data' crosses them."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMCXR_", "SLURM_", "TPU_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.path.join(os.path.dirname(__file__), ".."))
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_MESHES, str(port), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    assert outs[0] == outs[1]  # both processes build the same global mesh
    got = outs[0]
    assert got["4,1,1"] == {"shape": {"data": 4, "fsdp": 1, "tensor": 1},
                            "process": [[[0]], [[0]], [[1]], [[1]]]}
    assert got["-1,1,1"] == got["4,1,1"]
    # each slice (process) holds a whole fsdp / tensor block; the data axis runs across the two
    assert got["2,2,1"] == {"shape": {"data": 2, "fsdp": 2, "tensor": 1}, "process": [[[0], [0]], [[1], [1]]]}
    assert got["2,1,2"] == {"shape": {"data": 2, "fsdp": 1, "tensor": 2}, "process": [[[0, 0]], [[1, 1]]]}
    assert got["1,4,1 x2"] == ("train.mesh 1,4,1 over train.num_slices=2: the data axis (1) must be a multiple of "
                               "the slice count, as only data parallelism crosses slices; e.g. train.mesh=2,-1,1")
    assert got["4,1,1 x4"].startswith("train.num_slices=4 but the 4 devices span 2 processes")
    assert got["4,1,1 x1"] == 4  # one slice over both processes: an ordinary multi-host mesh
