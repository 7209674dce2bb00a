"""Bad input, under both pools: messages the worker must refuse, requests it must fail clearly, and
secrets it must never log. After each, the worker serves the next task.

docs/RELIABILITY.md lists what each test proves; keep the two in step.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer

from devtools.servers import ModelServer, RedisServer, free_port, wait_for
from forwarder.tasks import TASK_NAME
from tests.support.aws import aws_client
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import (
    POOLS,
    assert_no_secret,
    model_env,
    read_metas,
    send,
    sqs_counts,
    unacked_for,
    wait_error_meta,
    wait_final,
)

pytestmark = pytest.mark.faults


class Planted:
    """Unpickling this creates a file: proof that a pickle message was deserialized."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture
def pickle_producer(redis_server: RedisServer) -> Iterator[Celery]:
    """A producer that sends pickle, as a misconfigured (or hostile) client would."""
    app = Celery("pickler", broker=f"{redis_server.url}/0", backend=f"{redis_server.url}/1")
    app.conf.update(task_serializer="pickle", accept_content=["json", "pickle"], result_accept_content=["json"])
    yield app
    app.close()


def publish_raw(redis_server: RedisServer, queue: str, body: Any, headers: dict[str, Any]) -> None:
    """Publish a message that bypasses Celery's producer (a body Celery itself would never build)."""
    with Connection(f"{redis_server.url}/0") as connection:
        Producer(connection).publish(
            body, exchange=Exchange(queue, type="direct"), routing_key=queue, serializer="json", headers=headers
        )


def assert_serves_next(producer: Celery, results: Any, queue: str, worker: Any, model: ModelServer) -> None:
    """The worker still serves: a good task succeeds and reaches the model."""
    good = send(producer, queue, {"args": {"id": "next"}})
    assert wait_final(results, [good], 30, [worker])[good]["status"] == "SUCCESS"
    assert model.behaviour.requests["next"] == 1


# --------------------------------------------------------------------------- refused messages


@pytest.mark.parametrize("pool", POOLS)
def test_pickle_message_is_refused_never_deserialized(
    pool, spawn, pickle_producer, producer, results, broker, queue, own_model, tmp_path
):
    worker = spawn(pool, **model_env(own_model))
    planted = tmp_path / "unpickled"

    # When a pickle message arrives (unpickling it would create a file)
    refused = pickle_producer.send_task(
        TASK_NAME, args=[{"args": {"id": "pickled"}, "payload": Planted(str(planted))}, datetime.now(), False],
        queue=queue, serializer="pickle",
    ).id
    worker.wait_for_log("Refusing to deserialize untrusted content of type pickle", timeout=30)

    # Then it is dropped unread: never unpickled, never sent to the model, nothing stored, not requeued
    assert_serves_next(producer, results, queue, worker, own_model)
    assert not planted.exists()
    assert own_model.behaviour.total == 1
    assert read_metas(results, [refused]) == {}
    assert broker.llen(queue) == 0 and unacked_for(broker, queue) == {}


@pytest.mark.parametrize("pool", POOLS)
def test_unknown_task_name_is_rejected_with_a_stored_failure(pool, spawn, producer, results, broker, queue, own_model):
    worker = spawn(pool, **model_env(own_model))

    unknown = send(producer, queue, {"args": {"id": "unknown"}}, name="some.other.task")
    worker.wait_for_log("Received unregistered task of type 'some.other.task'", timeout=30)

    meta = wait_final(results, [unknown], 30, [worker])[unknown]
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "NotRegistered"
    assert "some.other.task" in str(producer.AsyncResult(unknown).result)
    assert_serves_next(producer, results, queue, worker, own_model)
    assert own_model.behaviour.requests["unknown"] == 0
    assert broker.llen(queue) == 0 and unacked_for(broker, queue) == {}


#: Messages with Celery's task headers but a body that is not [args (array), kwargs (object), embed].
MALFORMED_BODIES = [
    "a string",
    [1, 2],
    {"kwargs": {}},
    [{"args": {"id": "x"}}, {}, {}],
    [[{"args": {"id": "x"}}], "kwargs", {}],
]


