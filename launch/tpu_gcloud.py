"""Cloud TPU slices and the gcloud commands launch/tpu_pod.py runs: accelerator types -> chips and
worker VMs, the job (`Pod`: one slice, or a multi-slice queued resource of N slices named NAME-0 ...
NAME-(N-1)) and every gcloud call as an argv list. Stdlib only; no command runs here.
"""
from __future__ import annotations

import dataclasses
import re

# a sibling in launch/, which tpu_pod.py (a script, not a package member) puts on sys.path
from tpu_worker_scripts import LOG_DIR, poll_script, run_script, setup_script, stop_script

PROVISIONING = ("on-demand", "spot", "queued", "queued-spot")
NUM_SLICES_KEY = "--config.train.num_slices="  # the trainer's mesh spans this many slices


class LaunchError(Exception):
    """A one-line reason; `main` prints it as `tpu_pod.py: error: ...` and exits 2."""


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str  # as gcloud spells it (v5e-64 -> v5litepod-64)
    generation: str  # v2, v3, v4, v5p, v5e, v6e
    chips: int
    hosts: int  # TPU VM workers, gcloud --worker=0..hosts-1
    runtime_version: str  # default --version


def parse_accelerator(name: str) -> Slice:
    """Cloud TPU accelerator type -> chips and TPU VM workers (hosts), by the Cloud TPU docs' rule:

    * v2, v3, v4, v5p: the number counts TensorCores, two per chip, and a TPU VM host holds 4 chips,
      so hosts = N / 8: v4-8 = 4 chips = 1 host, v4-32 = 16 chips = 4 hosts, v5p-128 = 64 chips = 16 hosts.
    * v5e (gcloud: v5litepod) and v6e: the number counts chips; 1, 4 and 8 chips are one VM, and
      multi-host slices are made of 4-chip VMs, so hosts = N / 4: v5e-64 = 16 hosts, v6e-256 = 64 hosts.
    Valid sizes: v2 8-512 and v3 8-2048 TensorCores as listed below; v4 and v5p 8, 16, 32, 64, 128
    TensorCores, then multiples of 128 (past 64 chips a slice is whole 4x4x4 cubes) up to the pod;
    v5e and v6e 1, 4, 8, 16, 32, 64, 128, 256 chips. Runtime versions: "TPU software versions" page.
    """
    table = {  # generation: (gcloud prefix, TensorCores per chip, valid numbers in the name, runtime version)
        "v2": ("v2", 2, lambda n: n in (8, 32, 128, 256, 512), "tpu-ubuntu2204-base"),
        "v3": ("v3", 2, lambda n: n in (8, 32, 64, 128, 256, 512, 1024, 2048), "tpu-ubuntu2204-base"),
        "v4": ("v4", 2, lambda n: n in (8, 16, 32, 64) or (n % 128 == 0 and 0 < n <= 8192), "tpu-ubuntu2204-base"),
        "v5p": ("v5p", 2, lambda n: n in (8, 16, 32, 64) or (n % 128 == 0 and 0 < n <= 17920), "v2-alpha-tpuv5"),
        "v5e": ("v5litepod", 1, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite"),
        "v6e": ("v6e", 1, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e"),
    }
    m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise LaunchError(f"unknown accelerator type {name!r}; use GENERATION-SIZE with a generation of v2, v3, "
                          "v4, v5p, v5e (v5litepod), v6e, e.g. v4-32, v5p-128, v5litepod-64, v6e-64")
    gen, n = ("v5e" if m[1] == "v5litepod" else m[1]), int(m[2])
    prefix, cores_per_chip, valid, version = table[gen]
    if not valid(n):
        unit = "TensorCores (2 per chip)" if cores_per_chip == 2 else "chips"
        raise LaunchError(f"unknown accelerator type {name!r}: {n} is not a {gen} slice size; {gen} names count "
                          f"{unit}, e.g. {prefix}-{8 if cores_per_chip == 2 else 16}")
    chips = n // cores_per_chip
    hosts = max(chips // 4, 1) if cores_per_chip == 2 or chips > 8 else 1
    return Slice(f"{prefix}-{n}", gen, chips, hosts, version)


def split_train_command(args: list[str]) -> tuple[str, list[str], str | None]:
    """What follows `--`: bare train arguments, or a whole `llmcxr train|train-vqgan ...` command.
    -> (subcommand, arguments without --workdir, the --workdir given there or None)."""
    args = list(args)
    if args and (args[0] == "llmcxr" or args[0].endswith("/llmcxr")):
        args = args[1:]
    command = args.pop(0) if args and args[0] in ("train", "train-vqgan") else "train"
    rest, workdir, i = [], None, 0
    while i < len(args):
        if args[i] == "--workdir" and i + 1 < len(args):
            workdir, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--workdir="):
            workdir = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return command, rest, workdir


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    zone: str
    project: str | None = None
    slice: Slice | None = None
    version: str | None = None
    provisioning: str = "on-demand"
    repo: str | None = None
    commit: str | None = None
    workdir: str | None = None
    command: str = "train"
    train_args: tuple[str, ...] = ()
    python: str = "3.11"
    env: tuple[str, ...] = ()
    stop_timeout: int = 300
    num_slices: int = 1

    @property
    def queued(self) -> bool:
        return self.provisioning.startswith("queued")

    @property
    def nodes(self) -> tuple[str, ...]:
        """TPU VM nodes, one per slice: the name itself, or for N slices NAME-0 ... NAME-(N-1), which is how
        a queued resource created with --node-prefix=NAME --node-count=N names them."""
        if self.num_slices == 1:
            return (self.name,)
        return tuple(f"{self.name}-{i}" for i in range(self.num_slices))

    @property
    def hosts(self) -> int:
        """TPU VM workers of every slice together: the JAX processes of the job."""
        return self.slice.hosts * self.num_slices


def worker_label(pod: Pod, slice_index: int, worker: str) -> tuple[str, str]:
    """-> (how to name one worker, the `logs` options that show its log)."""
    if pod.num_slices == 1:
        return f"worker {worker}", f"--worker {worker}"
    return f"slice {slice_index} worker {worker}", f"--slice {slice_index} --worker {worker}"


def gcloud_commands(step: str, pod: Pod, worker: int | None = None, lines: int = 100,
                    follow: bool = False, slice_index: int = 0) -> list[list[str]]:
    """Every gcloud call this tool makes, as argv lists: describe and the ssh steps give one per node
    (slice), each `ssh --worker=all` on its own node; logs reads `worker` of node `slice_index`."""
    loc = [f"--zone={pod.zone}"] + ([f"--project={pod.project}"] if pod.project else [])
    tpu, qr = ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "queued-resources"]

    def ssh(target: str, script: str, nodes: tuple[str, ...] = pod.nodes) -> list[list[str]]:
        return [[*tpu, "ssh", node, *loc, f"--worker={target}", f"--command={script}"] for node in nodes]

    if step == "create":
        s = pod.slice
        version = pod.version or s.runtime_version
        spot = ["--spot"] if pod.provisioning.endswith("spot") else []
        if pod.queued:
            # one node, or N nodes (slices) named by the prefix: the queued resource's id
            nodes = ([f"--node-id={pod.name}"] if pod.num_slices == 1
                     else [f"--node-count={pod.num_slices}", f"--node-prefix={pod.name}"])
            return [[*qr, "create", pod.name, *nodes, *loc, f"--accelerator-type={s.accelerator_type}",
                     f"--runtime-version={version}", *spot]]
        return [[*tpu, "create", pod.name, *loc, f"--accelerator-type={s.accelerator_type}", f"--version={version}",
                 *spot]]
    if step == "delete":
        if pod.queued:  # --force deletes the node(s) with their queued resource
            return [[*qr, "delete", pod.name, *loc, "--force", "--quiet"]]
        return [[*tpu, "delete", pod.name, *loc, "--quiet"]]
    if step == "describe":
        return [[*tpu, "describe", node, *loc, "--format=value(state)"] for node in pod.nodes]
    if step == "describe-queued":
        return [[*qr, "describe", pod.name, *loc, "--format=value(state.state)"]]
    if step == "setup":
        return ssh("all", setup_script(pod.repo, pod.commit, pod.python))
    if step == "run":
        return ssh("all", run_script(pod.command, list(pod.train_args), pod.workdir, pod.commit, pod.env))
    if step == "poll":
        return ssh("all", poll_script())
    if step == "stop":
        return ssh("all", stop_script(pod.stop_timeout))
    if step == "logs":
        return ssh(str(worker), f"tail -n {lines}{' -F' if follow else ''} {LOG_DIR}/train_worker{worker}.log",
                   (pod.nodes[slice_index],))
    raise ValueError(f"unknown step {step!r}")


def with_num_slices(train_args: list[str], num_slices: int, provisioning: str) -> list[str]:
    """Check --num-slices, and tell the trainer: its mesh must span the slices (train.num_slices). An
    override the command already has must agree."""
    if num_slices < 1:
        raise LaunchError(f"--num-slices must be at least 1, got {num_slices}")
    if num_slices > 1 and not provisioning.startswith("queued"):
        raise LaunchError(f"--num-slices {num_slices} needs --provisioning queued or queued-spot: Cloud TPU creates "
                          "multi-slice jobs only as queued resources")
    given = [a[len(NUM_SLICES_KEY):] for a in train_args if a.startswith(NUM_SLICES_KEY)]
    other = [v for v in given if v.strip() != str(num_slices)]
    if other:
        raise LaunchError(f"the command's {NUM_SLICES_KEY}{other[0]} differs from --num-slices {num_slices}; "
                          "give the slice count once, as --num-slices")
    return train_args + [f"{NUM_SLICES_KEY}{num_slices}"] if num_slices > 1 and not given else train_args
