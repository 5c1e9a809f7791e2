"""The house as docs/layout.md draws it: every module says what it owns, its code map is
demo/phases.py's table, and each phase names a real command and real modules."""
import ast
import importlib
import os
import re

from llmcxr_jax.demo import phases

cli_main = importlib.import_module("llmcxr_jax.cli.main")  # the module; llmcxr_jax.cli.main is main()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llmcxr_jax")


def _modules():
    for d, _, names in os.walk(PACKAGE):
        for n in sorted(names):
            if n.endswith(".py"):
                yield os.path.join(d, n)


def test_every_module_opens_with_a_docstring():
    missing = []
    for path in _modules():
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if not doc or len(doc.split()) < 5:
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, f"modules without a docstring saying what they own: {missing}"


def test_layout_doc_code_map_is_the_phase_table():
    with open(os.path.join(ROOT, "docs", "layout.md")) as f:
        readme = f.read()
    assert phases.code_map() in readme, "docs/layout.md code map differs from demo/phases.py: paste code_map() into it"


def test_each_phase_names_real_commands_and_modules():
    commands = {name for family in cli_main.FAMILIES for name in family.commands.by_name}
    for p in phases.PHASES:
        named = re.findall(r"(?:llmcxr )?([a-z][a-z0-9-]+)", p.command.replace("llmcxr", "")) \
            if p.command.startswith("llmcxr") else []
        assert set(named) <= commands, (p.name, named)
        for module in p.module.split(","):
            assert os.path.isfile(os.path.join(PACKAGE, module.strip())), (p.name, module)


def test_every_command_is_in_exactly_one_family():
    seen = [name for family in cli_main.FAMILIES for name in family.commands.by_name]
    assert len(seen) == len(set(seen))
    assert {"synth", "train-vqgan", "encode-images", "train", "generate", "evaluate", "import-hf", "export-hf",
            "import-vqgan", "export-vqgan", "export", "compile-check", "extract-instructions", "demo"} <= set(seen)
    assert "extract-instructions" in cli_main.data.commands.by_name  # a data command: it writes input files
