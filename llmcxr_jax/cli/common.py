"""What every command family shares: the registry each family fills (`Commands`), the flags
several commands take (their help written once), progress bars, and the JSON line a command ends on."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import NamedTuple

from llmcxr_jax.errors import UsageError


class Command(NamedTuple):
    name: str
    help: str
    flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


class Commands:
    """One family's commands, in the order `llmcxr --help` lists them. A family module builds one,
    registers each handler with `@commands.add(name, help, flags=...)` (the flags function sits
    right above its handler), and hands `add_parser` / `run` to main.py."""

    def __init__(self) -> None:
        self.by_name: dict[str, Command] = {}

    def add(self, name: str, help: str, *, flags: Callable[[argparse.ArgumentParser], None]):
        def register(fn):
            self.by_name[name] = Command(name, help, flags, fn)
            return fn
        return register

    def add_parser(self, sub) -> None:
        for c in self.by_name.values():
            c.flags(sub.add_parser(c.name, help=c.help, description=c.help))

    def run(self, args: argparse.Namespace) -> int | None:
        return self.by_name[args.command].run(args)  # the exit status, when the command returns one


def emit(result: dict) -> None:
    """The one JSON line on stdout that ends every command (progress and reports go to stderr)."""
    print(json.dumps(result))


# Flags several commands share: one definition, one help text.
def add_mesh(p, default: str) -> None:
    p.add_argument("--mesh", default=default, help="data,fsdp,tensor sizes (one may be -1)")


def add_lm_ckpt(p) -> None:
    p.add_argument("--ckpt", required=True,
                   help="LM checkpoint (import-hf output, or a train WORKDIR or its checkpoints/)")


def add_vqgan_ckpt(p, flag: str = "--vqgan") -> None:
    p.add_argument(flag, required=True, help="VQ-GAN checkpoint whose codes the LM was trained on "
                   "(import-vqgan output, or a train-vqgan WORKDIR or its vqgan/)")


def add_data_root(p) -> None:
    p.add_argument("--data", required=True, help="MIMIC-CXR-JPG layout root (real, or made by `llmcxr synth`)")
    p.add_argument("--reports-root", default=None, help="unzipped mimic-cxr-reports root; default DATA/reports")


def add_config(p, example: str) -> None:
    p.add_argument("--config", required=True, help=f"FILE[:VARIANT], e.g. {example}; then --config.KEY=VALUE ...")


def add_sampling(p) -> None:
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of top_p 0.92")
    p.add_argument("--temperature", type=float, default=None, help="when sampling (default: LLM-CXR's 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus when sampling (default: LLM-CXR's 0.92; 1: off)")
    p.add_argument("--top-k", type=int, default=None, help="when sampling (default: LLM-CXR's 0, off)")
    p.add_argument("--seed", type=int, default=0)


def add_decoding(p) -> None:
    """How report->CXR decodes, the LM's compute dtype, the text clean-up and the switches that decode text
    as LLM-CXR did (generate, evaluate)."""
    p.add_argument("--image-decoding", default="constrained", choices=("constrained", "retry"),
                   help="report->CXR: constrained (the response is forced to exactly h*w image tokens) or retry "
                   "(LLM-CXR's way: sample freely, h*w + 44 new tokens, again until exactly h*w image tokens)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="with --image-decoding retry: retries before an input fails (default: 20)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the LM's compute dtype (weights stay as saved); LLM-CXR generated in bfloat16")
    p.add_argument("--keep-tokenization-spaces", action="store_true",
                   help="keep spaces before . , ! ? and contractions in text outputs (default: removed, as "
                   "transformers' clean_up_tokenization did for LLM-CXR)")
    # Our deliberate departures from LLM-CXR's text decoding; each flag turns one off, for a like-for-like run.
    p.add_argument("--allow-image-tokens-in-text", action="store_true",
                   help="reports, answers and text responses may sample image tokens, as LLM-CXR's did (default: "
                   "masked); their text drops them, as the original's decode did")
    p.add_argument("--stop-at-end-key-only", action="store_true",
                   help="text responses stop at '### End' only, as LLM-CXR's did (default: at <|endoftext|> too)")
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="special tokens inside a text response stay in its text, as LLM-CXR's decode kept them "
                   "(default: left out)")


def decoding_settings(args) -> dict:
    """The add_decoding flags as keyword arguments of tasks.run_task / EvalOptions; an unset
    --max-retries keeps the library's default."""
    given = {"image_decoding": args.image_decoding, "max_retries": args.max_retries}
    return {k: v for k, v in given.items() if v is not None}


def text_decoding_settings(args) -> dict:
    """The departure flags of add_decoding as keyword arguments of tasks.Generator.load / EvalOptions."""
    return {"allow_image_tokens_in_text": args.allow_image_tokens_in_text,
            "stop_at_end_key_only": args.stop_at_end_key_only, "keep_special_tokens": args.keep_special_tokens}


def add_instructions(p, applies_to: str) -> None:
    """--instruction TEXT or --instructions FILE|DIR (not both), for the report and image tasks."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--instruction", default=None, metavar="TEXT",
                   help=f"one instruction for every input ({applies_to}; default: our first paraphrase)")
    g.add_argument("--instructions", default=None, metavar="FILE|DIR",
                   help=f"instructions to sample one per input with --seed ({applies_to}): a file with one per line "
                   "or a JSON list of strings, or the folder `llmcxr extract-instructions` writes "
                   "(report_instructions.txt, image_instructions.txt)")


def sampling_settings(args) -> dict:
    """The --temperature / --top-p / --top-k given; the others keep LLM-CXR's values."""
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {k: v for k, v in given.items() if v is not None}


def byte_size(text: str) -> int:
    """'5GB', '500MiB', '123' -> bytes."""
    units = {"KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "B": 1}
    t = text.strip().upper()
    try:
        for unit in sorted(units, key=len, reverse=True):
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * units[unit])
        return int(t)
    except ValueError:
        raise UsageError(f"size {text!r} is not a number of bytes; write e.g. 5GB, 500MiB or 1000000") from None


@contextlib.contextmanager
def tensor_progress(total: int, desc: str):
    """A tensor-count progress bar on stderr, closed before any error is printed; it appears with the first
    tensor, so a file refused before any tensor is read (a cut weight file) stays one line."""
    done = 0

    def tick(_key) -> None:
        nonlocal done
        done += 1
        update(done)

    with count_progress(total, desc, "tensor") as update:
        yield tick


@contextlib.contextmanager
def count_progress(total: int, desc: str, unit: str):
    """A progress bar fed cumulative counts; it appears only once work starts, so input errors
    found up front stay one line."""
    from tqdm import tqdm

    bar = None

    def update(done: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
