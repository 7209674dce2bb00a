"""A message taken from a Redis queue is never only on the wire (``gateways.redis_transport``).

kombu's BRPOP removes a message from the queue before sending it: a reply that a broker restart cuts off
loses the message (seen in the broker-restart fault test: one task in two of seven runs). Here the consumer
moves each message into an in-transit list of its process, in the same command. The first tests pin the
kombu internals the transport overrides (seconds, no server); the next drive a real kombu channel against a
real Redis; the last ones a real worker.
"""

from __future__ import annotations

import inspect
import json
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue
from kombu.transport import redis as kombu_redis

from devtools.demo import producer as make_producer
from devtools.demo import send
from devtools.servers import RedisServer, WorkerProcess, wait_for
from gateways import redis_transport
from gateways.redis_transport import OWNERS_KEY, TRANSPORT_PATH, in_transit_key
from tests.support.faults import model_env, wait_final

# ----------------------------------------------------------------------------- kombu internals


def test_kombu_redis_channel_still_polls_through_brpop_start_and_brpop_read():
    """The transport overrides these two: kombu's poller must still call them, with these names and state."""
    channel = kombu_redis.Channel
    assert list(inspect.signature(channel._brpop_start).parameters) == ["self", "timeout"]
    assert "options" in inspect.signature(channel._brpop_read).parameters
    assert "'BRPOP': self._brpop_read" in inspect.getsource(channel.__init__), \
        "kombu's poller no longer dispatches replies to Channel._brpop_read: gateways/redis_transport.py overrides it"
    for name in ("_in_poll", "brpop_timeout", "_queue_cycle", "active_queues", "priority_steps",
                 "_q_for_pri", "global_keyprefix", "conn_or_acquire", "ResponseError"):
        assert hasattr(channel, name) or name in inspect.getsource(channel), \
            f"kombu's Redis Channel lost {name!r}: gateways/redis_transport.py relies on it"
    # kombu >= 5.7 times each BRPOP for its health check; ours sets the same attribute (unused before 5.7).
    start = inspect.getsource(channel._brpop_start)
    assert "_brpop_sent_at" in start or "_brpop_sent_at" not in inspect.getsource(kombu_redis)
    assert "self.connection._deliver(" in inspect.getsource(channel._brpop_read)


def test_kombu_redis_qos_append_still_writes_exactly_the_index_and_the_body():
    """``redis_transport.QoS.append`` redoes kombu's two writes (plus the in-transit removal) in one transaction."""
    source = inspect.getsource(kombu_redis.QoS.append)
    assert "pipe.zadd(self.unacked_index_key" in source and ".hset(self.unacked_key, delivery_tag" in source
    assert "dumps([message._raw, EX, RK])" in source, \
        "kombu changed the unacked record's shape: update gateways/redis_transport.QoS.append to match"
    assert source.count("pipe.") == 1 and source.count(".execute()") == 1


# ----------------------------------------------------------------------- a real channel, a real Redis


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[tuple[str, redis.Redis]]:
    url = f"{redis_server.url}/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.close()


def transport(url: str) -> Connection:
    return Connection(url, transport=TRANSPORT_PATH)


def publish(connection: Connection, queue: Queue, n: int, **options: Any) -> None:
    connection.Producer().publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key,
                                  declare=[queue], serializer="json", **options)


def a_queue() -> Queue:
    name = f"q-{uuid.uuid4().hex[:8]}"
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def consume(connection: Connection, queue: Queue, count: int) -> list[Any]:
    got: list[Any] = []
    with Consumer(connection, [queue], callbacks=[lambda _body, message: got.append(message)]):
        deadline = time.monotonic() + 10
        while len(got) < count and time.monotonic() < deadline:
            try:
                connection.drain_events(timeout=1)
            except TimeoutError:
                pass
    return got


def test_each_message_goes_through_the_in_transit_list_and_leaves_it_when_recorded_unacked(broker):
    url, client = broker
    queue = a_queue()
    with transport(url) as connection:
        for n in range(3):
            publish(connection, queue, n)
        messages = consume(connection, queue, 3)
        assert [m.payload["n"] for m in messages] == [0, 1, 2]
        # recorded as unacknowledged, and no longer in transit, nor in the queue
        assert client.hlen("unacked") == 3 and client.zcard("unacked_index") == 3
        assert client.llen(in_transit_key(queue.name)) == 0 and client.llen(queue.name) == 0
        for message in messages:
            message.ack()
        assert client.hlen("unacked") == 0


def test_a_message_whose_reply_was_lost_is_handed_back_when_the_consumer_connects_again(broker):
    url, client = broker
    queue = a_queue()
    with transport(url) as connection:
        publish(connection, queue, 7)
        # what BLMOVE does on the broker when its reply never reaches this process
        client.lmove(queue.name, in_transit_key(queue.name), "RIGHT", "LEFT")
        assert client.llen(queue.name) == 0
    with transport(url) as connection:
        assert connection.default_channel.recover_in_transit([queue.name]) == 1
        assert client.llen(in_transit_key(queue.name)) == 0
        assert [m.payload["n"] for m in consume(connection, queue, 1)] == [7]
        assert client.zscore(OWNERS_KEY, in_transit_key(queue.name)) is not None


