#!/usr/bin/env python3
"""Cloud TPU pod launcher for `llmcxr train`: create a TPU VM slice, install llmcxr-jax at a pinned
commit on every worker, start training on all workers at once, and supervise it through
preemptions (delete, recreate, set up, relaunch the same command, which resumes from --workdir).

Stdlib only. `gcloud_commands` builds every gcloud call as an argv list; `Runner` prints them
(--dry-run) or runs them with the `gcloud` found on PATH. The shell run on each worker is in
tpu_worker_scripts.py beside this file.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

PROG = "tpu_pod.py"
PROVISIONING = ("on-demand", "spot", "queued", "queued-spot")
DEAD = ("PREEMPTED", "TERMINATED")  # the slice is gone for good: delete and recreate
MISSING = "MISSING"  # describe said NOT_FOUND

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# launch/ is not a package (this file runs as a script and tests load it by path): import its sibling by folder
from tpu_worker_scripts import LOG_DIR, poll_script, run_script, setup_script, stop_script  # noqa: E402


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

    @property
    def queued(self) -> bool:
        return self.provisioning.startswith("queued")


def gcloud_commands(step: str, pod: Pod, worker: int | None = None, lines: int = 100,
                    follow: bool = False) -> list[list[str]]:
    """Every gcloud call this tool makes, as argv lists."""
    loc = [f"--zone={pod.zone}"] + ([f"--project={pod.project}"] if pod.project else [])
    tpu, qr = ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "queued-resources"]

    def ssh(target: str, script: str) -> list[str]:
        return [*tpu, "ssh", pod.name, *loc, f"--worker={target}", f"--command={script}"]

    if step == "create":
        s = pod.slice
        version = pod.version or s.runtime_version
        spot = ["--spot"] if pod.provisioning.endswith("spot") else []
        if pod.queued:
            return [[*qr, "create", pod.name, f"--node-id={pod.name}", *loc, f"--accelerator-type={s.accelerator_type}",
                     f"--runtime-version={version}", *spot]]
        return [[*tpu, "create", pod.name, *loc, f"--accelerator-type={s.accelerator_type}", f"--version={version}",
                 *spot]]
    if step == "delete":
        if pod.queued:  # --force deletes the node with its queued resource
            return [[*qr, "delete", pod.name, *loc, "--force", "--quiet"]]
        return [[*tpu, "delete", pod.name, *loc, "--quiet"]]
    if step == "describe":
        return [[*tpu, "describe", pod.name, *loc, "--format=value(state)"]]
    if step == "describe-queued":
        return [[*qr, "describe", pod.name, *loc, "--format=value(state.state)"]]
    if step == "setup":
        return [ssh("all", setup_script(pod.repo, pod.commit, pod.python))]
    if step == "run":
        return [ssh("all", run_script(pod.command, list(pod.train_args), pod.workdir, pod.commit, pod.env))]
    if step == "poll":
        return [ssh("all", poll_script())]
    if step == "stop":
        return [ssh("all", stop_script(pod.stop_timeout))]
    if step == "logs":
        return [ssh(str(worker), f"tail -n {lines}{' -F' if follow else ''} {LOG_DIR}/train_worker{worker}.log")]
    raise ValueError(f"unknown step {step!r}")


class Runner:
    """Prints commands (dry run) or runs them with the executable found on PATH."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run, self.out = dry_run, out or sys.stdout

    def __call__(self, argv: list[str], what: str, capture: bool = False, check: bool = True,
                 retries: int = 1, sleep=time.sleep, wait_s: float = 10.0) -> subprocess.CompletedProcess:
        if self.dry_run:
            print(shlex.join(argv), file=self.out, flush=True)
            return subprocess.CompletedProcess(argv, 0, "", "")
        exe = shutil.which(argv[0])
        if exe is None:
            raise LaunchError(f"{argv[0]} not found on PATH; install the Google Cloud CLI (gcloud)")
        for attempt in range(1, retries + 1):
            done = subprocess.run([exe, *argv[1:]], text=True, capture_output=capture)
            if done.returncode == 0 or not check:
                return done
            if attempt < retries:
                print(f"{PROG}: {what} failed (exit {done.returncode}); retry {attempt}/{retries - 1}",
                      file=sys.stderr, flush=True)
                sleep(wait_s)
        detail = (done.stderr or "").strip().splitlines()[-1:] if capture else []
        raise LaunchError(f"{what} failed (exit {done.returncode}){': ' + detail[0] if detail else ''}")


def node_state(pod: Pod, run: Runner) -> str:
    done = run(gcloud_commands("describe", pod)[0], "describe", capture=True, check=False)
    if done.returncode == 0:
        return done.stdout.strip() or "UNKNOWN"
    return MISSING if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower() else "UNKNOWN"


def worker_states(pod: Pod, run: Runner) -> dict[str, tuple[str, int | None]]:
    done = run(gcloud_commands("poll", pod)[0], "worker status", capture=True, check=False)
    states = {}
    for line in done.stdout.splitlines():
        m = re.fullmatch(r"llmcxr-state worker=(\S+) (\w+)(?: rc=(-?\d+))?", line.strip())
        if m:
            states[m[1]] = (m[2], int(m[3]) if m[3] is not None else None)
    return states


