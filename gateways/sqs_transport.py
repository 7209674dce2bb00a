"""kombu's SQS transport, except that a full prefetch window is re-checked often instead of once a poll.

Under the prefork pool kombu polls SQS from the worker's event loop. When every prefetch slot holds
an unacknowledged message it does not poll; it waits ``polling_interval`` and looks again, exactly as
after an empty ReceiveMessage. A slot freed by a finished task therefore idles until that wait ends:
with the default 1 s interval a prefork worker ran at most ``concurrency x prefetch`` tasks a second
(measured against moto, concurrency 2: 2 tasks/s with an instant model; 20 tasks of a 0.5 s model took
10.1 s instead of 5.1 s over Redis). The gevent pool does not use this path.

Here a full window is looked at again after ``WINDOW_CHECK_INTERVAL`` (a local check: no request to
SQS), so the next poll follows the ack. Empty polls still wait ``polling_interval``, so an idle worker
sends SQS no more requests than before. Each call still schedules exactly one follow-up, so there
is never more than one polling loop per queue.

kombu has no transport option for this: ``_schedule_queue`` (private) is overridden, and its shape and
kombu's full-window wait are pinned by ``tests/test_upstream_contracts.py``.

Selected with Celery's ``broker_transport`` setting (``sqs://`` URLs stay as they are); producers are
unaffected.
"""

from __future__ import annotations

from kombu.transport import SQS

#: Seconds between looks at a full prefetch window (no network I/O).
WINDOW_CHECK_INTERVAL = 0.05
#: Celery's ``broker_transport`` value selecting this transport.
TRANSPORT_PATH = "gateways.sqs_transport:Transport"


class Channel(SQS.Channel):
    """SQS channel whose polling loop resumes right after an ack frees the prefetch window."""

    def _schedule_queue(self, queue: str) -> None:
        if queue in self._active_queues and not self.qos.can_consume():
            self.hub.call_later(WINDOW_CHECK_INTERVAL, self._schedule_queue, queue)
            return
        super()._schedule_queue(queue)


class Transport(SQS.Transport):
    """kombu's SQS transport with ``Channel`` above."""

    Channel = Channel
