"""Post-inference hooks under faults: STS down, Firehose throttling, a missing stream, a failing callback.

Every test runs the worker as in production (both pools) with a real fault between it and the service:
a toggleable proxy in front of moto (``tests/support/faulty_proxy.py``, reached through botocore's
``AWS_ENDPOINT_URL_STS`` / ``AWS_ENDPOINT_URL_FIREHOSE``), moto's own state (a deleted stream), or the
callback receiver answering 500 or gone. In every case the tasks succeed with the model's result, each
hook failure is one WARNING line with a per-process count, and the hook works again once the fault ends.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import requests
from celery import Celery
from celery.result import AsyncResult

from devtools.demo import send
from devtools.servers import WorkerProcess, wait_for
from gateways.cached_client import CachedClient, ClientUnavailable
from tests.support.aws import assume_role_calls, aws_client, delivered_records, unique_role_arn
from tests.support.faulty_proxy import FaultyProxy, Hit

pytestmark = pytest.mark.faults

POOLS = ["prefork", "gevent"]
#: Worker processes that may each build a Firehose client (prefork: one per child; gevent: one process).
PROCESSES = {"prefork": 2, "gevent": 1}
CALLBACK_PASSWORD = "cb-Pa55word-never-logged-7d1f"
REQUEST_PASSWORD = "req-Pa55word-never-logged-93ac"
FAILURE_LINE = re.compile(
    r"^\[[^\]]*: WARNING/(?P<process>[^\]]+)\] hook (?P<hook>\w+) failed for task (?P<task>\S+): "
    r"(?P<type>\w+): (?P<message>.*) \(failures in this process: (?P<n>\d+) of (?P<m>\d+)\)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Failure:
    process: str
    hook: str
    task: str
    type: str
    message: str
    n: int
    m: int


def failures(worker: WorkerProcess, hook: str) -> dict[str, Failure]:
    """The hook's failure lines by task id, after checking the per-process counts run 1, 2, 3..."""
    found: dict[str, Failure] = {}
    counts: dict[str, list[int]] = defaultdict(list)
    for match in FAILURE_LINE.finditer(worker.output):
        line = Failure(**{**match.groupdict(), "n": int(match["n"]), "m": int(match["m"])})
        if line.hook != hook:
            continue
        assert line.task not in found, f"two failure lines for task {line.task}"
        assert line.n <= line.m, match.group(0)
        found[line.task] = line
        counts[line.process].append(line.n)
    for process, seen in counts.items():
        assert seen == list(range(1, len(seen) + 1)), f"{hook} failure counts in {process}: {seen}"
    return found


def wait_failures(worker: WorkerProcess, hook: str, task_ids: list[str], timeout: float = 30) -> dict[str, Failure]:
    """Wait until each task has its failure line for ``hook``; return those lines."""
    def all_logged() -> dict[str, Failure] | None:
        found = failures(worker, hook)
        return {task: found[task] for task in task_ids} if all(task in found for task in task_ids) else None

    try:
        return wait_for(all_logged, timeout, f"{hook} failure lines for {len(task_ids)} tasks", interval=0.1)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n--- worker output ---\n{worker.output[-4000:]}") from None


def record_ids(moto_url: str, stream: dict[str, str]) -> set[str]:
    return {record["RESPONSE_BODY"]["task_id"] for record in delivered_records(moto_url, stream)}


def wait_records(moto_url: str, stream: dict[str, str], task_ids: list[str], timeout: float = 30) -> set[str]:
    def all_there() -> set[str] | None:
        found = record_ids(moto_url, stream)
        return found if set(task_ids) <= found else None

    return wait_for(all_there, timeout, f"firehose records for {len(task_ids)} tasks", interval=0.2)


def task(producer: Celery, queue: str, index: int, **request: Any) -> AsyncResult:
    return send(producer, {"args": {"id": index, "prompt": f"hello {index}"}, **request}, queue=queue)


def assert_model_results(results: dict[int, AsyncResult]) -> None:
    """Every task SUCCEEDED with the model's answer to its own request."""
    for index, result in results.items():
        value = result.get(timeout=30)
        assert result.status == "SUCCESS" and value["status_code"] == 200
        assert json.loads(value["result"])["echo"]["id"] == index


