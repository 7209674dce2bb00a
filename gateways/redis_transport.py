"""kombu's Redis transport, except that a message taken from the queue is never only on the wire.

kombu consumes with ``BRPOP``: the broker removes the message from the list and then sends it. A message
whose reply never reaches the worker exists nowhere: not in the queue, not in kombu's unacked bookkeeping
(written only once the reply has arrived). That happens when the broker is restarted under load: Redis
serves the commands that arrive in its last event-loop turn, persists their effect (the pop, with an
append-only file) and exits before writing their replies. Measured on the broker-restart fault test
(5 SIGTERM restarts with a backlog, prefork): one task lost in two of seven runs, each the message that the
last ``BRPOP`` before a restart took (Redis's MONITOR showed its push, and no worker ever saw it).

Here the consumer takes a message with ``BLMOVE``: atomically out of the queue and into a list of this
process's own (its in-transit list), in the same command. kombu then records it as unacknowledged, and
that record's transaction also removes it from the in-transit list (``QoS.append``), so in normal
operation the list is empty again before the task starts. Whatever a lost reply leaves there goes back to
the queue:

- when this process's consumer connects again, and once more when the worker has stopped (a reply still on
  the wire as a warm shutdown closed the connection) (``recover_in_transit``, from ``extensions.reconnect``);
- when this process died (SIGKILL, OOM) holding one: each live worker's redelivery sweep marks its own list
  as alive (a sorted set of owners, scored by time) and hands back the lists of owners unseen for longer
  than the visibility timeout, as kombu does with unacknowledged messages (``sweep_in_transit``).

One blocking command waits on one list, so the consumer takes from the base list of each consumed queue
in turn (the forwarder consumes one). Messages published with a priority (kombu's sub-lists, ``queue\\x06\\x163``
...) are moved onto their base list by the sweep, so none is stranded (this worker serves in arrival order).
Needs Redis 6.2 or newer (``BLMOVE``); an older server, or a ``global_keyprefix``, gets kombu's own ``BRPOP``
with one WARNING. Overrides kombu's ``Channel._brpop_start``/``_brpop_read`` and ``QoS.append``:
``tests/test_upstream_contracts.py`` pins what they rely on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: Celery's ``broker_transport`` value selecting this transport.
TRANSPORT_PATH = "gateways.redis_transport:Transport"
#: Sorted set: in-transit list key -> last time its owner was seen alive (epoch seconds).
OWNERS_KEY = "forwarder.in_transit.owners"
#: In-transit list keys: ``<prefix>|<queue>|<owner>``.
IN_TRANSIT_PREFIX = "forwarder.in_transit"

#: Move every message of an in-transit list (KEYS[1]) back to the pop end of its queue (KEYS[2]) and drop
#: the list from the owners (KEYS[3]); returns how many.
_HAND_BACK = """
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'RIGHT') do moved = moved + 1 end
redis.call('ZREM', KEYS[3], KEYS[1])
return moved
"""
#: Move every message of a priority sub-list (KEYS[1]) onto the back of its base list (KEYS[2]).
_FOLD = """
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do moved = moved + 1 end
return moved
"""


_owner: tuple[int, str] | None = None


def owner() -> str:
    """This process, as named in its in-transit keys: host, pid and a random part drawn once per process (two
    containers of one pod share the host name and may share a pid; a forked child is another owner)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, f"{socket.gethostname()}.{pid}.{uuid.uuid4().hex[:8]}")
    return _owner[1]


def in_transit_key(queue: str) -> str:
    return f"{IN_TRANSIT_PREFIX}|{queue}|{owner()}"


def queue_of(key: str) -> str:
    """The queue an in-transit list belongs to (queue names may hold ``|``; owner names do not)."""
    return key[len(IN_TRANSIT_PREFIX) + 1:].rsplit("|", 1)[0]


