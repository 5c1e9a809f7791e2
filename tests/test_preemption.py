"""train/preemption.py: SIGTERM to one process stops every process at the same step, through JAX's
preemption sync manager (the default under jax.distributed) or, with that service off, a per-step
allgather of the flag; one process reads its own flag and runs no collective."""
import os
import signal
import subprocess
import sys

import portpicker
import pytest
from jax.experimental import multihost_utils

from llmcxr_jax.train import preemption

WORKER = os.path.join(os.path.dirname(__file__), "preemption_worker.py")


def _run(processes: int, start: int, signal_step: int, **env) -> list[str]:
    port = portpicker.pick_unused_port()
    base = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", **env)
    if processes > 1:
        base.update(LLMCXR_COORDINATOR=f"localhost:{port}", LLMCXR_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, WORKER, str(start), str(signal_step)],
                              env=dict(base, LLMCXR_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    lines = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung")
        assert p.returncode == 0, err[-2000:]
        lines.append(out.strip().splitlines()[-1])
    return lines


def test_sync_manager_stops_every_process_at_one_step():
    a, b = _run(2, start=100, signal_step=103)
    assert a == b and a.startswith("stopped") and a.endswith("mode sync"), (a, b)
    assert 103 <= int(a.split()[1]) < 399


def test_sync_manager_counts_a_signal_before_the_first_step_from_the_resumed_step():
    # unreported, each process's step would be 0 and the stop (0 + 1) long past
    a, b = _run(2, start=100, signal_step=100)
    assert a == b and a.startswith("stopped") and a.endswith("mode sync"), (a, b)
    assert 101 <= int(a.split()[1]) <= 110


def test_allgather_fallback_stops_every_process_at_the_signalled_step():
    assert _run(2, start=0, signal_step=3, JAX_ENABLE_PREEMPTION_SERVICE="false") == ["stopped 3 mode allgather"] * 2


def test_one_process_reads_its_own_flag_without_a_collective(monkeypatch):
    def no_collective(*_):
        raise AssertionError("a collective in a one-process run")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_collective)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no_collective)
    before = signal.getsignal(signal.SIGTERM)
    stop = preemption.StopAgreement(7)
    try:
        assert stop.mode == "local" and not stop.reached(8)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.reached(9) and stop.reached(10)  # stays stopped
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before
