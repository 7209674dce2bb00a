"""Capacity: how KEDA scales worker replicas on queue depth (``simulate``), and the command line of the plan
(what a workload needs: ``bench/capacity_plan.py``).

``python -m bench.capacity`` (``make capacity``) simulates a burst and a steady load under three KEDA metric
variants and writes bench/results/capacity.json and capacity.png; ``--plan RPS LATENCY_S [PAYLOAD_BYTES]``
prints the sizing table of one workload for both pools, ``--examples`` the worked examples of
docs/CAPACITY.md. Pure Python (matplotlib for the plot), seconds to run, deterministic for a given ``--seed``.

What is MEASURED comes from bench/results/*.json (sizing: memory and ready time; scale: the CPU ceiling and
CPU per task) and is read from there; everything else is MODELLED and says so: the autoscaler is a model of
KEDA and the HPA controller's documented algorithm, not a cluster.

The simulation, in brief. Tasks wait in the broker's list; a ready replica takes messages while it holds fewer
than its window (prefork: concurrency x prefetch multiplier; gevent: concurrency + 1, see ``held_limit``)
and runs up to ``concurrency`` at once, each for a model latency drawn per task, starting at most
``ceiling`` tasks per second (one process's CPU). KEDA's triggers read the queue every sync; the HPA turns
each into ``ceil(metric / target)`` replicas (within 10 % of the current count: no change), takes the largest,
stabilises (scale-down: the highest recommendation of the last 300 s) and rate-limits (scale-up: the larger of
+4 pods and +100 % per 15 s). A new replica consumes after its start-up; a removed one does a warm shutdown:
it takes nothing more, hands its messages not started back to the list and finishes its running tasks.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.capacity_plan import EXAMPLES, RESULTS, ROOT, Policy, measured, plan, plan_table

Z95 = 1.6448536269514722  # the standard normal's 95th percentile: a lognormal's p95 = median x exp(Z95 sigma)


# -------------------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Latency:
    """The model's latency per task: lognormal from its median and p95, or ``fixed`` seconds."""

    median_s: float = 5.0
    p95_s: float = 15.0
    fixed: bool = False

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        if self.fixed:
            return lambda: self.median_s
        sigma = math.log(self.p95_s / self.median_s) / Z95
        mu = math.log(self.median_s)
        return lambda: rng.lognormvariate(mu, sigma)


@dataclass(frozen=True)
class Workers:
    """One replica: pool, slots, prefetch, CPU ceiling, start-up (MODELLED pod start + MEASURED worker ready)."""

    pool: str = "gevent"
    concurrency: int = 32
    prefetch_multiplier: int = 0  # 0: the worker's default (prefork 1, gevent 2)
    ceiling: float = 0.0  # tasks started per second per replica; 0: unlimited (prefork: concurrency / latency)
    pod_start_s: float = 30.0  # MODELLED: scheduling on a node with room, a cached image, the model server ready
    worker_ready_s: float = 0.9  # MEASURED: bench/results/sizing.json, launch to ready line under ddtrace-run

    @property
    def start_s(self) -> float:
        return self.pod_start_s + self.worker_ready_s

    def held_limit(self) -> int:
        """Messages one replica takes from the list: running ones and those waiting in the worker.

        prefork: the prefetch window, concurrency x multiplier. gevent: its window is 2 x concurrency, but its
        consumer blocks in the pool's ``spawn()`` holding one message while every slot is busy
        (``forwarder/settings.py``, ``effective_prefetch_multiplier``), so it holds concurrency + 1.
        """
        multiplier = self.prefetch_multiplier or (2 if self.pool == "gevent" else 1)
        window = self.concurrency * multiplier
        return min(window, self.concurrency + 1) if self.pool == "gevent" else window


@dataclass(frozen=True)
class Rule:
    """An HPA scaling policy: ``kind`` "Pods" or "Percent", ``value`` per ``period_s``."""

    kind: str
    value: int
    period_s: float


