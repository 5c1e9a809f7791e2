"""Instruction paraphrases as data: the one reader of a user's instruction file (one per line, or a
JSON list of strings), the seeded choice of one per input, and the extraction of LLM-CXR's own two
lists from its training/mimiccxr_vq_dataset.py with `ast` (read as a literal, never imported or run).
"""
from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence

import numpy as np

from llmcxr_jax.data import prompts
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.vocab import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY

TASKS = ("report", "image")  # CXR->report, report->CXR: the two tasks whose instruction is a paraphrase
OURS = {"report": prompts.REPORT_INSTRUCTIONS, "image": prompts.IMAGE_INSTRUCTIONS}
FILE_NAMES = {"report": "report_instructions.txt", "image": "image_instructions.txt"}  # extract-instructions' output
ORIGINAL_SOURCE = os.path.join("training", "mimiccxr_vq_dataset.py")
# LLM-CXR's io_type "input" (the image is the prompt's input: CXR->report) samples the INPUT list;
# io_type "output" (the image is the response: report->CXR) samples the OUTPUT list.
ORIGINAL_NAMES = {"report": "CXR_VQ_INPUT_INSTRUCTION_LIST", "image": "CXR_VQ_OUTPUT_INSTRUCTION_LIST"}
_FORBIDDEN = (prompts.IMAGE_MARKER, prompts.IMAGE_BEGIN, prompts.IMAGE_END, INSTRUCTION_KEY,
              RESPONSE_KEY.strip(), END_KEY)  # would move the image injection or the response-only loss
_FORMAT = "give one instruction per line, or a JSON list of non-empty strings"


def check_instruction(text: str, where: str) -> str:
    """An instruction the prompt can carry: a non-empty string without an image marker or Dolly key."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{where} is {text!r}, not a non-empty instruction string; write the instruction text")
    bad = next((m for m in _FORBIDDEN if m in text), None)
    if bad is not None:
        raise UsageError(f"{where} contains {bad!r}, which the prompt template reserves; reword it without it")
    return text


def load_instructions(path: str, name: str = "instruction file") -> tuple[str, ...]:
    """A user's instructions, in file order (repeats allowed: they weigh the sampling).

    A .json file, or one whose text starts with "[", is a JSON list of strings, kept exactly. Any
    other file holds one instruction per line: surrounding whitespace stripped, blank lines skipped.
    `name` says where the path came from (a flag or config key) in error messages.
    """
    if os.path.isdir(path):
        raise UsageError(f"{name} {path} is a folder; {_FORMAT} in a file")
    if not os.path.isfile(path):
        raise MissingInputError(f"{name} {path} does not exist; {_FORMAT} in a file "
                                "(or make one with `llmcxr extract-instructions`)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{name} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if path.lower().endswith(".json") or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{name} {path} is not valid JSON ({e.msg}, line {e.lineno}); {_FORMAT}") from None
        if not isinstance(items, list):
            raise UsageError(f"{name} {path} holds a JSON {type(items).__name__}, not a list; {_FORMAT}")
        where = [f"{name} {path} item {i}" for i in range(len(items))]
    else:
        lines = text.split("\n")
        items = [line.strip() for line in lines if line.strip()]
        where = [f"{name} {path} line {n}" for n, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise UsageError(f"{name} {path} holds no instructions; {_FORMAT}")
    return tuple(check_instruction(s, w) for s, w in zip(items, where))


def task_instructions(path: str, task: str, name: str = "instruction file") -> tuple[str, ...]:
    """The instructions of `task` ("report" or "image"): ours when path is "", the file's, or, for a
    folder (what extract-instructions writes), its FILE_NAMES[task]."""
    if task not in TASKS:
        raise UsageError(f"instruction task must be one of {TASKS}, got {task!r}")
    if not path:
        return OURS[task]
    if os.path.isdir(path):
        file = os.path.join(path, FILE_NAMES[task])
        if not os.path.isfile(file):
            raise MissingInputError(f"{name} {path} is a folder without {FILE_NAMES[task]} (the {task} task's "
                                    "instructions); give that file, or run `llmcxr extract-instructions --out "
                                    f"{path}`")
        path = file
    return load_instructions(path, name)


def given_instructions(tasks: Sequence[str], text: str | None, path: str | None) -> dict[str, tuple[str, ...]]:
    """What a generate / evaluate run was given for its report and image tasks: --instruction TEXT or
    --instructions FILE (one list, so one such task) or DIR (a file per task); {} when neither."""
    if text is None and path is None:
        return {}
    flag = "--instruction" if text is not None else "--instructions"
    wanted = [t for t in TASKS if t in tasks]
    if not wanted:
        raise UsageError(f"{flag} applies to the report and image tasks, not {', '.join(tasks)}; vqa takes its "
                         "question and text its input as the instruction")
    if text is None and not os.path.exists(path):
        raise MissingInputError(f"--instructions {path} does not exist; {_FORMAT} in a file, or give the folder "
                                "`llmcxr extract-instructions` writes")
    if text is None and os.path.isdir(path):
        return {t: task_instructions(path, t, flag) for t in wanted}
    if len(wanted) > 1:
        raise UsageError(f"{flag} gives one instruction list but tasks report and image both run; give a folder "
                         f"with {FILE_NAMES['report']} and {FILE_NAMES['image']} (what `llmcxr extract-instructions` "
                         "writes) or run one task")
    return {wanted[0]: (check_instruction(text, flag),) if text is not None else load_instructions(path, flag)}


def sample(instructions: Sequence[str], count: int, seed: int, task: str) -> list[str]:
    """One instruction per input, uniformly and independently, as training draws them: a pure
    function of (seed, task), and the first k of `count` choices do not depend on `count`."""
    if not instructions:
        raise UsageError(f"no {task} instructions to sample from; give at least one")
    u = np.random.default_rng([int(seed), 2, TASKS.index(task)]).random(count)
    return [instructions[i] for i in (u * len(instructions)).astype(np.int64)]


# ---------------------------------------------------------------- LLM-CXR's own lists
def extract_original(repo: str) -> dict[str, tuple[str, ...]]:
    """{"report": ..., "image": ...} read from REPO/training/mimiccxr_vq_dataset.py without running it.

    Each name must be bound exactly once at module level to a literal list of string literals and
    not changed there afterwards (+=, .append, item assignment); anything else is refused.
    """
    if not os.path.isdir(repo):
        raise MissingInputError(f"--original-repo {repo} is not a folder; give the root of a clone of LLM-CXR "
                                "(github.com/hyn2028/llm-cxr)")
    path = os.path.join(repo, ORIGINAL_SOURCE)
    if not os.path.isfile(path):
        raise MissingInputError(f"{repo} has no {ORIGINAL_SOURCE}; give the root of a clone of LLM-CXR "
                                "(github.com/hyn2028/llm-cxr), the folder that holds training/")
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)  # parses only; the module is never imported or executed
    except (SyntaxError, ValueError) as e:
        raise UsageError(f"{path} is not Python that parses ({e}); give the file as LLM-CXR ships it") from None
    return {task: _literal_list(tree, name, path) for task, name in ORIGINAL_NAMES.items()}


_MUTATORS = ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__setitem__", "__iadd__")


def _literal_list(tree: ast.Module, name: str, path: str) -> tuple[str, ...]:
    binds = [s for s in tree.body if name in _bound_names(s)]
    if not binds:
        raise UsageError(f"{path} assigns no module-level {name}; give LLM-CXR's file, which defines it")
    if len(binds) > 1:
        lines = ", ".join(str(s.lineno) for s in binds)
        raise UsageError(f"{path} binds {name} {len(binds)} times (lines {lines}); keep the one literal list")
    stmt = binds[0]
    single = isinstance(stmt, (ast.Assign, ast.AnnAssign)) and _single_target(stmt, name)
    value = stmt.value if single else None
    if not isinstance(value, ast.List):
        what = type(value).__name__ if single else "Statement"
        raise UsageError(f"{path} line {stmt.lineno}: {name} is bound to {_describe(what)}, not a literal list "
                         "of strings; only `NAME = [\"...\", ...]` is read (nothing is run)")
    items = []
    for e in value.elts:
        if not (isinstance(e, ast.Constant) and isinstance(e.value, str)):
            raise UsageError(f"{path} line {e.lineno}: an item of {name} is {_describe(type(e).__name__)}, not a "
                             "string literal; only literal strings are read (nothing is run)")
        items.append(e.value)
    for s in tree.body:
        if s is not stmt and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and _mutates(s, name):
            raise UsageError(f"{path} line {s.lineno}: {name} is changed at module level after its literal; "
                             "the list that runs would differ from the literal, so it is not read")
    if not items:
        raise UsageError(f"{path} line {stmt.lineno}: {name} is an empty list; give LLM-CXR's file")
    return tuple(items)


def _bound_names(stmt: ast.stmt) -> set[str]:
    """Module-level names a top-level statement (re)binds or deletes."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}


