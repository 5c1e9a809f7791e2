"""The `llmcxr` entry point: builds one parser from the command families, runs the chosen command,
and turns a UsageError or an operating-system error into one line on stderr (exit 2). Any other
exception is a defect and keeps its traceback."""
from __future__ import annotations

import argparse
import sys

from llmcxr_jax import distributed
from llmcxr_jax.cli import convert, data, demo, inference, training, verify
from llmcxr_jax.errors import UsageError

FAMILIES = (convert, data, training, inference, verify, demo)  # `llmcxr --help` lists their commands in this order
MULTI_HOST_COMMANDS = ("train", "train-vqgan", "encode-images")  # join jax.distributed first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcxr", description="LLM-CXR in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_parser(sub)
    return parser


def _family(command: str):
    return next(f for f in FAMILIES if command in f.commands.by_name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--config.")]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a not in overrides) or ' '.join(extra)}")
    args.overrides = overrides
    distributed.mark_absl_flags_parsed()
    try:
        if args.command in MULTI_HOST_COMMANDS:
            distributed.initialize_distributed()  # from SLURM / TPU pod / LLMCXR_* env; nothing on one process
        code = _family(args.command).run(args)  # a command may return its exit status (verify: 1 = damaged)
    except (UsageError, OSError) as e:
        print(f"llmcxr {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    return code or 0


def error_line(e: UsageError | OSError) -> str:
    """A UsageError's own message; an operating-system error as its path and reason (a file where an
    output directory should go, a full disk) rather than a traceback."""
    if isinstance(e, OSError) and not isinstance(e, UsageError) and e.filename is not None and e.strerror:
        hint = {FileExistsError: "; give a new directory path", NotADirectoryError: " (part of the path is a file)"}
        return f"{e.filename}: {e.strerror}{hint.get(type(e), '')}"
    return str(e)

