"""`llmcxr compile-check`: compile a train step ahead of time for a TPU topology or GPU shape and
report per-chip memory against HBM, FLOPs per step and an estimated step time at a stated MFU.

The caller supplies `lower(mesh) -> jax.stages.Lowered` built with abstract, sharded arguments;
this module makes the devices (topologies.py), the mesh, compiles, and reads XLA's analyses.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llmcxr_jax import sharding
from llmcxr_jax.errors import UsageError
from llmcxr_jax.train import topologies
from llmcxr_jax.train.topologies import GiB, Topology


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one compile said about one step on one topology. Memory figures are per chip."""

    topology: str
    description: str
    target: str  # what compiled it: compile-only TPU devices, real GPUs, or CPU stand-ins
    chip: str
    num_chips: int
    num_slices: int
    mesh: dict[str, int]
    hbm_bytes: int
    hbm_label: str
    peak_flops_per_chip: float
    tokens_per_step: int
    mfu: float
    compile_seconds: float
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    peak_bytes: int | None = None  # XLA's own peak of live buffers, when the backend reports it
    xla_flops_per_chip: float | None = None
    step_has_loops: bool = False  # XLA's cost analysis counts a while-loop (scan) body only once
    model_flops_per_step: float | None = None
    xla_optimal_seconds: float | None = None  # XLA's cost-model step time (TPU); custom kernels not costed
    custom_kernels: tuple[str, ...] = ()  # custom-call targets in the compiled step (Pallas, cuDNN, ...)
    oom_message: str | None = None  # the compiler refused: it ran out of HBM
    oom_needed_bytes: int | None = None  # what that message says the step needs, arguments included

    @property
    def total_bytes(self) -> int | None:
        """Arguments + outputs - donated (aliased) + temporaries + code: a conservative sum."""
        parts = (self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes)
        if any(p is None for p in parts):
            return None
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes  # type: ignore[operator]
                + (self.generated_code_bytes or 0))

    @property
    def needed_bytes(self) -> int | None:
        """Bytes per chip the step needs: the conservative total (XLA's peak only when no total)."""
        if self.oom_message is not None:
            return self.oom_needed_bytes
        total = self.total_bytes
        return total if total is not None else self.peak_bytes

    @property
    def fits(self) -> bool:
        needed = self.needed_bytes
        return self.oom_message is None and needed is not None and needed <= self.hbm_bytes

    @property
    def xla_flops_per_step(self) -> float | None:
        return None if self.xla_flops_per_chip is None else self.xla_flops_per_chip * self.num_chips

    @property
    def timing_flops(self) -> float | None:
        """MFU counts model FLOPs; without them the compiler's count (remat included) stands in."""
        return self.model_flops_per_step if self.model_flops_per_step else self.xla_flops_per_step

    @property
    def step_seconds(self) -> float | None:
        flops = self.timing_flops
        if not flops:
            return None
        return flops / (self.num_chips * self.peak_flops_per_chip * self.mfu)

    @property
    def tokens_per_second(self) -> float | None:
        step = self.step_seconds
        return None if not step else self.tokens_per_step / step

    def cost_caveat(self) -> str:
        """What XLA's cost model leaves out of optimal_seconds (and of its FLOP count)."""
        notes = []
        if self.custom_kernels:
            notes.append(f"custom kernels it does not cost: {', '.join(self.custom_kernels)}")
        if self.step_has_loops:
            notes.append("loop bodies counted once")
        return f"; a lower bound: {'; '.join(notes)}" if notes else ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("total_bytes", "needed_bytes", "fits", "xla_flops_per_step", "step_seconds",
                     "tokens_per_second"):
            out[name] = getattr(self, name)
        return out

    def error_line(self) -> str:
        """One line for a failed check: what is needed against what the chip has, and what to try."""
        if self.fits:
            return ""
        have = f"{self.chip} has {self.hbm_label} HBM"
        hint = ("shard more (a larger fsdp/tensor axis in the mesh), use a smaller per-chip batch, remat, "
                "or a larger topology")
        needed = self.needed_bytes
        if self.oom_message is not None:
            what = f"needs {_gib(needed)} per chip" if needed is not None else "ran out of HBM"
            return f"does not fit: {what}, {have} (XLA: {self.oom_message.rstrip('.')}); {hint}"
        if needed is None:
            return f"does not fit: the compiler reported no memory figures for {self.topology}; {hint}"
        return f"does not fit: needs {_gib(needed)} per chip, {have}; {hint}"

    def format(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"compile-check {self.topology}: {self.description}",
                 f"  mesh {mesh}; compiled for {self.target} in {self.compile_seconds:.1f} s",
                 f"  memory per chip (HBM {self.hbm_label} = {_gib(self.hbm_bytes)}):"]
        rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                ("donated (aliased)", None if self.alias_bytes is None else -self.alias_bytes),
                ("temporaries", self.temp_bytes), ("generated code", self.generated_code_bytes),
                ("total", self.total_bytes), ("XLA peak", self.peak_bytes or None)]
        lines += [f"    {name:<18}{_gib(value):>13}" for name, value in rows if value is not None]
        if self.oom_message is not None:
            lines.append(f"    XLA refused: {self.oom_message}")
        needed = self.needed_bytes
        verdict = "fits" if self.fits else "DOES NOT FIT"
        share = f" ({100 * needed / self.hbm_bytes:.1f}% of HBM)" if needed is not None else ""
        lines.append(f"    => {verdict}: {_gib(needed) if needed is not None else 'unknown'} needed{share}")
        if self.xla_flops_per_step is not None:
            flops = (f"  FLOPs per step: {self.xla_flops_per_step:.4g} (XLA cost analysis; "
                     f"{self.xla_flops_per_chip:.4g} per chip)")
            if self.model_flops_per_step:
                ratio = self.xla_flops_per_step / self.model_flops_per_step
                flops += f"; model {self.model_flops_per_step:.4g} (XLA / model = {ratio:.2f})"
            lines.append(flops)
            if self.step_has_loops:
                lines.append("    (the step has loops, e.g. scanned layers: XLA counts a loop body once, so its "
                             "figure is a lower bound)")
        elif self.model_flops_per_step:
            lines.append(f"  FLOPs per step: model {self.model_flops_per_step:.4g} (no XLA cost analysis)")
        if self.xla_optimal_seconds is not None:
            lines.append(f"  XLA cost model: step {_seconds(self.xla_optimal_seconds)} "
                         f"(optimal_seconds){self.cost_caveat()}")
        if self.step_seconds is not None:
            basis = "model FLOPs" if self.model_flops_per_step else "XLA FLOPs (no model FLOPs given)"
            lines.append(f"  at {100 * self.mfu:.0f}% MFU on {self.num_chips} x {self.peak_flops_per_chip / 1e12:.0f} "
                         f"TFLOP/s ({basis}): step {_seconds(self.step_seconds)}, "
                         f"{self.tokens_per_step:,} tokens/step -> {self.tokens_per_second:,.0f} tokens/s")
        return "\n".join(lines)


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.1f} MiB" if abs(n) < GiB else f"{n / GiB:.1f} GiB"


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


