"""Faults injected for real, under both pools: killed workers and children, a restarted broker, a model
server that is down, hangs or answers garbage, SIGTERM under load, and replicas sharing one queue.

Every wait is on a condition (a stored result, a log line, the model's request count), with a generous
ceiling; results are read raw from the result backend (tests/support/faults.py). Workers are SIGKILLed
at teardown (the graceful stop is what ``test_sigterm_under_load_*`` tests), which keeps the gevent
pool's ~4 s warm shutdown out of every other test.

docs/RELIABILITY.md lists what each test proves; keep the two in step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devtools.servers import ModelServer, free_port, wait_for
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME
from tests.support.dogstatsd import statsd_env
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import (
    POOLS,
    model_env,
    read_metas,
    redelivery_wait,
    send,
    sqs_counts,
    statuses,
    unacked_for,
    wait_error_meta,
    wait_final,
)

pytestmark = pytest.mark.faults

#: Broker visibility timeout for redelivery tests: short, so a dead worker's message comes back fast.
VISIBILITY = 3
SUCCEEDED = re.compile(r"Task \S+\[([0-9a-f-]{36})\] succeeded")


# ------------------------------------------------------------------------ killed worker / child


@pytest.mark.parametrize("pool", POOLS)
def test_sigkilled_worker_tasks_are_redelivered_and_complete(
    pool, spawn, producer, results, broker, queue, own_model, agent
):
    # Given a worker busy with two slow tasks, and two more tasks waiting in the queue
    own_model.behaviour.delay = 2.0
    env = {**model_env(own_model), "CELERY_BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY)}
    first = spawn(pool, **env)
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(4)]
    wait_for(lambda: own_model.behaviour.total >= 2, 20, "two tasks in flight at the model")

    # When the whole worker is SIGKILLed mid-task (as an OOM kill would)
    first.kill()
    own_model.behaviour.delay = 0.0
    assert not any(m["status"] == "SUCCESS" for m in read_metas(results, ids).values())
    # the in-flight messages (and any the worker had reserved) stay unacknowledged in the broker
    held = unacked_for(broker, queue)
    assert len(held) >= 2, held
    # ... and a replacement starts at once, before their visibility timeout has passed
    second = spawn(pool, **env, **statsd_env(agent.port))

    # Then every task completes: the two killed mid-flight were delivered again once their visibility
    # timeout passed (by the replacement's periodic sweep, forwarder.redelivery), nothing was lost, within
    # the timeout and two sweeps of the replacement's start (a slower sweep fails here)
    metas = wait_final(results, ids, redelivery_wait(VISIBILITY), [second])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    seen = own_model.behaviour.requests
    assert sorted(seen[str(n)] for n in range(4)) == [1, 1, 2, 2], seen
    wait_for(lambda: unacked_for(broker, queue) == {}, 10, "every message acknowledged")
    # ... and the replacement said so: a log line, and the count in its metrics
    agent.wait("forwarder.broker.restored", len(held), f"queue:{queue}", f"pool:{pool}", "endpoint_id:end-1")
    assert "unacknowledged message(s) back to the queue" in second.output


@pytest.mark.parametrize("pool", POOLS)
def test_sigkilled_worker_on_sqs_tasks_are_redelivered_and_complete(pool, spawn, results, sqs_queue, own_model):
    # Given an SQS queue whose VisibilityTimeout is short, and a worker busy with two slow tasks from it
    env, producer, _url = sqs_queue(VISIBILITY)
    own_model.behaviour.delay = 2.0
    first = spawn(pool, **env)
    ids = [send(producer, env["CELERY_QUEUE"], {"args": {"id": n}}) for n in range(4)]
    wait_for(lambda: own_model.behaviour.total >= 2, 30, "two tasks in flight at the model")

    # When the whole worker is SIGKILLed mid-task, and a replacement starts at once
    first.kill()
    own_model.behaviour.delay = 0.0
    second = spawn(pool, **env)

    # Then SQS makes the unacknowledged messages visible again and every task completes
    metas = wait_final(results, ids, 30, [second])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    seen = own_model.behaviour.requests
    assert sorted(seen[str(n)] for n in range(4)) == [1, 1, 2, 2], seen


def test_sigkilled_prefork_child_task_is_requeued_and_completes(spawn, producer, results, queue, own_model):
    # Given a prefork worker whose two children are both busy
    own_model.behaviour.delay = 1.5
    worker = spawn("prefork", **model_env(own_model))
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(2)]
    wait_for(lambda: own_model.behaviour.in_flight == 2, 20, "both children busy at the model")
    children_before = {child.pid for child in worker.children()}

    # When one child is SIGKILLed mid-task
    victim = worker.children()[0]
    victim.kill()

    # Then its task is rejected back to the queue at once (task_reject_on_worker_lost) and completes
    metas = wait_final(results, ids, 30, [worker])
    assert set(statuses(metas).values()) == {"SUCCESS"}, metas
    assert sorted(own_model.behaviour.requests.values()) == [1, 2]
    assert "WorkerLostError" in worker.output or "exited prematurely" in worker.output.lower()
    # ... and the pool replaced the dead child; the worker keeps serving
    wait_for(lambda: len(worker.children()) == 2 and victim.pid not in {c.pid for c in worker.children()},
             20, "a replacement child")
    assert {child.pid for child in worker.children()} != children_before
    own_model.behaviour.delay = 0.0
    after = send(producer, queue, {"args": {"id": "after"}})
    assert wait_final(results, [after], 20, [worker])[after]["status"] == "SUCCESS"


# ------------------------------------------------------------------------------ broker restart


@pytest.mark.parametrize("pool", POOLS)
def test_redis_restart_while_tasks_flow(pool, spawn, producer, results, redis_server, queue, model):
    # Given a worker serving tasks
    worker = spawn(pool, CELERY_BROKER_VISIBILITY_TIMEOUT=str(VISIBILITY))
    batch = [send(producer, queue, {"args": {"id": f"before-{n}"}}) for n in range(10)]
    assert set(statuses(wait_final(results, batch, 30, [worker])).values()) == {"SUCCESS"}

    for restart in range(2):
        # When Redis restarts (every key is lost, as on a real restart) and tasks are sent right away
        redis_server.restart()
        batch = [send(producer, queue, {"args": {"id": f"after-{restart}-{n}"}}) for n in range(10)]
        # Then the worker reconnects by itself and completes every one of them
        metas = wait_final(results, batch, 60, [worker])
        assert set(statuses(metas).values()) == {"SUCCESS"}, statuses(metas)

    # ... and it keeps consuming afterwards (celery#9191: gevent could stop consuming after a reconnect)
    later = [send(producer, queue, {"args": {"id": f"later-{n}"}}) for n in range(10)]
    assert set(statuses(wait_final(results, later, 30, [worker])).values()) == {"SUCCESS"}
    for restart in range(2):
        for n in range(10):
            assert model.behaviour.requests[f"after-{restart}-{n}"] == 1


# --------------------------------------------------------------------------------- model server


@pytest.mark.parametrize("pool", POOLS)
def test_model_down_at_start_exits_3_with_one_line(pool, start_worker):
    closed = f"http://127.0.0.1:{free_port()}"
    worker = start_worker(pool, wait_ready=False, FORWARDER_READY_TIMEOUT="1",
                          FORWARDER_MODEL_URL=f"{closed}/predict", FORWARDER_HEALTHCHECK_URL=f"{closed}/readyz")
    assert worker.wait(30) == 3
    lines = [line for line in worker.output.splitlines() if "not ready" in line]
    assert lines == [
        f"forwarder: model server not ready at {closed}/readyz after 1 s "
        "(last: ConnectionRefusedError: [Errno 111] Connection refused)"
    ], worker.output
    assert "Traceback" not in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_model_down_mid_run_then_back_tasks_retry_and_complete(
    pool, spawn, producer, results, queue, model_process, model_on, own_model
):
    # Given a worker whose model server answers (its keep-alive connections are open), and whose readiness URL
    # is served apart (so it keeps passing: not an outage the hold would wait out, tests/test_model_outage.py)
    port = free_port()
    first = model_process(port)
    worker = spawn(pool, FORWARDER_RETRY_MAX="20", **predict_apart_from_readiness(port, own_model))
    warm = [send(producer, queue, {"args": {"id": f"warm-{n}"}}) for n in range(4)]
    assert set(statuses(wait_final(results, warm, 20, [worker])).values()) == {"SUCCESS"}

    # When the model server dies and tasks arrive
    first.kill()
    ids = [send(producer, queue, {"args": {"id": n}}, name=TASK_NAME if n % 2 else LEGACY_TASK_NAME)
           for n in range(4)]
    worker.wait_for_log("Retry in", timeout=30, count=4)
    # ... and comes back on the same port within the retry window
    back = model_on(port)

    # Then every task was retried (both task names) and completed, each reaching the model once
    metas = wait_final(results, ids, 60, [worker])
    assert set(statuses(metas).values()) == {"SUCCESS"}, metas
    assert [back.behaviour.requests[str(n)] for n in range(4)] == [1] * 4, back.behaviour.requests
    assert "ModelConnectionError" in worker.output


@pytest.mark.parametrize("pool", POOLS)
def test_model_down_longer_than_retries_fails_clearly(
    pool, spawn, producer, results, queue, model_process, model_on, own_model
):
    port = free_port()
    first = model_process(port)
    worker = spawn(pool, FORWARDER_RETRY_MAX="1", **predict_apart_from_readiness(port, own_model))
    warm = send(producer, queue, {"args": {"id": "warm"}})
    assert wait_final(results, [warm], 20, [worker])[warm]["status"] == "SUCCESS"
    first.kill()

    task = send(producer, queue, {"args": {"id": "lost"}})
    meta = wait_error_meta(results, [task], 30, [worker])[task]

    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "ModelConnectionError"
    error = json.loads(meta["result"]["custom"])["error"]
    assert error.startswith(f"model server http://127.0.0.1:{port}/predict unreachable: ConnectionRefusedError")
    assert meta["result"]["exc_message"] == [error]
    # ... and the worker keeps serving once the model is back
    model_on(port)
    again = send(producer, queue, {"args": {"id": "again"}})
    assert wait_final(results, [again], 30, [worker])[again]["status"] == "SUCCESS"


def predict_apart_from_readiness(port: int, ready: ModelServer) -> dict[str, str]:
    """The model's predict URL on ``port``, its readiness URL on another server that keeps answering ready."""
    return {"FORWARDER_MODEL_URL": f"http://127.0.0.1:{port}/predict", "FORWARDER_HEALTHCHECK_URL": f"{ready.url}/readyz"}


