"""DogStatsD metrics: the packets a real worker sends under both pools, and that sending never slows a task.

The ``agent`` fixture (tests/support/dogstatsd.py), a UDP listener on 127.0.0.1, plays the Datadog agent
(``DD_AGENT_HOST``/``DD_DOGSTATSD_PORT``). In process (fast): the metrics extension's real handlers, driven by
Celery's tracer over the worker's app (``tests/support/inprocess.py``), send every metric by its literal name
and tags (``EVERY_METRIC``), and every metric the dashboard and monitors query is one of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devtools.demo import send
from devtools.servers import free_port, wait_for
from forwarder.extensions.metrics import age_seconds, arrival_time
from forwarder.hooks import HookRunner
from forwarder.hooks.callback import CallbackHook
from gateways.dogstatsd import Metrics, parse_url
from tests.support.aws import unique_role_arn
from tests.support.dogstatsd import statsd_env

ROOT = Path(__file__).resolve().parent.parent
SENT = 2  # successful tasks per worker run


# ----------------------------------------------------------------------------------- unit


def test_a_counter_reaches_the_agent_with_global_and_own_tags(agent, monkeypatch):
    monkeypatch.setenv("DD_ENV", "staging")
    metrics = Metrics(host="127.0.0.1", port=agent.port, tags=["endpoint_id:e-1", ""])
    metrics.increment("forwarder.test.count", tags=["queue:q"])
    metrics.distribution("forwarder.test.seconds", 1.5)
    metrics.gauge("forwarder.test.gauge", 3)
    agent.wait("forwarder.test.gauge", 3)
    (count,) = agent.named("forwarder.test.count")
    assert (count.kind, count.value) == ("c", 1)
    assert {"queue:q", "endpoint_id:e-1", "env:staging"} <= count.tags
    assert agent.named("forwarder.test.seconds")[0].kind == "d"
    assert metrics._client is not None and metrics._client.builds == 1  # one client for every send


def test_metrics_off_build_nothing_and_send_nothing(agent):
    metrics = Metrics(enabled=False, host="127.0.0.1", port=agent.port)
    metrics.increment("forwarder.test.count")
    assert metrics.client() is None
    time.sleep(0.3)
    assert agent.packets == []


def test_a_unix_socket_url(tmp_path):
    path = str(tmp_path / "dsd.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        Metrics(url=f"unix://{path}").increment("forwarder.test.count", tags=["a:b"])
        assert server.recv(1024).decode().strip() == "forwarder.test.count:1|c|#a:b"


@pytest.mark.parametrize(("url", "expected"), [
    ("udp://10.0.0.1:8126", ("10.0.0.1", 8126, None)),
    ("udp://agent", ("agent", 8125, None)),
    ("unix:///var/run/datadog/dsd.socket", ("", None, "/var/run/datadog/dsd.socket")),
])
def test_dogstatsd_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["tcp://localhost:8125", "udp://", "unix://", "localhost:8125"])
def test_a_bad_dogstatsd_url_is_refused(url):
    with pytest.raises(ValueError):
        parse_url(url)


def _sends_per_second(metrics: Metrics, count: int = 20000) -> float:
    started = time.monotonic()
    for index in range(count):
        metrics.increment("forwarder.test.count", tags=[f"n:{index % 7}"])
    return time.monotonic() - started


def test_no_agent_and_a_full_buffer_never_block_or_raise():
    # Nobody listening (ICMP refusals), and a socket that never reads (its buffer fills at once).
    nobody = Metrics(host="127.0.0.1", port=free_port())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as deaf:
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deaf.bind(("127.0.0.1", 0))
        full = Metrics(host="127.0.0.1", port=deaf.getsockname()[1])
        assert _sends_per_second(nobody) < 5
        assert _sends_per_second(full) < 5
    # A unix socket that never reads: there the sender's buffer does fill (EAGAIN), where a blocking
    # client would wait for good.
    with tempfile.TemporaryDirectory() as folder, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf_unix:
        deaf_unix.bind(f"{folder}/dsd.socket")
        assert _sends_per_second(Metrics(url=f"unix://{folder}/dsd.socket")) < 5
    unresolvable = Metrics(host="no-such-agent.invalid", port=8125)
    started = time.monotonic()
    unresolvable.increment("forwarder.test.count")
    assert time.monotonic() - started < 10


def test_under_gevent_the_socket_is_gevents_and_a_forked_child_builds_its_own(agent):
    script = f"""
