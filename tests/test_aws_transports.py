"""SQS broker and S3 result backend against moto's server, under both pools.

The worker runs as in production (``python -m forwarder``) and reaches moto only through
``AWS_ENDPOINT_URL``. Producers are plain Celery apps as llm-engine's gateway builds them: broker
``sqs://`` with the queue predefined, results read with ``AsyncResult`` through Celery's stock
``s3://`` backend, so the stored layout is the one llm-engine reads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import statistics
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import botocore.client
import pytest
from celery import Celery
from celery.backends.s3 import S3Backend

from devtools.demo import producer as make_producer
from devtools.demo import send
from forwarder.app import (
    broker_transport_options,
    build_app,
    celery_config,
    result_backend_class,
    sqs_queue_region,
)
from forwarder.settings import Settings
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME
from gateways import s3_backend, sqs_transport
from gateways.s3_backend import S3ResultBackend, parse_s3_url
from tests.support.aws import REGION, assume_role_calls, aws_client, unique_role_arn, wait_for_records

POOLS = ["prefork", "gevent"]
PREFIX = "results/llm"
#: The stock backend's base path for ``s3://bucket/results/llm``.
BASE_PATH = "results/llm/"
BUILT = re.compile(rf"{s3_backend.CLIENT_NAME}: client built \(pid (\d+)")
TASKS = 4


# ----------------------------------------------------------------------------------------- helpers


def sqs_env(sqs_queue: dict[str, str]) -> dict[str, str]:
    """Worker settings for the SQS broker: CELERY_QUEUE is the predefined queue's name."""
    return {
        "CELERY_BROKER_URL": "sqs://",
        "CELERY_SQS_QUEUE_URL": sqs_queue["url"],
        "CELERY_QUEUE": sqs_queue["name"],
        "CELERY_SQS_POLLING_INTERVAL": "0.1",
    }


def sqs_producer(sqs_queue: dict[str, str], backend: str) -> Celery:
    app = make_producer("sqs://", backend)
    app.conf.broker_transport_options = {
        "predefined_queues": {sqs_queue["name"]: {"url": sqs_queue["url"]}},
        "region": REGION,
        "wait_time_seconds": 0,
    }
    return app


def stock_s3(app: Celery, bucket: str, moto_url: str) -> Celery:
    """Configure ``app``'s results as llm-engine's gateway does: Celery's own S3 backend."""
    app.conf.update(s3_bucket=bucket, s3_base_path=BASE_PATH, s3_endpoint_url=moto_url, s3_region=REGION)
    assert type(app.backend) is S3Backend  # the stock class: nothing global was re-aliased
    return app


def queue_urls(moto_url: str) -> set[str]:
    return set(aws_client("sqs", moto_url).list_queues().get("QueueUrls", []))


def send_and_check(app: Celery, queue: str, count: int = TASKS, timeout: float = 30) -> list[str]:
    """Send ``count`` tasks (both task names), check each stored result exactly; returns the task ids."""
    sent = []
    for index in range(count):
        args = {"id": f"{uuid.uuid4().hex[:8]}-{index}", "prompt": f"hello {index}"}
        name = LEGACY_TASK_NAME if index % 2 else TASK_NAME
        sent.append((args, send(app, {"args": args}, name, queue=queue)))
    for args, result in sent:
        assert_wrapped(result.get(timeout=timeout), args)
        assert result.status == "SUCCESS"
    return [result.id for _, result in sent]


def assert_wrapped(value: object, args: dict) -> None:
    """llm-engine's wrapped shape: exactly ``{"result": "<model JSON as a string>", "status_code": 200}``."""
    assert isinstance(value, dict) and set(value) == {"result", "status_code"}, value
    assert value["status_code"] == 200
    assert isinstance(value["result"], str)
    answer = json.loads(value["result"])
    assert answer["echo"] == args and answer["model"] == "example"


def builds_by_pid(output: str) -> Counter[int]:
    return Counter(int(pid) for pid in BUILT.findall(output))


def assert_one_client_per_process(output: str) -> Counter[int]:
    builds = builds_by_pid(output)
    assert builds, "no S3 client was built"
    assert max(builds.values()) == 1, f"S3 client built more than once in a process: {builds}"
    return builds


