"""Stop at the same step on every process when any of them is told to stop (SIGTERM, or a TPU
maintenance / preemption notice), so all save one consistent checkpoint and exit cleanly.

Distributed runs (``jax.distributed.initialize``, one process or many) use JAX's preemption service:
it catches SIGTERM in any process, agrees on a step in the background through the coordination
service, and ``reached_preemption_sync_point(step)`` turns true at that step on every process, without
a collective per step. A Python SIGTERM handler would replace the service's, so none is installed
then. A plain single-process run catches SIGTERM itself.
"""
from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger(__name__)


def _preemption_service_running() -> bool:
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionWatch:
    """``with PreemptionWatch() as stop: ... if stop.reached(step): save and exit``. Call ``reached``
    after every step, with the step just completed, on every process."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self.service = _preemption_service_running()

    def __enter__(self):
        if self.service:
            return self
        if jax.process_count() > 1:
            raise RuntimeError("a multi-process run needs JAX's preemption service (jax.distributed.initialize "
                               "with jax_enable_preemption_service on) to stop all processes at one step")
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the run still works
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.signalled = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether this is the step at which every process stops (and saves)."""
        if self.service:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signalled
