"""A result store that blips or goes down while tasks complete: every task still ends with one stored outcome.

The worker retries a failed store with backoff; a store that stays down makes it hand the message back
instead of acking a task whose outcome nobody could read (which would leave the producer at PENDING until
the task expired). The fault sits between the worker and the store: a TCP proxy in front of a separate
Redis for results, or the HTTP proxy in front of moto for S3.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from devtools.servers import RedisServer, wait_for
from tests.support.aws import aws_client
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import POOLS, model_env, send
from tests.support.tcp_proxy import *  # noqa: F403  (fixture)

TASKS = 24
#: Longer than a store's whole retry budget (forwarder.app: 5 retries, backoff up to 5 s; S3 adds botocore's own
#: 3 attempts to each), so some task surely exhausts it and is handed back, and others retry through it.
OUTAGE_S = {"redis": 12.0, "s3": 20.0}


@pytest.fixture
def results_server():
    server = RedisServer().start()
    yield server
    server.stop()


def final_states(read, ids) -> dict[str, str]:
    return {task_id: state for task_id in ids if (state := read(task_id)) in ("SUCCESS", "FAILURE")}


def run_through_an_outage(worker, producer, queue, own_model, read, cut, restore, outage: float) -> list[str]:
    own_model.behaviour.delay = 0.3
    ids = [send(producer, queue, {"args": {"id": index}}) for index in range(TASKS)]
    wait_for(lambda: len(final_states(read, ids)) >= 4, 30, "the first results")
    cut()
    time.sleep(outage)  # tasks keep completing while their results cannot be stored
    restore()
    wait_for(lambda: len(final_states(read, ids)) == TASKS, 120, "every task's outcome", interval=0.5)
    assert set(final_states(read, ids).values()) == {"SUCCESS"}
    # Every request reached the model at least once (a hand-back runs it again: at least once, as elsewhere).
    assert {str(index) for index in range(TASKS)} <= set(own_model.behaviour.requests)
    output = worker.output
    assert "Failed operation _store_result. Retrying" in output  # blips are retried ...
    assert "could not be stored" in output and "handed back to run again" in output  # ... an outage handed back
    return ids


@pytest.mark.faults
@pytest.mark.parametrize("pool", POOLS)
def test_a_redis_result_store_outage_loses_no_result(
    pool, spawn, producer, queue, own_model, results_server, tcp_proxy
):
    proxy = tcp_proxy(results_server.port)
    worker = spawn(pool, CELERY_RESULT_BACKEND=f"redis://127.0.0.1:{proxy.port}/1", **model_env(own_model))
    store = redis.Redis(port=results_server.port, db=1, socket_timeout=5)

    def read(task_id: str) -> str | None:
        raw = store.get(f"celery-task-meta-{task_id}")
        return None if raw is None else json.loads(raw)["status"]

    run_through_an_outage(worker, producer, queue, own_model, read, proxy.down, proxy.up, OUTAGE_S["redis"])
    store.close()


@pytest.mark.faults
@pytest.mark.parametrize("pool", POOLS)
def test_an_s3_result_store_outage_loses_no_result(
    pool, spawn, producer, queue, own_model, moto_server, aws_env, s3_bucket, faulty_proxy
):
    proxy = faulty_proxy("pass")
    worker = spawn(pool, CELERY_RESULT_BACKEND=f"s3://{s3_bucket}/results", AWS_ENDPOINT_URL_S3=proxy.url,
                   **aws_env, **model_env(own_model))
    s3 = aws_client("s3", moto_server)

    def read(task_id: str) -> str | None:
        try:
            body = s3.get_object(Bucket=s3_bucket, Key=f"results/celery-task-meta-{task_id}")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        return json.loads(body)["status"]

    run_through_an_outage(worker, producer, queue, own_model, read, lambda: proxy.set_mode("error500"),
                          lambda: proxy.set_mode("pass"), OUTAGE_S["s3"])