@pytest.mark.parametrize("pool", POOLS)
def test_malformed_message_bodies_are_refused_and_the_worker_survives(
    pool, spawn, producer, results, broker, redis_server, queue, own_model
):
    worker = spawn(pool, **model_env(own_model))

    # When messages arrive whose body (or headers) Celery cannot turn into a task call
    ids = [str(uuid.uuid4()) for _ in MALFORMED_BODIES]
    for body, task_id in zip(MALFORMED_BODIES, ids, strict=True):
        publish_raw(redis_server, queue, body, {"task": TASK_NAME, "id": task_id, "lang": "py"})
    publish_raw(redis_server, queue, [[{"args": {"id": "no-id"}}], {}, {}], {"task": TASK_NAME, "lang": "py"})

    # Then each is logged and dropped, and the worker keeps serving (it used to exit: a poison message
    # that every replica took in turn)
    worker.wait_for_log("Received invalid task message", timeout=30, count=len(MALFORMED_BODIES) + 1)
    # and each one whose id is known gets a stored FAILURE, so its producer is not left at PENDING
    metas = wait_error_meta(results, ids, 30, [worker])
    for body, task_id in zip(MALFORMED_BODIES, ids, strict=True):
        assert metas[task_id]["status"] == "FAILURE", body
        assert metas[task_id]["result"]["exc_type"] == "InvalidTaskError", body
        assert json.loads(metas[task_id]["result"]["custom"])["error"].startswith("malformed task message"), body
    assert_serves_next(producer, results, queue, worker, own_model)
    assert own_model.behaviour.total == 1
    assert "Unrecoverable error" not in worker.output
    assert broker.llen(queue) == 0 and unacked_for(broker, queue) == {}
    assert worker.process is not None and worker.process.poll() is None


#: Raw SQS message bodies that are not kombu messages (someone used the console or another client).
RAW_SQS_BODIES = ["a prompt", "[1, 2]", '{"args": {"id": 1}}', base64.b64encode(b"not json").decode(),
                  json.dumps({"body": "x", "properties": {}})]


@pytest.mark.parametrize("pool", POOLS)
def test_foreign_sqs_messages_are_deleted_and_the_worker_survives(pool, spawn, results, sqs_queue, moto_server, own_model):
    env, producer, url = sqs_queue(5)
    worker = spawn(pool, **env)
    sqs = aws_client("sqs", moto_server)

    # When an SQS queue receives bodies no Celery producer sent, and a kombu envelope with a malformed body
    for body in RAW_SQS_BODIES:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    envelope_id = str(uuid.uuid4())
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({
        "body": base64.b64encode(b'"a string"').decode(), "content-type": "application/json",
        "content-encoding": "utf-8", "headers": {"task": TASK_NAME, "id": envelope_id, "lang": "py"},
        "properties": {"body_encoding": "base64", "delivery_info": {}},
    }))

    # Then each foreign body is logged and deleted (not redelivered forever), the envelope gets a stored
    # FAILURE, nothing reaches the model, and the worker serves the next task
    worker.wait_for_log("Received and deleted unknown message", timeout=30, count=len(RAW_SQS_BODIES))
    meta = wait_error_meta(results, [envelope_id], 30, [worker])[envelope_id]
    assert meta["result"]["exc_type"] == "InvalidTaskError"
    assert_serves_next(producer, results, env["CELERY_QUEUE"], worker, own_model)
    assert own_model.behaviour.total == 1
    wait_for(lambda: sqs_counts(moto_server, url) == (0, 0), 15, "the queue empty, nothing in flight")
    assert worker.process is not None and worker.process.poll() is None


# ----------------------------------------------------------------------- malformed requests

#: (case, task args, exception type stored, text the error must contain)
MALFORMED = [
    ("no arguments", [], "MalformedRequest",
     "the task has no arguments: expected [request, arrival_timestamp, return_pickled]"),
    ("request is a string", ["a prompt", "2024-01-01T00:00:00", False], "MalformedRequest",
     "the request (first task argument) must be a JSON object, got a string"),
    ("request is a list", [[{"args": {}}], "2024-01-01T00:00:00", False], "MalformedRequest",
     "the request (first task argument) must be a JSON object, got an array"),
    ("args is a number", [{"args": 7}, "2024-01-01T00:00:00", False], "MalformedRequest",
     "request 'args' must be a JSON object, array or string, got a number"),
    ("args is null", [{"args": None}, "2024-01-01T00:00:00", False], "MalformedRequest",
     "request 'args' must be a JSON object, array or string, got null"),
    ("args is a boolean", [{"args": True}, "2024-01-01T00:00:00", False], "MalformedRequest",
     "request 'args' must be a JSON object, array or string, got a boolean"),
]