@dataclass(frozen=True)
class Autoscaler:
    """KEDA's ScaledObject and the HPA it drives, MODELLED on their documented defaults (the main ones are flags)."""

    min_replicas: int = 1
    max_replicas: int = 30
    polling_s: float = 15.0  # KEDA pollingInterval: activation (0 <-> 1) checks
    sync_s: float = 15.0  # the HPA controller's --horizontal-pod-autoscaler-sync-period
    tolerance: float = 0.1
    cooldown_s: float = 300.0  # KEDA cooldownPeriod: inactive this long -> 0 replicas (min_replicas 0 only)
    activation: float = 0.0  # a trigger is active above this
    up_window_s: float = 0.0
    # Kubernetes' defaults (pkg/apis/autoscaling/v2/defaults.go): 15 s periods (the API reference says 60 s).
    up_rules: tuple[Rule, ...] = (Rule("Pods", 4, 15.0), Rule("Percent", 100, 15.0))
    down_window_s: float = 300.0
    down_rules: tuple[Rule, ...] = (Rule("Percent", 100, 15.0),)
    datadog_lag_s: float = 30.0  # MODELLED: gauge every 5 s, DogStatsD 10 s flush, intake, the scaler's last point


@dataclass(frozen=True)
class Trigger:
    """One KEDA trigger: ``metric`` ("list", "in_flight" or "sqs") and its target per replica (AverageValue)."""

    metric: str
    target: float


@dataclass(frozen=True)
class Variant:
    """A ScaledObject's triggers: KEDA hands each to the HPA as one metric, and the HPA follows the largest."""

    name: str
    triggers: tuple[Trigger, ...]


def variants(concurrency: int) -> tuple[Variant, ...]:
    """The three KEDA set-ups compared: list length, list + in-flight (max of both), SQS with in-flight."""
    return (
        Variant("redis list length", (Trigger("list", concurrency),)),
        Variant("redis list + in-flight gauge", (Trigger("list", concurrency), Trigger("in_flight", 0.8 * concurrency))),
        Variant("sqs visible + in flight", (Trigger("sqs", concurrency),)),
    )


@dataclass(frozen=True)
class Load:
    """A burst of ``burst`` tasks at t=0, plus ``rate`` tasks/s (Poisson) for ``duration_s``."""

    burst: int = 10_000
    rate: float = 0.0
    duration_s: float = 0.0
    latency: Latency = field(default_factory=Latency)
    horizon_s: float = 7200.0  # stop here at the latest


@dataclass
class Replica:
    """One pod: its slots, the messages it holds, its life."""

    created: float
    ready: bool = False
    terminating: bool = False
    removed: float | None = None
    running: int = 0
    waiting: deque[tuple[float, float]] = field(default_factory=deque)  # (arrival, latency) taken, not started
    cpu_free: float = 0.0

    @property
    def held(self) -> int:
        return self.running + len(self.waiting)


