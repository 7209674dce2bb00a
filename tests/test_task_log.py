"""The worker's log: JSON or text lines, the effective configuration at start, one line per finished task."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest
from celery.exceptions import Reject, Retry

from devtools.demo import send
from devtools.servers import free_port
from forwarder.errors import MalformedRequest
from forwarder.extensions.task_log import (
    CONFIG_LINE,
    FIELDS_ATTR,
    TASK_LINE,
    JsonFormatter,
    error_type,
    log_configuration,
)
from forwarder.model_call import note_model_call
from forwarder.settings import VARS, Settings, effective_config, safe_url
from forwarder.tasks import TASK_NAME
from gateways.model_server import ModelConnectionError
from tests.support.faults import assert_no_secret

POOLS = ["prefork", "gevent"]
ENV_PASSWORD = "env-callback-password-tasklog-91c2"
REQUEST_PASSWORD = "request-callback-password-tasklog-5d0e"
#: The keys of every task line.
TASK_KEYS = {"task_id", "task_name", "queue", "state", "model_status_code", "model_duration_ms",
             "total_duration_ms", "retries", "error_type"}


# ------------------------------------------------------------------------------------- in process


def record(msg: str, *args: Any, **attrs: Any) -> logging.LogRecord:
    made = logging.LogRecord("forwarder.test", logging.WARNING, __file__, 1, msg, args, None)
    made.__dict__.update(attrs)
    return made


def test_json_formatter_writes_one_object_per_line_with_the_fields_as_keys():
    line = JsonFormatter().format(record("task %s\nsecond line", "abc", **{FIELDS_ATTR: {"task_id": "abc", "retries": 2}}))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "task abc\nsecond line"
    assert parsed["level"] == "WARNING" and parsed["logger"] == "forwarder.test"
    assert parsed["time"].endswith("Z") and parsed["task_id"] == "abc" and parsed["retries"] == 2
    assert "dd.trace_id" not in parsed


def test_json_formatter_keeps_a_traceback_on_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("it failed")
        failed.exc_info = sys.exc_info()
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["error.kind"] == "ValueError" and parsed["error.message"] == "boom"
    assert parsed["error.stack"].startswith("Traceback") and "raise ValueError" in parsed["error.stack"]


def test_json_formatter_carries_ddtrace_ids_when_injected():
    injected = {"dd.trace_id": "69a1e2b3000000001234567890abcdef", "dd.span_id": "42", "dd.service": "svc",
                "dd.env": "", "dd.version": ""}
    parsed = json.loads(JsonFormatter().format(record("traced", **injected)))
    assert parsed["dd.trace_id"] == injected["dd.trace_id"] and parsed["dd.span_id"] == "42"
    assert parsed["dd.service"] == "svc" and "dd.env" not in parsed
    untraced = json.loads(JsonFormatter().format(record("untraced", **{"dd.trace_id": "0", "dd.span_id": "0"})))
    assert "dd.trace_id" not in untraced and "dd.span_id" not in untraced


def test_effective_config_lists_every_variable_with_secrets_masked():
    settings = Settings.from_env({
        "FORWARDER_CALLBACK_AUTH_PASSWORD": ENV_PASSWORD,
        "CELERY_BROKER_URL": "redis://:broker-pass-77@broker:6379/0",
        "CELERY_RESULT_BACKEND": "redis://user:backend-pass-88@results:6379/1",
        "FORWARDER_HOOKS": "callback", "FORWARDER_LABELS": '{"team": "ml"}', "FORWARDER_LOG_FORMAT": "json",
        "FORWARDER_CALLBACK_URL": "https://caller.example/done?token=query-token-99",
    })
    config = effective_config(settings)
    assert list(config) == [var.name for var in VARS]
    assert config["FORWARDER_CALLBACK_AUTH_PASSWORD"] == "***"
    assert config["CELERY_BROKER_URL"] == "redis://:***@broker:6379/0"
    assert config["CELERY_RESULT_BACKEND"] == "redis://user:***@results:6379/1"
    assert config["FORWARDER_HOOKS"] == "callback" and config["FORWARDER_LABELS"] == '{"team": "ml"}'
    assert config["FORWARDER_LOG_FORMAT"] == "json" and config["CELERY_WORKER_MAX_TASKS_PER_CHILD"] == ""
    assert config["FORWARDER_CALLBACK_URL"] == "https://caller.example/done?***"
    assert_no_secret(json.dumps(config), [ENV_PASSWORD, "broker-pass-77", "backend-pass-88", "query-token-99"])
    assert effective_config(Settings.from_env({}))["FORWARDER_CALLBACK_AUTH_PASSWORD"] == ""
    assert safe_url("http://model:5005/predict") == "http://model:5005/predict"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_config_line_is_one_record_without_the_secret(log_format, caplog):
    settings = Settings.from_env({"FORWARDER_CALLBACK_AUTH_PASSWORD": ENV_PASSWORD, "FORWARDER_LOG_FORMAT": log_format})
    with caplog.at_level(logging.INFO, logger="forwarder"):
        log_configuration(settings)
    [line] = [r for r in caplog.records if r.getMessage().startswith(CONFIG_LINE)]
    formatted = JsonFormatter().format(line) if log_format == "json" else line.getMessage()
    assert_no_secret(formatted, [ENV_PASSWORD])
    if log_format == "json":
        assert json.loads(formatted)["config"]["FORWARDER_CALLBACK_AUTH_PASSWORD"] == "***"
    else:
        assert "FORWARDER_CALLBACK_AUTH_PASSWORD='***'" in formatted and "CELERY_QUEUE=celery" in formatted


def test_error_type_names_the_cause():
    assert error_type({"result": "ok"}) is None
    assert error_type(MalformedRequest("no")) == "MalformedRequest"
    assert error_type(Retry(exc=ModelConnectionError("down"))) == "ModelConnectionError"
    assert error_type(Reject("shutting down", requeue=True)) == "Reject"


def test_noting_a_model_call_outside_a_task_does_nothing():
    note_model_call(200, 0.1)


# ------------------------------------------------------------------------------------ a real worker


def json_records(output: str) -> list[dict[str, Any]]:
    """Every line of the worker's output as JSON; fails naming the first line that is not."""
    records = []
    for line in output.splitlines():
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- output ---\n{output[-4000:]}")
        assert isinstance(parsed, dict), line
        records.append(parsed)
    return records


