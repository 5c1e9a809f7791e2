"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata where they are created (models/); this module turns
those names into PartitionSpecs. A logical name missing from the table is an error, never a
silent replicate.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

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
        raise ValueError(f"mesh shape {spec!r} needs {len(MESH_AXES)} sizes for {','.join(MESH_AXES)}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {spec!r}: sizes must be positive with at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh shape {spec!r} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh shape {tuple(sizes)} uses {int(np.prod(sizes))} devices but {num_devices} are present; "
                         "make the product equal the device count or use -1 for one axis")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(spec: str | Sequence[int] = "1,-1,1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = parse_mesh_shape(spec, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    axes = []
    for name in logical_axes:
        if name is None:
            axes.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_AXIS_RULES in sharding.py")
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
            raise ValueError(f"parameter {where} has no logical axis names for all {np.ndim(var.get_value())} dims")
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
