"""Redis broker: a lost broker connection strands nothing, and duplicates no task that this worker still runs.

When the consumer loses the broker (a restart, a failover, a cut connection) Celery closes the connection
and connects again; tasks that were running go on in the pool and finish after the reconnect. kombu's
default, on that close, is to hand every message the channel held back to the queue: the running ones too,
so each ran twice (a second model call, callback and Firehose record). And when the broker was still down
at that moment (the usual case in a restart) the hand-back failed, and the messages stayed in the broker's
unacked set until the visibility timeout: an hour by default, 24 h with llm-engine's values.

``FollowReconnects``, a consumer step started on every connection, does instead:

1. The consumer's channel does not hand its messages back when it closes on a lost connection
   (kombu's ``Channel.do_restore``, the flag transports use to opt out of that hand-back); a warm
   shutdown still does (``stop``/``shutdown`` set it back before Celery closes the connection).
2. A task that finishes after the loss is settled through the new channel (``forwarder.acks``): kombu's
   Redis bookkeeping is broker-wide, by delivery tag. Settlements that found no open channel wait in
   ``acks.Channels.pending`` and are done here, as soon as the consumer has connected again.
3. Whatever else the old channel still held (nothing that this worker still runs or has reserved, nothing
   settled above) goes back to the queue now, not at the visibility timeout.
4. A message that arrived just as the connection broke: kombu pops it from the queue (BRPOP), then records
   it as unacknowledged (a pipeline to the broker) and only then hands it to Celery. When that pipeline
   fails, Celery never sees the message, the broker may or may not hold the record, and no worker knows
   the delivery tag: the message came back only at the visibility timeout, or never (measured: about
   one restart in five under load). Here such a message is kept in memory and handed back on the new
   connection (its record written first if it is missing, then kombu's own ``restore_by_tag``).

Each step logs one WARNING with its count. Needs kombu's virtual QoS internals (``_delivered``/``_dirty``,
``_remove_from_indices``, ``append`` called through the channel's ``qos``);
``tests/test_reconnect_contract.py`` fails loudly if they change.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker import state as worker_state
from kombu.utils.json import dumps

from forwarder import acks
from forwarder.extensions.base import Extension
from forwarder.settings import Settings
from gateways.errors import release_exception

logger = logging.getLogger(__name__)


class FollowReconnects(bootsteps.StartStopStep):
    """Consumer step: adopt each new channel, settle what waited for it, restore what the old one held."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        channel = getattr(c.task_consumer, "channel", None)
        if channel is None:
            return
        if not hasattr(channel, "unacked_key"):  # not kombu's Redis channel
            return
        channel.do_restore = False  # a lost connection must not requeue tasks still running here
        recover_in_transit(channel, consumed_queues(c))
        note_failed_appends(channel)
        with acks.Channels.lock:
            previous, acks.Channels.current = acks.Channels.current, channel
            pending, acks.Channels.pending = acks.Channels.pending, []
            unsure, acks.Channels.unsure = acks.Channels.unsure, []
        try:
            settled = settle_pending(channel, pending)
            recovered = hand_back_unsure(channel, unsure)
            if previous is not None and previous is not channel:
                restore_left_over(channel, previous, {tag for _action, tag, _task in pending}
                                  | {message.delivery_tag for message in recovered})
        except Exception as exc:  # a bug (connection errors are handled inside): it must not stop the consumer
            logger.exception("catching up after a broker reconnect failed (%s): what the old connection held "
                             "comes back after the visibility timeout", type(exc).__name__)
            release_exception(exc)
            return
        if settled:
            logger.warning("settled %d message(s) on the new broker connection: their tasks finished after the "
                           "old one was lost", settled)

    def stop(self, c: Any) -> None:
        # A warm shutdown closes the connection after this: it hands the reserved messages back, as kombu does.
        channel = acks.Channels.current
        if channel is not None and not acks.channel_gone(channel):
            channel.do_restore = True

    shutdown = stop


def consumed_queues(c: Any) -> list[str]:
    """The queues the consumer takes tasks from (declared: consuming starts only with the event loop)."""
    return [queue.name for queue in getattr(c.task_consumer, "queues", None) or ()]


def recover_in_transit(channel: Any, queues: list[str]) -> int:
    """Hand back what this process's in-transit lists hold (``gateways.redis_transport``): a message the broker
    moved there for a reply that the lost connection never delivered."""
    recover = getattr(channel, "recover_in_transit", None)
    if recover is None:
        return 0
    try:
        moved = recover(queues)
    except channel.connection_errors as exc:  # lost again: the next connection, or the sweep, tries again
        release_exception(exc)
        return 0
    if moved:
        logger.warning("handed %d message(s) back to the queue that the broker gave out as the connection was "
                       "lost (the reply never arrived)", moved)
    return moved


def note_failed_appends(channel: Any) -> None:
    """Keep each message whose unacked record fails to be written (the connection broke under it): Celery never
    gets it, so only this process knows it was taken from the queue. (Shadows ``append`` on this channel's QoS
    only; kombu calls it as ``self.qos.append``.)"""
    qos = channel.qos
    append = type(qos).append.__get__(qos)

    def append_noting_failures(message: Any, delivery_tag: str) -> None:
        try:
            append(message, delivery_tag)
        except channel.connection_errors:
            with acks.Channels.lock:
                acks.Channels.unsure.append(message)
            raise

    qos.append = append_noting_failures


