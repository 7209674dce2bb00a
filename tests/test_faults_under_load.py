"""Faults during traffic: the broker restarted while tasks complete, and several faults together across
replicas of both pools (issue 22).

The broker (and the result store) is a Redis with an append-only file fsynced on every write, restarted on
its port, so a restart loses nothing and anything left over is the worker's doing. The broker-restart test
keeps the default visibility timeout (one hour): a message stranded in the broker's unacked set would miss
its bound. The combined test sets it to 30 s, since only a SIGKILLed replica's messages may wait for it, and
bounds every other task well under it. Each prints what it measured (slowest task around each fault, and
each duplicate model call with the fault behind it): docs/RELIABILITY.md has the fault matrix.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from devtools.demo import producer as make_producer
from devtools.servers import RedisServer, WorkerProcess, wait_for
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import POOLS, model_env, redelivery_wait, statuses, unacked_for, wait_final
from tests.support.load import FaultLog, Load, around, latencies, recovery, trace_duplicates

pytestmark = pytest.mark.faults

#: Worker log lines that mean a fault ended the process or an ack, reject or requeue failed unhandled. (A
#: traceback alone is not one: under gevent Celery's remote-control greenlet dies with the broker connection
#: and prints one; the consumer starts a new one on reconnecting.)
FATAL = ("Unrecoverable error", "Pool callback raised exception", "AttributeError", "Couldn't ack", "Couldn't reject")


@pytest.fixture
def aof_broker() -> Iterator[RedisServer]:
    """A broker of this test's own that survives restarts (AOF, appendfsync always)."""
    server = RedisServer(persistent=True).start()
    yield server
    server.stop()


@pytest.fixture
def aof_store() -> Iterator[RedisServer]:
    """A result store of this test's own that survives restarts (AOF, appendfsync always)."""
    server = RedisServer(persistent=True).start()
    yield server
    server.stop()


def client(server: RedisServer, db: int) -> redis.Redis:
    return redis.Redis.from_url(f"{server.url}/{db}", socket_timeout=5, socket_connect_timeout=2)


def sender(broker: RedisServer) -> Celery:
    """A producer that only sends: results are read from the store with a plain client. Celery's Redis result
    backend would subscribe to each task's channel and unsubscribe when its AsyncResult is collected, which
    raises (an unraisable-exception warning at the end of the run) once the store has been restarted or stopped."""
    return make_producer(f"{broker.url}/0", "disabled://")


def alive(worker: WorkerProcess) -> bool:
    return worker.process is not None and worker.process.poll() is None


def where(broker: redis.Redis, queue: str, ids: list[str], results: redis.Redis, workers: list[WorkerProcess]) -> str:
    """Where each task without a SUCCESS is: in the queue, in kombu's unacked set, or nowhere; and which workers
    logged receiving it (none: the broker handed it out and no worker got it)."""
    queued = b"".join(broker.lrange(queue, 0, -1))
    unacked = b"".join(broker.hvals("unacked"))
    missing = [i for i in ids if (results.get(f"celery-task-meta-{i}") or b"").find(b'"SUCCESS"') < 0]

    def place(task_id: str) -> str:
        found = "queued" if task_id.encode() in queued else "unacked" if task_id.encode() in unacked else "nowhere"
        received = [w.pid for w in workers if f"[{task_id}] received" in w.output]
        return f"{task_id}: {found}, received by {received or 'no worker'}"

    return ", ".join(place(task_id) for task_id in missing)


def assert_handled(worker: WorkerProcess) -> None:
    """The worker is running and its log names no unhandled error."""
    assert alive(worker), f"worker {worker.pid} exited ({worker.process and worker.process.returncode}):\n" \
                          f"{worker.output[-4000:]}"
    for line in FATAL:
        assert line not in worker.output, f"{line!r} in the log of worker {worker.pid}:\n{worker.output[-4000:]}"


