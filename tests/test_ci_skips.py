"""tests/ci_skips.py: with CI=true a skipped torch parity test or web-demo test fails the run; without CI,
or for a skip that is not about a PyTorch-side library or the web demo's tools, a skip stays a skip. Each
case runs a small pytest session."""
import sys

import pytest

pytest_plugins = ["pytester"]

_INI = """[pytest]
markers =
    torch: compares against PyTorch libraries
"""
_CONFTEST = "from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"
_TESTS = '''
import pytest

@pytest.mark.torch
def test_marked_skip():
    pytest.skip("no GPU here")

def test_importorskip_torch():
    pytest.importorskip("torch")

def test_fixture_txv():
    pytest.skip("torchxrayvision is not installed (pip install --no-deps torchxrayvision==1.5.7)")

def test_chromium_skip():
    pytest.skip("/usr/bin/chromium is absent; install.sh installs Debian's chromium for the browser test")

def test_gradio_skip():
    pytest.skip("gradio is not installed (pip install 'llmcxr-jax[serve]')")

def test_other_skip():
    pytest.skip("libtpu not installed")

def test_other_importorskip():
    pytest.importorskip("tensorflow_datasets_not_here")

@pytest.mark.torch
@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

def test_passes():
    pass
'''


@pytest.fixture
def project(pytester):
    pytester.makefile(".ini", pytest=_INI)
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_parity=_TESTS)
    return pytester


def _run(pytester, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # torch is importable here: pretend it is not, as on a runner without it
    monkeypatch.setitem(sys.modules, "torch", None)
    return pytester.runpytest("-p", "no:cacheprovider", "-rfs")


def test_ci_turns_torch_skips_into_failures(project, monkeypatch):
    result = _run(project, monkeypatch, "true")
    result.assert_outcomes(failed=5, skipped=2, xfailed=1, passed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_marked_skip*", "*FAILED*test_importorskip_torch*",
                                 "*FAILED*test_fixture_txv*", "*FAILED*test_chromium_skip*",
                                 "*FAILED*test_gradio_skip*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_without_ci_skips_stay_skips(project, monkeypatch):
    result = _run(project, monkeypatch, None)
    result.assert_outcomes(skipped=7, xfailed=1, passed=1)
    assert result.ret == pytest.ExitCode.OK
    assert _run(project, monkeypatch, "false").ret == pytest.ExitCode.OK


def test_ci_fails_a_module_that_skips_at_collection(pytester, monkeypatch):
    pytester.makefile(".ini", pytest=_INI)
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_mod="import pytest\ntorch = pytest.importorskip('torch')\n\ndef test_a():\n    pass\n",
                        test_tpu="import pytest\npytest.importorskip('libtpu_not_here')\n\ndef test_b():\n"
                                 "    pass\n")
    result = _run(pytester, monkeypatch, "true")
    result.assert_outcomes(errors=1, skipped=1)
    result.stdout.fnmatch_lines(["*ERROR*test_mod.py*"])
    assert result.ret != pytest.ExitCode.OK
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
