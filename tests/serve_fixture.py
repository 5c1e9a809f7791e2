"""`llmcxr serve` over the quick demo's model, started once per test process on 127.0.0.1 (a free
port) and compiled once, for tests/test_serve.py (gradio_client) and tests/test_serve_browser.py
(headless Chromium). It records the console lines the server printed."""
from __future__ import annotations

import dataclasses
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Served:
    url: str
    session: object  # llmcxr_jax.serve.session.Session
    log: list[str]  # what `llmcxr serve` printed, in order


@pytest.fixture(scope="session")
def served(quick_demo):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'llmcxr-jax[serve]')")
    from llmcxr_jax.serve import server

    log: list[str] = []
    running = server.start(quick_demo.ckpt, quick_demo.vqgan, host="127.0.0.1", port=free_port(), log=log.append)
    yield Served(running.url, running.session, log)
    running.close()
