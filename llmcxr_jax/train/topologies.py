"""Accelerator chips and names: owns the chip table (HBM, peak bf16 FLOP/s, and a real device's peak from it),
the mapping of names such as v4-32, v5p-128, v5e-16, v6e-8 or gpu:2x8 to `jax.experimental.topologies`
arguments, and the devices for ahead-of-time compile checks (libtpu compile-only TPUs; GPUs or CPU stand-ins).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax

from llmcxr_jax.errors import UsageError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: what it is called and what one chip holds and computes."""

    name: str  # "v4", "v5p", "v5e", "v6e", "h100", ...
    platform: str  # "tpu" | "gpu"
    hbm_bytes: int
    hbm_label: str  # as the vendor states it, e.g. "32 GiB", "80 GB"
    peak_flops: float  # dense bf16 FLOP/s per chip
    topology_prefix: str = ""  # TPU topology names: "v4:2x2x2", "v5:2x2x1" (v5p), "v5e:4x4"
    chip_config: str = "default"  # "megacore": one JAX device drives both TensorCores of a chip
    cores_per_chip: int = 1  # v4/v5p names count TensorCores (v4-32 = 16 chips)
    torus_dims: int = 0  # 3 for v4/v5p, 2 for v5e/v6e
    pod_chips: int = 0


# Google Cloud TPU docs (tpu/docs/v4, v5p, v5e, v6e): peak bf16 per chip and HBM per chip.
TPU_CHIPS = {
    "v4": Chip("v4", "tpu", 32 * GiB, "32 GiB", 275e12, "v4", "megacore", 2, 3, 4096),
    "v5p": Chip("v5p", "tpu", 95 * GiB, "95 GiB", 459e12, "v5", "megacore", 2, 3, 8960),
    "v5e": Chip("v5e", "tpu", 16 * GiB, "16 GiB", 197e12, "v5e", "default", 1, 2, 256),
    "v6e": Chip("v6e", "tpu", 32 * GiB, "32 GiB", 918e12, "v6e", "default", 1, 2, 256),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "trillium": "v6e"}

# NVIDIA data sheets, dense bf16 tensor-core FLOP/s; HBM in decimal GB as stated (conservative).
GPU_CHIPS = {
    "a100-40g": Chip("a100-40g", "gpu", 40 * 10**9, "40 GB", 312e12),
    "a100-80g": Chip("a100-80g", "gpu", 80 * 10**9, "80 GB", 312e12),
    "h100": Chip("h100", "gpu", 80 * 10**9, "80 GB", 989e12),
    "h200": Chip("h200", "gpu", 141 * 10**9, "141 GB", 989e12),
}
DEFAULT_GPU = "h100"
# How a chip names itself in jax.Device.device_kind ("TPU v4", "TPU v5 lite"), where not by its table key.
# jax.Device.device_kind (lowercased) -> TPU_CHIPS key: a v5p calls itself "TPU v5", a v5e "TPU v5 lite".
TPU_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
                    "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def peak_flops(device: jax.Device) -> float:
    """Dense bf16 peak FLOP/s of a real device, from the chip tables; 0.0 when the chip is not in them."""
    if device.platform == "gpu":
        kind = gpu_type_of(device)
        return GPU_CHIPS[kind].peak_flops if kind else 0.0
    if device.platform == "tpu":
        name = TPU_DEVICE_KINDS.get(device.device_kind.strip().lower())
        return TPU_CHIPS[name].peak_flops if name else 0.0
    return 0.0


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed --topology: chip kind, per-slice shape and slice (or GPU host) count."""

    name: str  # as the user wrote it
    chip: Chip
    chips_per_slice: int
    num_slices: int = 1
    tpu_topology: str = ""  # "v4:2x2x2"
    chips_per_host_bounds: tuple[int, int, int] = (1, 1, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def describe(self) -> str:
        c = self.chip
        if c.platform == "gpu":
            return f"{self.num_slices} host(s) x {self.chips_per_slice} {c.name.upper()} = {self.num_chips} GPUs"
        cores = f" ({self.num_chips * c.cores_per_chip} TensorCores, {c.chip_config})" if c.cores_per_chip > 1 else ""
        slices = f", {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.num_chips} TPU {c.name} chips{cores}, topology {self.tpu_topology}{slices}"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Default chip grid of a slice of `chips` chips, as Cloud TPU lays them out.

    3-D (v4/v5p): 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, ...
    2-D (v5e/v6e): 1 -> 1x1, 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, 32 -> 4x8, ...
    """
    if not _power_of_two(chips) or (dims == 3 and chips < 4) or (dims == 2 and chips == 2):
        raise UsageError(f"{chips} chips has no default {dims}-D slice shape (it needs a power of two, "
                         f"{'at least 4' if dims == 3 else 'not 2'})")
    if dims == 3 and chips == 4:
        return (2, 2, 1)
    shape = [2, 2, 2] if dims == 3 else [1, 1]
    while _prod(shape) < chips:
        smallest = min(shape)
        shape[max(j for j, s in enumerate(shape) if s == smallest)] *= 2  # grow the last smallest dim
    return tuple(shape)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _tpu_topology(name: str, chip: Chip, shape: tuple[int, ...], num_slices: int) -> Topology:
    if len(shape) != chip.torus_dims:
        raise UsageError(f"TPU {chip.name} slices are {chip.torus_dims}-D, got shape {'x'.join(map(str, shape))} "
                         f"in {name!r}")
    chips = _prod(shape)
    if chips > chip.pod_chips:
        raise UsageError(f"{name!r} needs {chips} chips; a TPU {chip.name} pod has {chip.pod_chips}")
    padded = tuple(shape) + (1,) * (3 - len(shape))
    bounds = tuple(min(s, b) for s, b in zip(padded, (2, 2, 1)))
    if chip.torus_dims == 3:
        wrap = (min(shape) >= 4,) * 3  # full cubes (4x4x4 and up) are tori
    else:
        wrap = tuple(s == 16 for s in shape) + (False,)  # 16 wide = a full pod row
    return Topology(name, chip, chips, num_slices, f"{chip.topology_prefix}:{'x'.join(map(str, shape))}",
                    bounds, wrap)  # type: ignore[arg-type]


