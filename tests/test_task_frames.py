"""No task leaves a frame of ours holding its data: failed tasks, retries and failing hooks release their frames.

An exception kept after a task (on a cache, a counter, Celery's failure info) keeps its traceback and with
it every frame's locals: the request, the model's response buffers. ``except ... as exc`` followed by
``raise ... from exc`` also leaves a cycle (frame -> exception -> traceback -> frame) that only the cyclic
collector frees, late. Under long-lived prefork children or one gevent process that is memory held for
no reason, or without bound.

The checks run Celery's own task tracer (``build_tracer(eager=False)``: what a prefork child and a gevent
greenlet run per message) in a child process, with the worker's own app and deps, against the suite's
Redis, model and moto servers, then look at every frame whose code lives in ``forwarder/`` or
``gateways/``:

- strict (cyclic collector off): failures whose exceptions end in our hands (a malformed request, a model
  answering garbage, timing out or refusing connections, an answer or a result over its limit, a retry,
  both hooks failing) leave no such frame
  holding locals, and no request waiting in a reference cycle for the collector (each carries a 1 MiB
  prompt; what a collection frees afterwards must be less than half of one), also with the S3 result
  backend, where every task's first read is a 404 that botocore raises;
- reachable (after a full collection): outages that botocore retries internally (STS unreachable) leave no
  such frame at all. botocore's own retry loop keeps exceptions in cycles of its frames, which also hold
  the frames that were running above it (the hook runner's) until the collector runs: that is theirs, and
  bounded by the client's backoff, but nothing of it may stay reachable;
- a control that keeps one exception on purpose must be caught.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.servers import ModelServer, free_port, worker_env
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME

CHILD = Path(__file__).resolve().parent / "children" / "task_frames.py"


@pytest.fixture
def text_model():
    """A model server that answers HTTP 502 with an HTML body."""
    server = ModelServer().start()
    server.behaviour.mode, server.behaviour.status = "text", 502
    yield server
    server.stop()


@pytest.fixture
def hanging_model():
    """A model server that accepts requests and never answers."""
    server = ModelServer().start()
    server.behaviour.mode = "hang"
    yield server
    server.stop()


@pytest.fixture
def huge_model():
    """A model server answering 4 MB, chunked: over the children's answer limit, refused while counted."""
    server = ModelServer().start()
    server.behaviour.mode, server.behaviour.huge_bytes = "huge-chunked", 4_000_000
    yield server
    server.stop()


@pytest.fixture
def large_model():
    """A model server answering 1.8 MB: within the children's answer limit, over their result limit."""
    server = ModelServer().start()
    server.behaviour.mode, server.behaviour.huge_bytes = "huge", 1_800_000
    yield server
    server.stop()


#: Every request carries a prompt this large: one request left in a reference cycle exceeds the limit.
PROMPT = "p" * (1024 * 1024)
#: Bytes the cyclic collector may free after all the cases: half a prompt. What is there (~150 KB) is not
#: the tasks' data: billiard's copy of each failure's traceback (~28 KB a failed task, Celery's own) and
#: the exception classes Celery makes when the child reads a failure back.
CYCLES_LIMIT = 512 * 1024


def cases(model, text_model, hanging_model, huge_model, large_model, closed: str) -> list[dict]:
    predict = f"{model.url}/predict"

    def request(number: int) -> dict:
        return {"args": {"id": number, "prompt": PROMPT}}

    return [
        {"name": "success", "model": predict, "task": TASK_NAME, "request": request(1), "status": "SUCCESS"},
        {"name": "malformed", "model": predict, "task": TASK_NAME, "request": {"args": 7, "prompt": PROMPT}, "status": "FAILURE"},
        {"name": "legacy name, malformed", "model": predict, "task": LEGACY_TASK_NAME, "request": [PROMPT],
         "status": "FAILURE"},
        {"name": "non-JSON answer", "model": f"{text_model.url}/predict", "task": TASK_NAME,
         "request": request(2), "status": "FAILURE"},
        {"name": "read timeout", "model": f"{hanging_model.url}/predict", "task": TASK_NAME,
         "request": request(3), "status": "FAILURE"},
        {"name": "connection refused, retried", "model": f"{closed}/predict", "task": TASK_NAME,
         "request": request(4), "status": "RETRY"},
        {"name": "connection refused, retries used up", "model": f"{closed}/predict", "task": LEGACY_TASK_NAME,
         "request": request(5), "retries": 1, "status": "FAILURE"},
        {"name": "answer over the limit", "model": f"{huge_model.url}/predict", "task": TASK_NAME,
         "request": request(6), "status": "FAILURE"},
        {"name": "result over the limit", "model": f"{large_model.url}/predict", "task": TASK_NAME,
         "request": request(7), "status": "FAILURE"},
    ]


