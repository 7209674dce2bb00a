"""The model-outage hold: while the model server is away, taken tasks wait in place and intake stops.

A model server that restarts (OOM kill, crash, rollout, an LLM reloading its weights) is the most common
incident of an async-inference pod. Spending the retry budget on it failed a third of the traffic of a 90 s
outage. Instead, as a careful operator would do by hand:

1. **Detect** from the work itself: a task whose model call fails as an outage would (refused, reset
   before any answer, connect timeout, or a proxy's 502/503/504 with no body) probes the readiness URL
   once; if that fails too, it marks the model away for the whole worker (``ModelOutage.mark_away``).
2. **Stop intake**: the main process's consumer cancels its queue while the model is away and consumes it
   again once it is back (``extensions.model_outage``), so what is not taken stays in the broker for
   replicas whose model is up.
3. **Hold** what was taken: the task waits in place (``ModelOutage.wait``), using neither a Celery retry
   nor the retry budget, and calls the model again once it is back. After ``FORWARDER_MODEL_OUTAGE_MAX``
   seconds of waiting, or at once when a warm shutdown starts, it is handed back to the queue unrun.
4. **Watch**: one poller in the main process (``OutageWatcher``) probes the readiness URL every
   ``POLL_INTERVAL`` while the model is away, and logs one WARNING when an outage starts and one INFO line
   when it ends.

The state lives in shared memory created before prefork forks its children, so a child's failure reaches
the main process (which consumes) and the main process's "back" reaches every child; under gevent it is
the same memory in one process.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable

from celery.exceptions import Reject
from celery.utils.dispatch import Signal

logger = logging.getLogger(__name__)

#: Seconds between readiness probes while the model is away, and between looks at the state by a waiting task.
POLL_INTERVAL = 0.5
#: Bytes of the reason kept for the log line (the first failure's error text).
REASON_BYTES = 300

_AWAY_SINCE, _STOPPING, _WAITING = 0, 1, 2

STARTED, ENDED = "started", "ended"
#: Sent by the main process's watcher as an outage starts and ends: ``event`` (STARTED or ENDED) and
#: ``seconds`` (the outage's length; 0 at its start). The metrics and the readiness probe listen.
outage_changed = Signal(name="forwarder.model_outage_changed")


class ModelOutage:
    """Whether the model is away, shared by the main process and prefork's children (created before fork)."""

    def __init__(self, max_wait: float, poll_interval: float = POLL_INTERVAL) -> None:
        self.max_wait = max_wait
        self.poll_interval = poll_interval
        # [wall time the outage started (0: the model is available), warm shutdown started (0/1), tasks waiting]
        self._state = multiprocessing.Array("d", 3)
        self._reason = multiprocessing.Array(ctypes.c_char, REASON_BYTES)

    # ---------------------------------------------------------------------------------- the state

    @property
    def away(self) -> bool:
        return self._state[_AWAY_SINCE] > 0

    @property
    def away_since(self) -> float:
        """Wall time the current outage started; 0 when the model is available."""
        return self._state[_AWAY_SINCE]

    @property
    def waiting(self) -> int:
        """Tasks waiting for the model now, in every process of this worker."""
        return int(self._state[_WAITING])

    @property
    def reason(self) -> str:
        return self._reason.value.decode("utf-8", "replace")

    @property
    def stopping(self) -> bool:
        return self._state[_STOPPING] > 0

    def mark_away(self, reason: str) -> bool:
        """The model is away (first call of an outage wins); returns whether this call started the outage."""
        with self._state.get_lock():
            if self._state[_AWAY_SINCE] > 0:
                return False
            self._reason.value = reason.encode("utf-8", "replace")[: REASON_BYTES - 1]
            self._state[_AWAY_SINCE] = time.time()
            return True

    def mark_back(self) -> float:
        """The model answers ready again; returns how long it was away (seconds, 0 if it was not)."""
        with self._state.get_lock():
            since = self._state[_AWAY_SINCE]
            self._state[_AWAY_SINCE] = 0.0
        return max(0.0, time.time() - since) if since else 0.0

    def mark_stopping(self) -> None:
        """A warm shutdown started: waiting tasks go back to the queue now."""
        self._state[_STOPPING] = 1.0

    # ------------------------------------------------------------------------------ the task side

    def wait(self, task_id: str, waited: float = 0.0, check: Callable[[], None] | None = None) -> float:
        """Wait in place while the model is away; returns the seconds this task has now waited in all.

        ``waited``: seconds the task already waited in earlier holds (the limit is on the total).
        ``check``: called at every look, may raise to end the wait (a request that expired meanwhile).

        Raises:
            Reject: handed back to the queue (requeue) after ``max_wait`` seconds in all, or at once when
                a warm shutdown starts.
        """
        if not self.away:
            return waited
        started = time.monotonic()
        self._add_waiting(1)
        try:
            while self.away:
                total = waited + time.monotonic() - started
                if self.stopping:
                    raise Reject("worker shutting down while the model server is away: handed back to the queue",
                                 requeue=True)
                if total >= self.max_wait:
                    logger.warning("task %s waited %.0f s for the model server (FORWARDER_MODEL_OUTAGE_MAX=%g): "
                                   "handed back to the queue", task_id, total, self.max_wait)
                    raise Reject(f"waited {total:.0f} s for the model server: handed back to the queue", requeue=True)
                if check is not None:
                    check()
                time.sleep(self.poll_interval)
        finally:
            self._add_waiting(-1)
        return waited + time.monotonic() - started

    def _add_waiting(self, delta: int) -> None:
        with self._state.get_lock():
            self._state[_WAITING] = max(0.0, self._state[_WAITING] + delta)


class OutageWatcher:
    """The main process's poller: while the model is away, probe its readiness until it answers; log both ends.

    A thread (a greenlet under gevent, whose monkey-patching makes ``threading`` cooperative): a readiness
    probe may take up to the connect timeout, which must not stall the consumer's event loop.
    """

    def __init__(self, outage: ModelOutage, is_ready: Callable[[], tuple[bool, str]], healthcheck_url: str) -> None:
        self.outage = outage
        self.is_ready = is_ready
        self.healthcheck_url = healthcheck_url
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_outage = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-outage-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.outage.poll_interval):
            try:
                self.tick()
            except Exception as exc:  # the watcher must outlive any one failure, or held tasks wait forever
                logger.error("model outage watcher: %s: %s", type(exc).__name__, exc)

    def tick(self) -> None:
        """One look: announce a new outage, or probe an ongoing one and end it when the model is ready."""
        if not self.outage.away:
            return
        if not self._in_outage:
            self._in_outage = True
            logger.warning("model server unreachable (%s): intake paused; tasks taken wait for it in place "
                           "(at most %g s each), readiness polled at %s every %g s",
                           self.outage.reason, self.outage.max_wait, self.healthcheck_url, self.outage.poll_interval)
            self._notify(STARTED, 0.0)
        ready, _seen = self.is_ready()
        if ready:
            waiting = self.outage.waiting
            seconds = self.outage.mark_back()
            self._in_outage = False
            logger.info("model server back after %.1f s: intake resumed, %d waiting task(s) released", seconds, waiting)
            self._notify(ENDED, seconds)

    def _notify(self, event: str, seconds: float) -> None:
        for receiver, error in outage_changed.send_robust(sender=self, event=event, seconds=seconds):
            if isinstance(error, Exception):  # a receiver (metrics, probe file) must never stop the watcher
                logger.warning("outage receiver %s failed: %s: %s", receiver, type(error).__name__, error)
