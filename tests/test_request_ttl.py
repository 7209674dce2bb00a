"""FORWARDER_REQUEST_TTL: a request that waited in the queue too long is failed unrun, its hooks told.

Unit tests drive ``request_ttl`` and the extension in this process; the end-to-end test runs the worker
(both pools) against the suite's model, a callback receiver and a DogStatsD stand-in.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import redis

from devtools.demo import send
from forwarder.extensions import default_extensions
from forwarder.extensions.expiry import ExpireOldRequests
from forwarder.extensions.metrics import EXPIRED, FAILED, STUCK
from forwarder.request_ttl import RequestExpired, expired_by, parse_arrival, parse_ttl, waited_seconds
from forwarder.settings import Settings
from forwarder.tasks import TASK_NAME
from tests.support.dogstatsd import statsd_env
from tests.support.faults import wait_error_meta

POOLS = ["prefork", "gevent"]
NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def new_york(monkeypatch):
    """This process in America/New_York (UTC-5 in December), restored afterwards."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ------------------------------------------------------------------------------------ the check


def test_the_message_names_the_wait_and_the_limit():
    arrival = NOW - timedelta(seconds=21634.7)
    assert expired_by(arrival, NOW, 21600) == "waited 21634 s in the queue, limit 21600 s"
    assert expired_by(arrival, NOW, 21600.0) == "waited 21634 s in the queue, limit 21600 s"
    assert expired_by(arrival, NOW, 1e7) is None
    assert expired_by(NOW - timedelta(seconds=3), NOW, 1.5) == "waited 3 s in the queue, limit 1.5 s"


def test_exactly_the_ttl_still_runs_and_no_ttl_never_expires():
    assert expired_by(NOW - timedelta(seconds=60), NOW, 60) is None
    assert expired_by(NOW - timedelta(seconds=60.001), NOW, 60) is not None
    assert expired_by(NOW - timedelta(days=365), NOW, None) is None


@pytest.mark.parametrize(
    "arrival",
    [
        NOW - timedelta(hours=2),  # a datetime (kombu's JSON gives one back)
        (NOW - timedelta(hours=2)).isoformat(),  # its ISO text (an older kombu)
        (NOW - timedelta(hours=2)).isoformat().replace("+00:00", "Z"),
        (NOW - timedelta(hours=2)).astimezone(timezone(timedelta(hours=9))).isoformat(),  # any offset
        (NOW - timedelta(hours=2)).timestamp(),  # epoch seconds
        int((NOW - timedelta(hours=2)).timestamp()),
    ],
)
def test_every_form_of_the_arrival_timestamp_is_read(arrival):
    assert parse_arrival(arrival) == NOW - timedelta(hours=2)
    assert expired_by(arrival, NOW, 3600) == "waited 7200 s in the queue, limit 3600 s"


@pytest.mark.parametrize("arrival", [None, "yesterday", "", True, [2026, 12, 6], {"t": 1}, float("nan"), 1e300])
def test_an_unreadable_arrival_never_expires(arrival):
    assert parse_arrival(arrival) is None
    assert expired_by(arrival, NOW, 1) is None


def test_a_producer_clock_ahead_counts_as_no_wait():
    assert waited_seconds(NOW + timedelta(minutes=5), NOW) == 0
    assert expired_by(NOW + timedelta(days=2), NOW, 1) is None


def test_a_naive_arrival_is_the_workers_local_time(new_york):
    # llm-engine sends datetime.now(): local and zoneless. In New York (UTC-5) a naive 07:00 is 12:00 UTC;
    # read as UTC it would be five hours old and expire at once.
    assert parse_arrival(datetime(2026, 12, 6, 7, 0, 0)) == NOW
    assert parse_arrival("2026-12-06T07:00:00") == NOW
    assert expired_by(datetime(2026, 12, 6, 6, 59, 0), NOW, 3600) is None
    assert expired_by(datetime(2026, 12, 6, 6, 59, 0), NOW, 30) == "waited 60 s in the queue, limit 30 s"
    fresh = datetime.now() - timedelta(seconds=10)  # what a producer in this zone sends
    assert expired_by(fresh, datetime.now(UTC), 600) is None


def test_a_naive_arrival_across_a_dst_change_is_measured_by_the_clock(new_york):
    # 2026-11-01 01:30 EDT (-4), then clocks go back: 02:30 EST (-5) is 2 h later, not 1 h.
    arrival = datetime(2026, 11, 1, 0, 30)  # EDT
    now = datetime(2026, 11, 1, 2, 30).astimezone(UTC)  # EST
    assert expired_by(arrival, now, 3 * 3600 - 1) == f"waited {3 * 3600} s in the queue, limit {3 * 3600 - 1} s"


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "six hours", "1e400"])
def test_a_bad_ttl_is_refused(raw):
    with pytest.raises(ValueError):
        parse_ttl(raw)


def test_the_ttl_setting():
    assert Settings.from_env({}).request_ttl is None
    assert Settings.from_env({"FORWARDER_REQUEST_TTL": " 21600 "}).request_ttl == 21600
    assert Settings.from_env({"FORWARDER_REQUEST_TTL": "0.5"}).request_ttl == 0.5


# ------------------------------------------------------------------------------------ the extension