def run_child(pool: str, check: str, redis_server, model, queue: str, frame_cases: list[dict],
              **env: str) -> subprocess.CompletedProcess[str]:
    settings = {
        "CELERY_WORKER_POOL": pool,
        "CELERY_BROKER_URL": f"{redis_server.url}/0",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/1",
        "CELERY_QUEUE": queue,
        "FORWARDER_HEALTHCHECK_URL": f"{model.url}/readyz",
        "FORWARDER_MODEL_READ_TIMEOUT": "0.5",
        "FORWARDER_RETRY_MAX": "1",
        # An echo of a request (its 1 MiB prompt) is within both limits; huge_model and large_model are not.
        "FORWARDER_MAX_RESPONSE_BYTES": str(2 * 1024 * 1024),
        "FORWARDER_MAX_RESULT_BYTES": str(3 * 1024 * 1024 // 2),
        # The callback hook fails on every task: its default URL is a loopback address, refused (no
        # allow-list). Not the metadata service: were the guard broken, the child would really call it.
        "FORWARDER_HOOKS": "callback,logging",
        "FORWARDER_CALLBACK_URL": f"http://127.0.0.1:{free_port()}/callback",
        "FIREHOSE_STREAM_NAME": "no-such-stream",
        "FIREHOSE_ROLE_ARN": "arn:aws:iam::123456789012:role/logging",
        "FRAME_CHECK": check,
        "FRAME_CYCLES_LIMIT": str(CYCLES_LIMIT),
    }
    child_env = worker_env(**{**settings, **env})
    return subprocess.run([sys.executable, str(CHILD)], env=child_env, input=json.dumps(frame_cases),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_failed_tasks_retries_and_failing_hooks_leave_no_frame_holding_data(
    pool, redis_server, model, text_model, hanging_model, huge_model, large_model, queue, aws_env
):
    # The logging hook assumes its role at moto, then fails every put: the stream does not exist.
    closed = f"http://127.0.0.1:{free_port()}"
    frame_cases = cases(model, text_model, hanging_model, huge_model, large_model, closed)
    done = run_child(pool, "strict", redis_server, model, queue, frame_cases)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("\n") == 9  # every case ran, with the expected state
    assert "ModelResponseTooLarge" in done.stderr and "ResultTooLarge" in done.stderr
    # Hooks run once a task is over: the warm-up and every case but the RETRY one.
    assert done.stderr.count("hook logging failed") == 9 and "ResourceNotFoundException" in done.stderr
    assert done.stderr.count("hook callback failed") == 9 and "is loopback; refused" in done.stderr


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_s3_results_leave_no_frame_holding_data(pool, redis_server, model, text_model, queue, aws_env, s3_bucket):
    # Celery reads a result before every write: with S3 every task's first read is a 404, a ClientError.
    predict, request = f"{model.url}/predict", {"args": {"id": 1, "prompt": PROMPT}}
    frame_cases = [
        *({"name": f"success {i}", "model": predict, "task": TASK_NAME, "request": request, "status": "SUCCESS"}
          for i in range(3)),
        {"name": "non-JSON answer", "model": f"{text_model.url}/predict", "task": TASK_NAME, "request": request,
         "status": "FAILURE"},
    ]
    done = run_child(pool, "strict", redis_server, model, queue, frame_cases,
                     CELERY_RESULT_BACKEND=f"s3://{s3_bucket}/results", FORWARDER_HOOKS="")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("\n") == 4


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_an_sts_outage_keeps_nothing_of_ours_reachable(
    pool, redis_server, model, text_model, hanging_model, huge_model, large_model, queue
):
    closed = f"http://127.0.0.1:{free_port()}"
    done = run_child(
        pool, "reachable", redis_server, model, queue,
        cases(model, text_model, hanging_model, huge_model, large_model, closed),
        AWS_ENDPOINT_URL=closed, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "cannot build the Firehose client: EndpointConnectionError" in done.stderr


def test_the_check_sees_a_frame_kept_by_an_exception(redis_server, model, text_model, hanging_model, queue, aws_env):
    control = {"name": "control", "model": f"{text_model.url}/predict", "task": TASK_NAME,
               "request": {"args": {"id": 6}}, "status": "FAILURE", "keep_exception": True}
    done = run_child("prefork", "strict", redis_server, model, queue, [control])
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert "kept alive: predict model_server.py" in done.stdout