import gevent.monkey; gevent.monkey.patch_all()
import json, os, sys
from gateways.dogstatsd import Metrics
metrics = Metrics(host="127.0.0.1", port={agent.port})
metrics.increment("forwarder.test.parent")
metrics.flush()  # the socket is opened by the first send
parent = metrics.client()
metrics.increment("forwarder.test.parent")  # aggregated in the parent: never sent by the child
pid = os.fork()
if pid == 0:
    metrics.increment("forwarder.test.child")
    own = metrics.client() is not parent and metrics._client.builds == 1
    metrics.close()  # a process's stop flushes
    os._exit(0 if own and metrics.flushes == 1 else 1)
_, status = os.waitpid(pid, 0)
print(json.dumps({{"module": type(parent.socket).__module__, "child": status,
                  "thread": type(metrics._flusher).__module__}}))
metrics.close()
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("gevent"), report
    assert report["thread"].startswith("gevent"), report  # the flusher is a greenlet
    assert report["child"] == 0
    agent.wait("forwarder.test.child", 1)
    agent.wait("forwarder.test.parent", 2)
    assert agent.total("forwarder.test.parent") == 2  # the parent's aggregate was not sent by its child too


def test_metrics_are_aggregated_and_flushed_in_few_datagrams(agent):
    # 500 tasks' worth of metrics, as TaskMetrics records them: six per task, three counters, two distributions.
    metrics = Metrics(host="127.0.0.1", port=agent.port, tags=["endpoint_id:e-1"], flush_interval=3600)
    tags = ("queue:q", "pool:gevent", "task_name:t")
    tasks = 500
    for n in range(tasks):
        metrics.increment("forwarder.test.received", tags=("queue_name:q",))
        metrics.increment("forwarder.test.succeeded", tags=tags)
        metrics.increment("forwarder.test.responses", tags=(*tags, "status_code:200"))
        metrics.distribution("forwarder.test.latency", n / 1000, tags=(*tags, "status_code:200"))
        metrics.distribution("forwarder.test.end_to_end", n / 100, tags=(*tags, "outcome:success"))
    metrics.gauge("forwarder.test.in_flight", 3)
    assert agent.datagrams == 0 and metrics.flushes == 0  # nothing sent per metric
    metrics.flush()
    agent.wait("forwarder.test.in_flight", 3)
    wait_for(lambda: len(agent.named("forwarder.test.end_to_end")) == tasks, 10, "every sample")
    # Counters: one line each with the sum; distributions: every sample kept, packed into full datagrams.
    assert [p.value for p in agent.named("forwarder.test.succeeded", *tags, "endpoint_id:e-1")] == [tasks]
    assert len(agent.named("forwarder.test.received")) == 1
    assert sorted(p.value for p in agent.named("forwarder.test.latency")) == [n / 1000 for n in range(tasks)]
    assert metrics.flushes == 1
    # Full datagrams (up to 1,432 bytes): ~75 for these 1,000 sample lines; one datagram per metric was 3,001.
    assert agent.datagrams <= agent.bytes // 1200 + 1, (agent.datagrams, agent.bytes)
    assert agent.datagrams < 100
    metrics.flush()  # nothing new: nothing sent
    assert metrics.flushes == 1
    metrics.close()


