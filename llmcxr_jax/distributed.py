"""Multi-process start-up: who coordinates, how many processes, which one this is.

`resolve_distributed` reads arguments and the environment (explicit LLMCXR_* variables, SLURM,
TPU pods) into a plan without touching JAX; `initialize_distributed` acts on it, once, before
anything initialises a JAX backend. One process (nothing set, or a count of 1) does nothing.
On CPU, cross-process collectives run over gloo (jax_cpu_collectives_implementation's default).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from llmcxr_jax.errors import UsageError

DEFAULT_PORT = 12355  # LLMCXR_COORDINATOR given as a bare host


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
    """mode: 'single' (do nothing), 'explicit', 'slurm', or 'tpu' (JAX fills what is None)."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM compressed host list -> hosts: "gpu[01-03,07]-ib,login" -> gpu01-ib ... login."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(nodelist[start:i].strip())
            start = i + 1
    hosts = []
    for item in filter(None, items):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UsageError(f"cannot parse SLURM node list {nodelist!r} at {part!r}")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(expand_nodelist(f"{prefix}{n:0{len(lo)}d}{rest}"))
    return hosts


def _tasks_per_node(env: Mapping[str, str]) -> int:
    """Tasks on this node, from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("4(x2),3")."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if not spec:
        return 1
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UsageError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def _int(env: Mapping[str, str], key: str) -> int:
    if key not in env:
        raise UsageError(f"{key} is not set; the launcher must set it for every process")
    try:
        return int(env[key])
    except ValueError:
        raise UsageError(f"{key}={env[key]!r} is not an integer") from None


def _id_list(text: str, where: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{where}={text!r} must be comma-separated device ids, e.g. 0,1") from None


def _with_port(address: str, port: int) -> str:
    return address if re.search(r":\d+$", address) else f"{address}:{port}"


def _env_plan(env: Mapping[str, str]) -> DistributedPlan:
    """What the environment alone says; precedence LLMCXR_* > SLURM > TPU pod > single."""
    switch = env.get("LLMCXR_DISTRIBUTED", "").strip().lower()
    if switch in ("off", "single", "none"):
        return DistributedPlan("single")
    if switch not in ("", "tpu", "auto"):
        raise UsageError(f"LLMCXR_DISTRIBUTED={switch!r} must be one of off, tpu, auto (or unset)")
    port = _int(env, "LLMCXR_COORDINATOR_PORT") if "LLMCXR_COORDINATOR_PORT" in env else None
    local = _id_list(env["LLMCXR_LOCAL_DEVICE_IDS"], "LLMCXR_LOCAL_DEVICE_IDS") if env.get(
        "LLMCXR_LOCAL_DEVICE_IDS") else None
    if any(k in env for k in ("LLMCXR_COORDINATOR", "LLMCXR_NUM_PROCESSES", "LLMCXR_PROCESS_ID")):
        coordinator = env.get("LLMCXR_COORDINATOR")
        return DistributedPlan("explicit", coordinator and _with_port(coordinator, port or DEFAULT_PORT),
                               _int(env, "LLMCXR_NUM_PROCESSES") if "LLMCXR_NUM_PROCESSES" in env else None,
                               _int(env, "LLMCXR_PROCESS_ID") if "LLMCXR_PROCESS_ID" in env else None, local)
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise UsageError("SLURM job without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; launch the workers with srun")
        # The job id picks the port (as JAX's own SLURM detection does) so jobs sharing a node don't collide.
        port = port or 61440 + _int(env, "SLURM_JOB_ID") % 4096
        if local is None and _tasks_per_node(env) > 1 and "SLURM_LOCALID" in env:
            # One process per GPU, unless SLURM already bound one GPU to each task (--gpus-per-task=1).
            visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if len(visible) != 1:
                local = (_int(env, "SLURM_LOCALID"),)
        return DistributedPlan("slurm", f"{expand_nodelist(nodes)[0]}:{port}", _int(env, "SLURM_NTASKS"),
                               _int(env, "SLURM_PROCID"), local)
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if switch or "MEGASCALE_COORDINATOR_ADDRESS" in env or "CLOUD_TPU_TASK_ID" in env or hosts.count(",") >= 1:
        return DistributedPlan("tpu", local_device_ids=local)
    return DistributedPlan("single")


def resolve_distributed(env: Mapping[str, str] = os.environ, coordinator_address: str | None = None,
                        num_processes: int | None = None, process_id: int | None = None,
                        local_device_ids: int | Sequence[int] | None = None) -> DistributedPlan:
    """Arguments override the environment field by field; errors are one line naming what to set."""
    plan = _env_plan(env)
    if coordinator_address is not None:
        port = _int(env, "LLMCXR_COORDINATOR_PORT") if "LLMCXR_COORDINATOR_PORT" in env else DEFAULT_PORT
        coordinator_address = _with_port(coordinator_address, port)
    args = {"coordinator": coordinator_address, "num_processes": num_processes, "process_id": process_id,
            "local_device_ids": (local_device_ids,) if isinstance(local_device_ids, int)
            else None if local_device_ids is None else tuple(local_device_ids)}
    given = {k: v for k, v in args.items() if v is not None}
    if given:
        plan = dataclasses.replace(plan, mode="explicit" if plan.mode == "single" else plan.mode, **given)
    if plan.mode in ("single", "tpu"):
        return plan
    missing = [name for name, v in (("coordinator address (LLMCXR_COORDINATOR=host:port)", plan.coordinator),
                                    ("process count (LLMCXR_NUM_PROCESSES)", plan.num_processes),
                                    ("process id (LLMCXR_PROCESS_ID)", plan.process_id)) if v is None]
    if plan.num_processes == 1 and plan.process_id in (None, 0):
        return DistributedPlan("single")
    if missing:
        raise UsageError(f"multi-process start-up ({plan.mode}) is missing the {', '.join(missing)}")
    if plan.num_processes < 1:
        raise UsageError(f"process count must be >= 1, got {plan.num_processes}")
    if not 0 <= plan.process_id < plan.num_processes:
        raise UsageError(f"process id {plan.process_id} is outside [0, {plan.num_processes}); "
                         "give each process a distinct id from 0 to the process count - 1")
    if not re.fullmatch(r"\S+:\d+", plan.coordinator):
        raise UsageError(f"coordinator address {plan.coordinator!r} must be host:port")
    return plan


_DONE: dict[str, Any] | None = None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None, *,
                           env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Start jax.distributed per `resolve_distributed`; call before any JAX computation or
    jax.devices(). A second call returns the first call's description and does nothing."""
    global _DONE
    if _DONE is not None:
        return _DONE
    if jax.distributed.is_initialized():  # someone called jax.distributed.initialize directly
        _DONE = {"mode": "external", "coordinator": None, "num_processes": jax.process_count(),
                 "process_id": jax.process_index(), "local_device_ids": None}
        return _DONE
    plan = resolve_distributed(env, coordinator_address, num_processes, process_id, local_device_ids)
    if plan.mode == "tpu":
        kwargs = {k: v for k, v in (("coordinator_address", plan.coordinator), ("num_processes", plan.num_processes),
                                    ("process_id", plan.process_id), ("local_device_ids", plan.local_device_ids))
                  if v is not None}
        jax.distributed.initialize(**kwargs)
        plan = dataclasses.replace(plan, num_processes=jax.process_count(), process_id=jax.process_index())
    elif plan.mode != "single":
        # 'deactivate': our plan is complete; JAX must not re-derive fields (e.g. one GPU per SLURM task).
        jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                                   list(plan.local_device_ids) if plan.local_device_ids else None,
                                   cluster_detection_method="deactivate")
    else:
        plan = dataclasses.replace(plan, num_processes=1, process_id=0)
    _DONE = plan.describe()
    return _DONE


def mark_absl_flags_parsed() -> None:
    """grain hands absl flags to its worker processes and refuses unparsed ones. Entry points that
    take their options elsewhere (the `llmcxr` command, the tests, the benchmarks) call this once at
    start; a program of your own that runs grain workers calls it, or absl's app.run, too."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
