"""The cost section: what each part of the forwarder costs a task, against a bare Celery worker (``--only cost``).

Both pools (gevent at concurrency 16, prefork at 4) against the same 50 ms model. Per pool, every variant below
runs once per round, in an order rotated each round (drift on a shared machine hits all alike); each figure is the
median over the rounds, and the ratios are against bare Celery's medians of the same run:

- ``bare``: ``bench.bare_worker``, a bare Celery worker doing the same POST (Celery's defaults), the reference;
- ``bare, STARTED + late acks``: the same with the two settings llm-engine's protocol needs (the STARTED state
  stored, the ack after the result), which the forwarder always has: what Celery itself charges for them;
- ``off``: the forwarder with everything switchable off (no metrics, the task line below the log level, no
  delivery counter, no hooks, no tracing); the model-outage hold stays, it cannot be switched off;
- each part alone on top of ``off``: metrics with an agent listening (the bench's UDP sink, which also counts
  the datagrams), metrics with none (a closed port), the task log line, the delivery counter, tracing under
  ``ddtrace-run`` (spans to the bench's local trace agent), the callback and logging hooks (local receiver,
  moto's Firehose);
- ``defaults``: the forwarder as it ships, with an agent listening (metrics on, text task line at INFO,
  delivery counter on, no hooks, no tracing);
- ``all``: everything at once as production runs it: the defaults, JSON logs, both hooks, ``ddtrace-run``;
- with ``BENCH_BEFORE=<dir>``: the defaults again, running the forwarder of an earlier tree (before/after in
  the same rounds).

Figures: tasks/s (completions between the 10 % and 90 % marks), CPU ms per task (user + system over the
worker's processes, children included, between the same marks, over the tasks done between them), peak RSS
(summed over the processes, the higher of the samples at 50 % and 85 %).
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import measure
from bench.servers import Stack
from bench.workers import Variant
from devtools.servers import free_port

#: Everything that can be switched off, off.
OFF = {"FORWARDER_METRICS": "0", "CELERY_LOG_LEVEL": "WARNING", "FORWARDER_MAX_DELIVERIES": "0"}


@dataclass(frozen=True)
class CostPlan:
    pools: tuple[tuple[str, int], ...] = (("gevent", 16), ("prefork", 4))
    model_delay: float = 0.05
    tasks: int = 600
    rounds: int = 3


class UdpSink:
    """A DogStatsD stand-in in the bench process: takes every datagram and counts datagrams and metric lines."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.datagrams = 0
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dogstatsd-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams += 1
            self.lines += data.count(b"\n") + (not data.endswith(b"\n"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def variants(pool: str, concurrency: int, sink_port: int) -> list[Variant]:
    agent = {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(sink_port)}
    nobody = {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(free_port())}
    hooks = ("callback", "logging")

    def v(name: str, program: str = "forwarder", env: dict[str, str] | None = None, **kw: Any) -> Variant:
        return Variant(name, program=program, pool=pool, concurrency=concurrency, env=env or {}, **kw)

    return [
        v("bare", program="bare"),
        v("bare, STARTED + late acks", program="bare", env={"BARE_MIRROR": "track_started,acks_late"}),
        v("off", env=OFF),
        v("metrics, agent", env={**OFF, "FORWARDER_METRICS": "1", **agent}),
        v("metrics, no agent", env={**OFF, "FORWARDER_METRICS": "1", **nobody}),
        v("task log line", env={**OFF, "CELERY_LOG_LEVEL": "INFO"}),
        v("delivery counter", env={**OFF, "FORWARDER_MAX_DELIVERIES": "3"}),
        v("tracing (ddtrace-run)", env=OFF, ddtrace=True),
        v("hooks (callback, logging)", env=OFF, hooks=hooks),
        v("defaults, agent", env=agent),
        v("all on (production)", env={**agent, "FORWARDER_LOG_FORMAT": "json"}, hooks=hooks, ddtrace=True),
        *before(v, agent),
    ]


def before(v: Any, agent: dict[str, str]) -> list[Variant]:
    """``BENCH_BEFORE=<dir>`` (a checkout of an earlier commit, say ``git archive <commit> | tar -x -C <dir>``):
    its forwarder with the defaults, in the same rounds (the worker imports that tree's code instead)."""
    tree = os.environ.get("BENCH_BEFORE", "")
    if not tree:
        return []
    label = os.environ.get("BENCH_BEFORE_LABEL", Path(tree).name)
    return [v(f"defaults, agent: {label}", env={**agent, "PYTHONPATH": tree, "BENCH_CWD": tree})]


def run_cost(stack: Stack, plan: CostPlan, log: Any) -> dict[str, Any]:
    url = stack.model_url(plan.model_delay)
    sink = UdpSink()
    rows: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    try:
        for pool, concurrency in plan.pools:
            order = variants(pool, concurrency, sink.port)
            runs: dict[str, list[dict[str, Any]]] = {variant.label: [] for variant in order}
            for rnd in range(plan.rounds):
                shift = (rnd * 3) % len(order)  # rotated: no variant always first or last
                for variant in order[shift:] + order[:shift]:
                    before = (sink.datagrams, sink.lines)
                    try:
                        result = measure(stack, variant, plan.tasks, url)
                    except (TimeoutError, RuntimeError) as exc:  # a noisy machine: one failed run is not a result
                        log(f"cost {pool}-{concurrency} {variant.label} #{rnd + 1}: failed ({exc}); again")
                        result = measure(stack, variant, plan.tasks, url)
                    result.update(round=rnd, pool=pool, concurrency=concurrency,
                                  datagrams=sink.datagrams - before[0], metric_lines=sink.lines - before[1])
                    rows.append(result)
                    runs[variant.label].append(result)
                    log(f"cost {pool}-{concurrency} {variant.label} #{rnd + 1}: {result['tasks_per_s']:.1f} tasks/s, "
                        f"{result['cpu_ms_per_task'] or 0:.2f} CPU ms/task, RSS {result['memory_mb']['rss']:.0f} MB"
                        + (f", {result['datagrams']} datagrams / {result['metric_lines']} lines"
                           if result["datagrams"] else ""))
            medians = {
                label: {
                    "tasks_per_s": statistics.median(r["tasks_per_s"] for r in results),
                    "cpu_ms_per_task": statistics.median(r["cpu_ms_per_task"] or 0.0 for r in results),
                    "rss_mb": statistics.median(r["memory_mb"]["rss"] for r in results),
                    "datagrams_per_task": statistics.median(r["datagrams"] / r["tasks"] for r in results),
                    "tasks_per_s_all": [round(r["tasks_per_s"], 1) for r in results],
                    "cpu_ms_per_task_all": [round(r["cpu_ms_per_task"] or 0.0, 3) for r in results],
                }
                for label, results in runs.items()
            }
            bare = medians["bare"]
            off = medians["off"]
            for m in medians.values():
                m["tasks_per_s_vs_bare"] = m["tasks_per_s"] / bare["tasks_per_s"]
                m["cpu_vs_bare"] = m["cpu_ms_per_task"] / bare["cpu_ms_per_task"] if bare["cpu_ms_per_task"] else None
                m["rss_vs_bare"] = m["rss_mb"] / bare["rss_mb"]
                m["tasks_per_s_vs_off"] = m["tasks_per_s"] / off["tasks_per_s"]
                m["cpu_vs_off"] = m["cpu_ms_per_task"] / off["cpu_ms_per_task"] if off["cpu_ms_per_task"] else None
            groups.append({"pool": pool, "concurrency": concurrency, "order": [v.label for v in order],
                           "medians": medians})
    finally:
        sink.close()
    return {
        "model_delay_s": plan.model_delay, "tasks": plan.tasks, "rounds": plan.rounds, "rows": rows, "groups": groups,
        "target": "defaults with an agent >= 0.95x bare tasks/s and CPU/task <= 1.15x bare (both pools); "
                  "metrics with no agent <= 3% vs off",
    }