@pytest.mark.parametrize("pool", POOLS)
def test_broker_restarted_5_times_under_load_worker_survives_and_every_task_succeeds(
    pool, start_worker, aof_broker, aof_store, queue, own_model
):
    # Given a worker completing ~30 tasks a second (prefork 4 or gevent 8, a 0.1 s model)
    own_model.behaviour.delay = 0.1
    env = {**model_env(own_model), "CELERY_BROKER_URL": f"{aof_broker.url}/0",
           "CELERY_RESULT_BACKEND": f"{aof_store.url}/1", "CELERY_WORKER_CONCURRENCY": "4" if pool == "prefork" else "8"}
    worker = start_worker(pool, **env)
    producer = sender(aof_broker)
    results, broker = client(aof_store, 1), client(aof_broker, 0)
    load = Load(producer, queue, count=480, rate=30)
    faults = FaultLog()
    try:
        load.start()
        # When the broker restarts 5 times while tasks are in flight (each down ~0.3 s)
        for restart in range(5):
            time.sleep(max(0.0, load.between_sends(2.5 + 3 * restart) - time.monotonic()))
            faults.inject(f"broker restart {restart + 1}", lambda: aof_broker.restart(down=0.3))
            assert alive(worker), worker.output[-4000:]
        load.join(60)
        assert not load.is_alive()

        # Then every task ends SUCCESS, within a bound far below the visibility timeout (1 h) ...
        try:
            metas = wait_final(results, load.ids, 60, [worker])
        except AssertionError as exc:
            raise AssertionError(f"{where(broker, queue, load.ids, results, [worker])}\n{exc}") from None
        assert set(statuses(metas).values()) == {"SUCCESS"}, statuses(metas)
        # ... nothing is left in the broker's unacked set, and the worker never exited
        assert unacked_for(broker, queue) == {}
        assert_handled(worker)
    finally:
        load.stopped.set()
        producer.close()
        results.close()
        broker.close()
    took = latencies(metas, load)
    duplicates = trace_duplicates(own_model.behaviour.seen_at, faults, load)
    print(f"\n{pool}: {load.count} tasks, {load.resent} sends retried, slowest {max(took.values()):.1f} s, "
          f"{len(duplicates)} duplicate(s); slowest task sent around each restart (s): "
          + ", ".join(f"{worst:.1f}" for worst in recovery(faults, load, took).values()))
    print("\n".join(duplicates))
    # ... and a duplicate model call is rare and traced to a restart (the old code: 14 in 5 restarts, gevent)
    assert all("no fault" not in line for line in duplicates), duplicates
    assert len([line for line in duplicates if "producer" not in line]) <= 5, duplicates


#: Visibility timeout of the combined test: only a SIGKILLed replica's messages may wait for it.
COMBINED_VISIBILITY = 30
#: Seconds, beyond the visibility timeout and two sweeps, for the SIGKILLed replica's tasks under this load.
LOAD_SLACK = 10.0
#: Longest send-to-result time of a task the SIGKILLed replica did not hold: well under the visibility timeout.
UNHELD_BOUND = 20.0


