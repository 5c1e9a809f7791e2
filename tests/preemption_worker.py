"""One process of tests/test_preemption.py: steps of a loop kept in lockstep by a collective, as training
steps are, with StopAgreement after each; process 0 sends itself SIGTERM after step SIGNAL_STEP (before
the first step when that is START_STEP, while the others stand for compiling it).

Run as `python tests/preemption_worker.py START_STEP SIGNAL_STEP`; prints `stopped STEP mode MODE` or `never`.
"""
import os
import signal
import sys
import time

# First, before anything touches a JAX backend.
from llmcxr_jax.distributed import initialize_distributed

initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from llmcxr_jax.train.preemption import StopAgreement  # noqa: E402


def _sigterm_process0() -> None:
    if jax.process_index() == 0:
        os.kill(os.getpid(), signal.SIGTERM)


def main(start: int, signal_step: int) -> None:
    stop = StopAgreement(start)
    try:
        if signal_step == start:
            _sigterm_process0()
        time.sleep(2.0)  # compiling the first step (the notifier wakes up to 1 s late)
        for step in range(start + 1, start + 300):
            if jax.process_count() > 1:  # stands in for the train step's collectives
                multihost_utils.process_allgather(np.int32(step))
            time.sleep(0.02)
            if step == signal_step:
                _sigterm_process0()
            if stop.reached(step):
                print(f"stopped {step} mode {stop.mode}", flush=True)
                return
        print(f"never mode {stop.mode}", flush=True)
    finally:
        stop.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
