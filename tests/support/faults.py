"""Helpers and fixtures for the fault and bad-input tests (tests/test_faults.py, tests/test_bad_input.py).

Results are read raw from the result backend (Redis DB 1): a producer reconnecting after a broker
restart can neither hide nor delay what the worker stored, and the llm-engine failure meta (its
``custom`` JSON) is checked exactly as stored. Waits are on conditions, with generous ceilings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
import requests
from celery import Celery

from devtools.demo import producer as make_producer
from devtools.servers import ModelServer, RedisServer, WorkerProcess, wait_for, worker_env
from forwarder.tasks import TASK_NAME
from tests.support.aws import REGION, aws_client

__all__ = ["POOLS", "FINAL", "send", "read_metas", "wait_final", "wait_error_meta", "statuses", "model_env", "unacked_for",
           "assert_no_secret",
           "ModelProcess", "results", "broker", "own_model", "model_process", "model_on", "spawn",
           "sqs_queue", "sqs_counts"]

POOLS = ["prefork", "gevent"]
FINAL = ("SUCCESS", "FAILURE")
#: Seconds a redelivered task needs once its message is back in the queue: taken, run (a model answering at
#: once), stored and read here.
REDELIVERY_SLACK = 5.0


def sweep_every(visibility: float) -> float:
    """The redelivery sweep's pace as documented (forwarder/extensions/redelivery.py): every half visibility
    timeout, within 1 to 10 s. Restated here, not imported: a sweep slowed in the code must not lengthen the
    waits below with it (tests/test_redelivery.py pins the function and the step to this)."""
    return min(10.0, max(1.0, visibility / 2))


def redelivery_wait(visibility: float, slack: float = REDELIVERY_SLACK) -> float:
    """Longest wait, from a live worker's start, for a dead worker's unacknowledged messages to come back and
    complete: their visibility timeout, two sweeps (the one due as they expire may tick just before), and
    ``slack``. Derived from the configured visibility timeout, not a fixed 30-60 s: a sweep ten times slower
    misses it (and fails in seconds), where a fixed minute let it pass."""
    return visibility + 2 * sweep_every(visibility) + slack


def send(producer: Celery, queue: str, request: Any, name: str = TASK_NAME, **options: Any) -> str:
    """Send one task as llm-engine does ([request, arrival datetime, return_pickled]); returns its id."""
    return producer.send_task(name, args=[request, datetime.now(), False], queue=queue, **options).id


def read_metas(client: redis.Redis, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored meta of each task that has one (any state), read raw from the result backend."""
    ids = list(ids)
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for task_id, raw in zip(chunk, client.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True):
            if raw is not None:
                found[task_id] = json.loads(raw)
    return found


def wait_final(client: redis.Redis, ids: Iterable[str], timeout: float,
               workers: Iterable[WorkerProcess] = ()) -> dict[str, dict[str, Any]]:
    """Wait until every task has a final (SUCCESS or FAILURE) meta; returns them all.

    A broker restart may drop the connection mid-poll: that poll counts as "not yet".
    """
    ids = list(ids)
    latest: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        try:
            latest.update(read_metas(client, [i for i in ids if latest.get(i, {}).get("status") not in FINAL]))
        except redis.ConnectionError:
            return False
        return all(latest.get(i, {}).get("status") in FINAL for i in ids)

    try:
        wait_for(done, timeout, f"{len(ids)} final results", interval=0.1)
    except TimeoutError as exc:
        missing = [i for i in ids if latest.get(i, {}).get("status") not in FINAL]
        logs = "\n".join(f"--- worker {w.pid} ---\n{w.output[-3000:]}" for w in workers)
        raise AssertionError(f"{exc}: {len(missing)} missing, e.g. {missing[:3]}\n{logs}") from None
    return {i: latest[i] for i in ids}


def wait_error_meta(client: redis.Redis, ids: Iterable[str], timeout: float,
                    workers: Iterable[WorkerProcess] = ()) -> dict[str, dict[str, Any]]:
    """Wait until every task is FAILURE with llm-engine's error meta (its ``custom`` JSON) stored.

    Celery stores its own failure meta first; ``ForwardTask.after_return`` then overwrites it with
    llm-engine's, so a reader may briefly see the first one.
    """
    ids = list(ids)
    wait_final(client, ids, timeout, workers)

    def rewritten() -> bool:
        metas = read_metas(client, ids)
        return all(isinstance(m.get("result"), dict) and "custom" in m["result"] for m in metas.values())

    wait_for(rewritten, timeout, "llm-engine's error meta")
    return read_metas(client, ids)


