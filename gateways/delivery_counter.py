"""Count deliveries of each message (a key the caller chooses) in a Redis (the broker's), shared by a fleet.

``started(key)`` adds one and returns the count; ``finished(key)`` takes one away. A delivery whose
process dies between the two is never taken away: the count is the number of deliveries that killed their
worker. ``handed_back(key)`` takes one away from a delivery that was never counted (the caller counts only
redeliveries, ``extensions.delivery_cap``). Keys expire, so a counter never outlives the message it counts.
"""

from __future__ import annotations

from typing import Any

import redis

from gateways.cached_client import CachedClient

#: Key of a task id's counter.
KEY = "forwarder:deliveries:{}"
CONNECT_TIMEOUT = 5.0
SOCKET_TIMEOUT = 5.0


class DeliveryCounter:
    """Per-task-id counters in the Redis at ``url``, through one client per process."""

    def __init__(self, url: str, expiry_seconds: int) -> None:
        self.expiry_seconds = expiry_seconds
        self.client: CachedClient[Any] = CachedClient("delivery-counter", lambda: (self._connect(url), None))

    @staticmethod
    def _connect(url: str) -> Any:
        return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT)

    def started(self, task_id: str) -> int:
        """Count one more delivery of ``task_id``; returns the count (1 for a first delivery).

        Raises:
            redis.RedisError: the counter's Redis is unreachable.
        """
        pipe = self.client.get().pipeline()
        pipe.incr(KEY.format(task_id))
        pipe.expire(KEY.format(task_id), self.expiry_seconds)
        return int(pipe.execute()[0])

    def handed_back(self, task_id: str) -> None:
        """An uncounted delivery handed the message back without dying: one less, ahead of the next count."""
        pipe = self.client.get().pipeline()
        pipe.decr(KEY.format(task_id))
        pipe.expire(KEY.format(task_id), self.expiry_seconds)
        pipe.execute()

    def finished(self, task_id: str) -> None:
        """The delivery ended without killing its worker: take it back."""
        self.client.get().decr(KEY.format(task_id))
