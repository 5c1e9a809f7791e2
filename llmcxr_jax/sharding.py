"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata where they are created (models/); this module turns
those names into PartitionSpecs. A logical name missing from the table is an error, never a
silent replicate.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llmcxr_jax.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are split over

# logical axis -> mesh axis (or axes, or None = replicated). The only such table in the project.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    # convolutional nets (VQ-GAN, discriminator, perceptual nets) are data parallel: replicated
    "conv_height": None,
    "conv_width": None,
    "conv_in": None,
    "conv_out": None,
    "codebook": None,
    "codebook_dim": None,
    # activations
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
    "cache_batch": ("data", "fsdp"),
    "cache_length": None,
    "cache_heads": "tensor",
    "activation_height": None,
    "activation_width": None,
    "activation_channels": None,
}


def parse_mesh_shape(spec: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """"data,fsdp,tensor" sizes with at most one -1 inferred -> a shape that uses every device."""
    sizes = [int(s) for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(sizes) != len(MESH_AXES):
        raise UsageError(f"mesh shape {spec!r} needs {len(MESH_AXES)} sizes for {','.join(MESH_AXES)}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UsageError(f"mesh shape {spec!r}: sizes must be positive with at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise UsageError(f"mesh shape {spec!r} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise UsageError(f"mesh shape {tuple(sizes)} uses {int(np.prod(sizes))} devices but {num_devices} are present; "
                         "make the product equal the device count or use -1 for one axis")
    return tuple(sizes)  # type: ignore[return-value]


def fit_batch(spec: str | Sequence[int], batch_size: int, num_devices: int) -> str:
    """A mesh spec on every device whose batch axes split `batch_size` rows: `spec` unchanged when
    its data x fsdp divides the batch; otherwise the larger of data / fsdp becomes gcd(batch, data x
    fsdp), the other 1, and tensor takes the remaining devices (e.g. "1,-1,1" with a batch of 4 on
    8 devices -> "1,4,2"). For runs whose batch is fixed by their config, like `llmcxr demo`."""
    data, fsdp, tensor = parse_mesh_shape(spec, num_devices)
    if batch_size % (data * fsdp) == 0:
        return spec if isinstance(spec, str) else ",".join(map(str, spec))
    g = math.gcd(batch_size, data * fsdp)
    shape = (g, 1) if data >= fsdp else (1, g)
    return ",".join(map(str, (*shape, num_devices // g)))


def device_slices(devices: Sequence[jax.Device]) -> tuple[str, int]:
    """What splits `devices` into slices, and into how many: on TPUs their `slice_index` (a multi-slice
    job's slices talk over the data-center network, DCN); elsewhere the process (CPU and GPU devices
    carry no meaningful slice_index: each process stands for a slice, so a multi-process CPU run can
    rehearse a multi-slice one)."""
    attr = "slice_index" if devices[0].platform == "tpu" and hasattr(devices[0], "slice_index") else "process_index"
    return attr, len({getattr(d, attr) for d in devices})


def make_mesh(spec: str | Sequence[int] = "1,-1,1", devices: Sequence[jax.Device] | None = None,
              num_slices: int = 1) -> Mesh:
    """('data','fsdp','tensor') mesh over `devices` (default: every device) with Auto axis types.

    num_slices > 1 makes a hybrid mesh: each slice holds whole fsdp x tensor blocks and
    data / num_slices rows of the data axis, so only data parallelism (one gradient all-reduce per
    step) crosses the slow links between slices. Slices are device_slices(); their count must
    equal num_slices. With num_slices 1 the devices must lie in one TPU slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = parse_mesh_shape(spec, len(devices))
    if not isinstance(num_slices, int) or num_slices < 1:
        raise UsageError(f"train.num_slices must be a positive integer, got {num_slices!r}")
    attr, found = device_slices(devices)
    what = "TPU slices" if attr == "slice_index" else "processes (each process is a slice here)"
    if num_slices == 1:
        if attr == "slice_index" and found > 1:
            raise UsageError(f"the {len(devices)} devices span {found} TPU slices but train.num_slices is 1; "
                             f"set train.num_slices={found} (and a train.mesh data axis that is a multiple of it)")
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    if found != num_slices:
        raise UsageError(f"train.num_slices={num_slices} but the {len(devices)} devices span {found} {what}; "
                         f"set train.num_slices={found}")
    data, fsdp, tensor = shape
    if data % num_slices:
        raise UsageError(f"train.mesh {','.join(map(str, shape))} over train.num_slices={num_slices}: the data axis "
                         f"({data}) must be a multiple of the slice count, as only data parallelism crosses slices; "
                         f"e.g. train.mesh={num_slices},-1,1")
    counts = sorted(collections.Counter(getattr(d, attr) for d in devices).values())
    if counts[0] != counts[-1]:
        raise UsageError(f"the {found} {what} hold unequal device counts {counts}; every slice must hold "
                         "the same number of devices")
    ici = (data // num_slices, fsdp, tensor)  # one slice's block: its devices talk over the fast interconnect
    grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices,
                                                process_is_granule=attr == "process_index")
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    axes = []
    for name in logical_axes:
        if name is None:
            axes.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise UsageError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_AXIS_RULES in sharding.py")
        axes.append(LOGICAL_AXIS_RULES[name])
    return PartitionSpec(*axes)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh) -> PartitionSpec:
    """Drop a mesh axis from a dimension it does not divide (e.g. 3 qkv parts over tensor 2)."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(axis if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def param_logical_axes(state: nnx.State) -> nnx.State:
    """State of Params -> same tree of logical-axis tuples; a param without names is an error."""

    def axes(path, var):
        names = var.get_metadata().get("logical_axes")
        if names is None or len(names) != np.ndim(var.get_value()):
            where = "/".join(str(p) for p in path)
            raise UsageError(f"parameter {where} has no logical axis names for all {np.ndim(var.get_value())} dims")
        return tuple(names)

    return nnx.map_state(axes, state)


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding per parameter from its logical axes and the rules table."""
    names = param_logical_axes(state)
    return jax.tree.map(
        lambda ax, v: NamedSharding(mesh, _fit_spec(logical_to_spec(ax), np.shape(v), mesh)),
        names, state, is_leaf=lambda x: isinstance(x, tuple))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit_spec(logical_to_spec(logical_axes), x.shape, mesh))


# A parameter at or under this size may stay replicated on an fsdp/tensor mesh. 4 MiB sits above
# the largest bias/norm stack of our LMs (pythia-12b mlp bias over 36 layers: 2.9 MB in float32)
# and below their smallest weight matrix (dolly-v2-3b attention.dense, unstacked: 26 MB); a few
# replicated MiB per device are noise next to the GiBs the sharded matrices take. The VQ-GAN is
# data parallel by design (conv_* -> None): check it only on a data-only mesh.
REPLICATED_PARAM_MAX_BYTES = 4 * 2**20


def _mesh_axes_of(spec: PartitionSpec) -> list[str]:
    return [a for axis in spec if axis for a in ((axis,) if isinstance(axis, str) else axis)]


def _param_state(state_or_model) -> nnx.State:
    if isinstance(state_or_model, nnx.Module):
        return nnx.state(state_or_model, nnx.Param)
    if isinstance(state_or_model, dict) and "params" in state_or_model:
        state_or_model = state_or_model["params"]
    if isinstance(state_or_model, nnx.State):
        return nnx.filter_state(state_or_model, nnx.Param)
    raise TypeError(f"check_param_sharding needs an nnx.Module, an nnx.State of Params or a train state with "
                    f"'params'; got {type(state_or_model).__name__}")


def check_param_sharding(state_or_model, mesh: Mesh, *, min_bytes: int = REPLICATED_PARAM_MAX_BYTES) -> dict[str, Any]:
    """Check what `param_shardings` would do: every parameter named by the rules table, and on a
    mesh with fsdp or tensor > 1 every parameter over `min_bytes` split over some axis of size > 1.

    All violations are reported in one ValueError. Returns {"param_bytes", "bytes_per_device",
    "replicated_bytes", "largest_replicated": (path, shape, bytes) or None}.
    """
    params = _param_state(state_or_model)
    model_parallel = mesh.shape.get("fsdp", 1) > 1 or mesh.shape.get("tensor", 1) > 1
    unnamed, too_big = [], []
    total = per_device = replicated = 0
    largest = None
    for path, var in nnx.to_flat_state(params):
        where = "/".join(str(p) for p in path)
        value = var.get_value()
        shape, nbytes = tuple(np.shape(value)), int(np.prod(np.shape(value))) * np.dtype(value.dtype).itemsize
        names = var.get_metadata().get("logical_axes")
        if names is None or len(names) != len(shape):
            unnamed.append(f"{where} {shape}: logical_axes={names}")
            continue
        missing = [n for n in names if n is not None and n not in LOGICAL_AXIS_RULES]
        if missing:
            unnamed.append(f"{where} {shape}: no rule for {missing}")
            continue
        spec = _fit_spec(logical_to_spec(names), shape, mesh)
        shards = int(np.prod([mesh.shape[a] for a in _mesh_axes_of(spec)]))
        total += nbytes
        per_device += nbytes // shards
        if shards == 1:
            replicated += nbytes
            if largest is None or nbytes > largest[2]:
                largest = (where, shape, nbytes)
            if model_parallel and nbytes > min_bytes:
                too_big.append(f"{where} {shape} axes={tuple(names)} ({nbytes / 2**20:.1f} MiB)")
    problems = []
    if unnamed:
        problems.append(f"{len(unnamed)} parameter(s) not covered by LOGICAL_AXIS_RULES [{'; '.join(unnamed)}] "
                        "-> give them logical_axes where they are created and add any new name to the rules table")
    if too_big:
        problems.append(f"{len(too_big)} parameter(s) over {min_bytes / 2**20:g} MiB replicated on mesh "
                        f"{dict(mesh.shape)} [{'; '.join(too_big)}] -> map one of their logical axes to 'fsdp' or "
                        "'tensor' in LOGICAL_AXIS_RULES, or pick mesh sizes that divide those dims")
    if problems:
        raise UsageError("parameter sharding check failed: " + " | ".join(problems))
    return {"param_bytes": total, "bytes_per_device": per_device, "replicated_bytes": replicated,
            "largest_replicated": largest}


def _local_shard_counts(sharding: NamedSharding, ndim: int) -> list[tuple[int, int]]:
    """Per array dim: (distinct shards held by this process's devices, distinct shards in all)."""
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    me = jax.process_index()
    coords = [dict(zip(mesh.axis_names, idx)) for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me]
    counts = []
    for axis in spec:
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        local = len({tuple(c[n] for n in names) for c in coords})
        counts.append((local, int(np.prod([mesh.shape[n] for n in names]))))
    return counts


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh,
                 spec: PartitionSpec = PartitionSpec(BATCH_AXES)) -> dict[str, jax.Array]:  # noqa: B008 (immutable)
    """This host's rows of every array -> global jax.Arrays laid out by `spec` over `mesh`.

    Each process passes its own slice (rows for its devices); the global batch has
    host_rows * (batch shards in the mesh / batch shards on this host) rows.
    """
    sharding = NamedSharding(mesh, spec)
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        if value.ndim < len(spec):
            raise UsageError(f"batch[{key!r}] has {value.ndim} dims but the batch spec {spec} names {len(spec)}")
        global_shape = []
        for dim, (size, (local, total)) in enumerate(zip(value.shape, _local_shard_counts(sharding, value.ndim))):
            if size % local:
                raise UsageError(f"batch[{key!r}] dim {dim} has {size} rows on this host, which does not divide over "
                                 f"its {local} shards of mesh {dict(mesh.shape)} (spec {spec}); make the per-host "
                                 f"batch a multiple of {local}")
            global_shape.append(size // local * total)
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(global_shape))
    return out