def assert_clean(output: str) -> None:
    for bad in ("Traceback", "predefined_queues", "UndefinedQueue", "ERROR/"):
        assert bad not in output, output[-4000:]


# ------------------------------------------------------------------------------- pure configuration


def test_s3_url_gives_bucket_and_a_folder_prefix():
    assert parse_s3_url("s3://bucket/tmp/celery") == ("bucket", "tmp/celery/")
    assert parse_s3_url("s3://bucket/tmp/celery/") == ("bucket", "tmp/celery/")
    assert parse_s3_url("s3://bucket") == ("bucket", "")


def test_s3_results_select_the_cached_client_backend_for_this_app_only(monkeypatch):
    env = {"CELERY_RESULT_BACKEND": "s3://bucket/tmp/celery", "AWS_REGION": "eu-west-1",
           "CELERY_WORKER_POOL": "gevent", "CELERY_WORKER_CONCURRENCY": "32"}
    # As in the worker: Celery prefers this variable to the app's own result_backend setting.
    monkeypatch.setenv("CELERY_RESULT_BACKEND", env["CELERY_RESULT_BACKEND"])
    settings = Settings.from_env(env)
    assert result_backend_class(settings) == "forwarder.result_backends:S3Results+s3://bucket/tmp/celery"
    assert celery_config(settings)["s3_region"] == "eu-west-1"
    app = build_app(settings)
    backend = app.backend
    assert isinstance(backend, S3ResultBackend)
    assert (backend.bucket_name, backend.base_path) == ("bucket", "tmp/celery/")
    assert backend.client_config.region == "eu-west-1"
    assert backend.client_config.max_pool_connections == 32 + 8  # every greenlet, plus forwarder.pools.MARGIN
    assert backend.as_uri() == "s3://bucket/tmp/celery"
    assert pickle.loads(pickle.dumps(backend)).base_path == "tmp/celery/"
    # Building the backend connects nothing (the worker's main process builds it before forking).
    assert backend.client_config not in s3_backend._caches
    # Another app in the same process still gets Celery's stock backend for s3://.
    other = Celery("other", backend="s3://", set_as_current=False)
    other.conf.update(s3_bucket="bucket", s3_endpoint_url="http://127.0.0.1:1", s3_access_key_id="k",
                      s3_secret_access_key="s")
    assert type(other.backend) is S3Backend


def test_backend_round_trip_is_readable_by_the_stock_backend(moto_server, aws_env, s3_bucket):
    app = Celery("worker-side", set_as_current=False)
    app.conf.update(s3_endpoint_url=moto_server, s3_region=REGION)
    backend = S3ResultBackend(app=app, url=f"s3://{s3_bucket}/{PREFIX}")
    reader = stock_s3(Celery("reader", backend="s3://", set_as_current=False), s3_bucket, moto_server).backend
    assert backend.get("celery-task-meta-missing") is None
    backend.store_result("t-1", {"result": "{}", "status_code": 200}, "SUCCESS")
    meta = reader.get_task_meta("t-1")
    assert (meta["status"], meta["result"]) == ("SUCCESS", {"result": "{}", "status_code": 200})
    assert backend.get_task_meta("t-1")["status"] == "SUCCESS"
    backend.delete("celery-task-meta-t-1")
    assert reader.get("celery-task-meta-t-1") is None


def test_forked_child_builds_its_own_client(moto_server, aws_env):
    config = s3_backend.S3ClientConfig(endpoint_url=moto_server, region=REGION, read_timeout=7)
    parent = s3_backend.s3_client(config)
    assert s3_backend.s3_client(config) is parent  # cached in this process
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it built a client of its own, exactly once
        ok = False
        try:
            own = s3_backend.s3_client(config)
            ok = own is not parent and s3_backend.s3_client(config) is own and s3_backend.client_builds() == 1
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s3_backend.s3_client(config) is parent


