"""Benchmarks: ``python -m bench.run [--only pools|overhead|soak ...] [--quick]`` (``make bench``, ``make soak``).

Each run starts its own servers (Redis-protocol server, model server(s), moto with a Firehose stream, a
callback receiver: each in its own process) and launches workers as production does (``python -m
forwarder`` through ``devtools.servers.WorkerProcess``). Each measured configuration gets a fresh
worker and queue; its tasks are queued BEFORE the worker starts (a backlog: the worker, not the
producer, is the bottleneck), and completions are timed from the result backend's own pub/sub
messages. Throughput counts the completions between 10 % and 90 % of the tasks (no start-up, no tail).

Sections (side by side in the same run, reported as ratios):
- pools: gevent vs prefork at concurrency 4, 16, 32 with a 100 ms model: tasks/s, and worker memory
  (RSS, USS, PSS summed over the main process and its children, the highest of samples at 50 % and 85 %).
- overhead: the forwarder vs ``bench.bare_worker`` (a bare Celery worker doing only the POST), same
  pool, concurrency and servers, logging hook off and on, with an instant model (the worst case for
  per-task overhead); tasks/s and worker CPU ms per task.
- soak: 20,000 tasks with the callback and logging hooks on, per pool; worker RSS sampled as tasks
  complete, slope in MB per 1,000 tasks after the first 2,000. Negative control: ``bench.leaky_worker``
  (a Firehose client built per put). Also prefork with MALLOC_ARENA_MAX=2 and with jemalloc.

Outputs: bench/results/<section>.json and <section>.png, plus summary.md (``--quick``: under
bench/results/quick/). Numbers from one shared 2-core machine: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.servers import ROLE_ARN, Stack
from devtools.servers import WorkerProcess, worker_env
from forwarder.tasks import TASK_NAME

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SECTIONS = ("pools", "overhead", "soak")
#: Environment a bench worker must not inherit from the shell running the bench.
SCRUBBED = ("MALLOC_ARENA_MAX", "LD_PRELOAD", "PYTHONTRACEMALLOC", "FORWARDER_MEMORY_DEBUG", "FORWARDER_HOOKS",
            "CELERY_WORKER_PREFETCH_MULTIPLIER", "CELERY_WORKER_MAX_TASKS_PER_CHILD", "CELERY_WORKER_MAX_MEMORY_PER_CHILD")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (full or --quick)."""

    pool_concurrency: tuple[int, ...] = (4, 16, 32)
    pool_seconds: float = 20.0  # work queued per configuration, at the expected rate
    pool_model_delay: float = 0.1
    overhead_concurrency: int = 8
    overhead_tasks: int = 2500
    overhead_reps: int = 3
    overhead_model_delay: float = 0.0
    soak_concurrency: int = 4
    soak_tasks: int = 20_000
    soak_warmup: int = 2_000
    soak_sample_every: int = 200
    leaky_tasks: int = 4_000  # ~9 tasks/s: a client per put costs ~0.2 CPU s
    leaky_retained_tasks: int = 400  # every session and client kept (~8 MB each): RSS grows by the GB
    soak_model_delay: float = 0.0


QUICK = Plan(
    pool_concurrency=(4, 32), pool_seconds=3.0, overhead_tasks=250, overhead_reps=1, soak_tasks=800,
    soak_warmup=200, soak_sample_every=50, leaky_tasks=200, leaky_retained_tasks=100,
)


# ------------------------------------------------------------------------------------------ workers


@dataclass(frozen=True)
class Variant:
    """One worker configuration: which program, pool, concurrency, hooks and extra environment."""

    label: str
    program: str = "forwarder"  # forwarder | bare | leaky
    pool: str = "prefork"
    concurrency: int = 4
    hooks: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


class BenchWorker(WorkerProcess):
    """A worker launched like production, running the forwarder or one of the bench-only programs."""

    MODULES = {"forwarder": "forwarder", "bare": "bench.bare_worker", "leaky": "bench.leaky_worker"}
    READY = {"forwarder": "forwarder ready", "bare": "bare worker ready", "leaky": "forwarder ready"}

    def __init__(self, env: dict[str, str], program: str) -> None:
        super().__init__(env)
        self.program = program

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.MODULES[self.program]]

    def start(self, wait_ready: bool = True, timeout: float = 60) -> BenchWorker:
        super().start(wait_ready=False)
        if wait_ready:
            self.wait_for_log(self.READY[self.program], timeout)
        return self

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.pid), *self.children()]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> float:
        """RSS in MB summed over the worker's processes (cheap: /proc/<pid>/statm)."""
        total = 0.0
        for process in self.processes():
            try:
                total += process.memory_info().rss / 1e6
            except psutil.NoSuchProcess:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