def test_a_dead_workers_in_transit_message_comes_back_after_the_visibility_timeout_and_a_live_ones_stays(broker):
    url, client = broker
    queue = a_queue()
    dead = f"{redis_transport.IN_TRANSIT_PREFIX}|{queue.name}|gone-host.42"
    live = f"{redis_transport.IN_TRANSIT_PREFIX}|{queue.name}|busy-host.7"
    with transport(url) as connection:
        publish(connection, queue, 1)
        publish(connection, queue, 2)
        client.lmove(queue.name, dead, "RIGHT", "LEFT")
        client.lmove(queue.name, live, "RIGHT", "LEFT")
        now = time.time()
        client.zadd(OWNERS_KEY, {dead: now - 120, live: now - 10})

        assert connection.default_channel.sweep_in_transit([queue.name], visibility_timeout=60) == (1, 0)
        assert client.llen(dead) == 0 and client.zscore(OWNERS_KEY, dead) is None
        assert client.llen(live) == 1 and client.zscore(OWNERS_KEY, live) is not None
        assert client.zscore(OWNERS_KEY, in_transit_key(queue.name)) >= now  # this process: alive
        assert [m.payload["n"] for m in consume(connection, queue, 1)] == [1]


def test_a_message_published_with_a_priority_is_folded_onto_its_queue_and_served(broker):
    url, client = broker
    queue = a_queue()
    with transport(url) as connection:
        publish(connection, queue, 5, priority=9)
        sub_lists = [key for key in client.keys(f"{queue.name}*") if key != queue.name.encode()]
        assert sub_lists and client.llen(queue.name) == 0  # kombu put it on a sub-list the consumer never blocks on
        assert connection.default_channel.sweep_in_transit([queue.name], visibility_timeout=60) == (0, 1)
        assert [m.payload["n"] for m in consume(connection, queue, 1)] == [5]


# ---------------------------------------------------------------------------------- a real worker


def raw_task(client: redis.Redis, producer_url: str, backend_url: str, queue: str, n: int) -> tuple[str, bytes]:
    """A task message as llm-engine sends it to ``queue``, taken back off the queue (id, raw bytes)."""
    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    producer = make_producer(producer_url, backend_url)
    try:
        task_id = send(producer, {"args": {"id": n}}, queue=scratch).id
    finally:
        producer.close()
    message = json.loads(client.rpop(scratch))
    message["properties"]["delivery_info"]["routing_key"] = queue
    return task_id, json.dumps(message).encode()


def own_list(client: redis.Redis, queue: str, pid: int) -> str | None:
    """The in-transit list the worker process ``pid`` registered for ``queue`` (host.pid.random)."""
    prefix = f"{redis_transport.IN_TRANSIT_PREFIX}|{queue}|{socket.gethostname()}.{pid}."
    return next((key.decode() for key in client.zrange(OWNERS_KEY, 0, -1) if key.decode().startswith(prefix)), None)


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_worker_hands_back_what_its_last_connection_left_in_transit_and_a_dead_workers_list(
    pool, start_worker, redis_server, queue, model
):
    """A reply lost to a broker restart (this worker's own list) runs after the reconnect; a SIGKILLed worker's
    list runs once its owner has been unseen for the visibility timeout (4 s: swept every 2 s)."""
    broker_url, backend_url = f"{redis_server.url}/0", f"{redis_server.url}/1"
    client, results = redis.Redis.from_url(broker_url), redis.Redis.from_url(backend_url)
    worker: WorkerProcess = start_worker(pool, CELERY_BROKER_VISIBILITY_TIMEOUT="4", **model_env(model))
    try:
        own_id, own = raw_task(client, broker_url, backend_url, queue, 1)
        dead_id, dead = raw_task(client, broker_url, backend_url, queue, 2)
        own_key = wait_for(lambda: own_list(client, queue, worker.pid), 10, "the worker's in-transit list registered")
        dead_key = f"{redis_transport.IN_TRANSIT_PREFIX}|{queue}|gone-host.42"
        client.lpush(own_key, own)
        client.lpush(dead_key, dead)
        client.zadd(OWNERS_KEY, {dead_key: time.time() - 60})

        # the dead worker's message: at the next sweep
        assert wait_final(results, [dead_id], 15, [worker])[dead_id]["status"] == "SUCCESS"
        # this worker's own: at its next connection (a broker connection lost: Redis dropped the client)
        assert client.llen(own_key) == 1
        client.client_kill_filter(_type="normal", skipme=True)
        assert wait_final(results, [own_id], 30, [worker])[own_id]["status"] == "SUCCESS"
        assert "the broker gave out as the connection was lost" in worker.output
        assert client.llen(own_key) == 0 and client.llen(dead_key) == 0
    finally:
        worker.signal(signal.SIGTERM)
        client.close()
        results.close()


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_warm_shutdown_hands_back_what_is_in_transit_once_the_worker_stopped(pool, start_worker, redis_server, queue,
                                                                                model):
    """A warm stop closes the consumer's connection with its last BLMOVE outstanding (celery#4354 with BRPOP): what
    the broker served then is handed back after the worker stopped, not at the visibility timeout."""
    broker_url, backend_url = f"{redis_server.url}/0", f"{redis_server.url}/1"
    client = redis.Redis.from_url(broker_url)
    worker: WorkerProcess = start_worker(pool, **model_env(model))
    try:
        task_id, raw = raw_task(client, broker_url, backend_url, queue, 3)
        own_key = wait_for(lambda: own_list(client, queue, worker.pid), 10, "the worker's in-transit list registered")
        client.lpush(own_key, raw)  # what a BLMOVE served as the connection closed leaves
        worker.signal(signal.SIGTERM)
        assert worker.process is not None and worker.process.wait(30) == 0
        assert client.llen(own_key) == 0 and client.zscore(OWNERS_KEY, own_key) is None
        assert [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)] == [task_id]
        assert "handed 1 message(s) back to the queue that the broker gave out as the worker stopped" in worker.output
    finally:
        client.close()