def test_sqs_transport_options_predefine_the_queue_with_short_polling():
    settings = Settings.from_env({
        "CELERY_BROKER_URL": "sqs://", "CELERY_QUEUE": "launch-endpoint-id-e1",
        "CELERY_SQS_QUEUE_URL": "https://sqs.us-west-2.amazonaws.com/123456789012/launch-endpoint-id-e1",
        "AWS_REGION": "us-east-1",
    })
    options = broker_transport_options(settings)
    assert options["predefined_queues"] == {"launch-endpoint-id-e1": {
        "url": "https://sqs.us-west-2.amazonaws.com/123456789012/launch-endpoint-id-e1", "region": "us-west-2"}}
    assert options["region"] == "us-east-1"
    other_name = broker_transport_options(settings.replace(queue="celery"))["predefined_queues"]
    assert set(other_name) == {"celery", "launch-endpoint-id-e1"}
    assert options["wait_time_seconds"] == 0 and isinstance(options["wait_time_seconds"], int)
    assert options["polling_interval"] == 1
    config = celery_config(settings)
    assert config["worker_enable_remote_control"] is False
    assert config["worker_send_task_events"] is False
    app = build_app(settings)
    try:
        assert app.connection_for_read().transport_cls == sqs_transport.TRANSPORT_PATH
        assert issubclass(type(app.connection_for_read().transport), sqs_transport.Transport)
    finally:
        app.close()
    assert sqs_queue_region("http://127.0.0.1:5000/123456789012/q") is None
    assert sqs_queue_region("https://us-west-1.queue.amazonaws.com/1/q") == "us-west-1"


def test_sqs_consumer_needs_no_list_create_or_get_queue_url(moto_server, aws_env, sqs_queue, monkeypatch):
    """The worker's own app sends, declares, receives and acks with only message-level SQS calls."""
    calls: list[str] = []
    real = botocore.client.BaseClient._make_api_call

    def record(self, operation, params):  # noqa: ANN001, ANN202
        if self.meta.service_model.service_name == "sqs":
            calls.append(operation)
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", record)
    env = {**aws_env, **sqs_env(sqs_queue), "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/1"}
    app = build_app(Settings.from_env(env))
    try:
        with app.connection_for_write() as conn:
            queue = conn.SimpleQueue(sqs_queue["name"])
            queue.put({"hello": "sqs"})
            message = queue.get(timeout=10)
            assert message.payload == {"hello": "sqs"}
            message.ack()
            queue.close()
    finally:
        app.close()
    # GetQueueAttributes: queue_declare reports the queue's size (ApproximateNumberOfMessages).
    assert set(calls) <= {"GetQueueAttributes", "SendMessage", "ReceiveMessage", "DeleteMessage"}, calls
    assert {"SendMessage", "ReceiveMessage", "DeleteMessage"} <= set(calls)