def worker_environment(stack: Stack, variant: Variant, queue: str, model_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith(("AWS_", "FIREHOSE_"))}
    env = worker_env(
        base,
        CELERY_WORKER_POOL=variant.pool,
        CELERY_BROKER_URL=f"{stack.redis.url}/0",
        CELERY_RESULT_BACKEND=f"{stack.redis.url}/1",
        CELERY_QUEUE=queue,
        CELERY_WORKER_CONCURRENCY=str(variant.concurrency),
        FORWARDER_MODEL_URL=f"{model_url}/predict",
        FORWARDER_HEALTHCHECK_URL=f"{model_url}/readyz",
        FORWARDER_READY_TIMEOUT="30",
        **stack.aws_env(),
    )
    if variant.hooks:
        env["FORWARDER_HOOKS"] = ",".join(variant.hooks)
    if "logging" in variant.hooks:
        env.update(FIREHOSE_STREAM_NAME=stack.stream, FORWARDER_ENDPOINT_NAME="bench", FORWARDER_ENDPOINT_ID="end_bench")
    if "callback" in variant.hooks:
        env.update(
            FORWARDER_CALLBACK_URL=f"{stack.receiver.url}/callback",
            FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        )
    env.update(variant.env)
    return env


# ------------------------------------------------------------------------------------- measurement


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
) -> dict[str, Any]:
    """Run ``tasks`` queued tasks through a fresh worker of ``variant``; returns what was measured."""
    queue = f"bench-{uuid.uuid4().hex[:10]}"
    send_rate = queue_tasks(stack, queue, tasks)
    completions = Completions(f"{stack.redis.url}/1")
    worker = BenchWorker(worker_environment(stack, variant, queue, model_url), variant.program)
    callbacks_before = stack.callbacks_received()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    worker.start(timeout=90)
    ready_s = time.monotonic() - started
    marks = {"low": int(tasks * 0.1), "high": int(tasks * 0.9)}
    cpu: dict[str, tuple[int, float]] = {}
    memory_marks = sorted(int(tasks * f) for f in memory_at)
    memory: list[dict[str, float]] = []
    rss_samples: list[tuple[int, float]] = []
    next_rss = 0
    deadline = time.monotonic() + 120 + tasks / 5
    try:
        while completions.count < tasks:
            done = completions.count
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
    low, high = marks["low"], marks["high"]
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


# ----------------------------------------------------------------------------------------- sections