class Simulation:
    """One run: tasks, replicas, the list and the autoscaler, driven by a heap of timed events."""

    def __init__(self, load: Load, workers: Workers, scaler: Autoscaler, variant: Variant, seed: int) -> None:
        self.load, self.workers, self.scaler, self.variant = load, workers, scaler, variant
        self.tasks = self._tasks(seed)  # (arrival, latency): the same for every variant of one seed
        self.total = len(self.tasks)
        self.queue: deque[tuple[float, float]] = deque()
        self.replicas: list[Replica] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.done = 0
        self.sojourn: list[float] = []
        self.busy_s = 0.0
        self.history: list[tuple[float, int]] = []  # (t, running) for the lagged in-flight gauge
        self.recommendations: list[tuple[float, int]] = []
        self.scale_events: list[tuple[float, int]] = []
        self.last_active = 0.0
        self.series: dict[str, list[float]] = {k: [] for k in ("t", "replicas", "ready", "list", "held", "running")}
        self.finished_at: float | None = None
        self.list_empty_at: float | None = None
        self.hold = workers.held_limit()
        self.cursor = 0
        self.end = 0.0

    # -- set-up

    def _tasks(self, seed: int) -> list[tuple[float, float]]:
        rng = random.Random(seed)
        draw = self.load.latency.sampler(rng)
        tasks = [(0.0, draw()) for _ in range(self.load.burst)]
        t = 0.0
        while self.load.rate > 0:
            t += rng.expovariate(self.load.rate)
            if t >= self.load.duration_s:
                break
            tasks.append((t, draw()))
        return tasks

    def at(self, t: float, kind: str, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    # -- the run

    def run(self) -> dict[str, Any]:
        for arrival, latency in self.tasks:
            if arrival == 0.0:
                self.queue.append((arrival, latency))
            else:
                self.at(arrival, "arrive", (arrival, latency))
        for _ in range(self.scaler.min_replicas):
            self.add_replica(0.0, ready_now=True)
        self.at(0.0, "sample")
        self.at(self.scaler.polling_s, "poll")
        self.at(self.scaler.sync_s, "sync")
        self.feed(0.0)
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            self.end = now
            if now > self.load.horizon_s or (kind == "sample" and self.settled(now)):
                self.record(now)  # the end state, so the curves end where the run did
                break
            getattr(self, f"on_{kind}")(now, data)
        return self.summary()

    def settled(self, now: float) -> bool:
        """All tasks done, the load over, back at min replicas with none starting or stopping."""
        pods = [r for r in self.replicas if r.removed is None]
        return (self.done == self.total and now >= self.load.duration_s
                and len(pods) == self.scaler.min_replicas and all(r.ready and not r.terminating for r in pods))

    # -- events

    def on_arrive(self, now: float, task: tuple[float, float]) -> None:
        self.queue.append(task)
        self.feed(now)

    def on_ready(self, now: float, replica: Replica) -> None:
        if replica.removed is None and not replica.terminating:
            replica.ready = True
            self.feed(now)

    def on_cpu(self, now: float, replica: Replica) -> None:
        self.start_tasks(now, replica)

    def on_done(self, now: float, item: tuple[Replica, float, float]) -> None:
        replica, arrival, latency = item
        replica.running -= 1
        self.done += 1
        self.busy_s += latency
        self.sojourn.append(now - arrival)
        if self.done == self.total:
            self.finished_at = now
        if replica.terminating:
            if replica.held == 0:
                replica.removed = now
            return
        self.take(now, replica)
        self.start_tasks(now, replica)

    def on_sample(self, now: float, _: Any) -> None:
        self.record(now)
        if self.list_empty_at is None and not self.queue and self.done > 0 and now >= self.load.duration_s:
            self.list_empty_at = now
        self.at(now + 1.0, "sample")

    def record(self, now: float) -> None:
        """One point of the series, and of the in-flight history the lagged gauge reads."""
        running = sum(r.running for r in self.replicas)
        self.history.append((now, running))
        pods = [r for r in self.replicas if r.removed is None]
        for key, value in (("t", now), ("replicas", len(pods)), ("ready", sum(r.ready and not r.terminating for r in pods)),
                           ("list", len(self.queue)), ("held", sum(r.held for r in pods)), ("running", running)):
            self.series[key].append(value)

    def on_poll(self, now: float, _: Any) -> None:
        """KEDA's own loop: activation from 0 and, after the cooldown, back to 0 (only with min_replicas 0)."""
        self.at(now + self.scaler.polling_s, "poll")
        if self.scaler.min_replicas > 0:
            return
        active = any(self.metric(t.metric, now) > self.scaler.activation for t in self.variant.triggers)
        if active:
            self.last_active = now
            if self.spec() == 0:
                self.scale_to(now, 1)
        elif self.spec() > 0 and now - self.last_active >= self.scaler.cooldown_s:
            self.scale_to(now, 0)

    def on_sync(self, now: float, _: Any) -> None:
        """The HPA: each trigger's replicas, the largest, stabilised, rate-limited, within min and max."""
        self.at(now + self.scaler.sync_s, "sync")
        current = self.spec()
        if current == 0:  # KEDA owns 0 <-> 1
            return
        wanted = max(self.desired(t, current, now) for t in self.variant.triggers)
        self.recommendations.append((now, wanted))
        s = self.scaler
        up = min(r for t, r in self.recommendations if t > now - s.up_window_s - 1e-9)
        down = max(r for t, r in self.recommendations if t > now - s.down_window_s)
        target = min(max(current, up), down)  # k8s: raise to the scale-up window's floor, cap at scale-down's
        if target > current:
            target = min(target, self.limit(now, current, s.up_rules, up=True))
        elif target < current:
            target = max(target, self.limit(now, current, s.down_rules, up=False))
        target = min(max(target, max(s.min_replicas, 1)), s.max_replicas)
        if target != current:
            self.scale_to(now, target)

    # -- the autoscaler's arithmetic

    def metric(self, name: str, now: float) -> float:
        """What the trigger reads: LLEN (the list alone), the in-flight gauge (lagged), or SQS's two counts."""
        if name == "list":
            return float(len(self.queue))
        if name == "sqs":  # ApproximateNumberOfMessages + ...NotVisible: queued, and taken but not deleted
            return float(len(self.queue) + sum(r.held for r in self.replicas if r.removed is None))
        when = now - self.scaler.datadog_lag_s
        seen = [running for t, running in self.history if t <= when]
        return float(seen[-1]) if seen else 0.0

    def desired(self, trigger: Trigger, current: int, now: float) -> int:
        """The HPA's AverageValue rule: ceil(metric / target), unless within ``tolerance`` of the current count."""
        usage = self.metric(trigger.metric, now)
        ratio = usage / (trigger.target * current)
        return current if abs(ratio - 1.0) <= self.scaler.tolerance else math.ceil(usage / trigger.target)

    def limit(self, now: float, current: int, rules: tuple[Rule, ...], *, up: bool) -> int:
        """The HPA's rate limit: from the count at each rule's period start, the most permissive rule."""
        proposals = []
        for rule in rules:
            changed = sum(delta for t, delta in self.scale_events if t > now - rule.period_s)
            start = current - changed
            if rule.kind == "Pods":
                proposals.append(start + rule.value if up else start - rule.value)
            else:
                factor = 1 + rule.value / 100 if up else 1 - rule.value / 100
                proposals.append(math.ceil(start * factor) if up else int(start * factor))
        return max(proposals) if up else min(proposals)

    def spec(self) -> int:
        return sum(1 for r in self.replicas if r.removed is None and not r.terminating)

    def scale_to(self, now: float, target: int) -> None:
        current = self.spec()
        self.scale_events.append((now, target - current))
        for _ in range(target - current):
            self.add_replica(now)
        if target < current:
            # Kubernetes removes pods not ready before ready ones, and newer before older.
            alive = [r for r in self.replicas if r.removed is None and not r.terminating]
            alive.sort(key=lambda r: (r.ready, -r.created))
            for replica in alive[: current - target]:
                self.stop(now, replica)

    def add_replica(self, now: float, *, ready_now: bool = False) -> None:
        replica = Replica(created=now, ready=ready_now)
        self.replicas.append(replica)
        if not ready_now:
            self.at(now + self.workers.start_s, "ready", replica)

    def stop(self, now: float, replica: Replica) -> None:
        """Warm shutdown: take nothing more, hand back what has not started, let the running tasks finish."""
        replica.terminating = True
        while replica.waiting:
            self.queue.appendleft(replica.waiting.pop())
        if replica.running == 0:
            replica.removed = now
        self.feed(now)

    # -- workers

    def feed(self, now: float) -> None:
        """Every ready replica takes what its window allows, in turn (as blocked BRPOPs are served)."""
        ready = [r for r in self.replicas if r.ready and not r.terminating and r.removed is None]
        if not ready:
            return
        for i in range(len(ready)):
            if not self.queue:
                return
            replica = ready[(self.cursor + i) % len(ready)]
            self.take(now, replica)
            self.start_tasks(now, replica)
        self.cursor += 1

    def take(self, now: float, replica: Replica) -> None:
        while self.queue and replica.held < self.hold:
            replica.waiting.append(self.queue.popleft())

    def start_tasks(self, now: float, replica: Replica) -> None:
        """Start what the slots and the CPU allow; come back when the CPU is free again."""
        step = 1.0 / self.workers.ceiling if self.workers.ceiling else 0.0
        while replica.waiting and replica.running < self.workers.concurrency and not replica.terminating:
            if replica.cpu_free > now + 1e-12:
                self.at(replica.cpu_free, "cpu", replica)
                return
            arrival, latency = replica.waiting.popleft()
            replica.running += 1
            replica.cpu_free = now + step
            self.at(now + step + latency, "done", (replica, arrival, latency))

    # -- results

    def summary(self) -> dict[str, Any]:
        end = self.end
        replica_s = sum((r.removed if r.removed is not None else end) - r.created for r in self.replicas)
        sojourn = sorted(self.sojourn)

        def pct(q: float) -> float | None:
            return sojourn[min(len(sojourn) - 1, int(q * len(sojourn)))] if sojourn else None

        return {
            "variant": self.variant.name, "tasks": self.total, "done": self.done,
            "drain_s": self.finished_at, "list_empty_s": self.list_empty_at, "simulated_s": end,
            "peak_replicas": max(self.series["replicas"]), "replica_seconds": replica_s,
            "slot_utilisation": self.busy_s / (replica_s * self.workers.concurrency) if replica_s else None,
            "sojourn_s": {"p50": pct(0.5), "p95": pct(0.95), "max": sojourn[-1] if sojourn else None},
            "steady": self.steady() if self.load.rate else None,
        }

    def steady(self) -> dict[str, float]:
        """Replicas and the list over the load's last two thirds (after the first ramp-up)."""
        d = self.load.duration_s
        window = [i for i, t in enumerate(self.series["t"]) if d / 3 <= t <= d]
        replicas = [self.series["replicas"][i] for i in window]
        lengths = [self.series["list"][i] for i in window]
        return {"mean_replicas": statistics.fmean(replicas), "min_replicas": min(replicas), "max_replicas": max(replicas),
                "max_list": max(lengths), "share_of_time_list_nonempty": statistics.fmean(n > 0 for n in lengths)}


def every(values: list[float], step: int) -> list[float]:
    """Every ``step``-th value, and the last (the run's end state) in any case."""
    kept = values[::step]
    return kept + values[-1:] if (len(values) - 1) % step else kept


def simulate(load: Load, workers: Workers, scaler: Autoscaler, seed: int) -> dict[str, Any]:
    """Every variant on the same tasks (same seed): results and series (10 s steps) per variant."""
    out = {}
    for variant in variants(workers.concurrency):
        sim = Simulation(load, workers, scaler, variant, seed)
        result = sim.run()
        if result["done"] != result["tasks"] and sim.end < load.horizon_s:
            raise RuntimeError(f"{variant.name}: {result['tasks'] - result['done']} tasks lost")
        result["series"] = {key: every(values, 10) for key, values in sim.series.items()}
        out[variant.name] = result
    return out


# ------------------------------------------------------------------------------------------- output


def draw(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Replicas and list length over time, per variant, one row per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    styles = ({"lw": 4, "alpha": 0.45}, {"lw": 1.8, "ls": "--"}, {"lw": 1.2})  # overlapping curves stay visible
    for row, (scenario, data) in enumerate(results.items()):
        for j, (name, result) in enumerate(data["variants"].items()):
            s = result["series"]
            label = (f"{name}: drained {result['drain_s']:.0f} s, peak {result['peak_replicas']}, "
                     f"{result['replica_seconds'] / 3600:.1f} replica-h")
            axes[row][0].step(s["t"], s["replicas"], where="post", color=f"C{j}", label=label, **styles[j])
            axes[row][1].plot(s["t"], s["list"], color=f"C{j}", label=f"{name}: list length (LLEN)", **styles[j])
            axes[row][1].plot(s["t"], [a + b for a, b in zip(s["list"], s["held"], strict=True)], ":", color=f"C{j}",
                              label=f"{name}: list + taken by workers")
        axes[row][0].set(title=f"{scenario}: replicas (incl. starting and stopping)", xlabel="s", ylabel="replicas")
        axes[row][1].set(title=f"{scenario}: messages", xlabel="s", ylabel="messages")
        axes[row][0].legend(fontsize=7)
        axes[row][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def git_revision() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def scenarios(args: argparse.Namespace, m: dict[str, Any]) -> tuple[Workers, Autoscaler, dict[str, Load]]:
    """The command line's workers, autoscaler and the two scenarios (burst; steady load)."""
    ceiling = args.ceiling if args.ceiling is not None else (m["gevent_ceiling_tasks_per_s"] if args.pool == "gevent" else 0.0)
    workers = Workers(pool=args.pool, concurrency=args.concurrency, prefetch_multiplier=args.prefetch_multiplier,
                      ceiling=ceiling, pod_start_s=args.pod_start, worker_ready_s=m["ready_s"][args.pool])
    up = (Rule("Pods", args.up_pods, args.up_period), Rule("Percent", args.up_percent, args.up_period))
    scaler = Autoscaler(min_replicas=args.min_replicas, max_replicas=args.max_replicas, polling_s=args.polling,
                        sync_s=args.sync, cooldown_s=args.cooldown, activation=args.activation, up_rules=up,
                        down_window_s=args.down_window, datadog_lag_s=args.datadog_lag)
    latency = Latency(args.median, args.p95, fixed=args.fixed_latency)
    loads = {f"burst of {args.burst:,}" + (f" + {args.rate:g}/s" if args.rate else ""):
             Load(burst=args.burst, rate=args.rate, duration_s=args.duration if args.rate else 0.0, latency=latency),
             f"steady {args.steady_rate:g}/s for {args.steady_duration:g} s":
             Load(burst=0, rate=args.steady_rate, duration_s=args.steady_duration, latency=latency)}
    return workers, scaler, loads


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", nargs="+", type=float, metavar="N", help="RPS LATENCY_S [PAYLOAD_BYTES]: print the sizing table")
    p.add_argument("--examples", action="store_true", help="print docs/CAPACITY.md's worked examples")
    p.add_argument("--seed", type=int, default=16)
    g = p.add_argument_group("load")
    g.add_argument("--burst", type=int, default=10_000, help="tasks queued at t=0")
    g.add_argument("--rate", type=float, default=0.0, help="steady tasks/s on top of the burst")
    g.add_argument("--duration", type=float, default=600.0, help="seconds of --rate")
    g.add_argument("--steady-rate", type=float, default=50.0, help="the steady scenario's tasks/s")
    g.add_argument("--steady-duration", type=float, default=1800.0)
    g.add_argument("--median", type=float, default=5.0, help="model latency median, s")
    g.add_argument("--p95", type=float, default=15.0, help="model latency p95, s (lognormal)")
    g.add_argument("--fixed-latency", action="store_true", help="every task takes --median")
    g = p.add_argument_group("workers")
    g.add_argument("--pool", choices=("gevent", "prefork"), default="gevent")
    g.add_argument("--concurrency", type=int, default=32)
    g.add_argument("--prefetch-multiplier", type=int, default=0, help="0: the worker's default")
    g.add_argument("--ceiling", type=float, default=None, help="tasks/s per replica (default: gevent measured, prefork none)")
    g.add_argument("--pod-start", type=float, default=30.0, help="MODELLED s from scale-up to the worker's launch")
    g = p.add_argument_group("KEDA and HPA")
    g.add_argument("--min-replicas", type=int, default=1)
    g.add_argument("--max-replicas", type=int, default=30)
    g.add_argument("--polling", type=float, default=15.0, help="KEDA pollingInterval")
    g.add_argument("--sync", type=float, default=15.0, help="HPA sync period")
    g.add_argument("--cooldown", type=float, default=300.0, help="KEDA cooldownPeriod (to 0; min-replicas 0 only)")
    g.add_argument("--activation", type=float, default=0.0, help="activation threshold")
    g.add_argument("--up-pods", type=int, default=4)
    g.add_argument("--up-percent", type=int, default=100)
    g.add_argument("--up-period", type=float, default=15.0, help="scale-up policies' periodSeconds")
    g.add_argument("--down-window", type=float, default=300.0, help="scale-down stabilizationWindowSeconds")
    g.add_argument("--datadog-lag", type=float, default=30.0, help="MODELLED s from a gauge to KEDA's read")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for capacity.json and capacity.png")
    return p


#: The same scenarios again with one setting changed: headline numbers only (no series), for docs/CAPACITY.md.
SENSITIVITY: dict[str, dict[str, float]] = {
    "--up-period 60 (the API reference's wording of the scale-up default)": {"up_period": 60.0},
    "--down-window 60 (scale-down stabilization 60 s instead of 300)": {"down_window": 60.0},
    "--pod-start 120 (a model server that loads for two minutes)": {"pod_start": 120.0},
}


def sensitivity(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, changes in SENSITIVITY.items():
        workers, scaler, loads = scenarios(argparse.Namespace(**{**vars(args), **changes}), m)
        out[name] = {scenario: {variant: {k: v for k, v in r.items() if k != "series"}
                                for variant, r in simulate(load, workers, scaler, args.seed).items()}
                     for scenario, load in loads.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    m = measured()
    if args.plan or args.examples:
        workloads = [tuple(args.plan) + (64 * 1024,) * (3 - len(args.plan))] if args.plan else list(EXAMPLES)
        rows = [plan(rps, latency, int(payload), pool, inputs=m) for rps, latency, payload in workloads
                for pool in ("gevent", "prefork")]
        print(f"Inputs: {m['sources']['sizing']}, {m['sources']['scale']}; policy (MODELLED): {Policy()}")
        print(plan_table(rows))
        return 0
    workers, scaler, loads = scenarios(args, m)
    results = {name: {"load": asdict(load), "variants": simulate(load, workers, scaler, args.seed)}
               for name, load in loads.items()}
    meta = {"command": "python -m bench.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
            "git": git_revision(), "seed": args.seed, "workers": asdict(workers), "autoscaler": asdict(scaler),
            "measured": {k: m[k] for k in ("ready_s", "gevent_ceiling_tasks_per_s", "sources")},
            "modelled": ["the autoscaler (KEDA + HPA algorithm)", "pod_start_s", "datadog_lag_s", "latency distribution",
                         "arrivals (Poisson)", "per-replica CPU ceiling as a start rate"]}
    args.out.mkdir(parents=True, exist_ok=True)
    others = sensitivity(args, m)
    (args.out / "capacity.json").write_text(json.dumps({"meta": meta, "scenarios": results, "sensitivity": others},
                                                       indent=1))
    draw(results, args.out / "capacity.png")
    for name, data in results.items():
        print(f"{name}:")
        for result in data["variants"].values():
            print(headline(result))
    for change, runs in others.items():
        print(f"{change}:")
        for name, by_variant in runs.items():
            print(f" {name}:")
            for result in by_variant.values():
                print(headline(result))
    return 0


def headline(r: dict[str, Any]) -> str:
    steady = r["steady"]
    text = (f"  {r['variant']:<30} drained {r['drain_s']:7.1f} s, peak {r['peak_replicas']:3d} replicas, "
            f"{r['replica_seconds']:9,.0f} replica-s, slots busy {r['slot_utilisation']:.2f}, "
            f"p95 wait+run {r['sojourn_s']['p95']:.1f} s")
    if steady:
        text += (f"; steady: replicas {steady['min_replicas']}-{steady['max_replicas']} (mean {steady['mean_replicas']:.1f}),"
                 f" list non-empty {steady['share_of_time_list_nonempty']:.0%}, max list {steady['max_list']:,}")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
