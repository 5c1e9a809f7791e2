"""pytest hooks (imported by tests/conftest.py): with CI=true a parity test cannot pass by skipping.

A skip of a test marked `torch` (pytest.ini), or any skip whose reason says a PyTorch-side library is
missing (pytest.importorskip's "could not import 'torch'", or the torchxrayvision fixture's
"torchxrayvision is not installed", also when a whole module skips at collection), or that the web
demo's gradio, playwright or chromium is missing, is reported as a failure when CI is set. Other
skips (libtpu, tensorflow_datasets, scikit-image) stay skips."""
import os
import re

import pytest

# The libraries the parity tests compare against; omegaconf loads taming's configs.
TORCH_FAMILY = ("torch", "transformers", "diffusers", "taming", "torchxrayvision", "omegaconf")
_NAMES = "|".join(TORCH_FAMILY)
# The web demo's tests: install.sh installs gradio, playwright and (as root) Debian's chromium.
WEB_DEMO = ("gradio", "playwright")
_WEB = "|".join(WEB_DEMO)
_REASON = re.compile(rf"could not import '({_NAMES}|{_WEB})[.']|\b({_NAMES}|{_WEB}) is not installed"
                     r"|chromium is absent")


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"CI=true: {what} skipped ({_reason(report)}); parity tests must run in CI"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail") and ci() and (
            item.get_closest_marker("torch") is not None or _REASON.search(_reason(report))):
        _fail(report, f"{item.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.skipped and ci() and _REASON.search(_reason(report)):
        _fail(report, f"collection of {collector.nodeid}")
