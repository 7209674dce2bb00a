"""Health files for the Kubernetes probes: a heartbeat from the consumer's loop, a ready mark, a stopping mark.

The heartbeat is a timer entry on the consumer's timer (``c.timer``), never a thread of its own, which
would keep beating while the worker is stuck:

- prefork: ``c.timer`` is the timer of kombu's event loop (the Hub) the main process runs
  (``celery.worker.loops.asynloop``); the beat fires only when that loop turns. Tasks run in the
  children, so a busy worker keeps beating; a stopped (SIGSTOP) or blocked main process does not.
- gevent: ``c.timer`` is Celery's gevent timer (``celery.concurrency.gevent.Timer``): each entry is a
  greenlet the gevent hub runs. Tasks waiting on the model yield to the hub, so a worker whose every
  slot is busy keeps beating (its consumer greenlet may itself be parked in the pool's ``spawn``,
  waiting for a free slot: that is busy, not hung). A greenlet that blocks the hub (CPU, a blocking
  C call), or a stopped process, stops the beat.

The files and the probes that read them: ``forwarder.health``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from forwarder.extensions.base import Extension, RepeatingStep, add_step
from forwarder.health import HealthFiles, beat_interval
from forwarder.settings import Settings

logger = logging.getLogger(__name__)


class Heartbeat(RepeatingStep):
    """Consumer step: refresh the ``live`` file at once, then every ``beat_interval`` seconds (owner: ``HealthProbes``)."""

    owner: HealthProbes | None

    def interval(self, c: Any) -> float:
        return self.owner.beat_interval if self.owner is not None else 0.0

    def start(self, c: Any) -> None:
        self.tick(c)
        super().start(c)

    def tick(self, c: Any) -> None:
        """One heartbeat; never raises (a full disk is logged; the probe then fails, which is right)."""
        if self.owner is None:
            return
        try:
            self.owner.files.beat()
        except OSError as exc:
            logger.warning("heartbeat for the liveness probe failed: %s: %s", type(exc).__name__, exc)


class HealthProbes(Extension):
    """Write the files ``python -m forwarder probe live|ready`` reads (main process only)."""

    def install(self, app: Celery, settings: Settings) -> None:
        self.files = HealthFiles(settings.health_dir)
        self.main_pid = os.getpid()  # prefork children are forked later: their process hooks do nothing
        self.beat_interval = beat_interval(settings.liveness_max_age)
        add_step(app, Heartbeat, self)
        # The earliest sign of a warm shutdown: sent from Celery's SIGTERM/SIGINT/SIGQUIT handler.
        signals.worker_shutting_down.connect(self._shutting_down, weak=False, dispatch_uid="forwarder.probes.stopping")

    def process_start(self) -> None:
        if os.getpid() == self.main_pid:
            self.files.reset()

    def process_ready(self) -> None:
        self.files.mark_ready()

    def process_stop(self) -> None:
        if os.getpid() == self.main_pid:
            self.files.mark_stopped()

    def _shutting_down(self, **_: Any) -> None:
        try:
            self.files.mark_stopping()
        except OSError as exc:
            logger.warning("marking the worker not ready failed: %s: %s", type(exc).__name__, exc)
