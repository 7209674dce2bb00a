"""A summary line every ``FORWARDER_SUMMARY_INTERVAL`` seconds: what an operator without Datadog reads.

``forwarder summary: done=12 failed=1 retried=0 in_flight=3 model_calls=13 model_p50_ms=52.1
model_p99_ms=80.3 interval_s=60.0`` (in JSON the same as keys). Counts are over the interval: ``done`` a
SUCCESS stored (a non-2xx model answer included), ``failed`` a FAILURE stored, ``retried`` a retry scheduled;
``in_flight`` the tasks running as the line is written; p50/p99 over the model calls that ended in the interval
(null without any; over its last ``SAMPLES`` calls when there were more).

The tasks end in the process that runs them (a prefork child) and the line is written by the main process,
on its consumer's timer (as the metric gauges): so the counts and latencies live in shared memory created in
the main process before the children fork (they inherit it; a recycled child's successor too). Under gevent
it is the same memory in one process. Each task's update takes a lock held for a few assignments.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import time
from typing import Any

from celery import Celery, Task, states
from celery.worker import state as worker_state

from forwarder.extensions.base import Extension, RepeatingStep, add_step
from forwarder.extensions.task_log import FIELDS_ATTR
from forwarder.model_call import model_call
from forwarder.settings import Settings

logger = logging.getLogger("forwarder")

#: The start of the line.
SUMMARY_LINE = "forwarder summary"
#: Model latencies kept for the percentiles of one interval (a ring: the last ones when there were more).
SAMPLES = 4096
DONE, FAILED, RETRIED, CALLS = range(4)
#: Seconds a process waits for the tally's lock (held for a few assignments) before skipping.
LOCK_TIMEOUT = 0.5


class Tally:
    """Counters and a ring of model latencies in shared memory (anonymous, inherited across fork)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.lock = context.Lock()
        self.counts = context.RawArray(ctypes.c_longlong, 4)  # done, failed, retried, model calls (all time)
        self.samples = context.RawArray(ctypes.c_double, SAMPLES)
        self.taken = [0, 0, 0, 0]  # the counts at the last line (main process only)

    def add(self, which: int | None, model_seconds: float | None) -> None:
        # A bounded wait: a child killed while holding the lock (OOM) costs the summary a count, never a task.
        if not self.lock.acquire(timeout=LOCK_TIMEOUT):
            return
        try:
            if which is not None:
                self.counts[which] += 1
            if model_seconds is not None:
                self.samples[self.counts[CALLS] % SAMPLES] = model_seconds
                self.counts[CALLS] += 1
        finally:
            self.lock.release()

    def take(self) -> tuple[list[int], list[float]]:
        """The counts since the last take, and the model latencies (seconds) of the calls since then."""
        locked = self.lock.acquire(timeout=LOCK_TIMEOUT)
        try:
            now = list(self.counts)
            calls = now[CALLS] - self.taken[CALLS]
            kept = min(calls, SAMPLES)
            latencies = [self.samples[(now[CALLS] - 1 - back) % SAMPLES] for back in range(kept)]
        finally:
            if locked:
                self.lock.release()
        delta = [a - b for a, b in zip(now, self.taken, strict=True)]
        self.taken = now
        return delta, latencies


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(round(fraction * len(ordered), 9)))
    return ordered[min(rank, len(ordered)) - 1]


class Summary(Extension):
    """Tally each task where it ends; the main process logs the line every interval."""

    tally: Tally | None = None

    def install(self, app: Celery, settings: Settings) -> None:
        self.interval = settings.summary_interval
        self.json = settings.log_format == "json"
        if self.interval <= 0:
            return
        self.tally = Tally()  # before the children fork: they inherit it
        self.last = time.monotonic()
        add_step(app, SummaryTimer, self)

    def task_done(self, task: Task, task_id: str, state: str, retval: Any) -> None:
        if self.tally is None:
            return
        which = {states.SUCCESS: DONE, states.FAILURE: FAILED, states.RETRY: RETRIED}.get(state)
        _, seconds = model_call(task.request)
        if which is not None or seconds is not None:
            self.tally.add(which, seconds)

    def fields(self) -> dict[str, Any]:
        """The line's fields for the interval that ends now (and start the next)."""
        assert self.tally is not None
        counts, latencies = self.tally.take()
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        return {
            "done": counts[DONE],
            "failed": counts[FAILED],
            "retried": counts[RETRIED],
            "in_flight": len(worker_state.active_requests),
            "model_calls": counts[CALLS],
            "model_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "model_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "interval_s": round(elapsed, 1),
        }

    def log(self) -> None:
        fields = self.fields()
        if self.json:
            logger.info("%s", SUMMARY_LINE, extra={FIELDS_ATTR: fields})
        else:
            text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
            logger.info("%s: %s", SUMMARY_LINE, text)


class SummaryTimer(RepeatingStep):
    """Consumer step: ``Summary.log`` every interval, on the main process's timer (owner: ``Summary``)."""

    owner: Summary | None

    def interval(self, c: Any) -> float:
        return self.owner.interval if self.owner is not None else 0.0

    def tick(self, c: Any) -> None:
        if self.owner is not None:
            self.owner.log()
