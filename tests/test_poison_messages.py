"""A message that kills every worker that runs it is refused after FORWARDER_MAX_DELIVERIES deliveries.

In process (fast): the cap is among the extensions the worker builds, for the default settings, and refuses
the delivery over its limit (its decision, with the real task context). Against real workers: the test's model answers the poison request by SIGKILLing the process that sent it (as an OOM kill would):
the prefork child, or the whole gevent worker, which the test then replaces as Kubernetes would.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import redis

from devtools.servers import free_port, wait_for
from forwarder import deps
from forwarder.app import build_app
from forwarder.extensions.delivery_cap import CapDeliveries, PoisonMessage
from forwarder.settings import Settings
from forwarder.tasks import TASK_NAME
from tests.support.faults import *  # noqa: F403  (helpers and fixtures)
from tests.support.faults import model_env, read_metas, redelivery_wait, send, statuses, wait_error_meta, wait_final

MAX = 3
POISON = {"args": {"id": "poison"}}


SQS_ENV = {"CELERY_BROKER_URL": "sqs://", "CELERY_SQS_QUEUE_URL": "http://127.0.0.1:1/q"}


class MemoryCounter:
    """``gateways.delivery_counter.DeliveryCounter``'s three calls on a dict, in place of the broker's Redis."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, key: str) -> int:
        self.counts[key] += 1
        return self.counts[key]

    def finished(self, key: str) -> None:
        self.counts[key] -= 1

    def handed_back(self, key: str) -> None:
        self.counts[key] -= 1


def installed_cap(env: dict[str, str]) -> tuple[CapDeliveries, object]:
    """The cap among the extensions the worker builds (``deps.build_deps``), installed on the worker's app."""
    settings = Settings.from_env(env)
    app = build_app(settings)
    caps = [ext for ext in deps.build_deps(settings).extensions if isinstance(ext, CapDeliveries)]
    assert len(caps) == 1, "the delivery cap is not among the worker's extensions"
    caps[0].install(app, settings)
    return caps[0], app.tasks[TASK_NAME]


def deliver(cap: CapDeliveries, task, task_id: str, **request) -> None:
    """One delivery as the worker runs it: the task's context pushed, the cap's ``before_task``."""
    task.push_request(id=task_id, retries=0, **request)
    try:
        cap.before_task(task, task_id)
    finally:
        task.pop_request()


def test_by_default_the_cap_is_installed_and_refuses_the_delivery_after_three_that_died():
    cap, task = installed_cap({})  # the Redis broker, FORWARDER_MAX_DELIVERIES unset
    assert cap.limit == MAX and cap.counter is not None
    cap.counter = MemoryCounter()  # type: ignore[assignment]  # the broker's Redis, in memory
    deliver(cap, task, "t-1", delivery_info={"redelivered": False})  # a first delivery: runs, counts nothing
    assert cap.counter.counts == Counter()  # type: ignore[attr-defined]
    # Each redelivery is counted; the first (presumed dead) plus the counted ones that died: 1, 2, then 3.
    for _ in range(MAX - 1):
        deliver(cap, task, "t-1", delivery_info={"redelivered": True})  # its worker dies: nothing taken back
    with pytest.raises(PoisonMessage, match=f"delivered {MAX} times and its worker died each time"):
        deliver(cap, task, "t-1", delivery_info={"redelivered": True})
    # Another message is not affected.
    deliver(cap, task, "t-2", delivery_info={"redelivered": True})


@pytest.mark.parametrize(("received", "refused"), [(1, False), (MAX, False), (MAX + 1, True), (50, True)])
def test_on_sqs_the_cap_refuses_by_the_messages_receive_count(received, refused):
    cap, task = installed_cap(SQS_ENV)
    assert cap.limit == MAX and cap.counter is None  # no write at all: SQS counts
    if refused:
        with pytest.raises(PoisonMessage):
            deliver(cap, task, "t-sqs", forwarder_receive_count=received)
    else:
        deliver(cap, task, "t-sqs", forwarder_receive_count=received)


def test_max_deliveries_zero_turns_the_cap_off():
    cap, task = installed_cap({**SQS_ENV, "FORWARDER_MAX_DELIVERIES": "0"})
    deliver(cap, task, "t-off", forwarder_receive_count=1000)


def assert_refused_after_exactly(results, poison_id: str, own_model) -> None:
    meta = wait_error_meta(results, [poison_id], 60)[poison_id]
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "PoisonMessage", meta
    assert f"delivered {MAX} times and its worker died each time" in json.loads(meta["result"]["custom"])["error"]
    assert own_model.behaviour.requests["poison"] == MAX  # the refused delivery never reached the model


@pytest.mark.faults
def test_prefork_a_poison_message_is_refused_after_its_deliveries_and_the_queue_behind_it_flows(
    spawn, producer, results, queue, own_model
):
    own_model.behaviour.kill_senders = {"poison": 99, "once": 1}
    worker = spawn("prefork", CELERY_WORKER_CONCURRENCY="2", FORWARDER_MAX_DELIVERIES=str(MAX), **model_env(own_model))
    poison = send(producer, queue, POISON)
    once = send(producer, queue, {"args": {"id": "once"}})  # killed once, then runs normally
    behind = [send(producer, queue, {"args": {"id": n}}) for n in range(10)]
    assert_refused_after_exactly(results, poison, own_model)
    metas = wait_final(results, [once, *behind], 60, [worker])
    assert set(statuses(metas).values()) == {"SUCCESS"}, statuses(metas)
    assert own_model.behaviour.requests["once"] == 2
    assert len(own_model.behaviour.killed) == MAX + 1  # the poison's deliveries, and "once"'s first
    assert "refused without running" in worker.output