def parse_topology(name: str, num_slices: int = 1, gpu_type: str | None = None) -> Topology:
    """"v4-32" | "v5p-128" | "v5e-16" | "v6e-8" | "v4:2x2x4" | "v5e:4x4" | "gpu:NxM" -> Topology.

    TPU v4/v5p names count TensorCores (two per chip, driven as one megacore device); v5e/v6e
    names count chips. gpu:NxM means N hosts of M GPUs of `gpu_type` (default h100).
    """
    if num_slices < 1:
        raise UsageError(f"num_slices must be >= 1, got {num_slices}")
    text = name.strip().lower()
    if text.startswith("gpu:"):
        m = re.fullmatch(r"gpu:(\d+)x(\d+)", text)
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise UsageError(f"GPU topology {name!r} must look like gpu:NxM (N hosts x M GPUs), e.g. gpu:1x8")
        kind = (gpu_type or DEFAULT_GPU).lower()
        if kind not in GPU_CHIPS:
            raise UsageError(f"unknown GPU type {gpu_type!r}; choose one of {', '.join(GPU_CHIPS)}")
        if num_slices != 1:
            raise UsageError("for GPUs give the host count in the topology (gpu:NxM), not as slices")
        return Topology(name, GPU_CHIPS[kind], int(m[2]), int(m[1]))
    if gpu_type is not None:
        raise UsageError(f"gpu_type {gpu_type!r} only applies to gpu:NxM topologies, not {name!r}")
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    kind = TPU_ALIASES.get(m[1], m[1]) if m else None
    if kind not in TPU_CHIPS:
        raise UsageError(f"unknown topology {name!r}; use a Cloud TPU name such as v4-32, v5p-128, v5e-16, v6e-8, "
                         f"an explicit shape such as v4:2x2x4, or gpu:NxM")
    chip = TPU_CHIPS[kind]
    if m[3]:
        shape = tuple(int(s) for s in m[3].split("x"))
    else:
        count = int(m[2])
        if count % chip.cores_per_chip:
            raise UsageError(f"{name!r}: TPU {kind} names count TensorCores, {chip.cores_per_chip} per chip; "
                             f"{count} is not a multiple of {chip.cores_per_chip}")
        try:
            shape = slice_shape(count // chip.cores_per_chip, chip.torus_dims)
        except ValueError as e:
            example = "x".join(["A", "B", "C"][:chip.torus_dims])
            raise UsageError(f"{name!r}: {e}; give the slice shape explicitly as {kind}:{example}") from None
    return _tpu_topology(name, chip, shape, num_slices)


class TopologyUnavailable(UsageError):
    """The devices for a topology cannot be made here (no libtpu, too few devices)."""


def tpu_devices(topo: Topology) -> list[jax.Device]:
    """Compile-only TPU devices of every slice, made by libtpu (works on a CPU-only machine)."""
    from jax.experimental import topologies

    if os.environ.get("TPU_SKIP_MDS_QUERY") == "1":
        # JAX found no TPU chips here. Without these, libtpu logs errors about the TPU VM metadata it
        # cannot find; compile-only devices do not depend on them (same memory and FLOPs either way).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")  # any valid name; devices come from topo
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # No chips to guard: let concurrent compile checks (and pytest workers) each load libtpu
        # instead of failing on /tmp/libtpu_lockfile.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            topo.tpu_topology, "tpu", chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=topo.num_slices, wrap=topo.wrap)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise TopologyUnavailable(
                "compiling for TPU topologies needs libtpu: pip install 'llmcxr-jax[tpu]' (libtpu==0.0.42.*)") from e
        raise
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise TopologyUnavailable(f"libtpu made {len(devices)} devices for {topo.name!r}, expected {topo.num_chips}")
    return devices


def gpu_devices(topo: Topology) -> tuple[list[jax.Device], bool]:
    """-> (devices, real): this machine's GPUs when there are enough, else CPU stand-ins."""
    needed = topo.num_chips
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if gpus:
        if len(gpus) < needed:
            raise TopologyUnavailable(f"{topo.name} needs {needed} GPUs; this process sees {len(gpus)} "
                                      f"(compile a smaller gpu:NxM here, or run on the target machines)")
        return gpus[:needed], True
    cpus = jax.devices("cpu")
    if len(cpus) < needed:
        raise TopologyUnavailable(
            f"the CPU shape check of {topo.name} needs {needed} CPU devices but JAX has {len(cpus)}; start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} (or call ensure_cpu_devices({needed}) "
            "before JAX starts)")
    return cpus[:needed], False


def gpu_type_of(device: jax.Device) -> str | None:
    """Table key for a real GPU's device_kind ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"), if known."""
    kind = device.device_kind.upper()
    for key in ("H200", "H100"):
        if key in kind:
            return key.lower()
    if "A100" in kind:
        return "a100-80g" if "80G" in kind else "a100-40g"
    return None


def ensure_cpu_devices(n: int) -> bool:
    """Ask JAX for n CPU devices; works only before JAX's backends start. -> whether n are there."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", n)
    return len(jax.devices("cpu")) >= n