def test_worker_acks_what_producers_route_by_the_queue_s_own_name(moto_server, aws_env, sqs_queue):
    """CELERY_QUEUE left at "celery": the ack looks the queue up by the producer's routing key."""
    producer = make_producer("sqs://", "cache+memory://")
    producer.conf.broker_transport_options = {"predefined_queues": {sqs_queue["name"]: {"url": sqs_queue["url"]}}}
    env = {**aws_env, **sqs_env(sqs_queue), "CELERY_QUEUE": "celery"}
    app = build_app(Settings.from_env(env))
    try:
        send(producer, {"args": {"x": 1}}, queue=sqs_queue["name"])
        with app.connection_for_write() as conn:
            queue = conn.SimpleQueue("celery")
            message = queue.get(timeout=10)
            assert message.delivery_info["routing_key"] == sqs_queue["name"]
            message.ack()  # stock options: UndefinedQueueException, and the message would come back
            queue.close()
    finally:
        app.close()
        producer.close()
    attributes = aws_client("sqs", moto_server).get_queue_attributes(
        QueueUrl=sqs_queue["url"], AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
    assert attributes["Attributes"] == {"ApproximateNumberOfMessages": "0", "ApproximateNumberOfMessagesNotVisible": "0"}


# -------------------------------------------------------------------------------- worker end to end


@pytest.mark.parametrize("pool", POOLS)
def test_sqs_broker_with_redis_results(pool, start_worker, moto_server, aws_env, sqs_queue, redis_server, model):
    before = queue_urls(moto_server)
    worker = start_worker(pool, **aws_env, **sqs_env(sqs_queue))
    app = sqs_producer(sqs_queue, f"{redis_server.url}/1")
    try:
        send_and_check(app, sqs_queue["name"])
        # One at a time, to see the pickup latency of an idle worker (polling every 0.1 s here).
        latencies = []
        for index in range(3):
            started = time.monotonic()
            assert_wrapped(send(app, {"args": {"n": index}}, queue=sqs_queue["name"]).get(timeout=30), {"n": index})
            latencies.append(time.monotonic() - started)
        print(f"SQS + Redis ({pool}): task latency median {statistics.median(latencies) * 1000:.0f} ms")
    finally:
        app.close()
    assert queue_urls(moto_server) == before, "the worker created an SQS queue"
    assert model.behaviour.total == TASKS + 3
    worker.stop(timeout=20)
    assert_clean(worker.output)


def test_busy_prefork_worker_polls_again_as_soon_as_a_slot_frees(start_worker, aws_env, sqs_queue, redis_server,
                                                                model):
    """With kombu's stock channel a full prefetch window waited the whole polling interval (default 1 s)
    before the next look: 2 slots ran at most 2 tasks a second. 16 tasks would take >= 7.5 s."""
    env = {**sqs_env(sqs_queue), "CELERY_SQS_POLLING_INTERVAL": "1"}
    start_worker("prefork", **aws_env, **env)
    app = sqs_producer(sqs_queue, f"{redis_server.url}/1")
    try:
        send_and_check(app, sqs_queue["name"], count=2)  # warm: both children have started
        started = time.monotonic()
        send_and_check(app, sqs_queue["name"], count=16)
        elapsed = time.monotonic() - started
    finally:
        app.close()
    print(f"SQS prefork, 1 s polling interval: 16 tasks in {elapsed:.2f} s")
    assert elapsed < 4, f"16 tasks took {elapsed:.1f} s: polling waits out the interval while slots are free"


@pytest.mark.parametrize("pool", POOLS)
def test_redis_broker_with_s3_results(pool, start_worker, moto_server, aws_env, s3_bucket, redis_server, queue, model):
    extra = {}
    if pool == "prefork":
        # Each child is replaced after one task, so later children are forked from a main process that
        # has built its own client (it stores the expired task's REVOKED state below): each child must
        # build its own, never use the copy inherited by fork.
        extra["CELERY_WORKER_MAX_TASKS_PER_CHILD"] = "1"
    worker = start_worker(pool, **aws_env, CELERY_RESULT_BACKEND=f"s3://{s3_bucket}/{PREFIX}", **extra)
    app = stock_s3(make_producer(f"{redis_server.url}/0", "s3://"), s3_bucket, moto_server)
    try:
        expired = app.send_task(TASK_NAME, args=[{"args": {"late": True}}, datetime.now(), False], queue=queue,
                                expires=datetime.now(UTC) - timedelta(seconds=5))
        ids = send_and_check(app, queue)
        assert_wait_state(expired, "REVOKED")
    finally:
        app.close()
    keys = {item["Key"] for item in aws_client("s3", moto_server).list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {f"{BASE_PATH}celery-task-meta-{task_id}" for task_id in [*ids, expired.id]} == keys
    worker.stop(timeout=20)
    assert_clean(worker.output)
    builds = assert_one_client_per_process(worker.output)
    print(f"Redis + S3 ({pool}): S3 clients built per pid {dict(builds)}, main process {worker.pid}")
    if pool == "gevent":
        assert sum(builds.values()) == 1
    else:
        # The main process (REVOKED state) and each of the TASKS one-task children built exactly one: the
        # children forked after the main process built its client did not use the inherited one.
        assert worker.pid in builds, "the main process was expected to store the REVOKED state"
        assert len(builds) == 1 + TASKS, f"some child used a client it did not build: {builds}"


@pytest.mark.parametrize("pool", POOLS)
def test_sqs_broker_with_s3_results(pool, start_worker, moto_server, aws_env, sqs_queue, s3_bucket, model):
    before = queue_urls(moto_server)
    worker = start_worker(pool, **aws_env, **sqs_env(sqs_queue), CELERY_RESULT_BACKEND=f"s3://{s3_bucket}/{PREFIX}")
    app = stock_s3(sqs_producer(sqs_queue, "s3://"), s3_bucket, moto_server)
    try:
        send_and_check(app, sqs_queue["name"])
    finally:
        app.close()
    assert queue_urls(moto_server) == before, "the worker created an SQS queue"
    worker.stop(timeout=20)
    assert_clean(worker.output)
    builds = assert_one_client_per_process(worker.output)
    assert sum(builds.values()) <= (1 if pool == "gevent" else 2)  # concurrency 2: at most one per child


def assert_wait_state(result, state: str, timeout: float = 20) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while result.state != state:
        assert time.monotonic() < deadline, f"task {result.id} is {result.state}, expected {state}"
        time.sleep(0.1)



# ---------------------------------------------------------------- production shape: both hooks, all transports


HOOKED_TASKS = 6
CALLBACK_PASSWORD = "transport-callback-password-7"


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(("broker", "backend"), [("redis", "redis"), ("redis", "s3"), ("sqs", "redis"), ("sqs", "s3")])
def test_both_hooks_on_every_broker_and_result_backend(
    broker, backend, pool, start_worker, moto_server, aws_env, sqs_queue, s3_bucket, firehose_stream,
    callback_receiver, redis_server, queue, model,
):
    # As production runs it: callback and logging hooks on, Firehose through an assumed role.
    role = unique_role_arn()
    env = {
        **aws_env,
        "FORWARDER_HOOKS": "callback,logging",
        "FORWARDER_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "FIREHOSE_STREAM_NAME": firehose_stream["name"],
        "FIREHOSE_ROLE_ARN": role,
        "FORWARDER_ENDPOINT_ID": "end_transports",
    }
    if broker == "sqs":
        env.update(sqs_env(sqs_queue))
    if backend == "s3":
        env["CELERY_RESULT_BACKEND"] = f"s3://{s3_bucket}/{PREFIX}"
    worker = start_worker(pool, **env)
    result_url = "s3://" if backend == "s3" else f"{redis_server.url}/1"
    app = sqs_producer(sqs_queue, result_url) if broker == "sqs" else make_producer(f"{redis_server.url}/0", result_url)
    if backend == "s3":
        stock_s3(app, s3_bucket, moto_server)
    target = sqs_queue["name"] if broker == "sqs" else queue
    auth = {"kind": "basic", "username": "caller", "password": CALLBACK_PASSWORD}
    try:
        sent = []
        for index in range(HOOKED_TASKS):
            args = {"id": f"{broker}-{backend}-{index}"}
            request = {"args": args, "callback_url": f"{callback_receiver.url}/done", "callback_auth": auth}
            sent.append((args, send(app, request, LEGACY_TASK_NAME if index % 2 else TASK_NAME, queue=target)))
        for args, result in sent:
            assert_wrapped(result.get(timeout=30), args)
    finally:
        app.close()
    ids = {result.id for _, result in sent}
    # Every task called back once, with the caller's credentials and its own result
    calls = callback_receiver.wait_for(HOOKED_TASKS)
    assert {call.body["task_id"] for call in calls} == ids and len(calls) == HOOKED_TASKS
    assert all(call.basic_auth == ("caller", CALLBACK_PASSWORD) for call in calls)
    # Every task has one Firehose record, with no credential in it
    records = wait_for_records(moto_server, firehose_stream, HOOKED_TASKS)
    assert {record["RESPONSE_BODY"]["task_id"] for record in records} == ids and len(records) == HOOKED_TASKS
    assert CALLBACK_PASSWORD not in json.dumps(records)
    # Credentials fetched once per process that ran tasks (concurrency 2: two prefork children), not per task
    assert 1 <= assume_role_calls(moto_server, role) <= (1 if pool == "gevent" else 2)
    worker.stop(timeout=20)
    assert_clean(worker.output)
    assert "hook callback failed" not in worker.output and "hook logging failed" not in worker.output
    assert CALLBACK_PASSWORD not in worker.output
