"""DogStatsD metrics: llm-engine's names, so its dashboards keep working, and the worker's own under ``forwarder.``.

Every metric is listed, with its type and tags, in the README's "Metrics" section. Sending never blocks
or fails a task (``gateways.dogstatsd``); ``FORWARDER_METRICS=0`` sends nothing.

- Per task, in the process that runs it: ``received`` and ``stuck`` before the body runs (every attempt,
  refused, expired and retried ones included; stuck: the producer's arrival timestamp is older than
  ``FORWARDER_STUCK_AFTER`` when the task starts), the outcome and the end-to-end latency once it is done.
- Per hook (``hooks.HookRunner``'s observer): attempt, success (delivered), skipped, failure.
- Firehose client builds and their failures, STS apart (``FirehoseGateway``'s observer), in the process that
  builds the client; messages the Redis redelivery sweep handed back (``redelivery.messages_restored``).
- Model outages (``forwarder.model_outage``), from the main process's watcher: one count as each starts, its
  length as it ends, and the availability gauge at once.
- Every few seconds, on the main process's timer: tasks in flight against the concurrency, RSS, whether the
  model is available and how many tasks wait for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Reject
from celery.worker import state as worker_state

from forwarder.extensions.base import Extension, RepeatingStep, add_step
from forwarder.extensions.delivery_cap import PoisonMessage
from forwarder.extensions.redelivery import messages_restored
from forwarder.hooks import HookRunner
from forwarder.model_call import model_call
from forwarder.model_outage import ENDED, STARTED, ModelOutage, outage_changed
from forwarder.request_ttl import RequestExpired
from forwarder.settings import Settings
from gateways.dogstatsd import Metrics
from gateways.firehose import BUILD_FAILED, CLIENT_BUILT, STS_FAILED, FirehoseGateway

logger = logging.getLogger(__name__)

#: llm-engine's names (``DatadogInferenceMonitoringMetricsGateway``).
RECEIVED = "scale_launch.async_task.received.count"
STUCK = "scale_launch.async_task.stuck.count"
HOOK = "scale_launch.post_inference_hook.{hook}.{event}"
#: The worker's own.
PREFIX = "forwarder."
SUCCEEDED = PREFIX + "task.succeeded"
FAILED = PREFIX + "task.failed"
RETRIED = PREFIX + "task.retried"
REFUSED = PREFIX + "task.refused"
EXPIRED = PREFIX + "task.expired"
HANDED_BACK = PREFIX + "task.handed_back"
END_TO_END = PREFIX + "task.end_to_end_seconds"
HOOK_FAILED = PREFIX + "hook.failed"
HOOK_SKIPPED = PREFIX + "hook.skipped"
IN_FLIGHT = PREFIX + "worker.in_flight"
CONCURRENCY = PREFIX + "worker.concurrency"
SATURATION = PREFIX + "worker.saturation"
RSS = PREFIX + "worker.rss_bytes"
MODEL_RESPONSES = PREFIX + "model.responses"
MODEL_LATENCY = PREFIX + "model.latency_seconds"
FIREHOSE_BUILT = PREFIX + "firehose.client_built"
FIREHOSE_STS_FAILED = PREFIX + "firehose.sts_failed"
FIREHOSE_BUILD_FAILED = PREFIX + "firehose.client_build_failed"
RESTORED = PREFIX + "broker.restored"
MODEL_AVAILABLE = PREFIX + "model.available"
MODEL_WAITING = PREFIX + "model.waiting"
MODEL_OUTAGES = PREFIX + "model.outages"
MODEL_OUTAGE_SECONDS = PREFIX + "model.outage_seconds"
#: Seconds between the gauges.
GAUGE_INTERVAL = 5.0


def build_metrics(settings: Settings) -> Metrics:
    """The process's DogStatsD client from the settings, with the endpoint identity as global tags."""
    tags = [f"endpoint_id:{settings.endpoint_id}" if settings.endpoint_id else "",
            f"endpoint_name:{settings.endpoint_name}" if settings.endpoint_name else ""]
    return Metrics(
        enabled=settings.metrics,
        host=settings.dd_agent_host,
        port=settings.dd_dogstatsd_port,
        url=settings.dd_dogstatsd_url,
        tags=tags,
    )


