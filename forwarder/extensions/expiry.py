"""A request older than FORWARDER_REQUEST_TTL when its task starts is not run (SageMaker async's RequestTTLSeconds).

The check is ``request_ttl.expired_by`` on the task's arrival timestamp (its second positional argument).
An expired task fails with ``RequestExpired`` before the model is called: as with the delivery cap, that
stores llm-engine's failure meta, runs the failure hooks (the callback tells the caller) and acks the
message; the metrics count it as ``forwarder.task.expired``. Its ``received`` and ``stuck`` counts are
sent first, by the metrics extension that runs before this one. A Celery retry carries the first
delivery's arrival timestamp, so a retried task expires too.

A task with no arrival timestamp, or one that cannot be read, runs, and the first one in each process
logs a WARNING (the producer is not llm-engine's, or sends something else in that place).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task

from forwarder.extensions.base import Extension
from forwarder.request_ttl import RequestExpired, expired_by, parse_arrival
from forwarder.settings import Settings

logger = logging.getLogger(__name__)


class ExpireOldRequests(Extension):
    """Fail a task, unrun, whose request waited in the queue longer than the TTL."""

    ttl: float | None = None
    warned = False

    def install(self, app: Celery, settings: Settings) -> None:
        self.ttl = settings.request_ttl
        self.warned = False

    def before_task(self, task: Task, task_id: str) -> None:
        if self.ttl is None:
            return
        args: Any = getattr(task.request, "args", None) or ()
        arrival = args[1] if len(args) > 1 else None
        if parse_arrival(arrival) is None:
            self._warn_once(task_id, arrival)
            return
        reason = expired_by(arrival, datetime.now(UTC), self.ttl)
        if reason is not None:  # logged once, as the task's failure ("task ... failed: RequestExpired: ...")
            raise RequestExpired(reason)

    def _warn_once(self, task_id: str, arrival: Any) -> None:
        if self.warned:
            return
        self.warned = True
        shown = "none" if arrival is None else f"{type(arrival).__name__} {str(arrival)[:40]!r}"
        logger.warning("task %s has no readable arrival timestamp (second argument: %s); it runs without the "
                       "FORWARDER_REQUEST_TTL check (this warning is given once per process)", task_id, shown)
