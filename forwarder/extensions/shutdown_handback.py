"""Hand a task back to the queue, unrun, when its worker is already shutting down.

Under gevent, Celery's synchronous consumer keeps starting tasks it reserved (and even takes new ones)
while a warm shutdown waits for the running ones; each would hold the pod up to a whole task longer and
be cut by the kill at the end of the grace period. prefork starts none, so this changes nothing there.
"""

from __future__ import annotations

from celery import Task
from celery.exceptions import Reject
from celery.worker import state as worker_state

from forwarder.extensions.base import Extension


class HandBackOnShutdown(Extension):
    """Reject (requeue) a task that would start during a warm shutdown."""

    def before_task(self, task: Task, task_id: str) -> None:
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            raise Reject("worker shutting down: handed back to the queue unrun", requeue=True)
