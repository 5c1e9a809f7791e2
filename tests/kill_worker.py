"""The `llmcxr` command, frozen at a chosen point so that a test's SIGKILL lands exactly there
(tests/test_lm_signals.py, tests/test_vqgan_signals.py). Run as `python tests/kill_worker.py ARGS...`,
the same as `python -m llmcxr_jax.cli ARGS...`, with one of:

- KILL_PAUSE_AT_LOG=N: once metrics.jsonl holds the record of step N, the training loop sleeps for
  good (an asynchronous checkpoint save already under way goes on in its background thread);
- KILL_HANG_COMMIT=N: the asynchronous save of step N writes all its files into orbax's temporary
  directory, then never commits (renames) it; the loop trains on until its next save waits for it.

When frozen it creates the file KILL_MARKER (its text: the step). Nothing of the library changes.
"""
import os
import sys
import threading
import time

from orbax.checkpoint._src.checkpointers import async_checkpointer

from llmcxr_jax.cli.main import main
from llmcxr_jax.train import metrics


def _frozen(step: int) -> None:
    with open(os.environ["KILL_MARKER"] + ".tmp", "w") as f:
        f.write(str(step))
    os.replace(os.environ["KILL_MARKER"] + ".tmp", os.environ["KILL_MARKER"])
    while True:
        time.sleep(3600)


def _pause_after_log(step_to_pause: int) -> None:
    write = metrics.MetricsLog.write

    def paused_write(self, step, values, echo=True):
        write(self, step, values, echo=echo)
        if step == step_to_pause and threading.current_thread() is threading.main_thread():
            _frozen(step)

    metrics.MetricsLog.write = paused_write


def _hang_commit(step_to_hang: int) -> None:
    commit = async_checkpointer._on_commit_callback

    def hung_commit(tmpdir, *args, **kwargs):
        if tmpdir.get_final().name == str(step_to_hang):
            _frozen(step_to_hang)
        return commit(tmpdir, *args, **kwargs)

    async_checkpointer._on_commit_callback = hung_commit


def kill_when_frozen(proc, marker: str, ready, what: str, timeout: float) -> None:
    """The test side: wait until the child froze (its marker file) and ready() holds, then SIGKILL it
    and require return code -9; an early exit or a child that never froze fails the test."""
    import signal

    deadline = time.time() + timeout
    while not (os.path.isfile(marker) and ready()):
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{what}: the child never froze where the kill must land")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


if __name__ == "__main__":
    if os.environ.get("KILL_PAUSE_AT_LOG"):
        _pause_after_log(int(os.environ["KILL_PAUSE_AT_LOG"]))
    if os.environ.get("KILL_HANG_COMMIT"):
        _hang_commit(int(os.environ["KILL_HANG_COMMIT"]))
    sys.exit(main(sys.argv[1:]))
