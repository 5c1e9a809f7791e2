"""`llmcxr verify`: after copying checkpoints between buckets or machines, check an orbax LM / VQ-GAN checkpoint's
arrays against the checksums saved with them (read to host numpy: no model, mesh or accelerator), or that an
export's weight files (HF, diffusers, taming .ckpt) read in full. One line per step or file on stderr.

Exit status: 0 every checked step / file is intact; 1 one is damaged; 3 none is damaged but a step carries no
checksums (written before checksums; its arrays still read in full); 2 a usage error.
"""
from __future__ import annotations

import os
import sys

from llmcxr_jax.cli.common import Commands, emit
from llmcxr_jax.errors import MissingInputError, UsageError

commands = Commands()
add_parser, run = commands.add_parser, commands.run

DAMAGED, UNCHECKED = 1, 3  # exit statuses (0: intact; 2: usage error, as every command)


def _verify_flags(p) -> None:
    p.add_argument("dir", metavar="DIR", help="an orbax checkpoint (import-hf / import-vqgan output, a train or "
                   "train-vqgan WORKDIR or its checkpoints/), an export-hf or diffusers folder, or a taming .ckpt")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="check this step (default: the newest)")
    which.add_argument("--all", action="store_true", help="check every step")


@commands.add("verify", "check a checkpoint against its checksums, or that export weight files read in full; "
              "exit 0 only when all is intact", flags=_verify_flags)
def verify(args) -> int:
    from llmcxr_jax import checkpoint

    dirs = checkpoint.checkpoint_dirs(args.dir)
    if dirs:
        return _verify_orbax(dirs, args)
    if args.step is not None or args.all:
        raise UsageError(f"{args.dir} holds no orbax checkpoint, so it has no steps; drop --step / --all")
    return _verify_files(args.dir)


def _verify_orbax(dirs: list[str], args) -> int:
    from llmcxr_jax import checkpoint, checkpoint_integrity

    report, states = {}, set()
    for directory in dirs:
        steps = checkpoint.all_steps(directory)
        if args.step is not None and args.step not in steps:
            raise UsageError(f"{directory} has no step {args.step}; it holds steps {', '.join(map(str, steps))}")
        chosen = steps if args.all else [args.step if args.step is not None else steps[-1]]
        prefix = f"{directory}: " if len(dirs) > 1 else ""
        for step in sorted(chosen, reverse=True):
            status = checkpoint_integrity.verify_step(directory, step)
            print(prefix + status.line(), file=sys.stderr)
            report.setdefault(directory, {})[step] = status.what or status.state
            states.add(status.state)
    code = DAMAGED if "damaged" in states else UNCHECKED if "unchecked" in states else 0
    emit({"checked": report, "intact": code == 0})
    return code


def _verify_files(path: str) -> int:
    from llmcxr_jax.convert import file_integrity

    if not os.path.exists(path):
        raise MissingInputError(f"{path} does not exist")
    files = file_integrity.weight_files(path)
    if not files:
        raise UsageError(f"{path} holds no orbax checkpoint and no weight files (*.safetensors, *.bin, *.ckpt); give "
                         "a checkpoint directory, a train workdir, an export folder or a .ckpt file")
    report = {}
    for name in file_integrity.missing_shards(path):
        report[name] = "is missing"
    for f in files:
        problem = file_integrity.check_file(f)
        report[os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)] = problem or "reads in full"
    for name, what in report.items():
        print(f"{name}: {what}" if what == "reads in full" else f"{name}: damaged: {what}", file=sys.stderr)
    damaged = any(what != "reads in full" for what in report.values())
    emit({"checked": {path: report}, "intact": not damaged})
    return DAMAGED if damaged else 0
