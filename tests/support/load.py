"""A steady load of tasks sent from a thread, and a log of the faults injected while it runs
(tests/test_faults_under_load.py).

A send that fails (the broker is down mid-restart) is sent again with the same task id, so each task
id stands for one request whatever the broker did; a duplicate the model sees is the worker's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery

from tests.support.faults import send


class Load(threading.Thread):
    """Send ``count`` tasks to ``queue`` at ``rate`` per second; ``ids`` in order, request ``id`` = index."""

    def __init__(self, producer: Celery, queue: str, count: int, rate: float) -> None:
        super().__init__(name="load", daemon=True)
        self.producer, self.queue, self.count, self.rate = producer, queue, count, rate
        self.ids: list[str] = []
        self.sent_at: dict[str, float] = {}  # task id -> time.time() of its (first) send
        self.resent = 0
        self.resent_ids: set[str] = set()  # sends that failed and were sent again: the first may have arrived
        self.stopped = threading.Event()
        self.started_at = 0.0  # time.monotonic() of the first send's tick
        self.running = threading.Event()

    def run(self) -> None:
        started = self.started_at = time.monotonic()
        self.running.set()
        for n in range(self.count):
            if self.stopped.is_set():
                return
            pause = started + n / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            task_id = str(uuid.uuid4())
            self.sent_at[task_id] = time.time()
            while not self.stopped.is_set():
                try:
                    send(self.producer, self.queue, {"args": {"id": n}}, task_id=task_id,
                         retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.1})
                    break
                except Exception:  # the broker is down mid-restart: the same task again, shortly
                    self.resent += 1
                    self.resent_ids.add(task_id)
                    time.sleep(0.1)
            self.ids.append(task_id)

    def sent(self) -> int:
        return len(self.ids)

    def between_sends(self, seconds: float) -> float:
        """The ``time.monotonic()`` half-way between the two sends around ``seconds`` after the first one.

        Faults go there: a fault on the very tick of a send makes the same race every run (a replica
        SIGKILLed as a message is pushed loses it inside kombu's Redis transport: docs/RELIABILITY.md, known
        limits), where real faults fall anywhere.
        """
        self.running.wait(10)
        return self.started_at + seconds + 0.5 / self.rate


@dataclass
class FaultLog:
    """When each fault was injected (``time.monotonic()``, and ``time.time()`` in ``wall``), to trace each
    duplicate to one and measure how long the tasks sent around it took."""

    faults: list[tuple[float, str]] = field(default_factory=list)
    wall: dict[str, float] = field(default_factory=dict)

    def inject(self, name: str, action: Callable[[], object]) -> None:
        self.faults.append((time.monotonic(), name))
        self.wall[name] = time.time()
        action()

    def cause(self, first: float, again: float) -> str | None:
        """The fault nearest a request's first model call, among those injected from 2 s before that call up to
        its second one (a task running, or just taken, when the fault hit is the one that runs again)."""
        candidates = [(abs(at - first), name) for at, name in self.faults if first - 2.0 <= at <= again]
        return min(candidates)[1] if candidates else None


def trace_duplicates(seen_at: dict[str, list[float]], faults: FaultLog, load: Load) -> list[str]:
    """One line per request the model saw more than once, naming the fault behind it (or "no fault").

    A send that failed as the broker went down may have arrived all the same (the broker executed the LPUSH,
    its reply died with it): the producer then sent that task twice, and the duplicate is the producer's.
    """
    lines = []
    resent = {load.ids.index(task_id) for task_id in load.resent_ids if task_id in load.ids}
    for n in range(load.count):
        times = seen_at.get(str(n), [])
        if len(times) > 1:
            cause = faults.cause(times[0], times[1])
            if n in resent:
                cause = "the producer's send retried across a broker restart (sent twice)"
            lines.append(f"request {n}: {len(times)} model calls, {times[1] - times[0]:.2f} s apart, "
                         f"after {cause or 'no fault'}")
    return lines


def latencies(metas: dict[str, dict[str, Any]], load: Load) -> dict[str, float]:
    """Task id -> seconds from its send to its stored result (``date_done``, written by the worker)."""
    return {task_id: datetime.fromisoformat(meta["date_done"]).timestamp() - load.sent_at[task_id]
            for task_id, meta in metas.items()}


def recovery(faults: FaultLog, load: Load, took: dict[str, float], before: float = 1.0, after: float = 3.0
             ) -> dict[str, float]:
    """Fault -> the longest send-to-result time of the tasks sent from ``before`` s before it to ``after`` s
    after it: what the fault cost the tasks in flight or arriving as it happened."""
    worst = {}
    for name, at in faults.wall.items():
        around = [took[i] for i, sent in load.sent_at.items() if at - before <= sent <= at + after and i in took]
        worst[name] = max(around, default=0.0)
    return worst


def around(faults: FaultLog, load: Load, task_id: str) -> str:
    """When ``task_id`` was sent, relative to each fault (for a task that went missing)."""
    sent = load.sent_at.get(task_id)
    if sent is None:
        return f"{task_id}: never sent"
    return f"{task_id} sent " + ", ".join(f"{sent - at:+.2f} s from {name}" for name, at in faults.wall.items())