def test_the_flusher_sends_on_its_interval_and_close_sends_the_rest(agent):
    metrics = Metrics(host="127.0.0.1", port=agent.port, flush_interval=0.2)
    for _ in range(100):
        metrics.increment("forwarder.test.count")
    agent.wait("forwarder.test.count", 100, timeout=5)  # by the flusher thread, no call of ours
    assert metrics.flushes == 1 and agent.datagrams == 1
    metrics.increment("forwarder.test.last")
    metrics.close()
    agent.wait("forwarder.test.last", 1, timeout=5)


def test_hook_outcomes_reach_the_observer_and_a_skipped_callback_is_no_success():
    events: list[tuple[str, str, str]] = []

    class Broken:
        name = "broken"

        def __call__(self, *args: object) -> None:
            raise OSError("down")

    callback = CallbackHook(client=None)  # type: ignore[arg-type]  # no URL: never reaches the client
    runner = HookRunner([callback, Broken()], observer=lambda *event: events.append(event))
    runner.run({}, {"result": 1}, "t-1")
    assert events == [("callback", "attempt", ""), ("callback", "skipped", ""),
                      ("broken", "attempt", ""), ("broken", "failure", "OSError")]
    assert runner.counts["callback.success"] == 0 and runner.counts["callback.skipped"] == 1


def test_arrival_timestamps():
    naive = datetime(2024, 1, 1, 12, 0, 0)
    assert arrival_time(naive.isoformat()) == naive
    assert arrival_time(naive) == naive
    assert arrival_time("yesterday") is None and arrival_time(None) is None and arrival_time(5) is None
    aware = datetime.now(UTC) - timedelta(hours=25)
    assert 25 * 3600 - 5 < age_seconds(arrival_time(aware.isoformat())) < 25 * 3600 + 5  # type: ignore[arg-type]


# ------------------------------------------------------------------------- every name, in process


#: Every metric the worker sends, by its literal name (a renamed metric breaks a dashboard or a monitor, here
#: and in llm-engine's): its DogStatsD type and its tags, beyond the global ones (env, service, version from
#: DD_*, endpoint_id and endpoint_name). llm-engine's four (``DatadogInferenceMonitoringMetricsGateway`` in
#: model-engine/model_engine_server/inference/infra/gateways/datadog_inference_monitoring_metrics_gateway.py)
#: keep its names and tags: counters, ``queue_name`` on the task ones, none on the hook ones.
BASE_TAGS = {"queue", "pool"}
TASK_TAGS = BASE_TAGS | {"task_name"}
EVERY_METRIC: dict[str, tuple[str, set[str]]] = {
    "scale_launch.async_task.received.count": ("c", {"queue_name"}),
    "scale_launch.async_task.stuck.count": ("c", {"queue_name"}),
    "scale_launch.post_inference_hook.callback.attempt": ("c", set()),
    "scale_launch.post_inference_hook.callback.success": ("c", set()),
    "scale_launch.post_inference_hook.logging.attempt": ("c", set()),
    "scale_launch.post_inference_hook.logging.success": ("c", set()),
    "forwarder.task.succeeded": ("c", TASK_TAGS),
    "forwarder.task.failed": ("c", TASK_TAGS | {"exc_type"}),
    "forwarder.task.retried": ("c", TASK_TAGS),
    "forwarder.task.refused": ("c", TASK_TAGS),
    "forwarder.task.expired": ("c", TASK_TAGS),
    "forwarder.task.handed_back": ("c", TASK_TAGS),
    "forwarder.task.end_to_end_seconds": ("d", TASK_TAGS | {"outcome"}),
    "forwarder.model.responses": ("c", TASK_TAGS | {"status_code"}),
    "forwarder.model.latency_seconds": ("d", TASK_TAGS | {"status_code"}),
    "forwarder.hook.failed": ("c", BASE_TAGS | {"hook", "error_type"}),
    "forwarder.hook.skipped": ("c", BASE_TAGS | {"hook"}),
    "forwarder.worker.in_flight": ("g", BASE_TAGS),
    "forwarder.worker.concurrency": ("g", BASE_TAGS),
    "forwarder.worker.saturation": ("g", BASE_TAGS),
    "forwarder.worker.rss_bytes": ("g", BASE_TAGS | {"process"}),
    "forwarder.firehose.client_built": ("c", BASE_TAGS),
    "forwarder.firehose.sts_failed": ("c", BASE_TAGS | {"error_type"}),
    "forwarder.firehose.client_build_failed": ("c", BASE_TAGS | {"error_type"}),
    "forwarder.broker.restored": ("c", BASE_TAGS),
    "forwarder.model.available": ("g", BASE_TAGS),
    "forwarder.model.waiting": ("g", BASE_TAGS),
    "forwarder.model.outages": ("c", BASE_TAGS),
    "forwarder.model.outage_seconds": ("d", BASE_TAGS),
}
#: Added to every metric by the client (from DD_ENV, DD_SERVICE, DD_VERSION when set) and by the settings.
UNIFIED = {"env", "service", "version"}
IDENTITY = {"endpoint_id:end-1", "endpoint_name:my-endpoint"}
CALLBACK_URL = "http://127.0.0.1:9/cb"