def test_faults_together_under_load_each_task_one_success_and_no_replica_lost(
    start_worker, aof_broker, aof_store, queue, own_model
):
    # Given three replicas on one queue (prefork 2, prefork 2, gevent 8), separate AOF Redis servers for the
    # broker and the results, and a steady 20 short tasks a second (a 0.05 s model)
    own_model.behaviour.delay = 0.05
    env = {**model_env(own_model), "CELERY_BROKER_URL": f"{aof_broker.url}/0",
           "CELERY_RESULT_BACKEND": f"{aof_store.url}/1",
           "CELERY_BROKER_VISIBILITY_TIMEOUT": str(COMBINED_VISIBILITY)}
    gevent_env = {**env, "CELERY_WORKER_CONCURRENCY": "8"}
    replicas = {"prefork-a": start_worker("prefork", **env), "prefork-b": start_worker("prefork", **env),
                "gevent": start_worker("gevent", **gevent_env)}
    everyone = list(replicas.values())
    producer = sender(aof_broker)
    results, broker = client(aof_store, 1), client(aof_broker, 0)
    load = Load(producer, queue, count=800, rate=20)
    faults = FaultLog()
    held_at_kill: set[str] = set()

    def kill_child() -> None:
        replicas["prefork-a"].children()[0].kill()

    def kill_replica() -> None:
        replicas["gevent"].kill()
        held_at_kill.update(task_id for raw in broker.hvals("unacked")
                            for task_id in [json.loads(raw)[0]["headers"]["id"]])
        replicas["gevent"] = start_worker("gevent", **gevent_env)
        everyone.append(replicas["gevent"])

    def stop_replica() -> None:
        replicas["prefork-b"].signal(signal.SIGTERM)
        assert replicas["prefork-b"].wait(40) == 0
        replicas["prefork-b"] = start_worker("prefork", **env)
        everyone.append(replicas["prefork-b"])

    # When, during traffic, one fault after another (the broker once right after the result store)
    schedule = [
        (3, "broker restart 1", lambda: aof_broker.restart(down=0.3)),
        (7, "result store restart", lambda: aof_store.restart(down=0.3)),
        (8, "broker restart 2 (after the result store)", lambda: aof_broker.restart(down=0.3)),
        (12, "prefork child SIGKILL", kill_child),
        (16, "gevent replica SIGKILL (restarted)", kill_replica),
        (22, "broker restart 3", lambda: aof_broker.restart(down=0.3)),
        (26, "prefork replica SIGTERM (restarted)", stop_replica),
        (33, "broker restart 4", lambda: aof_broker.restart(down=0.3)),
    ]
    try:
        load.start()
        for at, name, action in schedule:
            time.sleep(max(0.0, load.between_sends(at) - time.monotonic()))
            faults.inject(name, action)
            for replica in replicas.values():
                assert alive(replica), f"after {name}: {replica.output[-4000:]}"
        load.join(60)
        assert not load.is_alive()

        # Then every task ends SUCCESS (the SIGKILLed replica's within its visibility timeout and a sweep) ...
        try:
            metas = wait_final(results, load.ids, redelivery_wait(COMBINED_VISIBILITY, LOAD_SLACK), everyone)
        except AssertionError as exc:
            missing = [i for i in load.ids if (results.get(f"celery-task-meta-{i}") or b"").find(b'"SUCCESS"') < 0]
            timing = "\n".join(around(faults, load, task_id) for task_id in missing[:5])
            raise AssertionError(f"{where(broker, queue, load.ids, results, everyone)}\n{timing}\n{exc}") from None
        assert set(statuses(metas).values()) == {"SUCCESS"}, statuses(metas)
        # ... every other task within a bound well under the visibility timeout ...
        took = latencies(metas, load)
        slow = {i: round(t, 1) for i, t in took.items() if t > UNHELD_BOUND and i not in held_at_kill}
        assert not slow, slow
        # ... nothing is left unacknowledged, and every replica the test did not kill is alive
        wait_for(lambda: unacked_for(broker, queue) == {}, 20, "every message acknowledged")
        for replica in replicas.values():
            assert_handled(replica)
    finally:
        load.stopped.set()
        producer.close()
        results.close()
        broker.close()
    duplicates = trace_duplicates(own_model.behaviour.seen_at, faults, load)
    worst = recovery(faults, load, took)
    print(f"\n{load.count} tasks, {load.resent} sends retried, slowest {max(took.values()):.1f} s "
          f"(held by the killed replica: {len(held_at_kill)}), {len(duplicates)} duplicate(s)")
    print("\n".join(f"{name}: slowest task sent around it {seconds:.1f} s" for name, seconds in worst.items()))
    print("\n".join(duplicates))
    # ... and each duplicate model call is traced to a fault
    assert all("no fault" not in line for line in duplicates), duplicates