class Supervisor:
    """create (if missing) + setup + run, then poll; a dead slice is deleted, recreated, set up and
    relaunched (the same command resumes from the workdir) at most max_restarts times."""

    def __init__(self, pod: Pod, run: Runner, poll_s: float, max_restarts: int, ssh_retries: int = 3,
                 delete_when_done: bool = False, sleep=time.sleep, log=None):
        self.pod, self.run, self.poll_s, self.max_restarts = pod, run, poll_s, max_restarts
        self.ssh_retries, self.delete_when_done, self.sleep = ssh_retries, delete_when_done, sleep
        self.log = log or (lambda msg: print(f"{PROG} supervise [{time.strftime('%H:%M:%S')}]: {msg}", flush=True))
        self.restarts = 0

    def _step(self, step: str) -> None:
        ssh = step in ("setup", "run", "stop")
        self.run(gcloud_commands(step, self.pod)[0], step, retries=self.ssh_retries if ssh else 1,
                 sleep=self.sleep, wait_s=max(self.poll_s, 1.0) if ssh else 0)

    def _restart(self, reason: str) -> None:
        if self.restarts >= self.max_restarts:
            raise LaunchError(f"{reason}; giving up after {self.max_restarts} restarts (--max-restarts)")
        self.restarts += 1
        self.log(f"{reason}; restart {self.restarts}/{self.max_restarts}")

    def _recreate(self, reason: str, delete: bool = True) -> None:
        """The slice died (or vanished): delete what is left, create it again."""
        self._restart(reason)
        if delete:
            done = self.run(gcloud_commands("delete", self.pod)[0], "delete", capture=True, check=False)
            if done.returncode:
                self.log(f"delete failed (exit {done.returncode}); creating anyway")
        self._step("create")

    def _ready(self, state: str) -> None:
        """From `state`, create / recreate as needed and wait until the node is READY."""
        while state != "READY":
            if state in DEAD:
                self._recreate(f"node {state}")
            elif state == MISSING and self.pod.queued:
                qr = self.run(gcloud_commands("describe-queued", self.pod)[0], "describe queued resource",
                              capture=True, check=False)
                qr_state = qr.stdout.strip() if qr.returncode == 0 else MISSING
                if qr_state in ("FAILED", "SUSPENDED"):
                    self._recreate(f"queued resource {qr_state}")
                elif qr_state == MISSING:
                    self._step("create")
                else:
                    self.log(f"queued resource {qr_state or 'UNKNOWN'}; waiting")
                    self.sleep(self.poll_s)
            elif state == MISSING:
                self._step("create")
            else:
                self.log(f"node {state}; waiting")
                self.sleep(self.poll_s)
            state = node_state(self.pod, self.run)

    def __call__(self) -> int:
        pod, hosts = self.pod, self.pod.slice.hosts
        state = node_state(pod, self.run)
        running = state == "READY" and any(s in ("RUNNING", "STARTING")
                                           for s, _ in worker_states(pod, self.run).values())
        if running:
            self.log("training already runs on the node; supervising it")
        else:
            self._ready(state)
            self._step("setup")
            self._step("run")
        while True:
            self.sleep(self.poll_s)
            state = node_state(pod, self.run)
            if state in DEAD or state == MISSING:
                # a queued resource outlives its preempted node: delete it too
                self._recreate(f"node {state}", delete=state != MISSING or pod.queued)
                self._ready(node_state(pod, self.run))
                self._step("setup")
                self._step("run")
                continue
            if state != "READY":
                self.log(f"node {state}; waiting")
                continue
            states = worker_states(pod, self.run)
            if len(states) >= hosts and all(s == "DONE" for s, _ in states.values()):
                self.log(f"finished: all {hosts} workers DONE; checkpoints in {pod.workdir}")
                if self.delete_when_done:
                    self._step("delete")
                return 0
            bad = sorted((w, s, rc) for w, (s, rc) in states.items() if s in ("FAILED", "LOST", "STOPPED"))
            if bad:
                w, s, rc = bad[0]
                self._restart(f"worker {w} {s}{f' (exit {rc})' if rc is not None else ''}; see "
                              f"`{PROG} logs --worker {w}`")
                self._step("stop")
                self._step("run")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM node name (also the queued-resource id)")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", default=None)
    common.add_argument("--accelerator-type", default=None, help="v4-32, v5p-128, v5litepod-64 (or v5e-64), v6e-64")
    common.add_argument("--version", default=None, help="TPU runtime version (default: the generation's)")
    common.add_argument("--provisioning", default="on-demand", choices=PROVISIONING)
    common.add_argument("--repo", default=None, help="git URL of llmcxr-jax, cloned on every worker")
    common.add_argument("--commit", default=None, help="commit SHA every worker checks out")
    common.add_argument("--workdir", default=None, help="run directory all workers share (gs://... or a shared mount)")
    common.add_argument("--python", default="3.11", help="Python version of the workers' virtualenv")
    common.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env for training")
    common.add_argument("--stop-timeout", type=int, default=300, help="seconds `stop` waits for the checkpoint")
    common.add_argument("--dry-run", action="store_true", help="print the commands, one per line; run nothing")
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="Training arguments follow `--`: -- --config FILE[:VARIANT] [--config.KEY=V ...]")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("create", "create the slice"), ("setup", "install llmcxr-jax at --commit on all workers"),
                        ("run", "start training on all workers"), ("status", "print the node state"),
                        ("logs", "tail one worker's training log"), ("stop", "SIGTERM training (checkpoints)"),
                        ("delete", "delete the slice (and its queued resource)"),
                        ("supervise", "create + setup + run, then relaunch after preemptions until done")):
        s = sub.add_parser(name, parents=[common], help=help_)
        if name == "logs":
            s.add_argument("--worker", type=int, required=True)
            s.add_argument("--lines", type=int, default=100)
            s.add_argument("--follow", action="store_true")
        if name == "status":
            s.add_argument("--workers", action="store_true", help="also each worker's training state")
        if name == "supervise":
            s.add_argument("--poll", type=float, default=60.0, help="seconds between status checks")
            s.add_argument("--max-restarts", type=int, default=10)
            s.add_argument("--ssh-retries", type=int, default=3)
            s.add_argument("--delete-when-done", action="store_true")
    return p