def task_with(*args: object) -> SimpleNamespace:
    return SimpleNamespace(request=SimpleNamespace(args=list(args)))


def extension(**env: str) -> ExpireOldRequests:
    ext = ExpireOldRequests()
    ext.install(None, Settings.from_env(env))  # type: ignore[arg-type]  # install touches no app
    return ext


def test_an_expired_task_is_refused_before_it_runs_and_a_fresh_one_passes():
    ext = extension(FORWARDER_REQUEST_TTL="60")
    old = datetime.now() - timedelta(hours=1)
    with pytest.raises(RequestExpired, match=r"^waited 36\d\d s in the queue, limit 60 s$"):
        ext.before_task(task_with({"args": {}}, old, False), "t-old")  # type: ignore[arg-type]
    ext.before_task(task_with({"args": {}}, datetime.now(), False), "t-fresh")  # type: ignore[arg-type]
    ext.before_task(task_with({"args": {}}, datetime.now(UTC).isoformat()), "t-iso")  # type: ignore[arg-type]


def test_without_a_ttl_nothing_is_checked_or_warned(caplog):
    ext = extension()
    ext.before_task(task_with({"args": {}}, datetime.now() - timedelta(days=30)), "t")  # type: ignore[arg-type]
    ext.before_task(task_with({"args": {}}), "t")  # type: ignore[arg-type]
    assert not caplog.records


def test_a_missing_or_unreadable_arrival_runs_with_one_warning_per_process(caplog):
    caplog.set_level(logging.WARNING, logger="forwarder.extensions.expiry")
    ext = extension(FORWARDER_REQUEST_TTL="60")
    for task in (task_with({"args": {}}), task_with({"args": {}}, "not a time"), task_with({"args": {}}, None),
                 task_with()):
        ext.before_task(task, "t-x")  # type: ignore[arg-type]
    (warning,) = caplog.records
    assert "task t-x has no readable arrival timestamp (second argument: none)" in warning.getMessage()
    assert "FORWARDER_REQUEST_TTL" in warning.getMessage()


def test_the_check_runs_after_the_received_and_stuck_metrics_and_before_the_delivery_count():
    names = [type(ext).__name__ for ext in default_extensions()]
    assert names.index("TaskMetrics") < names.index("ExpireOldRequests") < names.index("CapDeliveries")


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("pool", POOLS)
def test_e2e_an_expired_request_never_reaches_the_model_fails_and_tells_the_callback(
    pool, start_worker, producer, model, queue, callback_receiver, agent, redis_server
):
    # One slot: "one warning per process" is one warning in all.
    worker = start_worker(
        pool, CELERY_WORKER_CONCURRENCY="1", FORWARDER_REQUEST_TTL="600", FORWARDER_STUCK_AFTER="300",
        FORWARDER_HOOKS="callback", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1", **statsd_env(agent.port),
    )
    request = {"callback_url": f"{callback_receiver.url}/cb"}
    old = send(producer, {"args": {"id": "old"}, **request}, queue=queue,
               arrival=datetime.now() - timedelta(seconds=1234))  # naive local time, as llm-engine sends
    fresh = send(producer, {"args": {"id": "fresh"}, **request}, queue=queue)
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()  # a producer that sends text
    iso_old = producer.send_task(TASK_NAME, args=[{"args": {"id": "iso-old"}, **request}, two_hours_ago, False],
                                 queue=queue)
    no_arrival = [producer.send_task(TASK_NAME, args=[{"args": {"id": f"none-{n}"}}], queue=queue) for n in range(2)]

    assert fresh.get(timeout=30)["status_code"] == 200
    for task in no_arrival:
        assert task.get(timeout=30)["status_code"] == 200  # run, unchecked
    results = redis.Redis.from_url(f"{redis_server.url}/1")
    try:
        metas = wait_error_meta(results, [old.id, iso_old.id], 30, [worker])
    finally:
        results.close()
    for task, waited in ((old, 1234), (iso_old, 7200)):
        meta = metas[task.id]
        assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "RequestExpired", meta
        error = json.loads(meta["result"]["custom"])["error"]
        seconds = int(error.split()[1])
        assert error == f"waited {seconds} s in the queue, limit 600 s" and waited <= seconds < waited + 60, error
        assert meta["traceback"] is None
    # The model never saw them; it saw every other.
    assert model.behaviour.requests["old"] == model.behaviour.requests["iso-old"] == 0
    assert model.behaviour.requests["fresh"] == 1 and model.behaviour.requests["none-0"] == 1

    # The callback told each caller: the expired ones as failures, with the message.
    callbacks = {seen.body["task_id"]: seen.body for seen in callback_receiver.wait_for(3)}
    assert callbacks[old.id]["state"] == "FAILURE" and "in the queue, limit 600 s" in callbacks[old.id]["error"]
    assert callbacks[iso_old.id]["state"] == "FAILURE"
    assert callbacks[fresh.id]["status_code"] == 200

    agent.wait(EXPIRED, 2)
    assert agent.total(EXPIRED) == 2
    assert agent.total(FAILED, "exc_type:RequestExpired") == 2
    assert agent.total(STUCK) == 2  # both expired ones were also stuck (older than 300 s); nothing else
    worker.wait_for_log(f"task {old.id} failed: RequestExpired: waited ")
    assert worker.output.count("has no readable arrival timestamp") == 1