# ---------------------------------------------------------------- devices and mesh

def topology_devices(topo: Topology) -> tuple[list[jax.Device], str, Topology]:
    """-> (devices, what compiles for them, topology with the GPU type of real GPUs filled in)."""
    if topo.platform == "tpu":
        devices = topologies.tpu_devices(topo)
        return devices, f"compile-only TPU devices (libtpu {_version('libtpu')})", topo
    devices, real = topologies.gpu_devices(topo)
    if not real:
        return devices, "CPU stand-ins: a shape check, memory as the CPU compiler lays it out", topo
    return devices, f"{len(devices)} local {devices[0].device_kind}", topo


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def topology_mesh(devices: Sequence[jax.Device], mesh_shape: str | Sequence[int] | None,
                  num_slices: int = 1) -> Mesh:
    """The mesh training builds (sharding.make_mesh) over the topology's devices. TPU slices are
    hybrid: only 'data' spans the data-center network, each slice holds whole fsdp x tensor blocks.
    GPU hosts (real GPUs of this machine, or CPU stand-ins, all in one process) only set the default
    data axis (one row per host)."""
    spec = mesh_shape if mesh_shape is not None else f"{num_slices},-1,1"
    slices = num_slices if devices[0].platform == "tpu" else 1
    return sharding.make_mesh(spec, devices=devices, num_slices=slices)


# ---------------------------------------------------------------- the check

_OOM_SIZE = re.compile(r"(?:required for [^(]*\(|Used )([\d.]+)\s*([KMGT]?)i?B?\b")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> int | None:
    """Bytes XLA said the program needs in a RESOURCE_EXHAUSTED message, if stated. Its "G" is
    GiB, and its "HLO temporaries" figure includes the arguments (a 20 GiB argument alone reads
    "temporaries (20.00G)")."""
    m = _OOM_SIZE.search(message)
    return int(float(m[1]) * _UNITS[m[2]]) if m else None


def argument_bytes_per_device(lowered: jax.stages.Lowered) -> int | None:
    """Per-device bytes of the lowered step's arguments, from their shapes and shardings."""
    try:
        args = lowered._lowering.compile_args  # type: ignore[attr-defined]
        avals, shardings_ = args["global_in_avals"], args["in_shardings"]
    except (AttributeError, KeyError):
        return None
    total = 0
    for aval, sh in zip(avals, shardings_):
        shape = sh.shard_shape(aval.shape) if hasattr(sh, "shard_shape") else aval.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize
    return total


