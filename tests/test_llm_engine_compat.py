"""Where a switching user could tell this worker from llm-engine's forwarder, against a real worker.

Each behaviour below was checked against llm-engine's source (see README, "Switching from llm-engine's
forwarder"): string ``args`` are forwarded; a callback without auth carries basic (user_id, ""); a failed
task stores no traceback and its callback carries no stack trace; an endpoint config listing ``billing``
starts, warns once, and runs the hooks this worker has.

In process (fast, ``tests/support/inprocess.py``): a model call that fails (an HTTP answer that is no JSON, a
refused connection, an unexpected exception) stores llm-engine's failure meta and calls back with no stack
trace, through Celery's own task tracer and the worker's own app and deps.
"""

from __future__ import annotations

import base64
import json
import re

import pytest
import requests

from devtools.demo import send
from devtools.servers import wait_for
from tests.support.inprocess import Answer, in_process

POOLS = ["prefork", "gevent"]
USER_ID = "user-7f3a"


def endpoint_config(path, **fields) -> str:
    """An llm-engine endpoint-config file (base64 JSON) at ``path``; returns the path."""
    path.write_bytes(base64.b64encode(json.dumps(fields).encode()))
    return str(path)


@pytest.mark.parametrize("pool", POOLS)
def test_a_switching_producer_sees_llm_engines_behaviour(
    pool, start_worker, producer, model, queue, callback_receiver, tmp_path
):
    config = endpoint_config(
        tmp_path / "endpoint_config",
        endpoint_name="compat", endpoint_id="end_1", bundle_name="b", user_id=USER_ID,
        post_inference_hooks=["billing", "callback"], default_callback_url=f"{callback_receiver.url}/cb",
        default_callback_auth=None, labels={"team": "ml"},
    )
    worker = start_worker(pool, FORWARDER_ENDPOINT_CONFIG_PATH=config, FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1")
    # `billing` (accepted by llm-engine's API, run by neither forwarder): one warning at start, then served.
    assert worker.output.count("endpoint config hook 'billing' is not run by this worker") == 1

    # 1. A string `args` is POSTed as is, and its answer stored as SUCCESS.
    text = send(producer, {"args": "just a string"}, queue=queue)
    value = text.get(timeout=30)
    assert text.status == "SUCCESS" and value["status_code"] == 200
    assert json.loads(value["result"])["echo"] == "just a string"
    # 2. No auth in the request and none by default: basic (user_id, "") as llm-engine sends.
    success_callback = callback_receiver.wait_for(1)[0]
    assert success_callback.basic_auth == (USER_ID, "")
    assert success_callback.body == {**value, "task_id": text.id}

    # 3. A failed task (llm-engine cannot forward a number either): no traceback stored for API callers.
    failed = send(producer, {"args": 42}, queue=queue)
    with pytest.raises(Exception, match="must be a JSON object, array or string"):
        failed.get(timeout=30)
    # Celery stores its own failure first, then after_return rewrites it into llm-engine's shape (as
    # llm-engine's forwarder does); read it once rewritten, as the API reads it, through a fresh AsyncResult.
    def rewritten():
        fresh = producer.AsyncResult(failed.id)
        return fresh if fresh.status == "FAILURE" and fresh.traceback is None else None

    final = wait_for(rewritten, 10, "llm-engine's failure meta")
    assert final.status == "FAILURE" and final.traceback is None
    # 4. Its callback: task id, state and the error text the API shows; no trace line; the same auth.
    failure_callback = callback_receiver.wait_for(2)[1]
    assert failure_callback.body == {"task_id": failed.id, "state": "FAILURE", "error": str(failed.result)}
    assert "Traceback" not in failure_callback.raw.decode() and "error_metadata" not in failure_callback.body
    assert failure_callback.basic_auth == (USER_ID, "")
    assert model.behaviour.total == 1  # only the string request reached the model


# ----------------------------------------------------------------------------------- in process (fast)

#: A frame line of a Python traceback.
FRAME_LINE = re.compile(r'File "[^"]+", line \d+')
CALLBACK = "http://127.0.0.1:9/cb"


def model_fails(how: str) -> Answer:
    """The model's side of each failure: an HTTP answer that is no JSON, a connection refused, a bug."""
    def answer(request):
        if how == "http":
            return 500, b"<html>Internal Server Error</html>"
        if how == "connection":
            return requests.ConnectionError("[Errno 111] Connection refused")
        return RuntimeError("unexpected: the transport broke")
    return answer


def assert_no_trace(where: str, text: str) -> None:
    assert "Traceback" not in text and not FRAME_LINE.search(text), f"{where} carries a stack trace: {text!r}"


@pytest.mark.parametrize(("how", "exc_type", "error"), [
    ("http", "ModelResponseError", "answered HTTP 500 with a body that is not JSON"),
    ("connection", "ModelConnectionError", "unreachable"),
    ("unexpected", "RuntimeError", "unexpected: the transport broke"),
])
def test_a_failed_model_call_stores_and_calls_back_no_traceback(how, exc_type, error):
    env = {"FORWARDER_HOOKS": "callback", "FORWARDER_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}
    with in_process(env, model_fails(how)) as forwarder:
        # The connection error fails the task on its last retry (earlier ones are retried, not stored).
        retries = forwarder.settings.retry_max if how == "connection" else 0
        meta = forwarder.run({"args": {"id": 1}, "callback_url": CALLBACK}, retries=retries)
    assert forwarder.transport.posts >= 1
    # The meta llm-engine's API reads: state, exc_type and exc_message (the error text), traceback null.
    assert meta["status"] == "FAILURE" and meta["traceback"] is None, meta
    result = meta["result"]
    custom = json.loads(result["custom"])
    assert set(custom) == {"error", "error_metadata"} and error in custom["error"]
    assert result["exc_type"] == exc_type and result["exc_message"] == [custom["error"]]  # the exception's args
    # llm-engine's error_metadata, "Internal failure\n<trace>": the one place a trace is kept (llm-engine's format;
    # its API never reads `custom`, and hands callers str(exc)). Nowhere else in the meta:
    assert custom["error_metadata"].startswith("Internal failure\n")
    elsewhere = {**meta, "result": {**result, "custom": {"error": custom["error"]}}}
    assert_no_trace("the stored meta", json.dumps(elsewhere))
    # The callback: task id, state and the error text; nothing of the trace.
    ((url, body),) = forwarder.callbacks
    assert url == CALLBACK and body == {"task_id": meta["task_id"], "state": "FAILURE", "error": custom["error"]}
    assert_no_trace("the callback body", json.dumps(body))