def log(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


def run_pools(stack: Stack, plan: Plan) -> dict[str, Any]:
    url = stack.model_url(plan.pool_model_delay)
    rows = []
    for concurrency in plan.pool_concurrency:
        expected = min(concurrency / plan.pool_model_delay, 250) if plan.pool_model_delay else 250
        tasks = max(100, int(expected * plan.pool_seconds))
        for pool in ("prefork", "gevent"):
            variant = Variant(f"{pool}-{concurrency}", pool=pool, concurrency=concurrency)
            result = measure(stack, variant, tasks, url)
            rows.append(result)
            m = result["memory_mb"]
            log(f"pools {variant.label}: {result['tasks_per_s']:.1f} tasks/s, RSS {m['rss']:.0f} MB, "
                f"USS {m['uss']:.0f} MB, PSS {m['pss']:.0f} MB over {m['processes']:.0f} processes")
    ratios = []
    for concurrency in plan.pool_concurrency:
        pre = next(r for r in rows if r["variant"]["label"] == f"prefork-{concurrency}")
        gev = next(r for r in rows if r["variant"]["label"] == f"gevent-{concurrency}")
        ratios.append({
            "concurrency": concurrency,
            "gevent_vs_prefork_tasks_per_s": gev["tasks_per_s"] / pre["tasks_per_s"],
            **{f"gevent_vs_prefork_{key}": gev["memory_mb"][key] / pre["memory_mb"][key] for key in ("rss", "uss", "pss")},
        })
    return {"model_delay_s": plan.pool_model_delay, "rows": rows, "ratios": ratios,
            "target": "gevent memory <= 0.1 x prefork at concurrency 32"}


#: The overhead comparison: the forwarder, a bare Celery worker with Celery's defaults, and the same bare
#: worker with the two settings llm-engine's protocol needs (STARTED state, ack after the result).
OVERHEAD_PROGRAMS = (
    ("forwarder", "forwarder", {}),
    ("bare", "bare", {}),
    ("bare-protocol", "bare", {"BARE_MIRROR": "track_started,acks_late"}),
)


def run_overhead(stack: Stack, plan: Plan) -> dict[str, Any]:
    import statistics

    url = stack.model_url(plan.overhead_model_delay)
    rows, groups = [], []
    for pool in ("prefork", "gevent"):
        for hooks in ((), ("logging",)):
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in OVERHEAD_PROGRAMS}
            for rep in range(plan.overhead_reps):  # interleaved, so drift on a shared machine hits all alike
                # ... and rotated, so no program always runs first (on the coldest caches) or last.
                shift = rep % len(OVERHEAD_PROGRAMS)
                for name, program, env in OVERHEAD_PROGRAMS[shift:] + OVERHEAD_PROGRAMS[:shift]:
                    label = f"{name}-{pool}-{'logging' if hooks else 'nohooks'}"
                    variant = Variant(label, program=program, pool=pool, concurrency=plan.overhead_concurrency,
                                      hooks=hooks, env=env)
                    result = measure(stack, variant, plan.overhead_tasks, url)
                    result["rep"] = rep
                    rows.append(result)
                    runs[name].append(result)
                    log(f"overhead {label} #{rep + 1}: {result['tasks_per_s']:.1f} tasks/s, "
                        f"{result['cpu_ms_per_task'] or 0:.2f} CPU ms/task")
            median = {
                name: {
                    "tasks_per_s": statistics.median(r["tasks_per_s"] for r in results),
                    "cpu_ms_per_task": statistics.median(r["cpu_ms_per_task"] or 0 for r in results),
                }
                for name, results in runs.items()
            }
            fwd = median["forwarder"]
            groups.append({
                "pool": pool, "hooks": ",".join(hooks) or "none", "median": median,
                **{f"forwarder_vs_{name}_tasks_per_s": fwd["tasks_per_s"] / median[name]["tasks_per_s"]
                   for name in ("bare", "bare-protocol")},
                **{f"forwarder_vs_{name}_cpu_per_task": fwd["cpu_ms_per_task"] / (median[name]["cpu_ms_per_task"] or 1)
                   for name in ("bare", "bare-protocol")},
            })
    return {"model_delay_s": plan.overhead_model_delay, "concurrency": plan.overhead_concurrency,
            "tasks": plan.overhead_tasks, "reps": plan.overhead_reps, "rows": rows, "ratios": groups,
            "target": "forwarder >= 0.9 x bare throughput"}


def soak_variants(plan: Plan) -> list[tuple[Variant, int]]:
    hooks = ("callback", "logging")
    role = {"FIREHOSE_ROLE_ARN": ROLE_ARN}
    c = plan.soak_concurrency
    variants = [
        (Variant("gevent", pool="gevent", concurrency=c, hooks=hooks, env=role), plan.soak_tasks),
        (Variant("prefork", pool="prefork", concurrency=c, hooks=hooks, env=role), plan.soak_tasks),
        (Variant("prefork MALLOC_ARENA_MAX=2", pool="prefork", concurrency=c, hooks=hooks,
                 env={**role, "MALLOC_ARENA_MAX": "2"}), plan.soak_tasks),
    ]
    if os.path.exists(JEMALLOC):
        variants.append((Variant("prefork jemalloc", pool="prefork", concurrency=c, hooks=hooks,
                                 env={**role, "LD_PRELOAD": JEMALLOC}), plan.soak_tasks))
    else:
        log(f"soak: {JEMALLOC} missing (apt-get install libjemalloc2): jemalloc variant skipped")
    variants.append((Variant("leaky prefork (client per put)", program="leaky", pool="prefork", concurrency=c,
                             hooks=hooks, env=role), plan.leaky_tasks))
    variants.append((Variant("leaky prefork (client per put, kept by lru_cache)", program="leaky", pool="prefork",
                             concurrency=c, hooks=hooks, env={**role, "LEAKY_RETAIN": "1"}),
                     plan.leaky_retained_tasks))
    return variants


