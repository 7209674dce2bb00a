"""Stop taking messages while the model server is away, and start again the moment it is back.

The state and the hold are ``forwarder.model_outage``; this wires them into the worker's main process:

- ``IntakeControl``, a consumer step, looks at the shared state every ``INTAKE_INTERVAL`` seconds on the
  consumer's own timer (prefork: kombu's event loop; gevent: a timer greenlet) and cancels the task queue
  while the model is away, then consumes it again (Celery's ``Consumer.cancel_task_queue`` and
  ``add_task_queue``, what the ``cancel_consumer``/``add_consumer`` remote commands run; they work without
  remote control, which SQS cannot have). kombu's Redis transport defers a cancel that lands during a BRPOP
  until the read completes, and a message that still arrives for a cancelled queue is handed back. Only a
  running consumer with a live connection is touched; after a broker reconnect Celery rebuilds it from the
  selected queues, which the cancel deselected, so it stays paused until the model is back.
- ``OutageWatcher`` probes readiness while the model is away and ends the outage; it marks ``probe ready``
  failing in between. A warm shutdown hands waiting tasks back at once (``ModelOutage.mark_stopping``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker import state as worker_state

from forwarder.extensions.base import Extension, RepeatingStep, add_step
from forwarder.health import HealthFiles
from forwarder.model_outage import STARTED, ModelOutage, OutageWatcher, outage_changed
from forwarder.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds between looks at the shared state by the consumer (a memory read).
INTAKE_INTERVAL = 0.25


class IntakeControl(RepeatingStep):
    """Consumer step: consume the task queue only while the model is available (owner: ``PauseIntakeWhileModelAway``)."""

    owner: PauseIntakeWhileModelAway | None

    def interval(self, c: Any) -> float:
        return INTAKE_INTERVAL if self.owner is not None and self.owner.watcher is not None else 0.0

    def start(self, c: Any) -> None:
        if self.owner is not None and self.owner.watcher is not None:
            self.owner.watcher.start()
        super().start(c)

    def tick(self, c: Any) -> None:
        self.reconcile(c)

    def reconcile(self, c: Any) -> None:
        """Cancel the queue when the model goes away, add it back when it returns: only what this step did.

        Acts only while the consumer runs with a live connection: during a broker reconnect Celery rebuilds
        the task consumer from the selected queues itself (without ours while paused), and touching it then
        would race the rebuild.
        """
        owner = self.owner
        if owner is None or owner.outage is None or worker_state.should_stop is not None:
            return
        if c.connection is None or c.task_consumer is None or getattr(c.blueprint, "state", None) != bootsteps.RUN:
            return
        away = owner.outage.away
        try:
            if away and not owner.paused:
                c.cancel_task_queue(owner.queue)
                owner.paused = True
            elif not away and owner.paused:
                c.add_task_queue(owner.queue)
                owner.paused = False
        except (*c.connection_errors, *c.channel_errors) as exc:  # a broker blip: the next look tries again
            logger.warning("intake control: %s: %s", type(exc).__name__, exc)
        except Exception:  # a bug: said loudly, but the timer (and so intake control) must keep running
            logger.exception("intake control failed")


class PauseIntakeWhileModelAway(Extension):
    """Wire the outage hold into the main process (see the module docstring)."""

    watcher: OutageWatcher | None = None
    #: Whether IntakeControl cancelled the queue (kept here: Celery may rebuild the step on a reconnect).
    paused = False

    def __init__(self, outage: ModelOutage | None = None, model_ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        """``outage``: the shared state (``forwarder.deps`` builds it); ``model_ready``: the readiness check the
        watcher probes while the model is away. Without them (extensions installed alone, in tests): nothing."""
        self.outage = outage
        self.model_ready = model_ready

    def install(self, app: Celery, settings: Settings) -> None:
        if self.outage is None or self.model_ready is None:
            return
        self.queue = settings.queue
        self.main_pid = os.getpid()
        self.files = HealthFiles(settings.health_dir)
        self.watcher = OutageWatcher(self.outage, self.model_ready, settings.healthcheck_url)
        add_step(app, IntakeControl, self)
        outage_changed.connect(self._outage_changed, weak=False, dispatch_uid="forwarder.outage.probe")
        signals.worker_shutting_down.connect(self._shutting_down, weak=False, dispatch_uid="forwarder.outage.stop")

    def process_stop(self) -> None:
        if self.watcher is not None and os.getpid() == self.main_pid:
            self.watcher.stop()

    def _outage_changed(self, sender: Any = None, event: str = "", seconds: float = 0.0, **_: Any) -> None:
        self.files.mark_model_away(event == STARTED)

    def _shutting_down(self, **_: Any) -> None:
        if self.outage is not None:
            self.outage.mark_stopping()
