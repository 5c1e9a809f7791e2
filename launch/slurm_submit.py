#!/usr/bin/env python3
"""Submit `llmcxr train` to SLURM GPU nodes: builds the `sbatch` command line for
launch/slurm_gpu.sbatch (nodes, GPUs per node, one process per GPU or per node, partition, time,
account, job name, workdir) and runs it, or prints it with --dry-run. Stdlib only.

    python launch/slurm_submit.py --nodes 2 --workdir /shared/runs/s1 -- --config configs/llmcxr_stage1.py:3b
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

PROG = "slurm_submit.py"
SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_gpu.sbatch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpu_pod import split_train_command  # noqa: E402  (same folder, stdlib only)


class SubmitError(Exception):
    """A one-line reason; `main` prints it and exits 2."""


def sbatch_command(nodes: int, workdir: str, train_args: list[str], *, gpus_per_node: int = 8,
                   per: str = "gpu", partition: str | None = None, account: str | None = None,
                   time_limit: str | None = None, job_name: str = "llmcxr", signal_lead_s: int = 120,
                   command: str = "train", dependency: str | None = None,
                   script: str = SBATCH_SCRIPT) -> list[str]:
    """The sbatch argv. per="gpu": one JAX process per GPU; per="node": one per node (all its GPUs).
    --parsable: sbatch prints only the job id, which main() passes on (launch/sweep.py reads it)."""
    if nodes < 1 or gpus_per_node < 1:
        raise SubmitError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if "," in workdir or not workdir:
        raise SubmitError(f"--workdir {workdir!r} must be a non-empty path without commas (sbatch --export)")
    if time_limit and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", time_limit):
        raise SubmitError(f"--time {time_limit!r} must be a SLURM time such as 24:00:00 or 2-00:00:00")
    if dependency and not re.fullmatch(r"[a-z]+(:\d+)+(,[a-z]+(:\d+)+)*", dependency):
        raise SubmitError(f"--dependency {dependency!r} must be a SLURM dependency such as afterok:123:456")
    argv = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={nodes}",
            f"--ntasks-per-node={gpus_per_node if per == 'gpu' else 1}", f"--gpus-per-node={gpus_per_node}"]
    argv += [f"--partition={partition}"] if partition else []
    argv += [f"--account={account}"] if account else []
    argv += [f"--time={time_limit}"] if time_limit else []
    argv += [f"--dependency={dependency}"] if dependency else []
    export = f"ALL,WORKDIR={os.path.abspath(workdir)}" + (f",LLMCXR_COMMAND={command}" if command != "train" else "")
    argv += [f"--signal=B:USR1@{signal_lead_s}", f"--export={export}", script, *train_args]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train = []
    if "--" in argv:
        i = argv.index("--")
        argv, train = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one JAX process per GPU (default) or node")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00; the job requeues itself at the end")
    p.add_argument("--job-name", default="llmcxr")
    p.add_argument("--workdir", default=None, help="run directory on storage all nodes share")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds before the limit to checkpoint + requeue")
    p.add_argument("--dependency", default=None,
                   help="start after these jobs, e.g. afterok:123 (launch/sweep.py chains stage 2 to stage 1)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command; submit nothing")
    args = p.parse_args(argv)
    try:
        command, train_args, workdir = split_train_command(train)
        if workdir and args.workdir and workdir != args.workdir:
            raise SubmitError(f"--workdir {args.workdir} and the command's --workdir {workdir} differ; give one")
        workdir = args.workdir or workdir
        if not workdir:
            raise SubmitError("give --workdir (the run directory; the job resumes from it)")
        if not train_args:
            raise SubmitError("give the training arguments after `--`, e.g. -- --config FILE[:VARIANT]")
        cmd = sbatch_command(args.nodes, workdir, train_args, gpus_per_node=args.gpus_per_node, per=args.per,
                             partition=args.partition, account=args.account, time_limit=args.time,
                             job_name=args.job_name, signal_lead_s=args.signal_lead, command=command,
                             dependency=args.dependency)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        exe = shutil.which("sbatch")
        if exe is None:
            raise SubmitError("sbatch not found on PATH; run this on a SLURM login node")
        done = subprocess.run([exe, *cmd[1:]], stdout=subprocess.PIPE, text=True)
        if done.returncode == 0:
            print(f"slurm job {done.stdout.strip().split(';')[0]}")  # --parsable: "ID" or "ID;CLUSTER"
        return done.returncode
    except SubmitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
