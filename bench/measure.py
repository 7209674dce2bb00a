"""Measuring one worker: queue a backlog, time completions, sample CPU and memory; the machine's description."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.servers import Stack
from bench.workers import JEMALLOC, BenchWorker, Variant, worker_environment
from forwarder.tasks import TASK_NAME

ROOT = Path(__file__).resolve().parent.parent


class Completions:
    """Counts finished tasks from the result backend's pub/sub (one message per stored state)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("celery-task-meta-*")
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="completions", daemon=True)
        self._thread.start()

    @property
    def count(self) -> int:
        return len(self.times)

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.5)
            if not message:
                continue
            status = json.loads(message["data"]).get("status")
            if status in ("SUCCESS", "FAILURE", "REVOKED"):
                self.failures += status != "SUCCESS"
                self.times.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


#: Seconds without a completion, with 99 % seen, after which a run counts as done.
STALL_S = 10.0

#: Worker log text meaning an ack failed or a connection pool ran out.
POOL_ERRORS = ("Couldn't ack", "could not ack", "MaxConnectionsError", "Too many connections",
               "pop from empty list", "I/O operation on closed file")


def queue_tasks(stack: Stack, queue: str, count: int) -> float:
    """Queue ``count`` tasks as llm-engine's gateway sends them; returns the tasks/s of sending."""
    from devtools.demo import producer

    app = producer(f"{stack.redis.url}/0", "disabled://")  # no result subscriptions in the producer
    started = time.monotonic()
    with app.producer_or_acquire() as publisher:
        for index in range(count):
            request = {"args": {"id": index, "prompt": f"benchmark request {index}"}, "return_pickled": False}
            app.send_task(TASK_NAME, args=[request, datetime.now(), False], kwargs={}, queue=queue,
                          expires=86400, producer=publisher)
    elapsed = time.monotonic() - started
    app.close()
    return count / elapsed


def measure(
    stack: Stack,
    variant: Variant,
    tasks: int,
    model_url: str,
    *,
    memory_at: Iterable[float] = (0.5, 0.85),
    rss_every: int = 0,
    window: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``tasks`` queued tasks through a fresh worker of ``variant``; returns what was measured.

    Throughput counts the completions between the 10 % and 90 % marks, or between the ``window``
    completions (1-based: from the ``window[0]``-th to the ``window[1]``-th).
    """
    queue = f"bench-{uuid.uuid4().hex[:10]}"
    send_rate = queue_tasks(stack, queue, tasks)
    completions = Completions(f"{stack.redis.url}/1")
    worker = BenchWorker(worker_environment(stack, variant, queue, model_url), variant.program, ddtrace=variant.ddtrace)
    callbacks_before = stack.callbacks_received()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        worker.start(timeout=90)
    except BaseException:  # never leave a worker that did not come up running
        worker.kill()
        completions.close()
        raise
    ready_s = time.monotonic() - started
    marks = {"low": int(tasks * 0.1), "high": int(tasks * 0.9)} if window is None else dict(zip(("low", "high"), window, strict=True))
    cpu: dict[str, tuple[int, float]] = {}
    memory_marks = sorted(int(tasks * f) for f in memory_at)
    memory: list[dict[str, float]] = []
    rss_samples: list[tuple[int, float]] = []
    next_rss = 0
    deadline = time.monotonic() + 120 + tasks / 5
    progress = (0, time.monotonic())  # (count, when it last moved)
    try:
        while completions.count < tasks:
            done = completions.count
            if done != progress[0]:
                progress = (done, time.monotonic())
            elif done >= tasks * 0.99 and time.monotonic() - progress[1] > STALL_S:
                # A completion message lost on the way (pub/sub under load): every mark is passed already.
                print(f"  ! {variant.label}: {done}/{tasks} completions seen, none for {STALL_S:.0f} s: counted as done")
                break
            if worker.process is not None and worker.process.poll() is not None:
                raise RuntimeError(f"{variant.label}: worker exited ({worker.process.returncode}):\n{worker.output[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant.label}: {done}/{tasks} tasks after {time.monotonic() - started:.0f} s")
            for name, mark in marks.items():
                if name not in cpu and done >= mark:
                    cpu[name] = (done, worker.cpu_seconds())
            if memory_marks and done >= memory_marks[0]:
                memory_marks.pop(0)
                memory.append(worker.memory())
            if rss_every and done >= next_rss:
                rss_samples.append((done, worker.rss()))
                next_rss = done + rss_every
            time.sleep(0.02)
        if "high" not in cpu:  # the mark is the last task: the loop ended before sampling it
            cpu["high"] = (completions.count, worker.cpu_seconds())
        if "callback" in variant.hooks:  # hooks run after the result is stored: let the last ones finish
            settle = time.monotonic() + 15
            while stack.callbacks_received() - callbacks_before < tasks and time.monotonic() < settle:
                time.sleep(0.1)
        if rss_every:
            rss_samples.append((completions.count, worker.rss()))
        if not memory:
            memory.append(worker.memory())
    finally:
        worker.kill()  # every task is done (or the run failed): no need to wait for a warm shutdown
        completions.close()
    times = completions.times
    low, high = marks["low"], min(marks["high"], len(times))
    throughput = (high - low) / (times[high - 1] - times[low - 1]) if high > low > 0 else tasks / (times[-1] - started)
    cpu_ms = None
    if "low" in cpu and "high" in cpu and cpu["high"][0] > cpu["low"][0]:
        cpu_ms = 1e3 * (cpu["high"][1] - cpu["low"][1]) / (cpu["high"][0] - cpu["low"][0])
    output = worker.output
    result = {
        "variant": {**asdict(variant)},
        "tasks": tasks,
        "failures": completions.failures,
        "tasks_per_s": throughput,
        "cpu_ms_per_task": cpu_ms,
        "memory_mb": {key: max(sample[key] for sample in memory) for key in ("rss", "uss", "pss", "processes")},
        "ready_s": ready_s,
        "wall_s": times[-1] - started,
        "send_tasks_per_s": send_rate,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "hook_failures": output.count("failed for task"),
        "pool_errors": sum(output.count(text) for text in POOL_ERRORS),
        "callbacks": stack.callbacks_received() - callbacks_before if "callback" in variant.hooks else None,
    }
    if rss_every:
        result["rss_samples"] = rss_samples
    if completions.failures or result["hook_failures"]:
        print(f"  ! {variant.label}: {completions.failures} failed tasks, {result['hook_failures']} hook failures; "
              f"last worker output:\n{output[-2000:]}")
    worker.log_path.unlink(missing_ok=True)
    return result


def slope_per_1000(samples: list[tuple[int, float]], warmup: int) -> float | None:
    """Least-squares slope of RSS (MB) against tasks done, per 1,000 tasks, after ``warmup`` tasks."""
    import numpy as np

    points = [(done, rss) for done, rss in samples if done >= warmup]
    if len(points) < 3:
        return None
    x = np.array([p[0] for p in points], dtype=float) / 1000.0
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu_model, "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(), "platform": platform.platform(), "git": commit + ("+dirty" if dirty else ""),
        "jemalloc": os.path.exists(JEMALLOC),
    }
