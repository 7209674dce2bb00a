"""What ``forwarder.acks`` and ``forwarder.extensions.reconnect`` rely on in kombu, checked in seconds.

The first tests read kombu's internals the two modules use (they fail loudly on a kombu upgrade that
changes them); the others drive a real kombu channel against a real Redis (and SQS in moto) through a
closed connection, as a reconnect leaves it.
"""

from __future__ import annotations

import inspect
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from devtools.servers import RedisServer, wait_for
from forwarder import acks
from forwarder.extensions import reconnect
from tests.support.aws import REGION, aws_client

# ------------------------------------------------------------------------------- kombu internals


def test_kombu_redis_qos_still_offers_what_the_acks_use():
    qos = kombu_redis.QoS
    assert list(inspect.signature(qos._remove_from_indices).parameters) == ["self", "delivery_tag", "pipe"]
    assert list(inspect.signature(qos.restore_by_tag).parameters) == ["self", "tag", "client", "leftmost"]
    assert list(inspect.signature(qos.append).parameters) == ["self", "message", "delivery_tag"]
    assert hasattr(kombu_redis.Channel, "unacked_key") and hasattr(kombu_redis.Channel, "conn_or_acquire")


def test_kombu_still_restores_at_close_only_when_the_channel_allows_it():
    """``do_restore`` is what ``FollowReconnects`` turns off so a lost connection does not requeue running tasks."""
    assert virtual.Channel.do_restore is True
    assert "self.channel.do_restore" in inspect.getsource(virtual.QoS.restore_unacked_once)


def test_kombu_still_records_a_delivery_through_the_channels_qos_and_keeps_delivered_and_dirty():
    """``note_failed_appends`` shadows ``append`` on the QoS instance; ``held_tags`` reads these two."""
    assert "self.qos.append(message, message.delivery_tag)" in inspect.getsource(virtual.Channel.basic_consume)
    qos = virtual.QoS(channel=None)
    assert isinstance(qos._delivered, dict) and isinstance(qos._dirty, set)
    qos._on_collect.cancel()


# --------------------------------------------------------------------------- a real closed channel


@pytest.fixture
def fresh_channels(monkeypatch: pytest.MonkeyPatch) -> type[acks.Channels]:
    """``acks.Channels`` of this test's own (no current channel, nothing waiting)."""
    monkeypatch.setattr(acks.Channels, "current", None)
    monkeypatch.setattr(acks.Channels, "pending", [])
    monkeypatch.setattr(acks.Channels, "unsure", [])
    monkeypatch.setattr(acks.Channels, "settling", set())
    return acks.Channels


@pytest.fixture
def broker_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{redis_server.url}/2")
    yield client
    client.close()


def held_message(url: str, queue: Queue) -> tuple[Connection, Any]:
    """A message taken from ``queue`` and not acked (in kombu's unacked set), on a connection of its own."""
    connection = Connection(url)
    channel = connection.default_channel
    connection.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key,
                                  declare=[queue], serializer="json")
    message = channel.basic_get(queue.name, no_ack=False)
    assert message is not None
    return connection, message


def lose(connection: Connection) -> None:
    """Close ``connection`` as Celery does when it loses the broker (``collect``), kombu's close-time requeue
    turned off as ``FollowReconnects`` turns it off."""
    connection.default_channel.do_restore = False
    connection.collect()


def test_an_ack_on_a_channel_a_reconnect_closed_raises_in_kombu_and_is_done_on_the_new_channel_here(
    redis_server, broker_client, fresh_channels, caplog
):
    url = f"{redis_server.url}/2"
    queue = Queue(f"q-{uuid.uuid4().hex[:8]}", Exchange("contract", "direct"), routing_key="contract")
    old, message = held_message(url, queue)
    assert broker_client.hlen("unacked") == 1
    lose(old)

    # kombu itself: the ack raises the AttributeError that ended the prefork worker (issue 22)
    assert acks.channel_gone(message.channel)
    with pytest.raises(AttributeError):
        message.ack()

    # here: no exception; with no open channel yet, the ack waits ...
    with caplog.at_level(logging.WARNING):
        assert acks.acknowledge(message, "t-1", old.connection_errors) is False
    assert fresh_channels.pending == [("ack", message.delivery_tag, "t-1")]
    assert "waits for the broker connection" in caplog.text
    assert broker_client.hlen("unacked") == 1

    # ... and is done as soon as the consumer has a channel again
    new = Connection(url)
    try:
        channel = new.default_channel
        pending, fresh_channels.pending = fresh_channels.pending, []
        assert reconnect.settle_pending(channel, pending) == 1
        assert broker_client.hlen("unacked") == 0 and broker_client.llen(queue.name) == 0
    finally:
        new.close()


def test_a_requeue_on_a_closed_channel_goes_back_through_the_current_one(redis_server, broker_client, fresh_channels):
    url = f"{redis_server.url}/2"
    queue = Queue(f"q-{uuid.uuid4().hex[:8]}", Exchange("contract", "direct"), routing_key="contract")
    old, message = held_message(url, queue)
    lose(old)
    new = Connection(url)
    try:
        fresh_channels.current = new.default_channel
        assert acks.reject(message, "t-2", True, old.connection_errors) is True
        assert broker_client.hlen("unacked") == 0
        assert [json.loads(raw)["properties"]["delivery_tag"] for raw in broker_client.lrange(queue.name, 0, -1)] \
            == [message.delivery_tag]
    finally:
        new.close()


def test_a_message_whose_unacked_record_failed_is_handed_back_once(redis_server, broker_client, fresh_channels):
    """The broker took it from the queue, Celery never got it: it goes back, whether the record exists or not."""
    url = f"{redis_server.url}/2"
    queue = Queue(f"q-{uuid.uuid4().hex[:8]}", Exchange("contract", "direct"), routing_key="contract")
    old, written = held_message(url, queue)  # its record reached the broker
    _again, unwritten = held_message(url, queue)  # this one's did not (removed, as if the pipeline never ran)
    broker_client.hdel("unacked", unwritten.delivery_tag)
    lose(old)
    lose(_again)
    new = Connection(url)
    try:
        assert reconnect.hand_back_unsure(new.default_channel, [written, unwritten]) == [written, unwritten]
        assert broker_client.hlen("unacked") == 0 and broker_client.llen(queue.name) == 2
    finally:
        new.close()


def test_on_sqs_an_ack_on_a_closed_channel_is_skipped_and_the_message_comes_back(
    moto_server, aws_env, fresh_channels, caplog
):
    name = f"contract-{uuid.uuid4().hex[:8]}"
    url = aws_client("sqs", moto_server).create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    options = {"predefined_queues": {name: {"url": url}}, "region": REGION}
    connection = Connection("sqs://", transport="gateways.sqs_transport:Transport", transport_options=options)
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    connection.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue],
                                  serializer="json")
    message = wait_for(lambda: connection.default_channel.basic_get(name, no_ack=False), 10, "the message from SQS")
    connection.default_channel.do_restore = False
    connection.collect()

    with caplog.at_level(logging.WARNING):
        assert acks.acknowledge(message, "t-3", connection.connection_errors) is False
    assert "skipped" in caplog.text and "visibility timeout" in caplog.text
    # not deleted: SQS delivers it again once its visibility timeout passes
    sqs = aws_client("sqs", moto_server)
    received = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=3).get("Messages", [])
    assert len(received) == 1