@pytest.mark.parametrize("pool", POOLS)
def test_model_hangs_task_fails_with_timeout_and_worker_keeps_serving(pool, spawn, producer, results, queue, own_model):
    worker = spawn(pool, FORWARDER_MODEL_READ_TIMEOUT="1", **model_env(own_model))
    own_model.behaviour.mode = "hang"

    hung = send(producer, queue, {"args": {"id": "hung"}})
    meta = wait_error_meta(results, [hung], 20, [worker])[hung]

    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "ModelTimeout"
    custom = json.loads(meta["result"]["custom"])
    assert custom["error"] == f"model server {own_model.url}/predict did not answer within 1 s"
    assert custom["error_metadata"].startswith("Internal failure\n")
    assert own_model.behaviour.requests["hung"] == 1, "a read timeout is never retried (the model may be working)"
    own_model.behaviour.mode = "json"
    after = send(producer, queue, {"args": {"id": "after"}})
    assert wait_final(results, [after], 20, [worker])[after]["status"] == "SUCCESS"


@pytest.mark.parametrize("pool", POOLS)
def test_model_answers_non_json_task_fails_clearly(pool, spawn, producer, results, queue, own_model):
    worker = spawn(pool, **model_env(own_model))
    own_model.behaviour.mode = "text"
    own_model.behaviour.status = 502

    task = send(producer, queue, {"args": {"id": "html"}})
    meta = wait_error_meta(results, [task], 20, [worker])[task]

    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "ModelResponseError"
    assert json.loads(meta["result"]["custom"])["error"] == (
        "model server answered HTTP 502 with a body that is not JSON: '<html>oops, not json</html>'"
    )
    assert producer.AsyncResult(task).status == "FAILURE"
    assert "not JSON" in str(producer.AsyncResult(task).result)
    own_model.behaviour.mode, own_model.behaviour.status = "json", 200
    after = send(producer, queue, {"args": {"id": "after"}})
    assert wait_final(results, [after], 20, [worker])[after]["status"] == "SUCCESS"


