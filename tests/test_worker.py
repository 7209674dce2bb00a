"""The worker end to end, launched as in production, with tasks sent as llm-engine's gateway sends them."""

from __future__ import annotations

import json
import re
import signal
import time

import psutil
import pytest
import redis

from devtools.demo import send
from devtools.servers import free_port, wait_for
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME

POOLS = ["prefork", "gevent"]


def stored_meta(redis_server, task_id: str) -> dict:
    """The raw result meta the worker stored (Redis DB 1), as llm-engine's readers see it."""
    client = redis.Redis.from_url(f"{redis_server.url}/1")
    raw = client.get(f"celery-task-meta-{task_id}")
    client.close()
    assert raw is not None, f"no result stored for {task_id}"
    return json.loads(raw)


def received(worker) -> int:
    """How many tasks the worker has received (Celery's "Task <name>[<id>] received" lines)."""
    return len(re.findall(r"\] Task \S+\[[0-9a-f-]+\] received$", worker.output, flags=re.MULTILINE))


def results_db_connections(redis_server, pid: int) -> list[dict]:
    """The result backend (DB 1) connections of process ``pid``, as Redis's CLIENT LIST shows them."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
             if c.raddr and c.raddr.port == redis_server.port}
    client = redis.Redis.from_url(f"{redis_server.url}/1")
    listed = client.client_list()
    client.close()
    return [c for c in listed if c["db"] == "1" and int(c["addr"].rpartition(":")[2]) in ports]


def connections_received(redis_server) -> int:
    """Connections the Redis server has accepted since it started (its own count; this read's included)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


@pytest.mark.smoke  # `make matrix`: the one real-worker test per pool run on the oldest and newest dependency sets
@pytest.mark.parametrize("pool", POOLS)
def test_both_task_names_store_llm_engine_wrapped_results(pool, start_worker, producer, model, queue, redis_server):
    start_worker(pool)
    results = [
        send(producer, {"args": {"id": i, "prompt": "hi"}, "url": None, "return_pickled": False}, name, queue=queue)
        for i, name in enumerate([TASK_NAME, LEGACY_TASK_NAME, TASK_NAME, LEGACY_TASK_NAME])
    ]
    for i, result in enumerate(results):
        value = result.get(timeout=30)
        assert value == {
            "result": json.dumps({"echo": {"id": i, "prompt": "hi"}, "model": "example", "length": 25}),
            "status_code": 200,
        }
        meta = stored_meta(redis_server, result.id)
        assert meta["status"] == "SUCCESS" and meta["task_id"] == result.id
    assert {"id": 0, "prompt": "hi"} in model.behaviour.bodies  # args unwrapped before the POST


@pytest.mark.parametrize("pool", POOLS)
def test_non_2xx_is_stored_as_success_with_its_status(pool, start_worker, producer, model, queue):
    start_worker(pool)
    model.behaviour.status = 503
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    value = result.get(timeout=30)
    assert result.status == "SUCCESS"
    assert value["status_code"] == 503
    assert json.loads(value["result"])["echo"] == {"id": 1}


@pytest.mark.parametrize("pool", POOLS)
def test_malformed_request_fails_before_any_http_call_and_worker_keeps_serving(
    pool, start_worker, producer, model, queue, redis_server
):
    worker = start_worker(pool)
    bad = send(producer, {"args": 7}, queue=queue)  # llm-engine's forwarder cannot forward a number either
    with pytest.raises(Exception) as caught:
        bad.get(timeout=30)
    assert "args" in str(caught.value) and "must be a JSON object, array or string" in str(caught.value)
    assert bad.status == "FAILURE"
    # Celery stores its own failure meta first; after_return then rewrites it into llm-engine's shape.
    def rewritten() -> dict | None:
        meta = stored_meta(redis_server, bad.id)
        return meta if "custom" in meta["result"] else None

    meta = wait_for(rewritten, 10, "llm-engine's error meta")
    assert meta["result"]["exc_type"] == "MalformedRequest"
    custom = json.loads(meta["result"]["custom"])
    assert custom["error"] == str(caught.value)
    assert custom["error_metadata"].startswith("Internal failure\n")
    assert meta["traceback"] is None  # as llm-engine: callers never see the worker's frames
    assert model.behaviour.total == 0
    good = send(producer, {"args": {"id": 2}}, queue=queue)
    assert good.get(timeout=30)["status_code"] == 200
    assert "Traceback" not in worker.output  # expected failures are one line, not a stack dump


@pytest.mark.parametrize("pool", POOLS)
def test_raw_result_format(pool, start_worker, producer, model, queue):
    start_worker(pool, FORWARDER_RESULT_FORMAT="raw")
    request = {"args": {"id": 3}, "url": None}
    assert send(producer, request, queue=queue).get(timeout=30) == {
        "echo": request, "model": "example", "length": len(json.dumps(request)),
    }


@pytest.mark.parametrize("task_name", [TASK_NAME, LEGACY_TASK_NAME])
def test_connection_errors_retry_with_backoff_then_fail_under_both_names(task_name, start_worker, producer, queue):
    closed = f"http://127.0.0.1:{free_port()}"
    worker = start_worker(
        "gevent", FORWARDER_MODEL_URL=f"{closed}/predict", FORWARDER_READY_TIMEOUT="0", FORWARDER_RETRY_MAX="2",
    )
    result = send(producer, {"args": {"id": 1}}, task_name, queue=queue)
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    assert "unreachable" in str(caught.value)
    assert worker.output.count(f"{task_name}[{result.id}] retry") == 2


def test_ddtrace_run_gevent_worker_serves_a_task(start_worker, producer, model, queue):
    worker = start_worker("gevent", ddtrace=True, timeout=90)
    assert send(producer, {"args": {"id": 1}}, queue=queue).get(timeout=30)["status_code"] == 200
    assert "Traceback" not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_ddtrace_run_with_tracing_on_traces_each_task_and_its_model_call(
    pool, start_worker, producer, model, queue, trace_agent, callback_receiver
):
    # As production runs it: ddtrace-run, tracing on, spans sent to the (here: fake, local) agent.
    password, query_token = "traced-callback-password-1", "traced-query-token-1"
    worker = start_worker(
        pool, ddtrace=True, timeout=90, FORWARDER_HOOKS="callback", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        **trace_agent.env(),
    )
    request = {
        "callback_url": f"{callback_receiver.url}/done?token={query_token}",
        "callback_auth": {"kind": "basic", "username": "caller", "password": password},
    }
    results = [
        send(producer, {**request, "args": {"id": i}}, name, queue=queue)
        for i, name in enumerate([TASK_NAME, LEGACY_TASK_NAME, TASK_NAME])
    ]
    failed = send(producer, {"args": None}, queue=queue)  # llm-engine cannot forward null either
    for result in results:
        assert result.get(timeout=30)["status_code"] == 200
    with pytest.raises(Exception, match="must be a JSON object"):
        failed.get(timeout=30)
    callback_receiver.wait_for(3)
    ids = {result.id: name for result, name in zip(results, [TASK_NAME, LEGACY_TASK_NAME, TASK_NAME], strict=True)}
    predict_url = f"{model.url}/predict"

    def runs(spans: list[dict]) -> dict[str, dict]:
        return {s["meta"].get("celery.id"): s for s in spans if s["name"] == "celery.run"}

    def each_task_and_its_post(spans: list[dict]) -> bool:
        found = runs(spans)
        posts = {s["trace_id"] for s in spans if s["name"] == "requests.request" and s["meta"].get("http.url") == predict_url}
        return all(task in found and found[task]["trace_id"] in posts for task in ids)

    # The model POST is traced inside its task's trace: the request context follows the task (a prefork
    # child's thread, or the task's own greenlet: ddtrace sees gevent because it is imported before the patch).
    spans = trace_agent.wait_for_spans(each_task_and_its_post, 30, "celery.run span with its model POST per task")
    found = runs(spans)
    for task, name in ids.items():
        assert found[task]["resource"] == name and found[task]["meta"]["celery.state"] == "SUCCESS"
        assert found[task]["service"] == "celery-forwarder-test"
    # A failed task is an error in APM, with its type, message and stack (ddtrace itself leaves failures
    # listed in Task.throws unflagged; the stack also shows its frames were released only after this).
    error = trace_agent.wait_for_spans(lambda spans: failed.id in runs(spans), 30, "the failed task's span")
    failed_run = runs(error)[failed.id]
    assert failed_run["error"] == 1 and failed_run["meta"]["celery.state"] == "FAILURE"
    assert failed_run["meta"]["error.type"] == "forwarder.errors.MalformedRequest"
    assert "must be a JSON object" in failed_run["meta"]["error.message"]
    assert "plan_request" in failed_run["meta"]["error.stack"]
    everything = json.dumps(spans, default=str)
    assert password not in everything and query_token not in everything  # no secret reaches the trace agent
    assert "Traceback" not in worker.output and "failed to send" not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_lets_the_running_task_finish_and_store_its_result(pool, start_worker, producer, model, queue):
    worker = start_worker(pool)
    model.behaviour.delay = 2.0
    result = send(producer, {"args": {"id": 1}}, queue=queue)
    wait_for(lambda: model.behaviour.in_flight == 1, 20, "the task to reach the model")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert result.get(timeout=5)["status_code"] == 200
    assert "Warm shutdown" in worker.output


def test_prefork_children_are_recycled_after_max_tasks(start_worker, producer, model, queue):
    worker = start_worker("prefork", CELERY_WORKER_CONCURRENCY="1", CELERY_WORKER_MAX_TASKS_PER_CHILD="2")
    seen: set[int] = set()
    for i in range(6):
        seen.update(child.pid for child in worker.children())
        assert send(producer, {"args": {"id": i}}, queue=queue).get(timeout=30)["status_code"] == 200
    wait_for(lambda: seen.update(c.pid for c in worker.children()) or len(seen) >= 3, 20, "a third child")
    assert len(seen) >= 3  # 6 tasks, 2 per child: at least 3 children in turn


@pytest.mark.parametrize("pool", POOLS)
def test_a_replica_reserves_little_more_than_it_runs_and_replicas_share_the_queue(
    pool, start_worker, producer, model, queue
):
    model.behaviour.delay = 0.4
    first = start_worker(pool, CELERY_WORKER_CONCURRENCY="2")
    results = [send(producer, {"args": {"id": i}}, queue=queue) for i in range(16)]
    wait_for(lambda: model.behaviour.in_flight == 2, 20, "both slots of the first replica busy")
    # Reserved: the 2 running, plus under gevent the one its consumer holds while blocked in spawn()
    # (prefetch 2 per slot there, 1 under prefork); the rest stays in the queue.
    reserved = {"prefork": 2, "gevent": 3}[pool]
    wait_for(lambda: received(first) >= reserved, 10, f"{reserved} tasks received")
    time.sleep(0.3)  # time for any further reservation to show
    assert received(first) == reserved
    second = start_worker(pool, CELERY_WORKER_CONCURRENCY="2")
    for result in results:
        assert result.get(timeout=60)["status_code"] == 200
    # A result is visible just before its worker logs the success line: wait for all 16 lines.
    wait_for(lambda: first.output.count("succeeded in") + second.output.count("succeeded in") >= 16, 10,
             "16 success lines")
    done_first, done_second = first.output.count("succeeded in"), second.output.count("succeeded in")
    assert done_first + done_second == 16
    assert done_second >= 4, (done_first, done_second)
    assert model.behaviour.peak_in_flight == 4  # no slot of either replica idled while work waited


def test_gevent_greenlets_share_one_result_backend(start_worker, producer, model, queue, redis_server):
    # result_backend_thread_safe: one backend, so one connection pool, per process. Without it Celery
    # builds a backend per thread, which under gevent is per greenlet: a new Redis connection per task.
    # Counted as the connections Redis accepted over the run (INFO stats), not those open at its end: closed
    # ones (a dropped greenlet's backend, once collected) would hide from a count at the end.
    # Concurrency 8, not more: kombu's broker pool holds 10 connections, and more greenlets acking at
    # once can exhaust it (MaxConnectionsError, seen at 32), which is not what this test is about.
    model.behaviour.delay = 0.05  # long enough for all 8 slots to run at once
    worker = start_worker("gevent", CELERY_WORKER_CONCURRENCY="8")
    # Warm up: every slot busy once, so the pools (broker, results, the producer's) hold what 8 at once need.
    warm = [send(producer, {"args": {"id": f"warm-{i}"}}, queue=queue) for i in range(16)]
    for result in warm:
        assert result.get(timeout=60)["status_code"] == 200
    before = connections_received(redis_server)
    results = [send(producer, {"args": {"id": i}}, queue=queue) for i in range(100)]
    for result in results:
        assert result.get(timeout=60)["status_code"] == 200
    made = connections_received(redis_server) - before
    # One pool: no new connection once warm, or a few for a busier moment; a backend per greenlet: one
    # connection per task (100 or more).
    assert made <= 16, f"{made} Redis connections made for 100 tasks"
    connections = results_db_connections(redis_server, worker.pid)
    assert 1 <= len(connections) <= 8, len(connections)
    assert model.behaviour.peak_in_flight == 8  # the greenlets did run at once
