"""Redis broker: hand a dead worker's messages back to the queue once their visibility timeout passes.

A worker holds each message it runs or reserves in kombu's "unacked" bookkeeping until it acks it. When
the worker dies without acking (SIGKILL, OOM kill, node loss), the message comes back only when some
live worker sweeps that bookkeeping (``QoS.restore_visible``). kombu sweeps only from inside its polling:

- prefork (kombu's event loop): once at start, then every 100 s (``unacked_restore_interval`` x
  ``unacked_restore_throttle``);
- gevent (Celery's synchronous loop): only after a poll that saw no event at all, which the BRPOP reply
  every second (or the message itself) nearly never allows. Measured: an idle gevent worker left a
  SIGKILLed worker's messages unacknowledged for good, so a gevent-only fleet lost them.

``RestoreUnacked`` sweeps on the worker's own timer instead, under both pools, every few seconds
(a Redis SET NX, ZRANGE and DEL: negligible). Each sweep that hands messages back logs how many and sends
``messages_restored`` (a Celery signal; the metrics extension counts it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.utils.dispatch import Signal

from forwarder.extensions.base import Extension, RepeatingStep, add_step
from forwarder.settings import Settings

logger = logging.getLogger(__name__)

#: Longest pause between sweeps, in seconds; shorter when the visibility timeout is short.
SWEEP_INTERVAL_MAX = 10.0
#: Shortest pause between sweeps, in seconds.
SWEEP_INTERVAL_MIN = 1.0

#: Sent by a sweep that handed messages back to their queues, with their ``count``.
messages_restored = Signal(name="forwarder.messages_restored")


def sweep_interval(visibility_timeout: float) -> float:
    """Seconds between sweeps: half the visibility timeout, within [1, 10] s."""
    return min(SWEEP_INTERVAL_MAX, max(SWEEP_INTERVAL_MIN, visibility_timeout / 2))


class RestoreUnacked(RepeatingStep):
    """Consumer step: periodically restore unacknowledged messages older than the visibility timeout."""

    def interval(self, c: Any) -> float:
        return sweep_interval(float(options_of(c).get("visibility_timeout", 3600)))

    def tick(self, c: Any) -> None:
        self.sweep(c)

    def sweep(self, c: Any) -> None:
        """One sweep; never raises (a Redis outage is retried at the next tick)."""
        channel: Any = getattr(c.task_consumer, "channel", None)
        qos = getattr(channel, "qos", None)
        if qos is None or not hasattr(qos, "restore_visible"):
            return
        try:
            restored = restore_counted(qos, channel.unacked_restore_limit)
        except Exception as exc:
            logger.warning("restoring unacknowledged messages failed (next try in a few seconds): %s: %s",
                           type(exc).__name__, exc)
            return
        queues = [queue.name for queue in getattr(c.task_consumer, "queues", None) or ()]
        restored += sweep_in_transit(channel, queues, float(options_of(c).get("visibility_timeout", 3600)))
        if restored:
            logger.warning("handed %d unacknowledged message(s) back to the queue: their visibility timeout "
                           "passed (a worker died holding them)", restored)
            messages_restored.send(sender=self, count=restored)


def options_of(c: Any) -> dict[str, Any]:
    return c.app.conf.broker_transport_options or {}


def sweep_in_transit(channel: Any, queues: list[str], visibility_timeout: float) -> int:
    """``gateways.redis_transport``'s sweep: hand back in-transit lists of workers unseen for the visibility
    timeout, fold priority sub-lists onto their queue. Returns the messages handed back; never raises."""
    sweep = getattr(channel, "sweep_in_transit", None)
    if sweep is None:
        return 0
    try:
        handed_back, folded = sweep(queues, visibility_timeout)
    except Exception as exc:
        logger.warning("sweeping in-transit messages failed (next try in a few seconds): %s: %s",
                       type(exc).__name__, exc)
        return 0
    if folded:
        logger.info("moved %d message(s) published with a priority onto their queue", folded)
    return handed_back


def restore_counted(qos: Any, limit: int | None) -> int:
    """Run kombu's sweep (``QoS.restore_visible``) once, now, and return how many messages it handed back.

    kombu returns nothing, and calls ``restore_by_tag`` once per message whose visibility timeout passed:
    that call is counted for the duration of this sweep only (the instance attribute shadows the method and
    is removed afterwards). kombu offers no public count: ``tests/test_upstream_contracts.py`` pins this shape,
    so a kombu upgrade that changes it fails the fast tests instead of silently disabling the delivery cap.
    """
    restored = 0
    restore_by_tag = qos.restore_by_tag

    def counting(tag: Any, client: Any = None, leftmost: bool = False) -> None:
        nonlocal restored
        restore_by_tag(tag, client, leftmost)
        restored += 1

    qos.restore_by_tag = counting
    try:
        # interval=1: scan now, not on every Nth call (kombu's own throttle).
        qos.restore_visible(num=limit, interval=1)
    finally:
        del qos.restore_by_tag
    return restored


class RedeliverySweep(Extension):
    """Redis broker only: add ``RestoreUnacked`` to the consumer (SQS redelivers by itself)."""

    def install(self, app: Celery, settings: Settings) -> None:
        if not settings.broker_is_sqs:
            add_step(app, RestoreUnacked)