# ------------------------------------------------------------------------------ SIGTERM under load


@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_under_load_finishes_in_flight_and_hands_back_the_rest(
    pool, start_worker, producer, results, broker, queue, own_model
):
    # Given a worker (default 24 h visibility: nothing may rely on redelivery) that has two slow tasks
    # in flight and four more reserved (prefetch 3 x concurrency 2), with more waiting in the queue
    own_model.behaviour.delay = 1.5
    first = start_worker(pool, CELERY_WORKER_PREFETCH_MULTIPLIER="3", **model_env(own_model))
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(10)]
    wait_for(lambda: own_model.behaviour.in_flight == 2, 20, "two tasks in flight at the model")
    wait_for(lambda: len(unacked_for(broker, queue)) > 2, 10, "messages reserved beyond the two in flight")

    # When it is asked to stop (SIGTERM, as Kubernetes does)
    first.signal(15)
    own_model.behaviour.delay = 0.0
    assert first.wait(40) == 0

    # Then the two in-flight tasks finished and stored their results, nothing else ran ...
    metas = read_metas(results, ids)
    done = [i for i, m in metas.items() if m["status"] == "SUCCESS"]
    assert len(done) == 2, statuses(metas)
    assert own_model.behaviour.total == 2
    # ... the reserved messages went straight back to the queue (no visibility timeout involved)
    assert unacked_for(broker, queue) == {}
    assert broker.llen(queue) == 8

    # ... and a second replica started afterwards completes the rest: each request reached the model once
    second = start_worker(pool, **model_env(own_model))
    metas = wait_final(results, ids, 30, [second])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    assert [own_model.behaviour.requests[str(n)] for n in range(10)] == [1] * 10
    second.kill()