def task_of_put(hit: Hit) -> str | None:
    """The task id inside a PutRecord request (the record's RESPONSE_BODY.task_id)."""
    try:
        record = json.loads(base64.b64decode(hit.json()["Record"]["Data"]))
        return record["RESPONSE_BODY"]["task_id"]
    except (ValueError, KeyError, TypeError):
        return None


def logging_env(aws_env: dict[str, str], stream: dict[str, str], role: str, **extra: str) -> dict[str, str]:
    return {**aws_env, "FORWARDER_HOOKS": "logging", "FIREHOSE_STREAM_NAME": stream["name"],
            "FIREHOSE_ROLE_ARN": role, **extra}


def create_stream(moto_url: str, stream: dict[str, str]) -> None:
    """(Re)create the fixture's stream as ``firehose_stream`` does: same name, bucket and prefix."""
    aws_client("firehose", moto_url).create_delivery_stream(
        DeliveryStreamName=stream["name"],
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": f"arn:aws:s3:::{stream['bucket']}",
            "Prefix": stream["prefix"],
        },
    )


# ------------------------------------------------------------------------------ STS down


@pytest.mark.parametrize("pool", POOLS)
def test_sts_down_at_start_tasks_succeed_then_records_flow_once_it_is_back(
    pool: str, start_worker: Callable[..., WorkerProcess], producer: Celery, queue: str, model: Any,
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, str],
    faulty_proxy: Callable[..., FaultyProxy],
) -> None:
    sts = faulty_proxy("down")  # nothing listens: connections to STS are refused
    role = unique_role_arn()
    worker = start_worker(pool, CELERY_WORKER_CONCURRENCY="2" if pool == "prefork" else "4",
                          **logging_env(aws_env, firehose_stream, role, AWS_ENDPOINT_URL_STS=sts.url))

    # While STS is down, tasks keep coming and all succeed; each one's logging hook fails
    started = time.monotonic()
    down: dict[int, AsyncResult] = {}
    for index in range(8):
        down[index] = task(producer, queue, index)
        time.sleep(0.25)
    assert_model_results(down)
    lines = wait_failures(worker, "logging", [r.id for r in down.values()])
    assert {line.type for line in lines.values()} == {"FirehoseUnavailable"}
    # Either a build attempt that failed, or a refusal to try while the backoff runs: never an STS
    # attempt per task.
    tried = [line for line in lines.values() if "cannot build the Firehose client" in line.message]
    backing_off = [line for line in lines.values() if "last build failed" in line.message]
    assert len(tried) + len(backing_off) == len(down), [line.message for line in lines.values()]
    # Builds were really tried while STS was down (empty, the checks on tried below would pass vacuously)
    assert tried, [line.message for line in lines.values()]
    assert all("EndpointConnectionError" in line.message for line in tried)
    down_for = time.monotonic() - started
    assert record_ids(moto_server, firehose_stream) == set()

    # Then STS comes back: once a process's backoff ends, its next task builds the client
    sts.set_mode("pass")
    back: dict[int, AsyncResult] = {}

    def delivered_after_restore() -> bool:
        back[100 + len(back)] = task(producer, queue, 100 + len(back))
        return bool(record_ids(moto_server, firehose_stream) & {r.id for r in back.values()})

    restored = time.monotonic()
    wait_for(delivered_after_restore, 75, "a record for a task sent after STS came back", interval=0.5)
    recovery = time.monotonic() - restored
    assert_model_results(back)

    # Every task has either its record or its failure line, never both
    every = [r.id for r in {**down, **back}.values()]

    def accounted() -> tuple[set[str], dict[str, Failure]] | None:
        records, failed = record_ids(moto_server, firehose_stream), failures(worker, "logging")
        return (records, failed) if all((i in records) != (i in failed) for i in every) else None

    records, failed = wait_for(accounted, 30, "a record or a failure line for every task", interval=0.2)
    assert set(every) - set(failed) == records

    # And STS saw a bounded number of tries: per process a few backed-off builds, not one per task
    per_process = defaultdict(int)
    for line in tried:
        per_process[line.process] += 1
    bound = 2 + int(down_for).bit_length()  # 1 s, 2 s, 4 s... between tries
    assert all(count <= bound for count in per_process.values()), (per_process, down_for)
    assert len(tried) < len(down)
    calls = assume_role_calls(moto_server, role)
    assert 1 <= calls <= PROCESSES[pool]
    assert sts.count("AssumeRole", mode="pass") == calls
    assert worker.output.count("firehose: client built") == calls
    print(f"{pool}: {len(down)} tasks while STS was down for {down_for:.1f} s: {len(tried)} build attempts "
          f"{dict(per_process)}, {len(backing_off)} refused during backoff; first record {recovery:.1f} s "
          f"after STS came back ({len(back)} tasks sent); {calls} assume-role call(s)")