def hand_back_unsure(channel: Any, unsure: list[Any]) -> list[Any]:
    """Put each message taken from the queue as the old connection broke back in it, through ``channel``.

    kombu's ``restore_by_tag`` pushes it back and removes its unacked record, in one transaction, when the
    record was written. When it was not: with ``gateways.redis_transport`` the message is still in the
    in-transit list (the record and the removal from that list are one transaction), which
    ``recover_in_transit`` has handed back; with kombu's own BRPOP the record is written first here (HSETNX:
    an existing record wins).
    """
    moves = getattr(channel, "moves_in_transit", False) and not getattr(channel, "global_keyprefix", "")
    done: list[Any] = []
    handed_back: list[Any] = []
    for message in unsure:
        info = message.delivery_info or {}
        record = dumps([message._raw, info.get("exchange"), info.get("routing_key")])
        try:
            with channel.conn_or_acquire() as client:
                if not moves:
                    client.hsetnx(channel.unacked_key, message.delivery_tag, record)
                elif not client.hexists(channel.unacked_key, message.delivery_tag):
                    handed_back.append(message)  # still in transit: recover_in_transit handed it back
                    continue
                channel.qos.restore_by_tag(message.delivery_tag, client=client)
        except channel.connection_errors as exc:  # lost again: try on the next connection
            release_exception(exc)
            with acks.Channels.lock:
                acks.Channels.unsure.extend(m for m in unsure if m not in done and m not in handed_back)
            break
        done.append(message)
    if done:
        logger.warning("handed %d message(s) back to the queue that arrived as the broker connection was lost "
                       "(never started here)", len(done))
    return done + handed_back


def settle_pending(channel: Any, pending: list[tuple[str, str, str]]) -> int:
    """Do the waiting settlements on ``channel``; those a new connection loss interrupts wait again."""
    done = 0
    for index, (action, tag, _task_id) in enumerate(pending):
        try:
            acks.settle_by_tag(channel, action, tag)
        except channel.connection_errors as exc:
            release_exception(exc)
            with acks.Channels.lock:
                acks.Channels.pending[:0] = pending[index:]
            logger.warning("broker lost again: %d settlement(s) wait for the next connection", len(pending) - index)
            break
        done += 1
    return done


def restore_left_over(channel: Any, previous: Any, settled: set[str]) -> int:
    """Hand back, through ``channel``, what ``previous`` held unacknowledged that nothing here will settle."""
    held = held_tags(previous)
    if not held:
        return 0
    running = {getattr(request.message, "delivery_tag", None)
               for request in (*worker_state.reserved_requests, *worker_state.active_requests)}
    busy = running | settled | acks.Channels.settling
    left = [tag for tag in held if tag not in busy]
    restored = 0
    for tag in left:
        try:
            channel.qos.restore_by_tag(tag)
        except channel.connection_errors as exc:  # lost again: the visibility-timeout sweep is the fallback
            release_exception(exc)
            logger.warning("broker lost again while handing back %d message(s) the lost connection held: they "
                           "come back after the visibility timeout", len(left) - restored)
            break
        restored += 1
    if restored:
        logger.warning("handed %d message(s) back to the queue that the lost broker connection held unacknowledged "
                       "and nothing here will finish", restored)
    return restored


def held_tags(channel: Any) -> list[str]:
    """Delivery tags ``channel`` delivered and did not settle (kombu's virtual QoS: ``_delivered`` - ``_dirty``)."""
    qos = getattr(channel, "_qos", None)
    if qos is None:
        return []
    dirty = set(qos._dirty)
    return [tag for tag in list(qos._delivered) if tag not in dirty]


def hand_back_at_exit(app: Celery, queues: list[str]) -> int:
    """After the worker stopped: hand back what this process's in-transit lists hold, on a connection of its own.

    A warm shutdown closes the consumer's connection with its last BLMOVE outstanding; when the broker had served
    it, the message sits in this process's list (kombu's BRPOP lost it outright: celery#4354). No other worker
    would hand it back before the visibility timeout (24 h with llm-engine's values). One try, never raises.
    """
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
            recover = getattr(connection.default_channel, "recover_in_transit", None)
            moved = recover(queues, leaving=True) if recover is not None else 0
    except Exception as exc:  # the broker is gone too: the sweep of a live worker hands it back later
        logger.warning("could not hand back in-transit messages at exit (%s: %s): they come back after the "
                       "visibility timeout", type(exc).__name__, exc)
        release_exception(exc)
        return 0
    if moved:
        logger.warning("handed %d message(s) back to the queue that the broker gave out as the worker stopped", moved)
    return moved


class AdoptReconnects(Extension):
    """Redis broker only: add ``FollowReconnects`` to the consumer (SQS keeps no per-connection bookkeeping), and
    hand back this process's in-transit messages once the worker has stopped."""

    def install(self, app: Celery, settings: Settings) -> None:
        if settings.broker_is_sqs:
            return
        app.steps["consumer"].add(FollowReconnects)

        def at_exit(**_: Any) -> None:
            hand_back_at_exit(app, [settings.queue])

        signals.worker_shutdown.connect(at_exit, weak=False, dispatch_uid="forwarder.in_transit.at_exit")
