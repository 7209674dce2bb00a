"""The pool sizing rule and the ack retry, in process (the worker-level proof is tests/test_scale.py)."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest

from forwarder import acks
from forwarder.app import broker_transport_options, build_app, celery_config
from forwarder.pools import MARGIN, pool_sizes
from forwarder.settings import Settings


@pytest.mark.parametrize("concurrency", [1, 32, 256, 1024])
def test_under_gevent_every_pool_holds_every_slot_plus_a_margin(concurrency):
    sizes = pool_sizes("gevent", concurrency)
    assert sizes.tasks_per_process == concurrency
    for size in (sizes.broker_connections, sizes.broker_pool_limit, sizes.result_connections,
                 sizes.per_process_clients):
        assert size >= concurrency + MARGIN and size >= 10
    assert sizes.model_connections == concurrency  # a cap: never more sockets to the model than slots


def test_under_prefork_a_process_runs_one_task_and_keeps_the_library_defaults():
    sizes = pool_sizes("prefork", 64)
    assert sizes.tasks_per_process == 1 and sizes.model_connections == 1
    assert sizes.broker_connections == sizes.result_connections == sizes.per_process_clients == 10


def test_the_sizes_reach_celery_and_kombu():
    settings = Settings.from_env({"CELERY_WORKER_POOL": "gevent", "CELERY_WORKER_CONCURRENCY": "256"})
    config = celery_config(settings)
    assert config["broker_transport_options"]["max_connections"] == 256 + MARGIN
    assert config["broker_pool_limit"] == config["redis_max_connections"] == 256 + MARGIN
    sqs = Settings.from_env({"CELERY_WORKER_POOL": "gevent", "CELERY_WORKER_CONCURRENCY": "64",
                             "CELERY_BROKER_URL": "sqs://", "CELERY_SQS_QUEUE_URL": "http://127.0.0.1:1/q"})
    assert broker_transport_options(sqs)["client-config"] == {"max_pool_connections": 64 + MARGIN}


@pytest.mark.parametrize("pool", ["gevent", "prefork"])
def test_one_result_backend_per_process_not_per_thread_or_greenlet(pool):
    # result_backend_thread_safe: Celery keeps one backend (one Redis pool, one S3 client) per app; off, one per
    # thread, which under gevent (threading.local patched) is one per greenlet: a new connection per task.
    # tests/test_worker.py counts the connections a real gevent worker makes; here the setting and its effect.
    settings = Settings.from_env({"CELERY_WORKER_POOL": pool, "CELERY_WORKER_CONCURRENCY": "8"})
    assert celery_config(settings)["result_backend_thread_safe"] is True
    app = build_app(settings)
    assert app.conf.result_backend_thread_safe is True
    main = app.backend  # built once, in the main thread (concurrent first uses would each build their own)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(app.backend)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 4 and all(backend is main for backend in seen)


class Blip(ConnectionError):
    pass


class OpenChannel:
    """An open channel, as ``acks.channel_gone`` reads one: not closed, its transport still connected."""

    closed = False
    connection = SimpleNamespace(client=object())


class Message:
    """Stands in for a kombu message whose broker fails ``failures`` times (a blip cannot be timed here)."""

    channel = OpenChannel()
    delivery_tag = "tag-1"

    def __init__(self, failures: int) -> None:
        self.failures, self.acks = failures, 0

    def ack(self) -> None:
        self.acks += 1
        if self.acks <= self.failures:
            raise Blip("Too many connections")


def test_an_ack_that_fails_on_a_blip_is_retried_with_backoff(caplog):
    pauses: list[float] = []
    message = Message(failures=2)
    assert acks.acknowledge(message, "t-1", (Blip,), sleep=pauses.append) is True
    assert message.acks == 3 and pauses == [0.05, 0.1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_ack_that_keeps_failing_is_one_error_naming_the_consequence_and_counted(caplog):
    before = acks.AckCounter.failed
    message = Message(failures=99)
    with caplog.at_level(logging.WARNING):
        assert acks.acknowledge(message, "t-2", (Blip,), sleep=lambda _: None) is False
    assert message.acks == acks.ACK_ATTEMPTS and acks.AckCounter.failed == before + 1
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "t-2" in error.getMessage() and "will run again after the visibility timeout" in error.getMessage()


class Broken(Message):
    """A message whose ack fails with an error that is no broker fault (a bug), on an open channel."""

    def ack(self) -> None:
        self.acks += 1
        raise KeyError("bookkeeping")


def test_an_ack_that_raises_a_bug_is_one_error_with_its_trace_never_retried_and_never_the_end_of_the_worker(caplog):
    before = acks.AckCounter.failed
    message = Broken(failures=0)
    with caplog.at_level(logging.WARNING):
        assert acks.acknowledge(message, "t-3", (Blip,), sleep=lambda _: None) is False
    assert message.acks == 1 and acks.AckCounter.failed == before + 1
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "t-3" in error.getMessage() and "KeyError" in error.getMessage() and error.exc_info is not None