def statuses(metas: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {task_id: meta["status"] for task_id, meta in metas.items()}


def assert_no_secret(output: str, secrets: Iterable[str]) -> None:
    """The secret scan: none of ``secrets`` appears in a worker's output (the lines that hold one, if any)."""
    for secret in secrets:
        assert secret not in output, f"{secret!r} logged:\n" + "\n".join(
            line for line in output.splitlines() if secret in line
        )


def model_env(server: ModelServer) -> dict[str, str]:
    return {"FORWARDER_MODEL_URL": f"{server.url}/predict", "FORWARDER_HEALTHCHECK_URL": f"{server.url}/readyz"}


def unacked_for(broker: redis.Redis, queue: str) -> dict[str, float]:
    """Delivery tag -> delivery time of the unacknowledged messages of ``queue`` (kombu's Redis bookkeeping)."""
    tags = {}
    for tag, raw in broker.hgetall("unacked").items():
        _message, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            score = broker.zscore("unacked_index", tag)
            tags[tag.decode()] = float(score or 0)
    return tags


class ModelProcess:
    """The example model in a process of its own, so it can really go down: SIGKILL closes every
    connection, keep-alive ones included (an in-process server's stop() leaves those served)."""

    def __init__(self, port: int, request_log: str | None = None) -> None:
        self.port = port
        self.request_log = request_log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ModelProcess:
        code = ("from devtools.servers import serve_model_forever; "
                f"serve_model_forever({self.port}, request_log={self.request_log!r})")
        self.process = subprocess.Popen([sys.executable, "-c", code], env=worker_env())
        wait_for(lambda: _ready(self.port), 20, f"model process on port {self.port}")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def results(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain Redis client on the result backend (DB 1)."""
    client = redis.Redis.from_url(f"{redis_server.url}/1", socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain Redis client on the broker (DB 0): queue lists and kombu's unacked bookkeeping."""
    client = redis.Redis.from_url(f"{redis_server.url}/0", socket_timeout=5, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
def own_model() -> Iterator[ModelServer]:
    """A model server of this test's own: hung or delayed handlers never leak into other tests' counts."""
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
def model_process() -> Iterator[Callable[..., ModelProcess]]:
    """Factory: the example model in its own process on a port; killed at teardown."""
    started: list[ModelProcess] = []

    def start(port: int, request_log: str | None = None) -> ModelProcess:
        started.append(ModelProcess(port, request_log).start())
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def model_on() -> Iterator[Callable[[int], ModelServer]]:
    """Factory: an in-process model server (it counts requests) on a given port; stopped at teardown."""
    started: list[ModelServer] = []

    def start(port: int) -> ModelServer:
        started.append(ModelServer(port).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def spawn(start_worker: Callable[..., WorkerProcess]) -> Iterator[Callable[..., WorkerProcess]]:
    """``start_worker`` whose workers are SIGKILLed at teardown (before ``start_worker`` stops them)."""
    started: list[WorkerProcess] = []

    def start(pool: str = "prefork", **kwargs: Any) -> WorkerProcess:
        worker = start_worker(pool, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def sqs_queue(
    redis_server: RedisServer, moto_server: str, aws_env: dict[str, str], own_model: ModelServer
) -> Iterator[Callable[[int], tuple[dict[str, str], Celery, str]]]:
    """Factory: ``sqs_queue(visibility)`` -> (worker env, producer, queue URL) for a new SQS queue in moto."""
    producers: list[Celery] = []

    def make(visibility: int) -> tuple[dict[str, str], Celery, str]:
        name = f"queue-{uuid.uuid4().hex[:12]}"
        url = aws_client("sqs", moto_server).create_queue(
            QueueName=name, Attributes={"VisibilityTimeout": str(visibility)})["QueueUrl"]
        env = {**aws_env, **model_env(own_model), "CELERY_BROKER_URL": "sqs://", "CELERY_SQS_QUEUE_URL": url,
               "CELERY_QUEUE": name, "CELERY_SQS_POLLING_INTERVAL": "0.1"}
        producer = make_producer("sqs://", f"{redis_server.url}/1")
        producer.conf.broker_transport_options = {"predefined_queues": {name: {"url": url}}, "region": REGION}
        producers.append(producer)
        return env, producer, url

    yield make
    for producer in producers:
        producer.close()


def sqs_counts(moto_server: str, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of an SQS queue."""
    attrs = aws_client("sqs", moto_server).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])
