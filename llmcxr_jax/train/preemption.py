"""SIGTERM (preemption, `tpu_pod.py stop`, SLURM's forwarded signal) -> every process stops at the same step,
so the checkpoint save that follows, a collective, starts in all of them. Both trainers use `StopAgreement`.
"""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopAgreement:
    """Made just before a training loop (`close()` after it); `reached(step)` once after every step, in every
    process: True at the same step everywhere once any process has been sent SIGTERM.

    * One process: a Python SIGTERM handler sets a flag that `reached` reads. No collective.
    * Several processes under jax.distributed (the default): JAX's preemption sync manager. jax.distributed
      installs its own SIGTERM notifier (a C++ handler: a Python handler would replace it, so none is
      installed here); on a notice the coordination service collects every process's last step and sets
      the stop at (the furthest one) + 1, which `reached` reports. No per-step collective; a SIGTERM during
      the first step's compilation stops the run after that step. One sent before this object exists makes the
      stop step 1: honoured by a fresh run, already past for a resumed one (which then runs on until the
      launcher's SIGKILL, as a SIGTERM before the loop always did). orbax's CheckpointManager.save queries
      the same sync point with the same step numbers.
    * Several processes with jax_enable_preemption_service off (or without a jax.distributed client): the
      Python flag is OR-ed over processes by one scalar allgather after every step (every step, not every
      N: a notice gives ~30 s and a step of a large model can take seconds).
    """

    def __init__(self, start_step: int):
        self.start_step = int(start_step)
        self.mode = "local"
        if jax.process_count() > 1:
            sync = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
            self.mode = "sync" if sync else "allgather"
        self.stopped = False
        self._signalled = False
        self._previous = None
        if self.mode == "sync":
            # the protocol starts from each process's last reported step; unreported, it is 0 (past, on resume)
            multihost_utils.reached_preemption_sync_point(self.start_step)
        else:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_) -> None:
        self._signalled = True

    def close(self) -> None:
        """Put back the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def reached(self, step: int) -> bool:
        """Call once per step with the global step just finished; the same answer in every process."""
        if not self.stopped:
            if self.mode == "local":
                self.stopped = self._signalled
            elif self.mode == "sync":
                self.stopped = multihost_utils.reached_preemption_sync_point(int(step))
            else:
                self.stopped = bool(np.any(multihost_utils.process_allgather(np.int32(self._signalled))))
        return self.stopped