def run_soak(stack: Stack, plan: Plan) -> dict[str, Any]:
    url = stack.model_url(plan.soak_model_delay)
    rows = []
    for variant, tasks in soak_variants(plan):
        warmup = min(plan.soak_warmup, tasks // 3)
        # At least ~20 samples per variant, so a short control still gets a slope.
        every = min(plan.soak_sample_every, max(10, tasks // 20))
        result = measure(stack, variant, tasks, url, rss_every=every)
        result["warmup_tasks"] = warmup
        result["slope_mb_per_1000"] = slope_per_1000(result["rss_samples"], warmup)
        samples = result["rss_samples"]
        result["rss_start_mb"], result["rss_end_mb"] = samples[0][1], samples[-1][1]
        result["rss_warm_mb"] = next((rss for done, rss in samples if done >= warmup), samples[-1][1])
        rows.append(result)
        log(f"soak {variant.label}: {tasks} tasks at {result['tasks_per_s']:.1f} tasks/s, RSS "
            f"{samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB, slope {result['slope_mb_per_1000']:.3f} MB/1000 tasks "
            f"after {warmup}, callbacks {result['callbacks']}, hook failures {result['hook_failures']}")
    by_label = {r["variant"]["label"]: r for r in rows}
    base = by_label.get("prefork")
    ratios: dict[str, Any] = {}
    for leaky in (r for r in rows if r["variant"]["program"] == "leaky"):
        if base and base["slope_mb_per_1000"] is not None and leaky["slope_mb_per_1000"] is not None:
            # A ratio only means something when the real worker's slope is clearly above zero.
            ratios[leaky["variant"]["label"]] = {
                "minus_prefork_slope": leaky["slope_mb_per_1000"] - base["slope_mb_per_1000"],
                "vs_prefork_slope": (leaky["slope_mb_per_1000"] / base["slope_mb_per_1000"]
                                     if base["slope_mb_per_1000"] > 0.01 else None),
            }
    return {"model_delay_s": plan.soak_model_delay, "concurrency": plan.soak_concurrency, "rows": rows,
            "ratios": ratios, "target": "slope < 0.1 MB per 1,000 tasks after the first 2,000; leaky clearly larger"}


# ---------------------------------------------------------------------------------------- reporting


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


def plot(section: str, data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if section == "pools":
        rows = {r["variant"]["label"]: r for r in data["rows"]}
        conc = [r["concurrency"] for r in data["ratios"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.38
        xs = range(len(conc))
        for offset, pool in ((-width / 2, "prefork"), (width / 2, "gevent")):
            axes[0].bar([x + offset for x in xs], [rows[f"{pool}-{c}"]["tasks_per_s"] for c in conc], width, label=pool)
        axes[0].set(title=f"throughput, {data['model_delay_s'] * 1e3:.0f} ms model", xlabel="concurrency",
                    ylabel="tasks/s", xticks=list(xs), xticklabels=[str(c) for c in conc])
        axes[0].legend()
        for i, key in enumerate(("rss", "uss", "pss")):
            w = width / 1.5
            for j, pool in enumerate(("prefork", "gevent")):
                axes[1].bar([x + (i - 1) * w + (j - 0.5) * w / 2 for x in xs],
                            [rows[f"{pool}-{c}"]["memory_mb"][key] for c in conc], w / 2,
                            label=f"{pool} {key.upper()}", color=f"C{j}", alpha=1 - 0.28 * i)
        axes[1].set(title="worker memory, summed over processes", xlabel="concurrency", ylabel="MB",
                    xticks=list(xs), xticklabels=[str(c) for c in conc], yscale="log")
        axes[1].legend(fontsize=7, ncol=3, loc="upper left")
    elif section == "overhead":
        fig, ax = plt.subplots(figsize=(10, 4.5))
        groups = data["ratios"]
        names = [name for name, _, _ in OVERHEAD_PROGRAMS]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ax.bar([i + (j - 1) * width for i in range(len(groups))],
                   [group["median"][name]["tasks_per_s"] for group in groups], width, label=name)
        for i, group in enumerate(groups):
            ax.annotate(f"{group['forwarder_vs_bare_tasks_per_s']:.2f}x / {group['forwarder_vs_bare-protocol_tasks_per_s']:.2f}x",
                        (i, max(group["median"][n]["tasks_per_s"] for n in names)), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8)
        ax.set(title=f"forwarder vs bare Celery (median of {data['reps']}), concurrency {data['concurrency']}, "
                     f"{data['model_delay_s'] * 1e3:.0f} ms model; ratios vs bare / bare-protocol",
               ylabel="tasks/s", xticks=list(range(len(groups))),
               xticklabels=[f"{g['pool']}\nlogging hook {'on' if g['hooks'] != 'none' else 'off'}" for g in groups])
        ax.title.set_fontsize(9)
        ax.legend(loc="lower right")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for row in data["rows"]:
            samples = row["rss_samples"]
            label = f"{row['variant']['label']} ({row['slope_mb_per_1000']:+.3f} MB/1k)"
            axes[0].plot([s[0] for s in samples], [s[1] for s in samples], label=label)
            base = next((s[1] for s in samples if s[0] >= row["warmup_tasks"]), samples[0][1])
            axes[1].plot([s[0] for s in samples], [s[1] - base for s in samples], label=row["variant"]["label"])
        # Log scales: the retained-client control grows by GB while the real pools move by tenths of a MB.
        axes[0].set(title="worker RSS (sum over processes), both hooks on", xlabel="tasks done", ylabel="MB (log)",
                    yscale="log")
        axes[1].set(title="RSS change since the end of warm-up", xlabel="tasks done", ylabel="MB (symlog, linear within ±1)")
        axes[1].set_yscale("symlog", linthresh=1.0)
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    if "pools" in sections:
        data = sections["pools"]
        rows = {r["variant"]["label"]: r for r in data["rows"]}
        lines += [f"### pools ({data['model_delay_s'] * 1e3:.0f} ms model)", "",
                  "| concurrency | prefork tasks/s | gevent tasks/s | prefork RSS / USS / PSS MB | gevent RSS / USS / PSS MB "
                  "| gevent/prefork RSS | USS | PSS |", "|---|---|---|---|---|---|---|---|"]
        for ratio in data["ratios"]:
            c = ratio["concurrency"]
            pre, gev = rows[f"prefork-{c}"], rows[f"gevent-{c}"]
            mem = lambda r: " / ".join(f"{r['memory_mb'][k]:.0f}" for k in ("rss", "uss", "pss"))  # noqa: E731
            lines.append(f"| {c} | {pre['tasks_per_s']:.1f} | {gev['tasks_per_s']:.1f} | {mem(pre)} | {mem(gev)} | "
                         f"{ratio['gevent_vs_prefork_rss']:.3f} | {ratio['gevent_vs_prefork_uss']:.3f} | "
                         f"{ratio['gevent_vs_prefork_pss']:.3f} |")
        lines.append("")
    if "overhead" in sections:
        data = sections["overhead"]
        lines += [f"### overhead (concurrency {data['concurrency']}, {data['model_delay_s'] * 1e3:.0f} ms model, "
                  f"{data['tasks']} tasks, median of {data['reps']})", "",
                  "| pool | logging hook | forwarder tasks/s | bare tasks/s | bare-protocol tasks/s | forwarder / bare "
                  "| forwarder / bare-protocol | CPU ms/task forwarder / bare / bare-protocol |",
                  "|---|---|---|---|---|---|---|---|"]
        for group in data["ratios"]:
            m = group["median"]
            lines.append(
                f"| {group['pool']} | {'on' if group['hooks'] != 'none' else 'off'} | {m['forwarder']['tasks_per_s']:.1f} | "
                f"{m['bare']['tasks_per_s']:.1f} | {m['bare-protocol']['tasks_per_s']:.1f} | "
                f"{group['forwarder_vs_bare_tasks_per_s']:.2f}x | {group['forwarder_vs_bare-protocol_tasks_per_s']:.2f}x | "
                + " / ".join(f"{m[n]['cpu_ms_per_task']:.2f}" for n in ("forwarder", "bare", "bare-protocol")) + " |"
            )
        lines.append("")
    if "soak" in sections:
        data = sections["soak"]
        lines += [f"### soak (callback + logging hooks, concurrency {data['concurrency']}, "
                  f"{data['model_delay_s'] * 1e3:.0f} ms model)", "",
                  "| variant | tasks | tasks/s | RSS MB: start / after warm-up / end | slope MB per 1,000 tasks after warm-up "
                  "| warm-up tasks | callbacks | hook failures |", "|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            lines.append(f"| {row['variant']['label']} | {row['tasks']} | {row['tasks_per_s']:.1f} | "
                         f"{row['rss_start_mb']:.0f} / {row['rss_warm_mb']:.0f} / {row['rss_end_mb']:.0f} | "
                         f"{row['slope_mb_per_1000']:+.3f} | "
                         f"{row['warmup_tasks']} | {row['callbacks']} | {row['hook_failures']} |")
        base = next((r for r in data["rows"] if r["variant"]["label"] == "prefork"), None)
        for leaky in (r for r in data["rows"] if r["variant"]["program"] == "leaky" and base):
            positive = base["slope_mb_per_1000"] > 0.01 and leaky["slope_mb_per_1000"] > 0
            ratio = leaky["slope_mb_per_1000"] / base["slope_mb_per_1000"] if positive else None
            runners = base["variant"]["concurrency"] if base["variant"]["pool"] == "prefork" else 1
            per_process = (leaky["rss_warm_mb"] - base["rss_warm_mb"]) / runners
            lines += [
                "",
                f"{leaky['variant']['label']} vs prefork: slope {leaky['slope_mb_per_1000']:+.3f} vs {base['slope_mb_per_1000']:+.3f} "
                f"MB per 1,000 tasks" + (f" ({ratio:,.1f}x)" if ratio else " (no meaningful ratio)")
                + (f" = {leaky['slope_mb_per_1000'] / 1000:.1f} MB kept per task" if leaky["slope_mb_per_1000"] >= 100 else "")
                + f"; RSS after warm-up {leaky['rss_warm_mb']:.0f} vs {base['rss_warm_mb']:.0f} MB "
                f"({leaky['rss_warm_mb'] / base['rss_warm_mb']:.2f}x, {per_process:+.0f} MB per process running tasks); "
                f"throughput {leaky['tasks_per_s']:.1f} vs {base['tasks_per_s']:.1f} tasks/s "
                f"({leaky['tasks_per_s'] / base['tasks_per_s']:.2f}x)",
            ]
        lines.append("")
    return "\n".join(lines)


def run_sections(sections: Iterable[str], plan: Plan, meta: dict[str, Any], out: Path) -> None:
    with Stack() as stack:
        for section in sections:
            data = RUNNERS[section](stack, plan)
            data["meta"] = {**meta, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                            "loadavg_end": os.getloadavg()}
            (out / f"{section}.json").write_text(json.dumps(data, indent=1, default=str))
            plot(section, data, out / f"{section}.png")


RUNNERS: dict[str, Callable[[Stack, Plan], dict[str, Any]]] = {
    "pools": run_pools, "overhead": run_overhead, "soak": run_soak,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run (~2 min); results in results/quick/")
    parser.add_argument("--report", action="store_true", help="measure nothing: redraw plots and summary.md from the JSON")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "command": command.strip(),
            "quick": args.quick, "plan": asdict(plan), "machine": machine(), "loadavg_start": os.getloadavg()}
    log(f"bench: {meta['machine']['cpus']} CPUs, load {meta['loadavg_start'][0]:.2f}; sections {args.only or list(SECTIONS)}")
    began = time.monotonic()
    if args.report:
        for section in args.only or SECTIONS:
            if (out / f"{section}.json").exists():
                plot(section, json.loads((out / f"{section}.json").read_text()), out / f"{section}.png")
    else:
        run_sections(args.only or SECTIONS, plan, meta, out)
    # The summary covers every section's latest results in ``out``, whichever run produced them.
    latest = {name: json.loads((out / f"{name}.json").read_text()) for name in SECTIONS if (out / f"{name}.json").exists()}
    header = "\n".join(f"<!-- {name}: {data['meta']['command']} | {data['meta']['started']} | git {data['meta']['machine']['git']} -->"
                       for name, data in latest.items())
    text = summary(latest)
    (out / "summary.md").write_text(f"{header}\n\n{text}")
    print("\n" + text)
    log(f"bench: done in {time.monotonic() - began:.0f} s; results in {out.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
