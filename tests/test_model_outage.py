"""The model server goes away while tasks flow: no task fails, intake stops, each request reaches the model once.

The model runs in a process of its own (SIGKILL drops every connection, keep-alive ones included) and
appends each request's id to a file, which its restarted self appends to as well: the file is the count of
requests the model saw across the outage. The worker is started exactly as in production.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.servers import WorkerProcess, free_port, wait_for
from tests.support.dogstatsd import statsd_env
from tests.support.faults import *  # noqa: F403  (fixtures: spawn, results, broker, model_process, ...)
from tests.support.faults import (
    POOLS,
    model_env,
    read_metas,
    send,
    sqs_counts,
    statuses,
    wait_error_meta,
    wait_final,
)

pytestmark = pytest.mark.faults

#: The outage the issue measured: the model SIGKILLed and started again 90 s later.
OUTAGE_S = 90.0
#: Tasks sent per second, before, during and after it.
RATE = 2.0
BEFORE_S, AFTER_S = 8.0, 8.0


def probe(worker: WorkerProcess, which: str) -> bool:
    """``python -m forwarder probe live|ready`` against the worker's health folder, as the kubelet runs it."""
    env = {**os.environ, "FORWARDER_HEALTH_DIR": worker.env["FORWARDER_HEALTH_DIR"]}
    return subprocess.run([sys.executable, "-m", "forwarder", "probe", which], env=env, capture_output=True,
                          timeout=30).returncode == 0


def model_url_env(port: int) -> dict[str, str]:
    return {"FORWARDER_MODEL_URL": f"http://127.0.0.1:{port}/predict",
            "FORWARDER_HEALTHCHECK_URL": f"http://127.0.0.1:{port}/readyz"}


def requests_seen(log: Path) -> collections.Counter[str]:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


def run_an_outage(send_one: Callable[[int], str], depth: Callable[[], int], worker: WorkerProcess,
                  kill: Callable[[], None], restart: Callable[[], None]) -> list[str]:
    """Send at RATE for BEFORE_S, kill the model for OUTAGE_S, restart it, send AFTER_S more; checks the probes
    and that the queue grows while the model is away. Returns the ids sent."""
    ids: list[str] = []
    phases = [(BEFORE_S, None), (OUTAGE_S, kill), (AFTER_S, restart)]
    n = 0
    live_checks = ready_failed = 0
    for length, start_phase in phases:
        if start_phase is not None:
            start_phase()
        began = time.monotonic()
        depth_at_start = depth()
        next_probe = began + 3
        while time.monotonic() - began < length:
            ids.append(send_one(n))
            n += 1
            if start_phase is kill and time.monotonic() >= next_probe:
                assert probe(worker, "live"), "probe live failed while the model was away"
                live_checks += 1
                ready_failed += not probe(worker, "ready")
                next_probe = time.monotonic() + 10
            time.sleep(max(0.0, 1 / RATE - 0.01))
        if start_phase is kill:
            grown = depth() - depth_at_start
            # Intake stopped: nearly everything sent during the outage is still in the broker.
            assert grown >= RATE * OUTAGE_S * 0.8, f"queue grew by {grown} during the outage"
            assert live_checks >= 5 and ready_failed >= live_checks - 1, (live_checks, ready_failed)
    wait_for(lambda: probe(worker, "ready"), 20, "probe ready passing once the model is back")
    return ids


def assert_held_through(worker: WorkerProcess, metas: dict[str, dict], seen: collections.Counter[str],
                        ids: list[str], numbers: dict[str, int]) -> None:
    assert set(statuses(metas).values()) == {"SUCCESS"}, collections.Counter(statuses(metas).values())
    # Each request reached the model exactly once: none lost in the outage, none sent twice.
    assert all(seen[str(numbers[i])] == 1 for i in ids), {k: v for k, v in seen.items() if v != 1}
    output = worker.output
    assert output.count("model server unreachable") == 1, output[-4000:]
    assert output.count("model server back after") == 1, output[-4000:]
    assert "Retrying (" not in output, "urllib3 retry noise in the log"
    assert worker.process.poll() is None, "the worker exited"


