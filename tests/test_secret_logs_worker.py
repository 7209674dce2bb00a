"""No secret in a real worker's output: every byte of its stdout and stderr, both log formats, both pools.

The worker runs against a broker and a result store that require a password (in their URLs), with a
default callback password, a webhook signing secret, AWS keys for the logging hook (moto), at DEBUG; it
runs a task that succeeds with a callback carrying its own password, one whose result (logged by Celery)
echoes secret values, one that Celery refuses (an unknown
task name: Celery logs its body and headers, with a traceback), one that fails, and one whose callback
host is refused; then it stops warmly. None of the secret values appears, in any form they could be
written in (as is, URL-encoded, as a basic-auth token).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from devtools.demo import producer as make_producer
from devtools.demo import send
from devtools.servers import ModelServer, RedisServer, WorkerProcess, wait_for, worker_env
from forwarder.extensions.task_log import TASK_LINE
from tests.support.callback import CallbackReceiver

BROKER_PASSWORD = "broker+pw/e2e=9f3b"
BACKEND_PASSWORD = "backend-pw-e2e-41d7"
DEFAULT_CALLBACK_PASSWORD = "default-callback-pw-e2e-77c0"
REQUEST_PASSWORD = "request-callback-pw-e2e-b5a2"
SIGNING_SECRET = "whsec_" + base64.b64encode(b"e2e-signing-key-for-callbacks-32").decode()
AWS_KEY_ID = "AKIAE2ESECRETLOGS01X"
AWS_SECRET = "aws-secret-key-e2e-5c1d9a0b7e3f"
REQUEST_USER = "caller"
DEFAULT_USER = "endpoint-user"


def every_form() -> list[str]:
    """Each secret as is, URL-encoded and, for the callback passwords, as the basic-auth token."""
    plain = [BROKER_PASSWORD, BACKEND_PASSWORD, DEFAULT_CALLBACK_PASSWORD, REQUEST_PASSWORD, SIGNING_SECRET,
             SIGNING_SECRET.removeprefix("whsec_"), AWS_KEY_ID, AWS_SECRET]
    encoded = [quote(secret, safe="") for secret in plain]
    tokens = [base64.b64encode(f"{user}:{password}".encode()).decode()
              for user, password in ((REQUEST_USER, REQUEST_PASSWORD), (DEFAULT_USER, DEFAULT_CALLBACK_PASSWORD))]
    return sorted(set(plain + encoded + tokens))


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A broker and a result store, each with a password of its own."""
    broker = RedisServer(password=BROKER_PASSWORD).start()
    backend = RedisServer(password=BACKEND_PASSWORD).start()
    yield broker, backend
    broker.stop()
    backend.stop()


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_no_secret_reaches_the_worker_output(
    pool: str, log_format: str, locked_redis: tuple[RedisServer, RedisServer], model: ModelServer,
    moto_server: str, firehose_stream: dict[str, str], callback_receiver: CallbackReceiver, queue: str,
) -> None:
    broker, backend = locked_redis
    broker_url, backend_url = f"{broker.url}/0", f"{backend.url}/1"
    assert quote(BROKER_PASSWORD, safe="") in broker_url  # the URL carries the password, encoded
    worker = WorkerProcess(worker_env(
        CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=backend_url, CELERY_QUEUE=queue,
        CELERY_WORKER_POOL=pool, CELERY_WORKER_CONCURRENCY="2", CELERY_LOG_LEVEL="DEBUG",
        FORWARDER_LOG_FORMAT=log_format,
        FORWARDER_MODEL_URL=f"{model.url}/predict", FORWARDER_HEALTHCHECK_URL=f"{model.url}/readyz",
        FORWARDER_READY_TIMEOUT="20", FORWARDER_RETRY_MAX="0",
        FORWARDER_HOOKS="callback,logging", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        FORWARDER_CALLBACK_TIMEOUT="2", FORWARDER_CALLBACK_RETRIES="1",
        FORWARDER_CALLBACK_URL=f"{callback_receiver.url}/default",
        FORWARDER_CALLBACK_AUTH_USERNAME=DEFAULT_USER, FORWARDER_CALLBACK_AUTH_PASSWORD=DEFAULT_CALLBACK_PASSWORD,
        FORWARDER_CALLBACK_SIGNING_SECRET=SIGNING_SECRET,
        FIREHOSE_STREAM_NAME=firehose_stream["name"],
        AWS_ACCESS_KEY_ID=AWS_KEY_ID, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_SESSION_TOKEN="",
        AWS_ENDPOINT_URL=moto_server, AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
        FORWARDER_METRICS="0",
    ))
    producer = make_producer(broker_url, backend_url)
    try:
        worker.start(timeout=60)
        auth = {"kind": "basic", "username": REQUEST_USER, "password": REQUEST_PASSWORD}
        ok = send(producer, {"args": {"id": 1}, "callback_url": f"{callback_receiver.url}/cb", "callback_auth": auth},
                  queue=queue)
        unknown = send(producer, {"args": {"id": 2}, "callback_auth": auth}, task_name="some.other.task", queue=queue)
        failed = send(producer, {"args": 7, "callback_auth": auth}, queue=queue)  # MalformedRequest
        default = send(producer, {"args": {"id": 4}}, queue=queue)  # the default callback URL and auth
        # The model echoes it: Celery logs the result on its success line (the child's, under prefork), where
        # only the mask of known values stands between the secrets and the log.
        echoed = send(producer, {"args": {"echo": [DEFAULT_CALLBACK_PASSWORD, AWS_SECRET, BACKEND_PASSWORD]},
                                 "callback_url": f"{callback_receiver.url}/echo"}, queue=queue)
        refused = send(producer, {"args": {"id": 3}, "callback_url": "http://169.254.169.254/latest/",
                                  "callback_auth": auth}, queue=queue)
        assert ok.get(timeout=30)["status_code"] == 200
        assert refused.get(timeout=30)["status_code"] == 200
        assert default.get(timeout=30)["status_code"] == 200
        assert DEFAULT_CALLBACK_PASSWORD in echoed.get(timeout=30)["result"]
        with pytest.raises(Exception, match="MalformedRequest|JSON object"):
            failed.get(timeout=30)
        seen = {tuple(received.basic_auth or ()) for received in callback_receiver.wait_for(4)}
        assert (REQUEST_USER, REQUEST_PASSWORD) in seen and (DEFAULT_USER, DEFAULT_CALLBACK_PASSWORD) in seen
        worker.wait_for_log("Received unregistered task of type 'some.other.task'", timeout=30)
        worker.wait_for_log(f"hook callback failed for task {refused.id}: CallbackRefused", timeout=30)
        for result in (ok, failed, refused, default, echoed):
            wait_for(lambda r=result: any(TASK_LINE in line and r.id in line for line in worker.output.splitlines()),
                     30, f"the task line of {result.id}")
        assert unknown.id in worker.output
        assert worker.stop(timeout=30) == 0
    finally:
        producer.close()
        worker.stop(timeout=30)

    output = worker.output
    assert output.count("\n") > 20, output  # DEBUG: plenty of lines were written
    [success] = [line for line in output.splitlines() if echoed.id in line and "succeeded" in line]
    assert "***" in success, success  # masked, not dropped
    leaked = {secret: [line for line in output.splitlines() if secret in line] for secret in every_form()}
    [success] = [line for line in output.splitlines() if echoed.id in line and "succeeded" in line]
    assert "***" in success, success  # masked, not dropped
    leaked = {secret: lines for secret, lines in leaked.items() if lines}
    assert not leaked, "secrets in the worker's output:\n" + "\n".join(
        f"{secret!r}:\n  " + "\n  ".join(lines[:5]) for secret, lines in leaked.items())