def _single_target(stmt: ast.Assign | ast.AnnAssign, name: str) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return all(isinstance(t, ast.Name) and t.id == name for t in targets)


def _mutates(stmt: ast.stmt, name: str) -> bool:
    """A module-level statement (class bodies included: they run at import) that changes name's list."""
    for n in ast.walk(stmt):
        if isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.value, ast.Name) and n.value.id == name:
            if isinstance(n.ctx, (ast.Store, ast.Del)) or (isinstance(n, ast.Attribute) and n.attr in _MUTATORS):
                return True
    return False


def _describe(node_type: str) -> str:
    names = {"ListComp": "a list comprehension", "Name": "another name", "Call": "a function call",
             "BinOp": "an expression", "Tuple": "a tuple", "JoinedStr": "an f-string", "Constant": "a constant",
             "Subscript": "a subscript", "Starred": "an unpacking", "NoneType": "no value",
             "Statement": "a statement other than `NAME = [...]`"}
    return names.get(node_type, f"an expression ({node_type})")


def write_instructions(lists: dict[str, Sequence[str]], out: str) -> dict[str, str]:
    """OUT/report_instructions.txt and OUT/image_instructions.txt, one instruction per line; each
    file reads back (load_instructions) exactly. Returns {task: path}."""
    for task, items in lists.items():
        for i, s in enumerate(items):
            check_instruction(s, f"{task} instruction {i}")
            if "\n" in s or "\r" in s or s != s.strip() or (i == 0 and s.startswith("[")):
                raise UsageError(f"{task} instruction {i} ({s[:40]!r}...) has a line break, surrounding whitespace "
                                 "or (first) a leading '[', which a one-per-line file cannot keep; write a JSON list")
    os.makedirs(out, exist_ok=True)
    paths = {}
    for task, items in lists.items():
        paths[task] = os.path.join(out, FILE_NAMES[task])
        with open(paths[task], "w", encoding="utf-8", newline="\n") as f:
            f.writelines(s + "\n" for s in items)
    return paths
