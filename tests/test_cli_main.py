"""`llmcxr`'s error contract: a UsageError (bad input) and an operating-system error are one line
on stderr with exit 2; any other exception is a defect and reaches the caller with its traceback."""
import importlib

import pytest

from llmcxr_jax.cli import data as data_family
from llmcxr_jax.errors import MissingInputError, UsageError

cli_main = importlib.import_module("llmcxr_jax.cli.main")  # the module; llmcxr_jax.cli.main is main()


def _raising(monkeypatch, exc):
    def synth(args):
        raise exc

    command = data_family.commands.by_name["synth"]
    monkeypatch.setitem(data_family.commands.by_name, "synth", command._replace(run=synth))


@pytest.mark.parametrize("exc, line", [
    (UsageError("--num-images -1 is negative; give a count"), "--num-images -1 is negative; give a count"),
    (MissingInputError("x.jpg does not exist"), "x.jpg does not exist"),
    (FileExistsError(17, "File exists", "/tmp/out"), "/tmp/out: File exists; give a new directory path"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, exc, line):
    _raising(monkeypatch, exc)
    assert cli_main.main(["synth", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err == f"llmcxr synth: error: {line}\n"


@pytest.mark.parametrize("exc", [KeyError("params"), ValueError("operands could not be broadcast"),
                                 TypeError("unhashable type: 'list'"), AttributeError("no attribute 'astype'")])
def test_defects_keep_their_traceback(monkeypatch, exc):
    _raising(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli_main.main(["synth", "--out", "unused"])


def test_python_dash_m_runs_the_same_entry_point():
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["llmcxr", "--help"]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_module("llmcxr_jax.cli", run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
