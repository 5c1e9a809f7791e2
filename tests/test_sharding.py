"""Mesh construction and the logical-axis rules table."""
import os

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
