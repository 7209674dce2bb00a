"""Settle a finished task's message (ack, or reject with or without requeue) without ever ending the worker.

Two failures are handled here:

- **A broker blip.** kombu logs a failed ack ("Couldn't ack", CRITICAL) and moves on: the message stays
  unacknowledged and runs again after the visibility timeout. Here an ack that fails on a connection error
  is tried again with a short backoff (under a second in all: prefork acks from the main process's event
  loop); if it still fails, one ERROR line names the consequence, and the failure is counted.
- **A channel closed by a reconnect** (issue 22). A task that was running when the broker connection was lost
  finishes after the consumer has closed the old connection; its message still points at the old channel,
  whose kombu connection is gone. Acking there raised ``AttributeError: 'NoneType' object has no attribute
  'hostname'`` from kombu's Redis transport, which ended the prefork worker. No ack, reject or requeue is
  attempted on such a channel. On Redis the message is settled through the consumer's current channel
  instead: kombu keeps its unacknowledged messages in two broker-wide keys indexed by delivery tag, not per
  connection, so any channel to the same broker settles the same message. While the consumer has no open
  channel (it is still reconnecting) the settlement waits, and ``extensions.reconnect`` runs it on the new
  channel. The task ran once and its result is stored: no duplicate. Other transports (SQS) skip it: the
  message comes back after its visibility timeout, and runs again (at least once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: Attempts in all, and the first pause (doubling): 0.05 + 0.1 + 0.2 + 0.4 s at most between them.
ACK_ATTEMPTS = 5
ACK_BACKOFF = 0.05

#: What may be done to a message: ``ack``, ``requeue`` (reject, back to the queue) or ``drop`` (reject).
ACK, REQUEUE, DROP = "ack", "requeue", "drop"


class AckCounter:
    """Acks that failed for good, and settlements moved off a closed channel, in this process (logs, metrics)."""

    failed = 0
    moved = 0
    skipped = 0


class Channels:
    """The consumer's current broker channel, and settlements waiting for one (this process).

    Set by ``extensions.reconnect`` each time the consumer (re)connects. A lock, because prefork children
    never touch it but gevent greenlets and the consumer may (appends and swaps only).
    """

    current: Any = None
    pending: list[tuple[str, str, str]] = []  # (action, delivery tag, task id)
    unsure: list[Any] = []  # messages taken from the queue whose unacked record failed (extensions.reconnect)
    settling: set[str] = set()  # delivery tags being settled right now (gevent: an ack retrying in its backoff)
    lock = threading.Lock()


def channel_gone(channel: Any) -> bool:
    """Whether ``channel`` can no longer settle a message: closed, or its connection torn down by a reconnect.

    kombu's virtual transports (Redis, SQS) mark a closing channel ``closed``, detach it from its transport
    (``connection`` None) or leave the transport without its kombu connection (``client`` None), depending on
    how far the close got; any one of the three means a settlement there would fail or build a new pool.
    """
    if channel is None or getattr(channel, "closed", False):
        return True
    connection = getattr(channel, "connection", None)
    return connection is None or getattr(connection, "client", True) is None


def keeps_unacked_by_tag(channel: Any) -> bool:
    """Whether the transport keeps unacknowledged messages in the broker by delivery tag (kombu's Redis QoS)."""
    qos = getattr(channel, "_qos", None)  # never built here: only a channel that consumed has one
    return qos is not None and hasattr(qos, "restore_by_tag") and hasattr(qos, "_remove_from_indices")


def settle_by_tag(channel: Any, action: str, tag: str) -> None:
    """Settle the message ``tag`` through ``channel`` (Redis: broker-wide keys; see the module docstring).

    ``ack``/``drop``: remove it from kombu's unacked set; ``requeue``: put it back in its queue and remove it
    (as kombu's own reject does). Raises the transport's connection errors.
    """
    qos = channel.qos
    if action == REQUEUE:
        qos.restore_by_tag(tag, leftmost=True)
    else:
        qos._remove_from_indices(tag).execute()


def acknowledge(
    message: Any, task_id: str, errors: tuple[type[BaseException], ...], sleep: Callable[[float], None] = time.sleep
) -> bool:
    """Ack ``message``; returns False when it could not be acked here and now (logged, counted)."""
    return settle(message, ACK, task_id, errors, sleep)


def reject(message: Any, task_id: str, requeue: bool, errors: tuple[type[BaseException], ...],
           sleep: Callable[[float], None] = time.sleep) -> bool:
    """Reject ``message`` (back to its queue when ``requeue``), never on a closed channel; as ``acknowledge``."""
    return settle(message, REQUEUE if requeue else DROP, task_id, errors, sleep)


def settle(message: Any, action: str, task_id: str, errors: tuple[type[BaseException], ...],
           sleep: Callable[[float], None] = time.sleep) -> bool:
    """Ack or reject ``message``, retrying a broker blip; a message whose channel is gone goes to ``moved``."""
    tag: str = message.delivery_tag
    Channels.settling.add(tag)
    try:
        return _settle(message, action, task_id, errors, sleep)
    finally:
        Channels.settling.discard(tag)


def _settle(message: Any, action: str, task_id: str, errors: tuple[type[BaseException], ...],
            sleep: Callable[[float], None]) -> bool:
    failure = ""
    for attempt in range(1, ACK_ATTEMPTS + 1):
        if channel_gone(message.channel):
            return moved(message, action, task_id)
        try:
            if action == ACK:
                message.ack()
            else:
                message.reject(requeue=action == REQUEUE)
            return True
        except errors as exc:
            failure = f"{type(exc).__name__}: {exc}"
            release_exception(exc)
        except Exception as exc:
            # The channel torn down under this call (gevent: a reconnect in another greenlet) is the closed-
            # channel case. Anything else is a bug: never retried or hidden, and never the end of the worker.
            if channel_gone(message.channel):
                return moved(message, action, task_id)
            AckCounter.failed += 1
            logger.exception("%s of task %s raised %s: the message stays unacknowledged and runs again after the "
                             "visibility timeout (failed acks in this process: %d)",
                             action, task_id, type(exc).__name__, AckCounter.failed)
            release_exception(exc)
            return False
        if attempt < ACK_ATTEMPTS:
            logger.warning("%s of task %s failed (%s); retrying (attempt %d of %d)",
                           action, task_id, failure, attempt + 1, ACK_ATTEMPTS)
            sleep(ACK_BACKOFF * 2 ** (attempt - 1))
    AckCounter.failed += 1
    consequence = "the message will run again after the visibility timeout"
    if keeps_unacked_by_tag(message.channel):  # the consumer is about to lose this connection, most likely
        with Channels.lock:
            Channels.pending.append((action, message.delivery_tag, task_id))
        consequence = "it is done on the next broker connection, or " + consequence
    logger.error("could not %s task %s after %d attempts (%s): %s (failed acks in this process: %d)",
                 action, task_id, ACK_ATTEMPTS, failure, consequence, AckCounter.failed)
    return False


def moved(message: Any, action: str, task_id: str) -> bool:
    """Settle a message whose channel is gone: through the current channel, later, or not at all (SQS)."""
    tag = message.delivery_tag
    if not keeps_unacked_by_tag(message.channel):
        AckCounter.skipped += 1
        logger.warning(
            "%s of task %s skipped: its broker channel was closed by a reconnect; the message will be "
            "delivered again after its visibility timeout (skipped in this process: %d)",
            action, task_id, AckCounter.skipped,
        )
        return False
    with Channels.lock:
        current = Channels.current
        if current is None or current is message.channel or channel_gone(current):
            Channels.pending.append((action, tag, task_id))
            current = None
    AckCounter.moved += 1
    if current is None:
        return _waits(action, task_id)
    try:
        settle_by_tag(current, action, tag)
    except Exception as exc:
        if not (isinstance(exc, current.connection_errors) or channel_gone(current)):  # a bug: as in _settle
            AckCounter.failed += 1
            logger.exception("%s of task %s on the new broker connection raised %s: the message runs again after "
                             "the visibility timeout (failed acks in this process: %d)",
                             action, task_id, type(exc).__name__, AckCounter.failed)
            release_exception(exc)
            return False
        # Lost again (a connection error, or the channel torn down under this call): wait for the next one.
        release_exception(exc)
        with Channels.lock:
            Channels.pending.append((action, tag, task_id))
        return _waits(action, task_id)
    logger.warning("%s of task %s done on the new broker connection: its channel was closed by a reconnect "
                   "(moved in this process: %d)", action, task_id, AckCounter.moved)
    return True


def _waits(action: str, task_id: str) -> bool:
    logger.warning("%s of task %s waits for the broker connection: its channel was closed by a reconnect "
                   "(moved in this process: %d)", action, task_id, AckCounter.moved)
    return False
