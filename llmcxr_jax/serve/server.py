"""Starting `llmcxr serve`: check that gradio is installed, load the model (a bad checkpoint fails
here, in one line), open the page while it says the sampler compiles, compile every task, then
serve until stopped."""
from __future__ import annotations

import dataclasses
import socket
import sys
from collections.abc import Callable

from llmcxr_jax import api
from llmcxr_jax.errors import UsageError
from llmcxr_jax.serve.session import Session


def _log(line: str) -> None:
    print(f"[serve] {line}", file=sys.stderr, flush=True)


def require_gradio() -> None:
    """gradio is the optional `[serve]` extra: without it, one line saying how to install it."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web demo needs gradio; pip install 'llmcxr-jax[serve]'") from None


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the page could not listen on host:port."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a listener still blocks
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); give another --port "
                         "(or --host)") from None


@dataclasses.dataclass
class Server:
    """A running page: its address, its model session and the gradio app behind it."""

    url: str
    session: Session
    app: object  # gradio.Blocks

    def block(self) -> None:
        """Serve until interrupted (Ctrl-C), then close."""
        self.app.block_thread()

    def close(self) -> None:
        self.app.close()


def start(ckpt: str, vqgan: str, *, host: str = "127.0.0.1", port: int = 7860, dtype: str = "float32",
          log: Callable[[str], None] = _log) -> Server:
    """Load, open the page, compile every task, and return once the page is ready. The page answers
    from the start: its status line reads "Compiling ..." and its buttons stay off until then."""
    require_gradio()
    check_port(host, port)
    generator = api.Generator.from_checkpoints(ckpt, vqgan, dtype=dtype)
    log(f"loaded {ckpt} ({dtype}) and {vqgan}: {generator.resolution} px CXRs, {generator.codes_per_image} codes "
        f"each; prompts padded to {generator.batch.prompt_width} tokens")
    session = Session(generator)
    from llmcxr_jax.serve import app as page

    blocks = page.build(session)
    blocks.queue(default_concurrency_limit=1)
    _, url, _ = blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                              theme=page.THEME, footer_links=["api"])
    log(f"page open at {url}; it says when the sampler is compiled")
    try:
        session.warm_up(log)
    except BaseException:
        blocks.close()
        raise
    log(f"ready: {url}")
    return Server(url, session, blocks)