def test_a_build_slower_than_the_backoff_still_backs_off() -> None:
    """STS timing out (3 attempts x 5 s connect timeout) must not use up the backoff while it fails."""
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    attempts = []

    def build() -> tuple[object, None]:
        attempts.append(now[0])
        now[0] += timedelta(seconds=15)
        raise OSError("connect timeout")

    cache: CachedClient[object] = CachedClient("firehose", build, clock=lambda: now[0])
    with pytest.raises(OSError):
        cache.get()
    for _ in range(5):  # right after the slow failure: no new attempt
        with pytest.raises(ClientUnavailable):
            cache.get()
    now[0] += timedelta(seconds=1)
    with pytest.raises(OSError):
        cache.get()
    now[0] += timedelta(seconds=1.5)  # the next backoff is 2 s, counted from the second failure
    with pytest.raises(ClientUnavailable):
        cache.get()
    assert len(attempts) == 2


# ------------------------------------------------------------------------------ Firehose throttled


@pytest.mark.parametrize("pool", POOLS)
def test_firehose_throttling_is_retried_a_bounded_number_of_times_then_records_flow_again(
    pool: str, start_worker: Callable[..., WorkerProcess], producer: Celery, queue: str, model: Any,
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, str],
    faulty_proxy: Callable[..., FaultyProxy],
) -> None:
    firehose = faulty_proxy("pass")
    role = unique_role_arn()
    worker = start_worker(pool, **logging_env(aws_env, firehose_stream, role, AWS_ENDPOINT_URL_FIREHOSE=firehose.url))
    first = task(producer, queue, 0)
    assert_model_results({0: first})
    wait_records(moto_server, firehose_stream, [first.id])

    # While Firehose throttles, tasks succeed and each put is given up after botocore's 3 attempts
    firehose.set_mode("throttle")
    started = time.monotonic()
    throttled = {index: task(producer, queue, index) for index in range(1, 5)}
    assert_model_results(throttled)
    lines = wait_failures(worker, "logging", [r.id for r in throttled.values()])
    throttled_for = time.monotonic() - started
    for line in lines.values():
        assert line.type == "FirehosePutError"
        assert "ThrottlingException: Rate exceeded" in line.message, line.message
    for result in throttled.values():
        hits = firehose.count("PutRecord", where=lambda hit, task_id=result.id: task_of_put(hit) == task_id)
        assert hits == 3, f"{hits} PutRecord attempts for task {result.id}"

    # Then the throttling ends: records flow again on the same clients
    firehose.set_mode("pass")
    after = {index: task(producer, queue, index) for index in range(5, 8)}
    assert_model_results(after)
    records = wait_records(moto_server, firehose_stream, [r.id for r in after.values()])
    assert not records & {r.id for r in throttled.values()}
    calls = assume_role_calls(moto_server, role)
    assert 1 <= calls <= PROCESSES[pool]
    assert worker.output.count("firehose: client built") == calls  # throttling never rebuilds a client
    print(f"{pool}: {len(throttled)} throttled tasks, {firehose.count('PutRecord', mode='throttle')} PutRecord "
          f"attempts, failures logged within {throttled_for:.1f} s")


# ------------------------------------------------------------------------------ stream missing