@pytest.mark.parametrize("pool", POOLS)
def test_a_90s_model_outage_on_redis_fails_no_task(pool, spawn, producer, results, broker, queue, model_process,
                                                   tmp_path):
    # Given a worker whose model runs in its own process, logging each request it receives
    port, log = free_port(), tmp_path / "requests.log"
    model = model_process(port, str(log))
    worker = spawn(pool, **model_url_env(port), CELERY_WORKER_CONCURRENCY="4")
    numbers: dict[str, int] = {}

    def send_one(n: int) -> str:
        task_id = send(producer, queue, {"args": {"id": n}})
        numbers[task_id] = n
        return task_id

    # When the model is SIGKILLed while tasks arrive, and started again on its port 90 s later
    ids = run_an_outage(send_one, lambda: int(broker.llen(queue)), worker, model.kill,
                        lambda: model_process(port, str(log)))

    # Then every task succeeds, each request reached the model once, and the worker said so in two lines
    metas = wait_final(results, ids, 120, [worker])
    assert_held_through(worker, metas, requests_seen(log), ids, numbers)


@pytest.mark.parametrize("pool", POOLS)
def test_a_90s_model_outage_on_sqs_fails_no_task(pool, spawn, results, sqs_queue, moto_server, model_process,
                                                 tmp_path):
    env, producer, url = sqs_queue(600)
    port, log = free_port(), tmp_path / "requests.log"
    model = model_process(port, str(log))
    worker = spawn(pool, **{**env, **model_url_env(port)}, CELERY_WORKER_CONCURRENCY="4")
    numbers: dict[str, int] = {}

    def send_one(n: int) -> str:
        task_id = send(producer, env["CELERY_QUEUE"], {"args": {"id": n}})
        numbers[task_id] = n
        return task_id

    ids = run_an_outage(send_one, lambda: sqs_counts(moto_server, url)[0], worker, model.kill,
                        lambda: model_process(port, str(log)))

    metas = wait_final(results, ids, 180, [worker])
    assert_held_through(worker, metas, requests_seen(log), ids, numbers)


@pytest.mark.parametrize("pool", POOLS)
def test_an_outage_longer_than_the_limit_hands_tasks_back_to_a_replica_whose_model_is_up(
    pool, spawn, producer, results, broker, queue, model_process, own_model, tmp_path
):
    # Given a worker whose model is down, holding the tasks it took (at most 6 s each)
    port, log = free_port(), tmp_path / "requests.log"
    model = model_process(port, str(log))
    away = spawn(pool, **model_url_env(port), FORWARDER_MODEL_OUTAGE_MAX="6")
    model.kill()
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(6)]
    away.wait_for_log("model server unreachable", timeout=30)

    # When the limit passes and a replica whose model is up joins
    away.wait_for_log("handed back to the queue", timeout=30)
    healthy = spawn(pool, **model_env(own_model))

    # Then the held tasks were handed back, not failed, and succeed on the replica, each sent once to its model
    metas = wait_final(results, ids, 60, [away, healthy])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    assert sorted(own_model.behaviour.requests[str(n)] for n in range(6)) == [1] * 6
    assert requests_seen(log) == collections.Counter()
    assert away.process.poll() is None


@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_during_an_outage_hands_waiting_tasks_back_at_once(
    pool, spawn, producer, results, broker, queue, model_process, own_model, tmp_path
):
    # Given a worker holding tasks for a model that is down (the limit far away)
    port = free_port()
    model = model_process(port)
    worker = spawn(pool, **model_url_env(port), CELERY_WORKER_CONCURRENCY="2")
    model.kill()
    ids = [send(producer, queue, {"args": {"id": n}}) for n in range(4)]
    worker.wait_for_log("model server unreachable", timeout=30)
    time.sleep(2)  # the slots' tasks are held

    # When it is asked to stop
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    took = time.monotonic() - started

    # Then it exits within a warm shutdown's usual time, and the tasks are back in the queue for the next worker
    assert took < 15, f"warm shutdown took {took:.1f} s"
    assert int(broker.llen(queue)) == 4
    replacement = spawn(pool, **model_env(own_model))
    metas = wait_final(results, ids, 60, [replacement])
    assert set(statuses(metas).values()) == {"SUCCESS"}


