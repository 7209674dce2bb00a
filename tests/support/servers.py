"""Fixtures for the Redis-protocol server, the model server, workers and a producer."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from devtools.demo import producer as make_producer
from devtools.servers import ModelServer, RedisServer, WorkerProcess, worker_env

__all__ = ["redis_server", "model_server", "model", "queue", "producer", "start_worker", "base_env"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def model_server() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
def model(model_server: ModelServer) -> Iterator[ModelServer]:
    """The shared model server with its behaviour reset before and after the test."""
    model_server.behaviour.reset()
    yield model_server
    model_server.behaviour.reset()


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own: tests never see each other's messages."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def base_env(redis_server: RedisServer, model: ModelServer, queue: str) -> dict[str, str]:
    """Worker environment against the suite's servers, with short timeouts for tests."""
    return worker_env(
        CELERY_BROKER_URL=f"{redis_server.url}/0",
        CELERY_RESULT_BACKEND=f"{redis_server.url}/1",
        CELERY_QUEUE=queue,
        CELERY_WORKER_CONCURRENCY="2",
        FORWARDER_MODEL_URL=f"{model.url}/predict",
        FORWARDER_HEALTHCHECK_URL=f"{model.url}/readyz",
        FORWARDER_READY_TIMEOUT="20",
        FORWARDER_RETRY_BACKOFF="1",
        FORWARDER_RETRY_BACKOFF_MAX="1",
    )


@pytest.fixture
def producer(redis_server: RedisServer) -> Iterator[Celery]:
    """A bare Celery app as llm-engine's gateway builds one: sends tasks, reads results."""
    app = make_producer(f"{redis_server.url}/0", f"{redis_server.url}/1")
    yield app
    app.close()


@pytest.fixture
def start_worker(base_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker(pool="gevent", ddtrace=False, wait_ready=True, **ENV)``; all stopped after."""
    started: list[WorkerProcess] = []

    def start(pool: str = "prefork", *, ddtrace: bool = False, wait_ready: bool = True,
              timeout: float = 60, **env: str) -> WorkerProcess:
        worker = WorkerProcess({**base_env, "CELERY_WORKER_POOL": pool, **env}, ddtrace=ddtrace)
        started.append(worker)
        return worker.start(wait_ready=wait_ready, timeout=timeout)

    yield start
    for worker in started:  # signal all first: their warm shutdowns overlap
        worker.signal(signal.SIGTERM)
    for worker in started:
        worker.stop(timeout=20)
