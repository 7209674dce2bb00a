"""A message that kills every worker that runs it is refused after ``FORWARDER_MAX_DELIVERIES`` deliveries.

A request that makes its process die (the answer pushes a child past its memory limit and the kernel
OOM-kills it, a native crash) is handed back by ``task_reject_on_worker_lost`` and by the redelivery sweep;
the next worker takes it and dies too, and every replica crash-loops on it. Deliveries are counted per task
id and retry number (one message) across the fleet; the delivery after the budget is not run: the task fails
with ``PoisonMessage``, which stores llm-engine's failure meta and runs the failure hooks, and the message is
acked.

- **SQS**: from the message's ``ApproximateReceiveCount`` (which also counts hand-backs). No write at all.
- **Redis broker**: in the broker's own Redis (``gateways.delivery_counter``), and only from a redelivery on:
  a first delivery writes nothing (no round trip on the common path). Every way a message comes back to a
  queue goes through kombu's restore, which marks it ``redelivered`` (in its delivery info and headers):
  ``task_reject_on_worker_lost``, the redelivery sweep, a hand-back (``Reject(requeue=True)``), the unacked
  messages restored at a connection's close. A redelivery adds one to the message's counter and takes it back
  as it ends, however it ends, so the counter holds the counted deliveries that died; the first delivery,
  never counted, is presumed to have died too (a message comes back when its worker died), unless it said
  otherwise as it ended: a first delivery handed back by us (warm shutdown, model outage) takes one away
  first. So: deaths before this delivery = the counter after this delivery's increment.
  Known over-count (at most one, at the next redelivery): a first delivery that came back without dying and
  without a hand-back of ours, e.g. a message prefetched but never started when its worker stopped, or a
  message whose stored outcome the main process handed back after a result-store outage.
  Celery's retries are new messages (``retries`` + 1), not redeliveries: each has its own count.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Reject

from forwarder.errors import ForwarderError
from forwarder.extensions.base import Extension
from forwarder.settings import Settings
from gateways.delivery_counter import DeliveryCounter
from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: Request key carrying SQS's ApproximateReceiveCount from the consumer to the task (tasks.CheckedRequest).
RECEIVE_COUNT_KEY = "forwarder_receive_count"


class PoisonMessage(ForwarderError):
    """The message was delivered the maximum number of times and its worker died each time: not run again."""


class Refused:
    """Messages refused in this process (for logs and metrics)."""

    count = 0


class CapDeliveries(Extension):
    """Refuse a delivery when the task's earlier deliveries all died."""

    def install(self, app: Celery, settings: Settings) -> None:
        self.limit = settings.max_deliveries
        self.counter: DeliveryCounter | None = None
        if self.limit and not settings.broker_is_sqs:
            # Longer than any message lives: the producer's expiry (llm-engine: a day) and N visibility timeouts.
            expiry = int(max(86400, settings.visibility_timeout * (self.limit + 1)))
            self.counter = DeliveryCounter(settings.broker_url, expiry)
        self.counted: set[str] = set()

    def before_task(self, task: Task, task_id: str) -> None:
        if not self.limit:
            return
        died = self._deaths(task, task_id)
        if died is not None and died >= self.limit:
            Refused.count += 1
            logger.error("task %s was delivered %d times and its worker died each time; refused without running "
                         "(FORWARDER_MAX_DELIVERIES=%d; refused in this process: %d)",
                         task_id, died, self.limit, Refused.count)
            raise PoisonMessage(f"delivered {died} times and its worker died each time "
                                f"(FORWARDER_MAX_DELIVERIES={self.limit}); not run again")

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if self.counter is None:
            return
        key = _delivery_key(task, task_id)
        try:
            if key in self.counted:  # a redelivery that ended: it did not die
                self.counted.discard(key)
                self.counter.finished(key)
            elif state == states.REJECTED and isinstance(retval, Reject) and retval.requeue:
                self.counter.handed_back(key)  # a first delivery handed back unrun: not a death
        except Exception as exc:  # the key expires anyway; only the budget is a little smaller
            logger.warning("delivery count of task %s not taken back: %s: %s", task_id, type(exc).__name__, exc)
            release_exception(exc)

    def _deaths(self, task: Task, task_id: str) -> int | None:
        """Deliveries of this task that killed their worker, before this one; None when unknown."""
        if self.counter is None:
            received = getattr(task.request, RECEIVE_COUNT_KEY, None)
            return int(received) - 1 if received else None
        if not redelivered(task):
            return 0  # a first delivery: nothing died before it, and nothing is written
        key = _delivery_key(task, task_id)
        try:
            count = self.counter.started(key)
        except Exception as exc:  # never block work on the counter: run the task, count nothing
            logger.warning("delivery count of task %s unavailable: %s: %s", task_id, type(exc).__name__, exc)
            release_exception(exc)
            return None
        self.counted.add(key)
        return count  # this delivery's own count, less one, plus the first delivery's death


def redelivered(task: Task) -> bool:
    """Whether kombu restored this message to its queue at least once (its ``redelivered`` mark)."""
    delivery = getattr(task.request, "delivery_info", None) or {}
    return bool(delivery.get("redelivered"))


def _delivery_key(task: Task, task_id: str) -> str:
    """One counter per message: a Celery retry is a new message of the same task id (``retries`` + 1), which
    may even start before the retried delivery has finished, so it must not share the retried one's count."""
    return f"{task_id}:{getattr(task.request, 'retries', 0) or 0}"