class InTransit:
    """The message being delivered in this process right now: its in-transit list and raw bytes.

    Set by ``Channel._brpop_read`` around kombu's delivery, which records it (``QoS.append``) before
    handing it to Celery; one consumer per process delivers one message at a time.
    """

    key: str | None = None
    raw: bytes | None = None


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's record of an unacknowledged message (index and body), plus, in the same transaction, its
        removal from the in-transit list that ``BLMOVE`` put it in."""
        key, raw = InTransit.key, InTransit.raw
        if key is None or raw is None:
            super().append(message, delivery_tag)
            return
        InTransit.key = InTransit.raw = None  # recorded once (a reject within the delivery appends again)
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]])) \
                .lrem(key, 1, raw) \
                .execute()
        # kombu's bookkeeping in this process (virtual QoS: _delivered), as its own append does after the pipeline.
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    """Redis channel that consumes with ``BLMOVE`` into an in-transit list of this process."""

    QoS = QoS
    #: False once the server refused ``BLMOVE`` (older than 6.2): kombu's own ``BRPOP`` from then on.
    moves_in_transit = True
    _moving_from: str | None = None

    def _moves(self) -> bool:
        return self.moves_in_transit and not self.global_keyprefix

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._moves():
            super()._brpop_start(timeout)
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        queue = queues[0]
        self._moving_from = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu: None until a first poll
        wait = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMOVE", queue, in_transit_key(queue), "RIGHT", "LEFT", wait or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if not self._moves() or self._moving_from is None:
            return super()._brpop_read(**options)
        queue, self._moving_from = self._moving_from, None
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # as kombu does: the next turn reconnects
                raise
            except self.ResponseError as exc:
                self.moves_in_transit = False
                logger.warning("the broker refused BLMOVE (%s): consuming with BRPOP, as kombu does; a message "
                               "whose reply a broker restart cuts off is lost (Redis 6.2 or newer avoids it)", exc)
                raise Empty() from None
            if raw is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            InTransit.key, InTransit.raw = in_transit_key(queue), raw
            try:
                self.connection._deliver(loads(bytes_to_str(raw)), queue)
            finally:
                InTransit.key = InTransit.raw = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu: False, a connection or None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6: a re-auth waiting for an idle socket
            if flush is not None:
                flush()

    # -- recovery (called by the forwarder's consumer steps; never raise on a connection error) ------------

    def recover_in_transit(self, queues: Iterable[str], *, leaving: bool = False) -> int:
        """Hand back whatever this process's in-transit lists of ``queues`` hold (a reply lost with the last
        connection), and register them as alive; ``leaving``: the process stops, its lists leave the owners."""
        moved = 0
        with self.conn_or_acquire() as client:
            for queue in queues:
                key = in_transit_key(queue)
                moved += int(client.eval(_HAND_BACK, 3, key, queue, OWNERS_KEY))
                if not leaving:
                    client.zadd(OWNERS_KEY, {key: time.time()})
        return moved

    def sweep_in_transit(self, queues: Iterable[str], visibility_timeout: float) -> tuple[int, int]:
        """Mark this process's lists of ``queues`` alive; hand back those of owners unseen for
        ``visibility_timeout``; fold priority sub-lists of ``queues`` onto their base list. Returns (messages
        handed back, messages folded)."""
        now = time.time()
        queues = list(queues)
        handed_back = folded = 0
        with self.conn_or_acquire() as client:
            if queues:
                client.zadd(OWNERS_KEY, {in_transit_key(queue): now for queue in queues})
            for stale in client.zrangebyscore(OWNERS_KEY, "-inf", now - visibility_timeout):
                key = bytes_to_str(stale)
                handed_back += int(client.eval(_HAND_BACK, 3, key, queue_of(key), OWNERS_KEY))
            for queue in queues:
                for priority in self.priority_steps:
                    sub_list = self._q_for_pri(queue, priority)
                    if sub_list != queue:
                        folded += int(client.eval(_FOLD, 2, sub_list, queue))
        return handed_back, folded


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``Channel`` above."""

    Channel = Channel
