#!/usr/bin/env python3
"""Cloud TPU pod launcher for `llmcxr train`: create a TPU VM slice (or, with --num-slices N, a
multi-slice queued resource of N slices), install llmcxr-jax at a pinned commit on every worker,
start training on all workers at once, and supervise it through preemptions (delete, recreate, set
up, relaunch the same command, which resumes from --workdir).

Stdlib only. tpu_gcloud.py beside this file builds every gcloud call as an argv list (and the shell
run on each worker comes from tpu_worker_scripts.py); `Runner` here prints them (--dry-run) or runs
them with the `gcloud` found on PATH, and `Supervisor` keeps the job going.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

PROG = "tpu_pod.py"
DEAD = ("PREEMPTED", "TERMINATED")  # the slice is gone for good: delete and recreate
MISSING = "MISSING"  # describe said NOT_FOUND

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# launch/ is not a package (this file runs as a script and tests load it by path): import its siblings by folder
from tpu_gcloud import (  # noqa: E402
    PROVISIONING,
    LaunchError,
    Pod,
    gcloud_commands,
    parse_accelerator,
    split_train_command,
    with_num_slices,
    worker_label,
)


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


def node_states(pod: Pod, run: Runner) -> dict[str, str]:
    """State of each node (slice): READY, CREATING, PREEMPTED, ..., MISSING when describe finds none."""
    states = {}
    for node, argv in zip(pod.nodes, gcloud_commands("describe", pod)):
        done = run(argv, "describe", capture=True, check=False)
        if done.returncode == 0:
            states[node] = done.stdout.strip() or "UNKNOWN"
        else:
            gone = "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower()
            states[node] = MISSING if gone else "UNKNOWN"
    return states


def node_state(pod: Pod, run: Runner) -> str:
    """One state for the job: a node that is dead (or gone) makes the job dead, since every step's
    collectives span all slices; READY when every node is; else the first other state."""
    states = list(node_states(pod, run).values())
    for bad in (*DEAD, MISSING):
        if bad in states:
            return bad
    return next((s for s in states if s != "READY"), "READY")


def worker_states(pod: Pod, run: Runner) -> dict[tuple[int, str], tuple[str, int | None]]:
    """(slice, worker) -> (state, exit code) from every node's poll."""
    states = {}
    for i, argv in enumerate(gcloud_commands("poll", pod)):
        done = run(argv, "worker status", capture=True, check=False)
        for line in done.stdout.splitlines():
            m = re.fullmatch(r"llmcxr-state worker=(\S+) (\w+)(?: rc=(-?\d+))?", line.strip())
            if m:
                states[(i, m[1])] = (m[2], int(m[3]) if m[3] is not None else None)
    return states


class Supervisor:
    """create (if missing) + setup + run, then poll; a dead slice (any slice of a multi-slice job) is
    deleted, recreated (the whole queued resource), set up and relaunched (the same command resumes
    from the workdir) at most max_restarts times."""

    def __init__(self, pod: Pod, run: Runner, poll_s: float, max_restarts: int, ssh_retries: int = 3,
                 delete_when_done: bool = False, sleep=time.sleep, log=None):
        self.pod, self.run, self.poll_s, self.max_restarts = pod, run, poll_s, max_restarts
        self.ssh_retries, self.delete_when_done, self.sleep = ssh_retries, delete_when_done, sleep
        self.log = log or (lambda msg: print(f"{PROG} supervise [{time.strftime('%H:%M:%S')}]: {msg}", flush=True))
        self.restarts = 0

    def _step(self, step: str) -> None:
        ssh = step in ("setup", "run", "stop")
        for argv in gcloud_commands(step, self.pod):  # node by node
            self.run(argv, step, retries=self.ssh_retries if ssh else 1, sleep=self.sleep,
                     wait_s=max(self.poll_s, 1.0) if ssh else 0)

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
                elif qr_state == "ACTIVE":  # granted, yet a node (slice) is gone: the job cannot run
                    self._recreate("queued resource ACTIVE but a node is missing")
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
        pod, hosts = self.pod, self.pod.hosts
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
                slices = f" of {pod.num_slices} slices" if pod.num_slices > 1 else ""
                self.log(f"finished: all {hosts} workers{slices} DONE; checkpoints in {pod.workdir}")
                if self.delete_when_done:
                    self._step("delete")
                return 0
            bad = sorted((w, s, rc) for w, (s, rc) in states.items() if s in ("FAILED", "LOST", "STOPPED"))
            if bad:
                (i, w), s, rc = bad[0]
                name, where = worker_label(pod, i, w)
                self._restart(f"{name} {s}{f' (exit {rc})' if rc is not None else ''}; see `{PROG} logs {where}`")
                self._step("stop")  # one JAX job over every slice: all of it restarts
                self._step("run")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM node name (also the queued-resource id); with "
                        "--num-slices N the nodes are NAME-0 ... NAME-(N-1)")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", default=None)
    common.add_argument("--accelerator-type", default=None, help="v4-32, v5p-128, v5litepod-64 (or v5e-64), v6e-64")
    common.add_argument("--version", default=None, help="TPU runtime version (default: the generation's)")
    common.add_argument("--provisioning", default="on-demand", choices=PROVISIONING)
    common.add_argument("--num-slices", type=int, default=1, help="slices of --accelerator-type in one multi-slice "
                        "job (a queued resource: --provisioning queued or queued-spot); data parallel across them")
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
            s.add_argument("--slice", type=int, default=0, help="which slice's node (with --num-slices)")
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
    if args.cmd == "logs" and not 0 <= args.slice < args.num_slices:
        raise LaunchError(f"--slice {args.slice} is not a slice of this job: give 0 to {args.num_slices - 1}")
    return Pod(args.name, args.zone, args.project, slice_, args.version, args.provisioning, args.repo, args.commit,
               args.workdir, command, tuple(with_num_slices(train_args, args.num_slices, args.provisioning)),
               args.python, tuple(args.env), args.stop_timeout, args.num_slices)