def arrival_time(value: Any) -> datetime | None:
    """The producer's arrival timestamp (a datetime, or its ISO string once JSON-encoded); None if neither."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


def age_seconds(arrival: datetime, now: datetime | None = None) -> float:
    """Seconds since ``arrival``: an aware one against UTC now, a naive one (llm-engine sends
    ``datetime.now()``) against local now, as llm-engine compares them."""
    if now is None:
        now = datetime.now(UTC) if arrival.tzinfo is not None else datetime.now()
    return (now - arrival).total_seconds()


class TaskMetrics(Extension):
    """Sends the task, hook and worker metrics.

    ``hooks``, ``firehose`` and ``outage`` are what it observes, handed over by whoever builds the extensions
    (``forwarder.deps``); without them (extensions installed alone, in tests) those metrics are not sent.
    """

    metrics: Metrics

    def __init__(
        self,
        hooks: HookRunner | None = None,
        firehose: Sequence[FirehoseGateway] = (),
        outage: ModelOutage | None = None,
    ) -> None:
        self.hooks = hooks
        self.firehose = tuple(firehose)
        self.outage = outage

    def install(self, app: Celery, settings: Settings) -> None:
        self.metrics = build_metrics(settings)
        self.queue = settings.queue
        self.pool = settings.pool
        self.concurrency = settings.concurrency
        self.stuck_after = settings.stuck_after
        # Tags built once per process: the constant ones now, the per-task-name ones on first use (TagCache).
        self.queue_tags = (f"queue_name:{self.queue}",)
        self.base_tags = (f"queue:{self.queue}", f"pool:{self.pool}")
        self.tag_cache = TagCache(self.base_tags)
        self._hook_metrics: dict[tuple[str, str, str], tuple[str, tuple[str, ...]]] = {}
        if not settings.metrics:
            return
        if self.hooks is not None:
            self.hooks.observe(self.hook_event)
        for gateway in self.firehose:
            gateway.observe(self.firehose_event)
        messages_restored.connect(self.restored)
        outage_changed.connect(self.outage_event, weak=False, dispatch_uid="forwarder.metrics.outage")
        add_step(app, WorkerGauges, self)

    def process_start(self) -> None:
        """Build this process's client now (a prefork child: its own), not on a task's path."""
        if self.metrics.enabled:
            try:
                self.metrics.client()
            except Exception as exc:  # no agent address yet: the sends will try again, with backoff
                logger.warning("metrics client not built: %s: %s", type(exc).__name__, exc)

    def process_stop(self) -> None:
        self.metrics.close()

    def before_task(self, task: Task, task_id: str) -> None:
        if not self.metrics.enabled:
            return
        self.metrics.increment(RECEIVED, tags=self.queue_tags)
        arrival = self._arrival(task)
        if arrival is not None and age_seconds(arrival) > self.stuck_after:
            self.metrics.increment(STUCK, tags=self.queue_tags)

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if not self.metrics.enabled:
            return
        name = getattr(task, "name", "") or "unknown"
        cache = self.tag_cache
        tags = cache.task(name)
        status, seconds = model_call(task.request)
        if status is not None and seconds is not None:  # the model answered (any status): status, duration
            status_tags = cache.extra(name, "status_code", status)
            self.metrics.increment(MODEL_RESPONSES, tags=status_tags)
            self.metrics.distribution(MODEL_LATENCY, seconds, tags=status_tags)
        if state == states.SUCCESS:
            self.metrics.increment(SUCCEEDED, tags=tags)
            outcome = "success"
        elif state == states.FAILURE:
            exc_type = type(retval).__name__ if isinstance(retval, BaseException) else "unknown"
            self.metrics.increment(FAILED, tags=cache.extra(name, "exc_type", exc_type))
            if isinstance(retval, PoisonMessage):
                self.metrics.increment(REFUSED, tags=tags)
            elif isinstance(retval, RequestExpired):
                self.metrics.increment(EXPIRED, tags=tags)
            outcome = "failure"
        elif state == states.RETRY:
            self.metrics.increment(RETRIED, tags=tags)
            outcome = "retry"
        elif state == states.REJECTED and isinstance(retval, Reject) and retval.requeue:
            self.metrics.increment(HANDED_BACK, tags=tags)
            return
        else:
            return
        arrival = self._arrival(task)
        if arrival is not None:
            self.metrics.distribution(END_TO_END, age_seconds(arrival), tags=cache.extra(name, "outcome", outcome))

    def hook_event(self, hook: str, event: str, error_type: str) -> None:
        """``hooks.HookRunner``'s observer (names and tags built once per hook, event and error type)."""
        key = (hook, event, error_type)
        found = self._hook_metrics.get(key)
        if found is None:
            found = self._hook_metrics[key] = self._hook_metric(hook, event, error_type)
        if found[0]:
            self.metrics.increment(found[0], tags=found[1])

    def _hook_metric(self, hook: str, event: str, error_type: str) -> tuple[str, tuple[str, ...]]:
        if event in ("attempt", "success"):
            return HOOK.format(hook=hook, event=event), ()
        if event == "failure":
            return HOOK_FAILED, (*self.base_tags, f"hook:{hook}", f"error_type:{error_type}")
        if event == "skipped":
            return HOOK_SKIPPED, (*self.base_tags, f"hook:{hook}")
        return "", ()

    def firehose_event(self, event: str, error_type: str) -> None:
        """``FirehoseGateway``'s observer: a client built, or a failed build (STS apart)."""
        names = {CLIENT_BUILT: FIREHOSE_BUILT, STS_FAILED: FIREHOSE_STS_FAILED, BUILD_FAILED: FIREHOSE_BUILD_FAILED}
        tags = self._base_tags()
        if error_type:
            tags.append(f"error_type:{error_type}")
        if event in names:
            self.metrics.increment(names[event], tags=tags)

    def restored(self, sender: Any = None, count: int = 0, **_: Any) -> None:
        """``redelivery.messages_restored``: messages the sweep handed back to the queue."""
        self.metrics.increment(RESTORED, count, tags=self._base_tags())

    def outage_event(self, sender: Any = None, event: str = "", seconds: float = 0.0, **_: Any) -> None:
        """``model_outage.outage_changed``: an outage started or ended (main process)."""
        tags = self._base_tags()
        if event == STARTED:
            self.metrics.increment(MODEL_OUTAGES, tags=tags)
            self.metrics.gauge(MODEL_AVAILABLE, 0, tags=tags)
        elif event == ENDED:
            self.metrics.distribution(MODEL_OUTAGE_SECONDS, seconds, tags=tags)
            self.metrics.gauge(MODEL_AVAILABLE, 1, tags=tags)

    def gauges(self) -> None:
        """In the main process, every few seconds: saturation and memory."""
        in_flight = len(worker_state.active_requests)
        tags = self._base_tags()
        self.metrics.gauge(IN_FLIGHT, in_flight, tags=tags)
        self.metrics.gauge(CONCURRENCY, self.concurrency, tags=tags)
        self.metrics.gauge(SATURATION, in_flight / self.concurrency, tags=tags)
        main, children = rss_bytes(os.getpid()), sum(rss_bytes(pid) for pid in child_pids())
        self.metrics.gauge(RSS, main, tags=[*tags, "process:main"])
        if children:
            self.metrics.gauge(RSS, children, tags=[*tags, "process:children"])
        if self.outage is not None:
            self.metrics.gauge(MODEL_AVAILABLE, 0 if self.outage.away else 1, tags=tags)
            self.metrics.gauge(MODEL_WAITING, self.outage.waiting, tags=tags)

    # ------------------------------------------------------------------------------ internals

    def _base_tags(self) -> list[str]:
        return list(self.base_tags)

    @staticmethod
    def _arrival(task: Task) -> datetime | None:
        args: Any = getattr(task.request, "args", None) or ()
        return arrival_time(args[1]) if len(args) > 1 else None