@pytest.mark.parametrize("pool", POOLS)
def test_deleted_stream_fails_clearly_without_retries_then_records_flow_once_recreated(
    pool: str, start_worker: Callable[..., WorkerProcess], producer: Celery, queue: str, model: Any,
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, str],
    faulty_proxy: Callable[..., FaultyProxy],
) -> None:
    firehose = faulty_proxy("pass")  # passes everything: only to count the puts
    worker = start_worker(pool, **logging_env(aws_env, firehose_stream, unique_role_arn(),
                                              AWS_ENDPOINT_URL_FIREHOSE=firehose.url))
    first = task(producer, queue, 0)
    assert_model_results({0: first})
    wait_records(moto_server, firehose_stream, [first.id])

    # The stream is deleted mid-run: tasks succeed, each failure names the missing stream
    aws_client("firehose", moto_server).delete_delivery_stream(DeliveryStreamName=firehose_stream["name"])
    missing = {index: task(producer, queue, index) for index in range(1, 4)}
    assert_model_results(missing)
    lines = wait_failures(worker, "logging", [r.id for r in missing.values()])
    for line in lines.values():
        assert line.type == "FirehosePutError"
        assert f"put_record to {firehose_stream['name']} failed: ResourceNotFoundException" in line.message
    for result in missing.values():  # a missing stream is not worth retrying
        assert firehose.count("PutRecord", where=lambda hit, task_id=result.id: task_of_put(hit) == task_id) == 1

    # Then it is recreated: records flow again
    create_stream(moto_server, firehose_stream)
    after = {index: task(producer, queue, index) for index in range(4, 7)}
    assert_model_results(after)
    records = wait_records(moto_server, firehose_stream, [r.id for r in after.values()])
    assert not records & {r.id for r in missing.values()}
    print(f"{pool}: stream deleted: {len(missing)} tasks, 1 PutRecord each: {next(iter(lines.values())).message}")


# ------------------------------------------------------------------------------ callback failing


@pytest.mark.parametrize("pool", POOLS)
def test_failing_or_gone_callback_is_tried_twice_and_changes_nothing_else(
    pool: str, start_worker: Callable[..., WorkerProcess], producer: Celery, queue: str, model: Any,
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, str], callback_receiver: Any,
    redis_server: Any, faulty_proxy: Callable[..., FaultyProxy],
) -> None:
    worker = start_worker(pool, **logging_env(
        aws_env, firehose_stream, unique_role_arn(),
        FORWARDER_HOOKS="callback,logging",
        FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        FORWARDER_CALLBACK_TIMEOUT="1",
        FORWARDER_CALLBACK_RETRIES="2",
    ))
    auth = {"kind": "basic", "username": "u", "password": CALLBACK_PASSWORD}
    # The endpoint is reached through a proxy, so that it can vanish with its kept-alive connections
    endpoint = faulty_proxy("pass", upstream=callback_receiver.url)
    url = f"{endpoint.url}/cb"

    # The callback endpoint answers 500 to every attempt
    callback_receiver.default_status = 500
    failing = {index: task(producer, queue, index, callback_url=url, callback_auth=auth) for index in range(3)}
    assert_model_results(failing)
    lines = wait_failures(worker, "callback", [r.id for r in failing.values()])
    for line in lines.values():
        assert line.type == "CallbackError" and "failed after 2 attempt(s): HTTP 500" in line.message, line.message
    attempts = defaultdict(int)
    for request in callback_receiver.received:
        attempts[request.body["task_id"]] += 1
    assert attempts == {r.id: 2 for r in failing.values()}
    # ... the next hook still ran for each of them
    wait_records(moto_server, firehose_stream, [r.id for r in failing.values()])

    # Then the endpoint is gone entirely: open connections cut, new ones refused
    endpoint.set_mode("down")
    gone = {index: task(producer, queue, index, callback_url=url, callback_auth=auth) for index in range(3, 6)}
    assert_model_results(gone)
    lines = wait_failures(worker, "callback", [r.id for r in gone.values()])
    for line in lines.values():
        assert line.type == "CallbackError" and "failed after 2 attempt(s): connection failed" in line.message
    wait_records(moto_server, firehose_stream, [r.id for r in gone.values()])

    # And what llm-engine's gateway reads is still the model's result; the worker keeps serving
    backend = redis.Redis.from_url(f"{redis_server.url}/1")
    try:
        for result in {**failing, **gone}.values():
            meta = json.loads(backend.get(f"celery-task-meta-{result.id}"))
            assert meta["status"] == "SUCCESS" and meta["result"] == result.result
    finally:
        backend.close()
    assert_model_results({9: task(producer, queue, 9)})
    assert len(callback_receiver.received) == 6
    assert CALLBACK_PASSWORD not in worker.output
    print(f"{pool}: callback gone: {next(iter(lines.values())).message}")


# ------------------------------------------------------------------------------ secrets under faults