@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_on_sqs_finishes_in_flight_and_releases_the_rest_at_once(
    pool, start_worker, results, sqs_queue, moto_server, own_model
):
    # Given a worker on an SQS queue with a 10-minute VisibilityTimeout (nothing may rely on it), two slow
    # tasks in flight and more received from SQS and held (prefetch 3 x concurrency 2)
    env, producer, url = sqs_queue(600)
    own_model.behaviour.delay = 1.5
    first = start_worker(pool, CELERY_WORKER_PREFETCH_MULTIPLIER="3", **env)
    ids = [send(producer, env["CELERY_QUEUE"], {"args": {"id": n}}) for n in range(10)]
    wait_for(lambda: own_model.behaviour.in_flight == 2, 30, "two tasks in flight at the model")
    wait_for(lambda: sqs_counts(moto_server, url)[1] > 2, 10, "messages held beyond the two in flight")

    # When it is asked to stop (SIGTERM)
    first.signal(15)
    own_model.behaviour.delay = 0.0
    assert first.wait(40) == 0

    # Then the two in-flight tasks finished and stored their results, nothing else ran ...
    metas = read_metas(results, ids)
    assert [m["status"] for m in metas.values()].count("SUCCESS") == 2, statuses(metas)
    assert own_model.behaviour.total == 2
    # ... the held messages are visible again at once (kombu makes the originals visible rather than
    # sending copies, so nothing comes back a second time when the 10 minutes pass)
    assert sqs_counts(moto_server, url) == (8, 0)

    # ... and a second replica completes the rest: each request reached the model once
    second = start_worker(pool, **env)
    metas = wait_final(results, ids, 30, [second])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    assert [own_model.behaviour.requests[str(n)] for n in range(10)] == [1] * 10
    assert sqs_counts(moto_server, url) == (0, 0)
    second.kill()


# ----------------------------------------------------------------------------------- replicas


def test_replicas_share_one_queue_each_task_runs_exactly_once(spawn, producer, results, queue, own_model):
    # Given three replicas of both pools on one queue
    env = model_env(own_model)
    workers = [spawn("prefork", **env), spawn("gevent", CELERY_WORKER_CONCURRENCY="8", **env), spawn("prefork", **env)]

    # When a few thousand tasks arrive
    count = 2000
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(count)]

    # Then each has exactly one SUCCESS, and the model saw each request exactly once
    metas = wait_final(results, ids, 90, workers)
    assert set(statuses(metas).values()) == {"SUCCESS"}
    seen = own_model.behaviour.requests
    assert own_model.behaviour.total == count
    assert all(seen[str(n)] == 1 for n in range(count)), [n for n in range(count) if seen[str(n)] != 1][:10]
    # ... and every replica took part, no task ran on two of them
    ran = [SUCCEEDED.findall(worker.output) for worker in workers]
    assert all(ran), [len(r) for r in ran]
    assert sorted(task for per_worker in ran for task in per_worker) == sorted(ids)


# -------------------------------------------------------------------------------- the document


def test_reliability_doc_names_every_fault_test():
    """docs/RELIABILITY.md has one row per fault or bad-input test, and names no test that is gone (a row may
    name a test of another module too: the scale, pool and entry-point tests)."""
    root = Path(__file__).resolve().parent
    named = set(re.findall(r"`(test_\w+)`", (root.parent / "docs" / "RELIABILITY.md").read_text()))

    def tests_in(path: Path) -> set[str]:
        return set(re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.MULTILINE))

    fault_modules = ("test_faults.py", "test_bad_input.py", "test_hook_faults.py", "test_large_answers.py",
                     "test_model_outage.py", "test_faults_under_load.py", "test_in_transit.py")
    defined = set().union(*(tests_in(root / module) for module in fault_modules))
    anywhere = set().union(*(tests_in(path) for path in root.glob("test_*.py")))
    meta = {"test_reliability_doc_names_every_fault_test", "test_planted_pickle_really_creates_its_file"}
    assert named - {"test_reliability_doc_names_every_fault_test"} <= anywhere, named - anywhere
    assert defined - meta <= named, f"no row in docs/RELIABILITY.md for {sorted(defined - meta - named)}"