class TagCache:
    """Per-task tag tuples, built once per process for each task name (and status, outcome, error type)."""

    def __init__(self, base: tuple[str, ...]) -> None:
        self.base = base
        self._tasks: dict[str, tuple[str, ...]] = {}
        self._extra: dict[tuple[str, str, Any], tuple[str, ...]] = {}

    def task(self, name: str) -> tuple[str, ...]:
        tags = self._tasks.get(name)
        if tags is None:
            tags = self._tasks[name] = (*self.base, f"task_name:{name}")
        return tags

    def extra(self, name: str, key: str, value: Any) -> tuple[str, ...]:
        """The task's tags and ``key:value`` (a few values each: status codes, outcomes, exception types)."""
        tags = self._extra.get((name, key, value))
        if tags is None:
            tags = self._extra[(name, key, value)] = (*self.task(name), f"{key}:{value}")
        return tags


class WorkerGauges(RepeatingStep):
    """Consumer step: the worker gauges every ``GAUGE_INTERVAL`` seconds, on the main process's timer (owner: ``TaskMetrics``)."""

    owner: TaskMetrics | None

    def interval(self, c: Any) -> float:
        return GAUGE_INTERVAL if self.owner is not None else 0.0

    def tick(self, c: Any) -> None:
        if self.owner is not None:
            self.owner.gauges()


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux /proc; 0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def child_pids() -> list[int]:
    """This process's children (prefork's pool processes), from /proc; empty when unknown."""
    pids: list[int] = []
    try:
        for task_dir in Path("/proc/self/task").iterdir():
            pids += [int(pid) for pid in (task_dir / "children").read_text().split()]
    except (OSError, ValueError):
        return []
    return pids