@pytest.mark.parametrize("pool", POOLS)
def test_no_credential_reaches_the_log_under_faults(
    pool: str, start_worker: Callable[..., WorkerProcess], producer: Celery, queue: str, model: Any,
    moto_server: str, aws_env: dict[str, str], firehose_stream: dict[str, str], callback_receiver: Any,
    faulty_proxy: Callable[..., FaultyProxy],
) -> None:
    sts, firehose = faulty_proxy("throttle"), faulty_proxy("error500")
    role = unique_role_arn()
    # moto accepts any credentials: distinctive ones, so finding them in the log means a leak
    own = {"AWS_SECRET_ACCESS_KEY": "env-secret-Zq81xk2fP0wLmN3vR7tY", "AWS_SESSION_TOKEN": "env-token-Hh5Jd9sKe2LxQw0pUa"}
    # At DEBUG, the most talkative level: botocore would log STS answers and signed headers, Celery's
    # pool every task's args (the worker keeps those loggers at INFO).
    worker = start_worker(pool, CELERY_LOG_LEVEL="DEBUG", **logging_env(
        {**aws_env, **own}, firehose_stream, role,
        AWS_ENDPOINT_URL_STS=sts.url,
        AWS_ENDPOINT_URL_FIREHOSE=firehose.url,
        FORWARDER_HOOKS="callback,logging",
        FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        FORWARDER_CALLBACK_TIMEOUT="1",
        FORWARDER_CALLBACK_RETRIES="2",
        FORWARDER_CALLBACK_URL=f"{callback_receiver.url}/default",
        FORWARDER_CALLBACK_AUTH_USERNAME="endpoint-user",
        FORWARDER_CALLBACK_AUTH_PASSWORD=CALLBACK_PASSWORD,
    ))
    callback_receiver.default_status = 500

    # STS throttles: no client; each build attempt is 3 AssumeRole requests at the proxy
    throttled = {index: task(producer, queue, index) for index in range(2)}
    assert_model_results(throttled)
    lines = wait_failures(worker, "logging", [r.id for r in throttled.values()])
    tried = [line for line in lines.values() if "cannot build the Firehose client" in line.message]
    assert tried and all("Throttling: Rate exceeded" in line.message for line in tried)
    assert sts.count("AssumeRole", mode="throttle") == 3 * len(tried)
    wait_failures(worker, "callback", [r.id for r in throttled.values()])

    # STS is back but Firehose answers 500: credentials are fetched, every put fails
    sts.set_mode("pass")
    broken: dict[int, AsyncResult] = {}

    def put_attempted() -> bool:
        broken[10 + len(broken)] = task(producer, queue, 10 + len(broken))
        return firehose.count("PutRecord", mode="error500") > 0

    wait_for(put_attempted, 75, "a put on the Firehose proxy once STS is back", interval=0.5)
    assert_model_results(broken)
    wait_failures(worker, "logging", [r.id for r in broken.values()])
    # ... then Firehose throttles, and the callback endpoint answers 500 throughout
    firehose.set_mode("throttle")
    last = task(producer, queue, 99, callback_auth={"kind": "basic", "username": "u", "password": REQUEST_PASSWORD})
    assert_model_results({99: last})
    lines = wait_failures(worker, "logging", [last.id])
    assert "ThrottlingException" in lines[last.id].message
    wait_failures(worker, "callback", [last.id])
    assert "InternalFailure" in worker.output

    # None of the credentials in play is in the log: the worker's own, the assumed role's, the callback's
    data = requests.get(f"{moto_server}/moto-api/data.json", timeout=10).json()
    assumed = [item for item in data["sts"]["AssumedRole"] if item["role_arn"] == role]
    assert assumed, "the role was assumed once STS was back"
    secrets = {**own, "default callback password": CALLBACK_PASSWORD, "request's callback password": REQUEST_PASSWORD}
    for index, item in enumerate(assumed):
        secrets[f"assumed secret key {index}"] = item["secret_access_key"]
        secrets[f"assumed session token {index}"] = item["session_token"]
    output = worker.output
    assert "DEBUG/" in output
    leaked = [name for name, value in secrets.items() if value in output]
    assert not leaked, f"found in the worker's log: {leaked}"
    print(f"{pool}: STS throttled: {len(tried)} build attempt(s), {sts.count('AssumeRole', mode='throttle')} "
          f"AssumeRole requests; Firehose 500: {firehose.count('PutRecord', mode='error500')} PutRecord requests "
          f"for {len(broken)} tasks; {len(secrets)} secrets, {len(output.splitlines())} log lines at DEBUG: none leaked")