def _pod(args, train: list[str] | None) -> Pod:
    need = {"create": ("accelerator_type",), "setup": ("repo", "commit"), "run": ("workdir",),
            "supervise": ("accelerator_type", "repo", "commit", "workdir")}.get(args.cmd, ())
    command, train_args, workdir = split_train_command(train or [])
    if workdir and args.workdir and workdir != args.workdir:
        raise LaunchError(f"--workdir {args.workdir} and the command's --workdir {workdir} differ; give one")
    args.workdir = args.workdir or workdir
    for key in need:
        if not getattr(args, key):
            raise LaunchError(f"{args.cmd} needs --{key.replace('_', '-')}")
    if args.cmd in ("run", "supervise") and not train_args:
        raise LaunchError(f"{args.cmd} needs the training arguments after `--`, e.g. -- --config FILE[:VARIANT]")
    if args.commit and not re.fullmatch(r"[0-9a-f]{7,40}", args.commit):
        raise LaunchError(f"--commit {args.commit!r} must be a commit SHA (7-40 hex digits), so every worker runs "
                          "the same code")
    for e in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e):
            raise LaunchError(f"--env {e!r} must be KEY=VALUE")
    slice_ = parse_accelerator(args.accelerator_type) if args.accelerator_type else None
    return Pod(args.name, args.zone, args.project, slice_, args.version, args.provisioning, args.repo, args.commit,
               args.workdir, command, tuple(train_args), args.python, tuple(args.env), args.stop_timeout)


def _warn_workdir(pod: Pod) -> None:
    if pod.workdir and pod.slice and pod.slice.hosts > 1 and not pod.workdir.startswith("gs://"):
        print(f"{PROG}: warning: --workdir {pod.workdir} must be storage all {pod.slice.hosts} workers of "
              f"{pod.slice.accelerator_type} share (an NFS/Filestore or gcsfuse mount), not a worker's own disk",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train = None
    if "--" in argv:
        i = argv.index("--")
        argv, train = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    try:
        pod = _pod(args, train)
        run = Runner(args.dry_run)
        _warn_workdir(pod)
        if args.cmd == "status":
            if args.dry_run:
                run(gcloud_commands("describe", pod)[0], "describe")
                if args.workers:
                    run(gcloud_commands("poll", pod)[0], "worker status")
                return 0
            state = node_state(pod, run)
            print(state)
            if args.workers and state == "READY":
                for w, (s, rc) in sorted(worker_states(pod, run).items()):
                    print(f"worker {w}: {s}{f' (exit {rc})' if rc is not None else ''}")
            return 0
        if args.cmd == "supervise":
            if args.dry_run:
                for step in ("create", "setup", "run"):
                    run(gcloud_commands(step, pod)[0], step)
                print(f"# then every {args.poll:g} s until all {pod.slice.hosts} workers are DONE:")
                for step in ("describe", "poll"):
                    run(gcloud_commands(step, pod)[0], step)
                print(f"# when the node is {' / '.join(DEAD)} or gone (at most {args.max_restarts} times), delete "
                      "and recreate it, then setup and run as above:")
                run(gcloud_commands("delete", pod)[0], "delete")
                return 0
            return Supervisor(pod, run, args.poll, args.max_restarts, args.ssh_retries, args.delete_when_done)()
        kwargs = {"worker": args.worker, "lines": args.lines, "follow": args.follow} if args.cmd == "logs" else {}
        for argv_ in gcloud_commands(args.cmd, pod, **kwargs):
            run(argv_, args.cmd)
        return 0
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; anything started on the pod keeps running (see `status`, `stop`, `delete`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