def answers_by_id(request):
    """The model: JSON for every request but id "bad", which gets an HTML page (the task fails)."""
    if b'"bad"' in request.body:
        return 500, b"<html>oops</html>"
    return 200, b'{"ok": true}'


def tags_by_key(packet) -> dict[str, str]:
    return {tag.split(":", 1)[0]: tag.split(":", 1)[1] for tag in packet.tags}


def test_the_metrics_extension_sends_every_name_with_its_tags_exactly(agent):
    from celery import states
    from celery.exceptions import Reject, Retry

    from forwarder.extensions.delivery_cap import PoisonMessage
    from forwarder.extensions.metrics import TaskMetrics
    from forwarder.extensions.redelivery import messages_restored
    from forwarder.model_outage import ENDED, STARTED
    from forwarder.request_ttl import RequestExpired
    from forwarder.tasks import TASK_NAME
    from gateways.firehose import BUILD_FAILED, CLIENT_BUILT, STS_FAILED
    from tests.support.inprocess import in_process

    env = {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(agent.port), "FORWARDER_ENDPOINT_ID": "end-1",
           "FORWARDER_ENDPOINT_NAME": "my-endpoint", "CELERY_QUEUE": "q-metrics", "FORWARDER_STUCK_AFTER": "60",
           "FORWARDER_HOOKS": "callback", "FORWARDER_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}
    made: list[TaskMetrics] = []

    def metrics_of(built):  # as build_deps hands them over: the hook runner and the outage state it observes
        made.append(TaskMetrics(built.hooks, (), built.outage))
        return made

    old = datetime.now() - timedelta(minutes=5)  # naive local time, as llm-engine sends: stuck after 60 s
    with in_process(env, answers_by_id, metrics_of) as forwarder:
        (extension,) = made
        # The task path as a worker runs it: a success (stuck, called back), a failure (called back),
        # a success whose callback fails, and one with no callback to make (skipped).
        ok = forwarder.run({"args": {"id": "ok"}, "callback_url": CALLBACK_URL}, old)
        bad = forwarder.run({"args": {"id": "bad"}, "callback_url": CALLBACK_URL}, datetime.now())
        forwarder.run({"args": {"id": "cb"}, "callback_url": "http://127.0.0.1:9/fail"}, datetime.now())
        forwarder.run({"args": {"id": "none"}}, datetime.now())
        assert (ok["status"], bad["status"]) == ("SUCCESS", "FAILURE")
        # The outcomes the tracer does not reach here: retried, handed back, refused, expired.
        task = forwarder.app.tasks[TASK_NAME]
        for state, retval in ((states.RETRY, Retry()), (states.REJECTED, Reject("shutdown", requeue=True)),
                              (states.FAILURE, PoisonMessage("delivered 3 times")),
                              (states.FAILURE, RequestExpired("waited too long"))):
            task.push_request(id="t-other", args=[{"args": {}}, datetime.now(), False])
            try:
                extension.task_done(task, "t-other", state, retval)
            finally:
                task.pop_request()
        # The other senders: the logging hook's observer, the Firehose gateway's, the redelivery sweep's
        # signal, the outage watcher's, the gauges' timer.
        extension.hook_event("logging", "attempt", "")
        extension.hook_event("logging", "success", "")
        for event, error in ((CLIENT_BUILT, ""), (STS_FAILED, "ClientError"), (BUILD_FAILED, "EndpointConnectionError")):
            extension.firehose_event(event, error)
        messages_restored.send(sender=None, count=2)
        extension.outage_event(event=STARTED)
        extension.outage_event(event=ENDED, seconds=3.0)
        extension.gauges()
        extension.metrics.flush()
    agent.wait("forwarder.model.outage_seconds", 3)
    sent = {packet.name for packet in agent.packets}
    assert sent == set(EVERY_METRIC), (sorted(sent - set(EVERY_METRIC)), sorted(set(EVERY_METRIC) - sent))
    for packet in agent.packets:
        kind, keys = EVERY_METRIC[packet.name]
        assert packet.kind == kind, packet
        assert IDENTITY <= packet.tags, packet
        assert set(tags_by_key(packet)) - UNIFIED == keys | {"endpoint_id", "endpoint_name"}, packet
        tags = tags_by_key(packet)
        if "queue_name" in keys:
            assert tags["queue_name"] == "q-metrics"
        if "queue" in keys:
            assert (tags["queue"], tags["pool"]) == ("q-metrics", "prefork")
        if "task_name" in keys:
            assert tags["task_name"] == TASK_NAME
    # The task path's values: the counts per outcome, what failed and how, and the model's answers.
    assert agent.total("scale_launch.async_task.received.count") == 4
    assert agent.total("scale_launch.async_task.stuck.count") == 1
    assert agent.total("forwarder.task.succeeded") == 3
    assert agent.total("forwarder.task.failed", "exc_type:ModelResponseError") == 1
    assert agent.total("forwarder.model.responses", "status_code:200") == 3
    assert {p.tags & {"outcome:success", "outcome:failure"} for p in agent.named("forwarder.task.end_to_end_seconds")} \
        >= {frozenset({"outcome:success"}), frozenset({"outcome:failure"})}
    assert agent.total("scale_launch.post_inference_hook.callback.attempt") == 4  # one per task, as llm-engine
    assert agent.total("scale_launch.post_inference_hook.callback.success") == 2  # ok and bad: delivered
    assert agent.total("forwarder.hook.failed", "hook:callback", "error_type:CallbackError") == 1
    assert agent.total("forwarder.hook.skipped", "hook:callback") == 1
    assert agent.total("forwarder.broker.restored") == 2


def test_every_metric_the_dashboard_and_monitors_query_is_one_the_worker_sends_by_that_name():
    from tests.test_dashboards import GLOBAL_TAGS, INTEGRATIONS, queries, uses

    for where, query in queries():
        for metric, tags in uses(query):
            if metric in INTEGRATIONS:
                continue
            assert metric in EVERY_METRIC, f"{where}: {metric} is not sent by the worker"
            assert tags <= EVERY_METRIC[metric][1] | GLOBAL_TAGS, f"{where}: {metric} {tags}"


# ----------------------------------------------------------------------------------- worker


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_worker_sends_llm_engines_metrics_and_its_own(pool, agent, start_worker, producer, queue):
    dead = free_port()
    env = statsd_env(agent.port)
    worker = start_worker(pool, FORWARDER_HOOKS="callback", FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
                          FORWARDER_CALLBACK_RETRIES="1", FORWARDER_CALLBACK_TIMEOUT="2", **env)
    # Retries: a second worker whose model is a closed port, on a queue of its own.
    retry_queue = f"{queue}-retry"
    start_worker(pool, CELERY_QUEUE=retry_queue, FORWARDER_MODEL_URL=f"http://127.0.0.1:{dead}/predict",
                 FORWARDER_READY_TIMEOUT="0", FORWARDER_RETRY_MAX="1", **env)
    results = [send(producer, {"args": {"n": n}}, queue=queue) for n in range(SENT)]
    failed = send(producer, {"args": 7}, queue=queue)  # MalformedRequest, before any HTTP call
    stuck = send(producer, {"args": {"old": True}}, queue=queue, arrival=datetime.now() - timedelta(days=2))
    hooked = send(producer, {"args": {"n": 9}, "callback_url": f"http://127.0.0.1:{dead}/cb"}, queue=queue)
    retried = send(producer, {"args": {"n": 1}}, queue=retry_queue)
    for result in [*results, stuck, hooked]:
        assert result.get(timeout=30)["status_code"] == 200
    for result in (failed, retried):
        result.get(timeout=60, propagate=False)
        assert result.status == "FAILURE"

    common = {"pool:" + pool, "env:test", "service:forwarder-test", "version:1.2.3", "endpoint_id:end-1",
              "endpoint_name:my-endpoint"}
    ours = {"queue:" + queue, "task_name:ml_serve.celery_service.exec_func", *common}
    ok = SENT + 2  # plain, stuck, hooked
    agent.wait("forwarder.task.succeeded", ok, *ours)
    agent.wait("forwarder.task.failed", 1, *ours, "exc_type:MalformedRequest")
    agent.wait("scale_launch.async_task.received.count", ok + 1, f"queue_name:{queue}")
    agent.wait("scale_launch.async_task.stuck.count", 1, f"queue_name:{queue}")
    # A retry, then its final failure: two attempts received.
    agent.wait("forwarder.task.retried", 1, "queue:" + retry_queue, f"pool:{pool}")
    agent.wait("forwarder.task.failed", 1, "queue:" + retry_queue, "exc_type:ModelConnectionError")
    agent.wait("scale_launch.async_task.received.count", 2, f"queue_name:{retry_queue}")
    # Hooks: every task is an attempt; only the one with a URL was tried, and it failed: no success at all.
    hook_attempts = ok + 1
    agent.wait("scale_launch.post_inference_hook.callback.attempt", hook_attempts)
    agent.wait("forwarder.hook.failed", 1, "hook:callback", "error_type:CallbackError", *common)
    agent.wait("forwarder.hook.skipped", hook_attempts - 1, "hook:callback")
    # End-to-end latency: one per outcome, the stuck task's about two days.
    latencies = [p.value for p in agent.named("forwarder.task.end_to_end_seconds", "outcome:success", *ours)]
    assert len(latencies) == ok and max(latencies) > 2 * 86400 - 60
    assert sorted(latencies)[0] < 30
    assert agent.named("forwarder.task.end_to_end_seconds", "outcome:failure", *ours)
    # The model's answers: status codes and latency (the failed task never reached the model).
    assert agent.total("forwarder.model.responses", *ours, "status_code:200") == ok
    assert len(agent.named("forwarder.model.latency_seconds", *ours, "status_code:200")) == ok
    # Worker gauges: saturation against the concurrency, and RSS.
    agent.wait("forwarder.worker.concurrency", 2, "queue:" + queue, timeout=15)
    assert agent.named("forwarder.worker.rss_bytes", "process:main")[0].value > 10 * 1024 * 1024
    assert {p.kind for p in agent.named("forwarder.worker.in_flight")} == {"g"}

    assert agent.total("scale_launch.post_inference_hook.callback.success") == 0
    assert agent.total("scale_launch.async_task.stuck.count", f"queue_name:{queue}") == 1
    assert agent.total("forwarder.task.succeeded", *ours) == ok  # each counted once
    assert "Traceback" not in worker.output


def _timed_tasks(producer, queue: str, count: int = 12) -> float:
    started = time.monotonic()
    results = [send(producer, {"args": {"n": n}}, queue=queue) for n in range(count)]
    for result in results:
        assert result.get(timeout=30)["status_code"] == 200
    return time.monotonic() - started


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_no_agent_or_a_full_buffer_slows_no_task(pool, start_worker, producer, queue, tmp_path):
    deaf = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.bind(("127.0.0.1", 0))  # never read: its buffer is full after a few packets
    deaf_unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf_unix.bind(str(tmp_path / "dsd.socket"))  # never read: the senders' sends would block (EAGAIN)
    try:
        runs = {
            "off": {"FORWARDER_METRICS": "0"},
            "nobody": {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(free_port())},
            "full_udp": {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(deaf.getsockname()[1])},
            "full_unix": {"DD_DOGSTATSD_URL": f"unix://{tmp_path / 'dsd.socket'}"},
        }
        times = {}
        for name, env in runs.items():
            own = f"{queue}-{name}"
            start_worker(pool, CELERY_QUEUE=own, **env)
            _timed_tasks(producer, own, 40)  # warm up, and fill the buffers
            times[name] = _timed_tasks(producer, own)
        for name in ("nobody", "full_udp", "full_unix"):
            assert times[name] < times["off"] * 2 + 1, times
    finally:
        deaf.close()
        deaf_unix.close()


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_firehose_client_builds_and_sts_failures_are_counted(
    pool, agent, start_worker, producer, queue, moto_server, aws_env, firehose_stream
):
    env = {**statsd_env(agent.port), **aws_env, "FORWARDER_HOOKS": "logging", "CELERY_WORKER_CONCURRENCY": "1",
           "FIREHOSE_STREAM_NAME": firehose_stream["name"], "FIREHOSE_ROLE_ARN": unique_role_arn()}
    start_worker(pool, **env)
    down_queue = f"{queue}-sts-down"  # a second worker whose STS is a closed port
    down = start_worker(pool, CELERY_QUEUE=down_queue, AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{free_port()}", **env)
    for name in (queue, down_queue):
        for result in [send(producer, {"args": {"n": n}}, queue=name) for n in range(3)]:
            assert result.get(timeout=60)["status_code"] == 200  # a hook failure fails no task

    tags = (f"pool:{pool}", "endpoint_id:end-1")
    agent.wait("scale_launch.post_inference_hook.logging.success", 3)
    agent.wait("forwarder.firehose.sts_failed", 1, f"queue:{down_queue}", *tags, "error_type:EndpointConnectionError")
    # One process each, one build for three puts; the worker whose STS is down never built one
    assert agent.total("forwarder.firehose.client_built", f"queue:{queue}", *tags) == 1
    assert agent.total("forwarder.firehose.client_built", f"queue:{down_queue}") == 0
    # Its backoff spares STS: fewer failed builds than tasks
    assert agent.total("forwarder.firehose.sts_failed", f"queue:{down_queue}") < 3
    assert "Traceback" not in down.output



@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_a_worker_aggregates_its_metrics_a_few_datagrams_per_second_not_six_per_task(
    pool, agent, start_worker, producer, queue
):
    start_worker(pool, **statsd_env(agent.port))
    tasks = 60
    for result in [send(producer, {"args": {"n": n}}, queue=queue) for n in range(tasks)]:
        assert result.get(timeout=30)["status_code"] == 200
    agent.wait("forwarder.task.succeeded", tasks)
    agent.wait("scale_launch.async_task.received.count", tasks)
    # Every sample of the distributions arrives; the counters arrive summed, in fewer lines than tasks.
    wait_for(lambda: len(agent.named("forwarder.model.latency_seconds")) == tasks, 10, "every latency sample")
    assert agent.total("forwarder.task.succeeded") == tasks
    assert len(agent.named("forwarder.task.succeeded")) < tasks / 4
    # Six metrics per task sent one datagram each was 360 datagrams; now a flush a second per process, each
    # packing its lines (the distributions' samples are most of the bytes) into datagrams of up to 1,432 bytes.
    assert agent.datagrams < tasks / 2, agent.datagrams
    assert agent.bytes / agent.datagrams > 500, (agent.bytes, agent.datagrams)