def task_lines(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for item in records:
        if item.get("logger") == "forwarder.tasks" and item["message"].startswith(TASK_LINE):
            assert TASK_KEYS <= set(item), item
            found.setdefault(item["task_id"], []).append(item)
    return found


@pytest.mark.parametrize("pool", POOLS)
def test_json_log_one_line_per_task_and_the_config_without_secrets(pool, start_worker, producer, model, queue):
    worker = start_worker(
        pool, FORWARDER_LOG_FORMAT="json",
        FORWARDER_CALLBACK_AUTH_USERNAME="endpoint-user", FORWARDER_CALLBACK_AUTH_PASSWORD=ENV_PASSWORD,
    )
    auth = {"kind": "basic", "username": "caller", "password": REQUEST_PASSWORD}
    ok = send(producer, {"args": {"id": 1}, "callback_auth": auth}, queue=queue)
    bad = send(producer, {"args": 7, "callback_auth": auth}, queue=queue)  # fails before any HTTP call
    assert ok.get(timeout=30)["status_code"] == 200
    with pytest.raises(Exception, match="MalformedRequest|JSON object"):
        bad.get(timeout=30)
    for result in (ok, bad):
        worker.wait_for_log(f"{TASK_LINE}: {result.id}", timeout=30)
    assert worker.stop(timeout=30) == 0  # the shutdown lines are JSON too

    output = worker.output
    records = json_records(output)
    assert_no_secret(output, [ENV_PASSWORD, REQUEST_PASSWORD])
    assert "Traceback" not in output
    assert all({"time", "level", "logger", "message"} <= set(item) for item in records)

    [config] = [item for item in records if item["message"] == CONFIG_LINE]
    assert config["level"] == "INFO" and set(config["config"]) == {var.name for var in VARS}
    assert config["config"]["FORWARDER_CALLBACK_AUTH_PASSWORD"] == "***"
    assert config["config"]["CELERY_QUEUE"] == queue and config["config"]["CELERY_WORKER_POOL"] == pool
    assert any(item["message"].startswith("forwarder ready") for item in records)

    lines = task_lines(records)
    assert set(lines) == {ok.id, bad.id}
    [success], [failure] = lines[ok.id], lines[bad.id]
    assert success["state"] == "SUCCESS" and success["level"] == "INFO"
    assert success["task_name"] == TASK_NAME and success["queue"] == queue
    assert success["model_status_code"] == 200 and success["error_type"] is None and success["retries"] == 0
    assert 0 < success["model_duration_ms"] <= success["total_duration_ms"]
    assert failure["state"] == "FAILURE" and failure["level"] == "WARNING"
    assert failure["error_type"] == "MalformedRequest" and failure["queue"] == queue
    assert failure["model_status_code"] is None and failure["model_duration_ms"] is None  # no HTTP call
    assert failure["total_duration_ms"] > 0 and failure["retries"] == 0


@pytest.mark.parametrize("pool", POOLS)
def test_json_log_a_retried_task_has_a_line_per_attempt(pool, start_worker, producer, queue):
    closed = f"http://127.0.0.1:{free_port()}"
    worker = start_worker(
        pool, FORWARDER_LOG_FORMAT="json", FORWARDER_MODEL_URL=f"{closed}/predict", FORWARDER_READY_TIMEOUT="0",
        FORWARDER_RETRY_MAX="1",
    )
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    with pytest.raises(Exception, match="unreachable"):
        result.get(timeout=60)
    worker.wait_for_log(f"{TASK_LINE}: {result.id} FAILURE", timeout=30)

    lines = task_lines(json_records(worker.output))[result.id]
    assert [(line["state"], line["retries"]) for line in lines] == [("RETRY", 0), ("FAILURE", 1)]
    for line in lines:
        assert line["error_type"] == "ModelConnectionError" and line["model_status_code"] is None
        assert line["model_duration_ms"] is not None and line["total_duration_ms"] >= line["model_duration_ms"]
        assert line["queue"] == queue and line["task_name"] == TASK_NAME


@pytest.mark.parametrize("pool", POOLS)
def test_text_log_shows_the_task_line_and_the_config(pool, start_worker, producer, model, queue):
    worker = start_worker(pool, FORWARDER_CALLBACK_AUTH_PASSWORD=ENV_PASSWORD)
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    assert result.get(timeout=30)["status_code"] == 200
    worker.wait_for_log(f"{TASK_LINE}: task_id={result.id} ", timeout=30)
    output = worker.output
    [line] = [line for line in output.splitlines() if f"{TASK_LINE}: task_id={result.id} " in line]
    assert f"task_name={TASK_NAME} queue={queue} state=SUCCESS model_status_code=200 model_duration_ms=" in line
    assert line.endswith(" retries=0 error_type=-")
    assert "FORWARDER_CALLBACK_AUTH_PASSWORD='***'" in output and f"CELERY_QUEUE={queue}" in output
    assert_no_secret(output, [ENV_PASSWORD])


@pytest.mark.parametrize("pool", POOLS)
def test_json_task_line_carries_its_trace_ids_under_ddtrace(pool, start_worker, producer, model, queue, trace_agent):
    worker = start_worker(pool, ddtrace=True, timeout=90, FORWARDER_LOG_FORMAT="json", **trace_agent.env())
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    assert result.get(timeout=30)["status_code"] == 200
    worker.wait_for_log(f"{TASK_LINE}: {result.id}", timeout=30)
    spans = trace_agent.wait_for_spans(
        lambda spans: any(s["name"] == "celery.run" and s["meta"].get("celery.id") == result.id for s in spans),
        30, "the task's celery.run span",
    )
    [run] = [s for s in spans if s["name"] == "celery.run" and s["meta"].get("celery.id") == result.id]
    [line] = task_lines(json_records(worker.output))[result.id]
    trace_id = line["dd.trace_id"]
    low_bits = int(trace_id, 16) & (2**64 - 1) if len(trace_id) == 32 else int(trace_id)
    assert low_bits == run["trace_id"] and int(line["dd.span_id"]) == run["span_id"]
    # Lines logged inside the task carry the same trace (ddtrace's own injection, copied by the formatter)
    inside = [item for item in json_records(worker.output)
              if item.get("logger", "").startswith("celery.app.trace") and result.id in item["message"]]
    assert inside and all(item.get("dd.trace_id") == trace_id for item in inside)