@pytest.mark.parametrize("pool", POOLS)
def test_503_with_retry_after_is_sent_again_when_opted_in_and_stored_otherwise(
    pool, spawn, producer, results, queue, own_model
):
    own_model.behaviour.overloaded = {"retried": 2, "stored": 1}
    opted_in = spawn(pool, **model_env(own_model), FORWARDER_RETRY_STATUSES="429,503")
    retried = send(producer, queue, {"args": {"id": "retried"}})
    meta = wait_final(results, [retried], 30, [opted_in])[retried]
    assert meta["status"] == "SUCCESS" and meta["result"]["status_code"] == 200, meta
    assert own_model.behaviour.requests["retried"] == 3  # two 503s, one after each Retry-After, then the answer
    opted_in.stop()

    plain = spawn(pool, **model_env(own_model))
    stored = send(producer, queue, {"args": {"id": "stored"}})
    meta = wait_final(results, [stored], 30, [plain])[stored]
    assert meta["status"] == "SUCCESS" and meta["result"]["status_code"] == 503, meta  # as llm-engine stores it
    assert own_model.behaviour.requests["stored"] == 1


def test_a_proxy_503_with_no_body_is_an_outage_and_the_metrics_tell_it(spawn, producer, results, queue, own_model,
                                                                       agent):
    # Given a model behind a proxy that answers 503 with no body, readiness failing too
    own_model.behaviour.mode, own_model.behaviour.status = "empty", 503
    worker = spawn("gevent", **model_env(own_model), **statsd_env(agent.port))
    own_model.behaviour.ready = False
    task = send(producer, queue, {"args": {"id": "behind-proxy"}})
    worker.wait_for_log("model server unreachable", timeout=30)
    time.sleep(3)  # held, not failed, not retried through Celery
    assert read_metas(results, [task]).get(task, {}).get("status") in (None, "STARTED")

    # When the model behind it is back, the task succeeds
    agent.wait("forwarder.model.outages", 1, f"queue:{queue}", "pool:gevent")
    wait_for(lambda: any(p.value == 1 for p in agent.named("forwarder.model.waiting")), 10, "the waiting gauge at 1")
    assert [p.value for p in agent.named("forwarder.model.available")][-1] == 0
    own_model.behaviour.mode, own_model.behaviour.status, own_model.behaviour.ready = "json", 200, True
    meta = wait_final(results, [task], 30, [worker])[task]
    assert meta["status"] == "SUCCESS" and meta["result"]["status_code"] == 200
    wait_for(lambda: agent.named("forwarder.model.outage_seconds"), 10, "the outage's length")
    assert agent.named("forwarder.model.outage_seconds")[0].value >= 3
    assert [p.value for p in agent.named("forwarder.model.available")][-1] == 1



@pytest.mark.parametrize("pool", POOLS)
def test_a_task_waiting_on_an_outage_past_its_ttl_expires_instead_of_running(
    pool, spawn, producer, results, queue, model_process, tmp_path
):
    # Given a worker holding a task for a model that is down, with a request TTL of 6 s
    port, log = free_port(), tmp_path / "requests.log"
    model = model_process(port, str(log))
    worker = spawn(pool, **model_url_env(port), FORWARDER_REQUEST_TTL="6")
    model.kill()
    task = send(producer, queue, {"args": {"id": "late"}})
    worker.wait_for_log("model server unreachable", timeout=30)

    # When the TTL passes while it waits, and the model comes back afterwards
    meta = wait_error_meta(results, [task], 30, [worker])[task]
    model_process(port, str(log))

    # Then it failed as expired, never reaching the model, and the worker serves on once the model is back
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "RequestExpired", meta
    again = send(producer, queue, {"args": {"id": "fresh"}})
    assert wait_final(results, [again], 60, [worker])[again]["status"] == "SUCCESS"
    assert requests_seen(log) == collections.Counter({"fresh": 1})