@pytest.mark.parametrize("pool", POOLS)
def test_malformed_requests_fail_clearly_before_any_http_call(pool, spawn, producer, results, queue, own_model):
    worker = spawn(pool, **model_env(own_model))

    sent = {case: producer.send_task(TASK_NAME, args=args, queue=queue).id for case, args, _, _ in MALFORMED}
    metas = wait_error_meta(results, sent.values(), 30, [worker])

    for case, _args, exc_type, text in MALFORMED:
        meta = metas[sent[case]]
        assert meta["status"] == "FAILURE", case
        assert meta["result"]["exc_type"] == exc_type, case
        custom = json.loads(meta["result"]["custom"])
        assert text in custom["error"], (case, custom["error"])
        assert custom["error_metadata"].startswith("Internal failure\n"), case
        assert text in str(producer.AsyncResult(sent[case]).result), case
    assert own_model.behaviour.total == 0, "a malformed request never reaches the model"
    assert_serves_next(producer, results, queue, worker, own_model)
    # Expected failures: one line each, no traceback in the log
    assert "Traceback" not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_five_megabyte_payload_is_forwarded_and_stored(pool, spawn, producer, results, queue, own_model):
    worker = spawn(pool, **model_env(own_model))
    children = {child.pid for child in worker.children()}
    blob = "x" * (5 * 1024 * 1024)

    big = send(producer, queue, {"args": {"id": "big", "blob": blob}})
    meta = wait_final(results, [big], 60, [worker])[big]

    assert meta["status"] == "SUCCESS", meta.get("result")
    assert meta["result"]["status_code"] == 200
    assert json.loads(meta["result"]["result"])["echo"]["blob"] == blob
    assert_serves_next(producer, results, queue, worker, own_model)
    assert {child.pid for child in worker.children()} == children, "no child died or was replaced"


# --------------------------------------------------------------------------------- secrets

#: The secrets this worker reads (Redis broker, callback hook only). AWS credentials are read only by the
#: AWS clients (SQS broker, S3 results, logging hook): test_no_credential_reaches_the_log_under_faults
#: (tests/test_hook_faults.py) checks those, at DEBUG, with a worker that uses them.
SECRETS = {"FORWARDER_CALLBACK_AUTH_PASSWORD": "env-callback-password-7f3a9c"}
REQUEST_PASSWORD = "request-callback-password-2e7b"


@pytest.mark.parametrize("pool", POOLS)
def test_no_secret_in_logs(pool, spawn, producer, pickle_producer, results, queue, own_model, model):
    closed = f"http://127.0.0.1:{free_port()}/callback"
    worker = spawn(
        pool, **model_env(own_model), **SECRETS,
        FORWARDER_CALLBACK_AUTH_USERNAME="endpoint-user",
        FORWARDER_HOOKS="callback", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        FORWARDER_CALLBACK_RETRIES="1", FORWARDER_CALLBACK_TIMEOUT="2",
    )
    auth = {"kind": "basic", "username": "caller", "password": REQUEST_PASSWORD}

    # Every path a request can take: success with a callback, a failed callback, a malformed request,
    # an unknown task name, a pickle message; each carrying the request's callback password.
    ids = [
        send(producer, queue, {"args": {"id": 1}, "callback_url": f"{model.url}/callback", "callback_auth": auth}),
        send(producer, queue, {"args": {"id": 2}, "callback_url": closed, "callback_auth": auth}),
        send(producer, queue, {"args": {"id": 3}, "callback_url": closed}),  # the default (env) password
        send(producer, queue, {"args": None, "callback_url": closed, "callback_auth": auth}),  # malformed
        send(producer, queue, {"args": {"id": 5}, "callback_auth": auth}, name="some.other.task"),
    ]
    pickle_producer.send_task(TASK_NAME, args=[{"args": {"id": 6}, "callback_auth": auth}, datetime.now(), False],
                              queue=queue, serializer="pickle")
    wait_final(results, ids, 30, [worker])
    worker.wait_for_log("Refusing to deserialize", timeout=30)
    for task_id in ids[:4]:  # the callback's outcome: "callback for task <id> delivered" or "... failed for task <id>"
        worker.wait_for_log(f"for task {task_id}", timeout=30)

    output = worker.output
    # The first callback is delivered (to the shared model server, which answers any POST); the next
    # three fail (a closed port); the unknown task and the pickle message never reach the hooks.
    assert f"callback for task {ids[0]} delivered to 127.0.0.1:{model.port}" in output
    assert [body["task_id"] for body in model.behaviour.bodies] == [ids[0]]  # what the server received
    for task_id in ids[1:4]:
        assert f"hook callback failed for task {task_id}: CallbackError" in output
    assert output.count("callback for task ") == 1 and output.count("hook callback failed") == 3
    assert_no_secret(output, [*SECRETS.values(), REQUEST_PASSWORD])


def test_planted_pickle_really_creates_its_file(tmp_path: Path):
    """The probe of the pickle test works: unpickling a Planted does create the file."""
    import pickle

    planted = tmp_path / "probe"
    pickle.loads(pickle.dumps(Planted(str(planted))))
    assert planted.exists()