def compile_check(lower: Callable[[Mesh], jax.stages.Lowered], topology: str, *, num_slices: int = 1,
                  mesh_shape: str | Sequence[int] | None = None, tokens_per_step: int,
                  model_flops_per_step: float | None = None, mfu: float = 0.4,
                  gpu_type: str | None = None) -> CompileReport:
    """Lower and compile `lower(mesh)` for `topology` and report memory, FLOPs and speed.

    A compile that runs out of HBM gives a report with fits=False (and error_line()); other
    compile errors propagate.
    """
    if not 0 < mfu <= 1:
        raise UsageError(f"mfu must be in (0, 1], got {mfu}")
    if tokens_per_step <= 0:
        raise UsageError(f"tokens_per_step must be positive, got {tokens_per_step}")
    topo = topologies.parse_topology(topology, num_slices, gpu_type)
    devices, target, topo = topology_devices(topo)
    if topo.platform == "gpu" and gpu_type is None and devices[0].platform == "gpu":
        kind = topologies.gpu_type_of(devices[0])
        if kind is not None:
            topo = topologies.parse_topology(topology, num_slices, kind)
    mesh = topology_mesh(devices, mesh_shape, topo.num_slices)
    base = dict(topology=topology, description=topo.describe(), target=target, chip=topo.chip.name,
                num_chips=topo.num_chips, num_slices=topo.num_slices, mesh=dict(mesh.shape),
                hbm_bytes=topo.chip.hbm_bytes, hbm_label=topo.chip.hbm_label,
                peak_flops_per_chip=topo.chip.peak_flops, tokens_per_step=int(tokens_per_step), mfu=float(mfu),
                model_flops_per_step=model_flops_per_step)
    start = time.perf_counter()
    # The abstract mesh lets the model's sharding constraints resolve while tracing; eager work in
    # `lower` still runs on this host (compile-only TPU devices cannot run anything).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = lower(mesh)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            message = str(e)
            if "RESOURCE_EXHAUSTED" not in message:
                raise
            text = message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
            return CompileReport(**base, compile_seconds=time.perf_counter() - start,
                                 argument_bytes=argument_bytes_per_device(lowered), oom_message=text,
                                 oom_needed_bytes=_oom_bytes(text))
    seconds = time.perf_counter() - start
    mem = _memory(compiled)
    cost = _cost(compiled)
    flops = cost.get("flops")
    return CompileReport(**base, compile_seconds=seconds, **mem,
                         xla_flops_per_chip=None if flops is None else float(flops),
                         xla_optimal_seconds=cost.get("optimal_seconds"), custom_kernels=custom_kernels(compiled),
                         step_has_loops="stablehlo.while" in lowered.as_text())


def _memory(compiled: jax.stages.Compiled) -> dict[str, int | None]:
    try:
        m = compiled.memory_analysis()
    except NotImplementedError:
        m = None
    if m is None:
        return {}
    peak = getattr(m, "peak_memory_in_bytes", 0) or None
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "generated_code_bytes": m.generated_code_size_in_bytes, "peak_bytes": peak}


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    """XLA's cost analysis of one device's program (SPMD: every device runs the same one): "flops",
    and on TPU "optimal_seconds", its cost model's step time."""
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError:
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    out = {k: float(cost[k]) for k in ("flops", "optimal_seconds") if cost and k in cost}
    if out.get("optimal_seconds", 1.0) <= 0:  # v4's cost model gives negative times for steps with Pallas kernels
        del out["optimal_seconds"]
    return out


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_KERNEL_NAMES = {"tpu_custom_call": "Pallas/Mosaic (e.g. splash attention)",
                 "__gpu$xla.gpu.triton": "Pallas/Triton", "__cudnn$fmha": "cuDNN attention"}


def custom_kernels(compiled: jax.stages.Compiled) -> tuple[str, ...]:
    """The kernels the compiled step calls outside XLA's own ops ("Pallas/Mosaic (e.g. splash
    attention) x64"), which its cost analysis does not cost."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - some backends cannot print a compiled program; then none is known
        return ()
    counts: dict[str, int] = {}
    for target in _CUSTOM_CALL.findall(text):
        name = _KERNEL_NAMES.get(target, target if target.startswith(("__cudnn", "__gpu")) else None)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return tuple(f"{name} x{n}" for name, n in sorted(counts.items()))


# ---------------------------------------------------------------- comparing settings

def variant_grid(specs: Sequence[str]) -> list[list[str]]:
    """["model.attention=xla,splash", "train.logits_chunk=0,512"] -> every combination as override
    lists ([["model.attention=xla", "train.logits_chunk=0"], ...]); no specs -> [[]]."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        choices = [v for v in values.split(",") if v]
        if not sep or not key or not choices:
            raise UsageError(f"--compare {spec!r} is not KEY=V1,V2,...")
        axes.append([f"{key}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)]


def comparison_table(reports: Sequence[tuple[Sequence[str], CompileReport]]) -> str:
    """A markdown table of compiled variants: memory per chip, whether it fits, XLA's cost-model
    step time and the step time at the stated MFU."""
    lines = ["| settings | memory per chip | of HBM | fits | XLA cost model step | est. step at MFU |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, r in reports:
        needed = r.needed_bytes
        share = f"{100 * needed / r.hbm_bytes:.0f}%" if needed is not None else "?"
        optimal = _seconds(r.xla_optimal_seconds) if r.xla_optimal_seconds is not None else "-"
        step = _seconds(r.step_seconds) if r.step_seconds is not None else "-"
        lines.append(f"| {' '.join(variant) or '(config)'} | {_gib(needed)} | {share} | "
                     f"{'yes' if r.fits else 'no'} | {optimal} | {step} |")
    return "\n".join(lines)
