"""The logging hook: llm-engine's Firehose record, without credentials, through moto and a real worker."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery

from devtools.demo import send
from devtools.servers import ModelServer, WorkerProcess
from forwarder import deps
from forwarder.hooks import HookRunner
from forwarder.hooks.firehose_log import REDACTED, TRUNCATED_FIELD, LoggingHook, is_secret_key
from forwarder.payload import error_payload
from forwarder.settings import Settings
from gateways.firehose import MAX_RECORD_BYTES
from tests.support.aws import (
    assume_role_calls,
    aws_client,
    delivered_records,
    make_gateway,
    unique_role_arn,
    wait_for_records,
)

SECRET = "hunter2-callback-Pa55word"
BEARER = "Bearer abc.def-very-secret-jwt"
FIXED_NOW = datetime(2031, 2, 3, 4, 5, 6, 789, tzinfo=UTC)
IDENTITY = {
    "endpoint_id": "end_abc123",
    "endpoint_name": "llama-endpoint",
    "endpoint_type": "async",
    "bundle_id": "bun_xyz789",
    "labels": {"team": "ml", "product": "chat"},
}


def make_hook(stream: dict[str, str], **overrides: Any) -> LoggingHook:
    identity = {**IDENTITY, **overrides}
    return LoggingHook(make_gateway(stream["name"], role_arn=unique_role_arn()), clock=lambda: FIXED_NOW, **identity)


def request_with_secrets(index: int = 0) -> dict[str, Any]:
    return {
        "args": {"id": index, "prompt": f"hello {index}", "max_new_tokens": 16, "temperature": 0.2},
        "callback_url": "https://example.com/callback",
        "callback_auth": {"kind": "basic", "username": "svc-user", "password": SECRET},
        "return_pickled": False,
    }


def raw_bodies(moto_url: str, stream: dict[str, str]) -> bytes:
    s3 = aws_client("s3", moto_url)
    listing = s3.list_objects_v2(Bucket=stream["bucket"], Prefix=stream["prefix"]).get("Contents", [])
    return b"".join(s3.get_object(Bucket=stream["bucket"], Key=item["Key"])["Body"].read() for item in listing)


# ------------------------------------------------------------------------------ the record, in-process


def test_record_has_llm_engine_fields(moto_server: str, firehose_stream: dict[str, str]) -> None:
    hook = make_hook(firehose_stream)
    response = {"result": json.dumps({"text": "hi"}), "status_code": 200, "task_id": "task-1"}
    HookRunner([hook]).run(request_with_secrets(), {"result": response["result"], "status_code": 200}, "task-1")
    (record,) = delivered_records(moto_server, firehose_stream)
    assert set(record) == {"EMITTED_AT", "REQUEST_BODY", "RESPONSE_BODY", "ENDPOINT_ID", "ENDPOINT_NAME",
                           "ENDPOINT_TYPE", "BUNDLE_ID", "LABELS"}
    assert record["EMITTED_AT"] == "2031-02-03T04:05:06"
    assert isinstance(record["REQUEST_BODY"], str)  # a JSON string, as llm-engine's request.json()
    request = json.loads(record["REQUEST_BODY"])
    assert request["args"] == request_with_secrets()["args"]
    assert request["callback_auth"] == REDACTED and request["callback_url"] == "https://example.com/callback"
    assert record["RESPONSE_BODY"] == response
    assert record["ENDPOINT_ID"] == "end_abc123" and record["ENDPOINT_NAME"] == "llama-endpoint"
    assert record["ENDPOINT_TYPE"] == "async" and record["BUNDLE_ID"] == "bun_xyz789"
    assert record["LABELS"] == {"team": "ml", "product": "chat"}


def test_credentials_never_reach_the_record(moto_server: str, firehose_stream: dict[str, str]) -> None:
    hook = make_hook(firehose_stream)
    request = request_with_secrets()
    request["args"]["headers"] = {"Authorization": BEARER, "X-Api-Key": "k-123456789", "Accept": "json"}
    request["args"]["access_token"] = "tok-123456789"
    # A model that echoes what it got: the password inside the stored (string-encoded) result, escaped.
    echoed = {"echo": {"note": f"auth was {SECRET}", "nested": json.dumps({"pw": SECRET})}}
    response = {"result": json.dumps(echoed), "status_code": 200, "client_secret": "cs-123456789"}
    hook(request, {**response, "task_id": "task-2"}, "task-2")
    raw = raw_bodies(moto_server, firehose_stream).decode()
    for secret in (SECRET, BEARER, "k-123456789", "tok-123456789", "cs-123456789"):
        assert secret not in raw
    (record,) = delivered_records(moto_server, firehose_stream)
    sent = json.loads(record["REQUEST_BODY"])
    assert sent["args"]["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED, "Accept": "json"}
    assert sent["args"]["max_new_tokens"] == 16  # "tokens" is not a credential
    assert record["RESPONSE_BODY"]["client_secret"] == REDACTED
    assert REDACTED in json.loads(record["RESPONSE_BODY"]["result"])["echo"]["note"]


@pytest.mark.parametrize(
    ("key", "secret"),
    [("callback_auth", True), ("password", True), ("Authorization", True), ("x-api-key", True),
     ("access_token", True), ("clientSecret", True), ("max_new_tokens", False), ("token_ids", False),
     ("eos_token", False), ("author", False), ("prompt", False), ("keyword", False)],
)
def test_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_empty_labels_and_identity_still_log(moto_server: str, firehose_stream: dict[str, str]) -> None:
    hook = make_hook(firehose_stream, labels={}, endpoint_id="", bundle_id="")
    hook({"args": {"id": 1}}, {"result": "{}", "status_code": 200, "task_id": "task-3"}, "task-3")
    (record,) = delivered_records(moto_server, firehose_stream)
    assert record["LABELS"] == {} and record["RESPONSE_BODY"]["task_id"] == "task-3"


def test_failed_task_logs_the_error_payload(moto_server: str, firehose_stream: dict[str, str]) -> None:
    hook = make_hook(firehose_stream)
    try:
        raise ValueError("model answered garbage")
    except ValueError as exc:
        payload = error_payload(exc)
    runner = HookRunner([hook])
    runner.run(request_with_secrets(), payload, "task-4")
    assert runner.counts["logging.success"] == 1
    (record,) = delivered_records(moto_server, firehose_stream)
    assert record["RESPONSE_BODY"]["task_id"] == "task-4"
    assert record["RESPONSE_BODY"]["error"] == "model answered garbage"
    assert record["RESPONSE_BODY"]["error_metadata"].startswith("Internal failure\n")


def test_oversize_record_is_truncated_with_a_marker_and_one_warning(
    moto_server: str, firehose_stream: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    hook = make_hook(firehose_stream)
    request = {"args": {"prompt": 'say "hi" ' * 200_000}}  # ~1.8 MB, ~2.2 MB once double-encoded
    response = {"result": json.dumps({"text": "y" * 1_500_000}), "status_code": 200, "task_id": "task-5"}
    with caplog.at_level(logging.WARNING):
        runner = HookRunner([hook])
        runner.run(request, response, "task-5")
    assert runner.counts["logging.success"] == 1
    # ours only: ddtrace's writer may log its own ERROR here (no trace agent listening), seen under CI load
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and not r.name.startswith("ddtrace")]
    assert len(warnings) == 1 and "truncated" in warnings[0].getMessage()
    raw = raw_bodies(moto_server, firehose_stream)
    assert len(raw) <= MAX_RECORD_BYTES and raw.endswith(b"\n")
    record = json.loads(raw)
    assert set(record[TRUNCATED_FIELD]) == {"REQUEST_BODY", "RESPONSE_BODY"}
    assert record[TRUNCATED_FIELD]["REQUEST_BODY"] > MAX_RECORD_BYTES
    assert json.dumps(request).startswith(record["REQUEST_BODY"]) and len(record["REQUEST_BODY"]) > 100_000
    assert record["RESPONSE_BODY"]["task_id"] == "task-5" and record["RESPONSE_BODY"]["status_code"] == 200
    assert len(record["RESPONSE_BODY"]["truncated"]) > 100_000
    assert record["LABELS"] == IDENTITY["labels"]


def test_put_failure_is_logged_and_counted_by_the_runner(
    moto_server: str, aws_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    hook = LoggingHook(make_gateway("no-such-stream"), **IDENTITY)
    runner = HookRunner([hook])
    with caplog.at_level(logging.WARNING):
        runner.run(request_with_secrets(), {"result": "{}", "status_code": 200}, "task-6")
    assert runner.counts["logging.failure"] == 1
    assert any("hook logging failed" in r.getMessage() and "FirehosePutError" in r.getMessage()
               for r in caplog.records)
    assert SECRET not in caplog.text


def test_deps_build_the_hook_without_io() -> None:
    settings = Settings.from_env({
        "FORWARDER_HOOKS": "logging",
        "FIREHOSE_STREAM_NAME": "the-stream",
        "FORWARDER_ENDPOINT_ID": "end_1",
        "FORWARDER_LABELS": '{"team": "ml"}',
    })
    (hook,) = deps.build_deps(settings).hooks.hooks
    assert isinstance(hook, LoggingHook) and hook.name == "logging"
    assert hook.endpoint_id == "end_1" and hook.labels == {"team": "ml"} and hook.endpoint_type == "async"
    assert hook.gateway.stream_name == "the-stream" and hook.gateway.client_cache.builds == 0


# ------------------------------------------------------------------------------ a real worker


TASKS = 20


@pytest.mark.parametrize(("pool", "concurrency", "max_assume_roles"), [("prefork", "2", 2), ("gevent", "8", 1)])
def test_worker_logs_every_task_once_per_process_credentials(
    pool: str,
    concurrency: str,
    max_assume_roles: int,
    start_worker: Callable[..., WorkerProcess],
    producer: Celery,
    queue: str,
    model: ModelServer,
    moto_server: str,
    aws_env: dict[str, str],
    firehose_stream: dict[str, str],
) -> None:
    role = unique_role_arn()
    worker = start_worker(
        pool,
        CELERY_WORKER_CONCURRENCY=concurrency,
        FORWARDER_HOOKS="logging",
        FIREHOSE_STREAM_NAME=firehose_stream["name"],
        FIREHOSE_ROLE_ARN=role,
        FORWARDER_ENDPOINT_ID=IDENTITY["endpoint_id"],
        FORWARDER_ENDPOINT_NAME=IDENTITY["endpoint_name"],
        FORWARDER_BUNDLE_ID=IDENTITY["bundle_id"],
        FORWARDER_LABELS=json.dumps(IDENTITY["labels"]),
        **aws_env,
    )

    # Given N successful tasks
    results = [send(producer, request_with_secrets(index), queue=queue) for index in range(TASKS)]
    for result in results:
        assert result.get(timeout=30)["status_code"] == 200
    records = wait_for_records(moto_server, firehose_stream, TASKS)
    # And then failing ones (the model answers with a body that is not JSON)
    model.behaviour.mode = "text"
    failed = [send(producer, request_with_secrets(100 + index), queue=queue) for index in range(2)]
    for result in failed:
        result.get(timeout=30, propagate=False)
        assert result.status == "FAILURE"
    records = wait_for_records(moto_server, firehose_stream, TASKS + 2)

    # Then every task has exactly one record, with llm-engine's fields
    by_task = {record["RESPONSE_BODY"]["task_id"]: record for record in records}
    assert len(records) == TASKS + 2 and set(by_task) == {r.id for r in results + failed}
    for index, result in enumerate(results):
        record = by_task[result.id]
        assert json.loads(record["REQUEST_BODY"])["args"]["id"] == index
        assert json.loads(record["RESPONSE_BODY"]["result"])["echo"]["id"] == index
        assert record["RESPONSE_BODY"]["status_code"] == 200
        assert record["ENDPOINT_ID"] == IDENTITY["endpoint_id"] and record["LABELS"] == IDENTITY["labels"]
        datetime.strptime(record["EMITTED_AT"], "%Y-%m-%dT%H:%M:%S")
    for result in failed:
        body = by_task[result.id]["RESPONSE_BODY"]
        assert set(body) == {"error", "error_metadata", "task_id"} and "not JSON" in body["error"]

    # And the callback password is nowhere: not in any record, not in the worker's log
    assert SECRET not in raw_bodies(moto_server, firehose_stream).decode()
    log = worker.output
    assert SECRET not in log
    assert "hook logging failed" not in log

    # And credentials were fetched once per worker process, never per task
    calls = assume_role_calls(moto_server, role)
    assert 1 <= calls <= max_assume_roles, f"{calls} assume-role calls for {TASKS + 2} tasks under {pool}"
    assert log.count("firehose: client built") == calls