def _warn_workdir(pod: Pod) -> None:
    if pod.workdir and pod.slice and pod.hosts > 1 and not pod.workdir.startswith("gs://"):
        slices = f" in {pod.num_slices} slices" if pod.num_slices > 1 else ""
        print(f"{PROG}: warning: --workdir {pod.workdir} must be storage all {pod.hosts} workers of "
              f"{pod.slice.accelerator_type}{slices} share (an NFS/Filestore or gcsfuse mount), not a worker's own "
              "disk", file=sys.stderr)


def _status(pod: Pod, run: Runner, workers: bool) -> None:
    """The node state (one line per node with several slices), then each worker's when asked."""
    states = node_states(pod, run)
    if pod.num_slices == 1:
        print(states[pod.name])
    else:
        for node, state in states.items():
            print(f"{node}: {state}")
    if workers and all(s == "READY" for s in states.values()):
        for (i, w), (s, rc) in sorted(worker_states(pod, run).items()):
            print(f"{worker_label(pod, i, w)[0]}: {s}{f' (exit {rc})' if rc is not None else ''}")


def _dry_supervise(pod: Pod, run: Runner, poll: float, max_restarts: int) -> None:
    """What supervise runs, as --dry-run prints it."""
    for step in ("create", "setup", "run"):
        for argv in gcloud_commands(step, pod):
            run(argv, step)
    slices = f" of {pod.num_slices} slices" if pod.num_slices > 1 else ""
    print(f"# then every {poll:g} s until all {pod.hosts} workers{slices} are DONE:")
    for step in ("describe", "poll"):
        for argv in gcloud_commands(step, pod):
            run(argv, step)
    if pod.num_slices == 1:
        print(f"# when the node is {' / '.join(DEAD)} or gone (at most {max_restarts} times), delete and recreate it, "
              "then setup and run as above:")
    else:
        print(f"# when any node is {' / '.join(DEAD)} or gone (at most {max_restarts} times), delete and recreate the "
              "whole queued resource, then setup and run as above:")
    run(gcloud_commands("delete", pod)[0], "delete")


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
                for argv_ in gcloud_commands("describe", pod) + (gcloud_commands("poll", pod) if args.workers else []):
                    run(argv_, "status")
                return 0
            _status(pod, run, args.workers)
            return 0
        if args.cmd == "supervise":
            if args.dry_run:
                _dry_supervise(pod, run, args.poll, args.max_restarts)
                return 0
            return Supervisor(pod, run, args.poll, args.max_restarts, args.ssh_retries, args.delete_when_done)()
        kwargs = ({"worker": args.worker, "lines": args.lines, "follow": args.follow, "slice_index": args.slice}
                  if args.cmd == "logs" else {})
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