@pytest.mark.faults
def test_gevent_a_poison_message_that_kills_the_whole_worker_is_refused_by_a_replacement(
    spawn, producer, results, queue, own_model
):
    own_model.behaviour.kill_senders = {"poison": 99}
    visibility = 2
    env = dict(CELERY_WORKER_CONCURRENCY="1", FORWARDER_MAX_DELIVERIES=str(MAX),
               CELERY_BROKER_VISIBILITY_TIMEOUT=str(visibility), **model_env(own_model))
    poison = send(producer, queue, POISON)
    behind = [send(producer, queue, {"args": {"id": n}}) for n in range(5)]
    workers = []
    while poison not in read_metas(results, [poison]) or read_metas(results, [poison])[poison]["status"] != "FAILURE":
        # MAX + 1 when nothing else kills a worker; a little slack for a worker lost to a loaded machine (its
        # output is shown), since what is asserted below is what the model saw: exactly MAX deliveries.
        assert len(workers) <= MAX + 3, "more replacements than deliveries:\n" + "\n---\n".join(
            "\n".join(w.output.splitlines()[-15:]) for w in workers)
        worker = spawn("gevent", **env)  # a replacement, as the pod's restart would start
        workers.append(worker)
        # The poison comes back by the replacement's sweep: within the visibility timeout and two sweeps.
        wait_for(lambda: worker.process.poll() is not None  # noqa: B023
                 or read_metas(results, [poison]).get(poison, {}).get("status") == "FAILURE",
                 redelivery_wait(visibility), "the worker to die or the poison to be refused")
    assert len(workers) >= MAX + 1  # MAX died; a later one refused the message and lives on
    assert len(own_model.behaviour.killed) == MAX
    assert_refused_after_exactly(results, poison, own_model)
    metas = wait_final(results, behind, 60, [workers[-1]])
    assert set(statuses(metas).values()) == {"SUCCESS"}, statuses(metas)


@pytest.mark.faults
@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_celerys_own_retries_never_use_up_the_delivery_budget(pool, spawn, producer, results, broker, queue, own_model):
    # A budget of one death, and three autoretries of a model that refuses connections: were a retry counted
    # as a delivery that died, the second attempt would be refused as a PoisonMessage. Its readiness URL is
    # served apart and passes: a model that is away altogether is held, not retried (tests/test_model_outage.py).
    closed = f"http://127.0.0.1:{free_port()}"
    worker = spawn(pool, FORWARDER_MAX_DELIVERIES="1", FORWARDER_RETRY_MAX="3",
                   FORWARDER_MODEL_URL=f"{closed}/predict", FORWARDER_HEALTHCHECK_URL=f"{own_model.url}/readyz")
    task = send(producer, queue, {"args": {"id": "retried"}})
    meta = wait_final(results, [task], 60, [worker])[task]
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "ModelConnectionError", meta
    assert worker.output.count(f"[{task}] retry:") == 3
    for retries in range(4):  # each message (the first and its three retries) counted, then taken back
        assert int(broker.get(f"forwarder:deliveries:{task}:{retries}") or 0) == 0


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, server-wide (every database, every client)."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()}


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_first_delivery_costs_the_broker_no_command_for_the_delivery_cap(pool, start_worker, producer, results,
                                                                          broker, queue):
    # The cap on (its default, 3) on a Redis broker: a first delivery writes nothing to count itself; only a
    # redelivery does (kombu marks it). Were the counter's round trip back on the common path, every task would
    # show an INCR and an EXPIRE (in a pipeline) and a DECR.
    worker = start_worker(pool, FORWARDER_MAX_DELIVERIES="3")
    warm = send(producer, queue, {"args": {"id": "warm-up"}})
    wait_final(results, [warm], 30, [worker])
    broker.config_resetstat()
    tasks = [send(producer, queue, {"args": {"id": n}}) for n in range(20)]
    # Done when the backend published each task's STARTED and SUCCESS (no reads of ours in between).
    wait_for(lambda: commandstats(broker).get("publish", 0) >= 40, 60, "40 publishes")
    calls = commandstats(broker)
    metas = wait_final(results, tasks, 60, [worker])
    assert set(statuses(metas).values()) == {"SUCCESS"}
    # The result store: STARTED is written without a read first (a first delivery: nothing can be stored yet,
    # forwarder.result_backends), SUCCESS after one (Celery's guard against a duplicate overwriting it).
    assert calls.get("get", 0) == 20, calls
    assert {name: calls.get(name, 0) for name in ("incr", "incrby", "decr", "decrby", "expire")} == \
        {"incr": 0, "incrby": 0, "decr": 0, "decrby": 0, "expire": 0}, calls
    assert [key for key in broker.keys("forwarder:deliveries:*") if key.decode().split(":")[2] in tasks] == []


def test_which_deliveries_are_first():
    from types import SimpleNamespace as Request

    from forwarder.result_backends import first_delivery

    redis_url = "redis://localhost:6379/0"
    assert first_delivery(Request(delivery_info={"redelivered": False}), redis_url)
    assert not first_delivery(Request(delivery_info={"redelivered": True}), redis_url)
    assert not first_delivery(Request(delivery_info={}), redis_url)  # no mark: unknown, the read stays
    assert not first_delivery(None, redis_url)
    assert not first_delivery(Request(delivery_info={"redelivered": False}), "sqs://")  # SQS: only its count says
    assert first_delivery(Request(delivery_info={}, forwarder_receive_count=1), "sqs://")
    assert not first_delivery(Request(delivery_info={}, forwarder_receive_count=2), "sqs://")
