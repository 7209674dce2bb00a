"""The capacity plan and the KEDA scaling simulation behind docs/CAPACITY.md (in-process, seconds).

The plan is checked on round inputs (Little's law, the CPU ceiling, the memory fits) and on the measured ones
(docs/CAPACITY.md's worked examples); the simulation on what it must never do (lose or duplicate a task, exceed
the maximum, scale past the rate limit) and on the claim the document rests on: under a steady load where
every message is in flight, a list-length trigger alone leaves a backlog that an in-flight trigger does not.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.capacity import Autoscaler, Latency, Load, Simulation, Workers, simulate, variants
from bench.capacity_plan import MIB, Policy, plan

#: Round inputs in the shape of ``measured()``: every figure easy to compute by hand.
ROUND: dict[str, Any] = {
    "pss_mib": {"gevent_base": 100.0, "gevent_slot": 0.5, "prefork_main": 50.0, "prefork_child": 40.0},
    "gevent_ceiling_tasks_per_s": 100.0,
    "cpu_ms_per_task": {"gevent": 2.0, "prefork": 4.0},
}


def test_the_plan_applies_littles_law_and_the_memory_fits() -> None:
    row = plan(10, 30, 0, "gevent", Policy(utilisation=0.5, min_replicas=1), inputs=ROUND)
    assert row["in_flight"] == 300 and row["slots"] == 600
    assert (row["replicas"], row["concurrency"]) == (1, 600)
    assert row["memory_mib"]["per_replica"] == 100 + 600 * 0.5
    assert row["cpu_cores_per_replica"] == pytest.approx(10 * 2.0 / 1000)


def test_gevent_replicas_follow_the_cpu_ceiling_and_payloads_add_memory() -> None:
    # 200 tasks/s of 1 s: 400 slots fit one process, but one process starts at most 0.5 x 100 tasks/s
    row = plan(200, 1, MIB, "gevent", Policy(utilisation=0.5, min_replicas=1), inputs=ROUND)
    assert row["replicas"] == 4 and row["concurrency"] == 100
    assert row["memory_mib"]["payload"] == pytest.approx(100 * 3.0)  # three copies of 1 MiB per slot
    prefork = plan(200, 1, 0, "prefork", Policy(utilisation=0.5, min_replicas=1), inputs=ROUND)
    assert prefork["replicas"] == 13 and prefork["concurrency"] == 31  # at most 32 children per replica
    assert prefork["memory_mib"]["worker"] == 50 + 31 * 40


def test_the_worked_examples_of_the_capacity_document() -> None:
    gevent = plan(10, 30, 64 * 1024, "gevent")
    assert (gevent["in_flight"], gevent["replicas"], gevent["concurrency"]) == (300, 2, 215)
    prefork = plan(1000, 2, 64 * 1024, "prefork")
    assert (prefork["replicas"], prefork["concurrency"]) == (90, 32)
    assert prefork["memory_mib"]["total"] > 100 * plan(1000, 2, 64 * 1024, "gevent")["memory_mib"]["total"]


def small(**changes: Any) -> tuple[Workers, Autoscaler]:
    workers = Workers(pool="gevent", concurrency=8, pod_start_s=10.0, worker_ready_s=1.0)
    scaler = Autoscaler(**{"min_replicas": 1, "max_replicas": 6, "down_window_s": 60.0, **changes})
    return workers, scaler


def test_a_burst_drains_once_per_task_within_the_maximum_and_the_rate_limit() -> None:
    workers, scaler = small()
    results = simulate(Load(burst=400, latency=Latency(2.0, fixed=True), horizon_s=3600), workers, scaler, seed=1)
    assert len(results) == 3
    for result in results.values():
        assert result["done"] == result["tasks"] == 400  # simulate raises on a lost task
        assert result["peak_replicas"] <= 6
        # 400 tasks of 2 s on at most 6 x 8 slots take at least 400 x 2 / 48 s
        assert result["drain_s"] >= 400 * 2 / 48
    # Scale-up: at most the larger of +4 pods and +100 % in any 15 s (the series is sampled every second)
    sim = Simulation(Load(burst=400, latency=Latency(2.0, fixed=True), horizon_s=3600), workers, scaler,
                     variants(8)[0], seed=1)
    sim.run()
    replicas, t = sim.series["replicas"], sim.series["t"]
    assert max(replicas) == 6
    for i, start in enumerate(t):
        later = [n for n, when in zip(replicas[i:], t[i:], strict=True) if when < start + 15]
        assert max(later) <= max(replicas[i] + 4, 2 * replicas[i]), (start, later)


def test_a_removed_replica_finishes_its_running_tasks() -> None:
    # Tasks of 100 s: the list empties long before they end, the 60 s scale-down window passes, and the HPA
    # removes replicas that are still running tasks
    workers, scaler = small()
    sim = Simulation(Load(burst=100, latency=Latency(100.0, fixed=True), horizon_s=3600), workers, scaler,
                     variants(8)[0], seed=3)
    result = sim.run()
    series = sim.series
    stopping_busy = [i for i, t in enumerate(series["t"])
                     if series["replicas"][i] > series["ready"][i] and series["running"][i] > 8 * series["ready"][i]]
    assert stopping_busy, "no replica was removed while it ran tasks: the case is not exercised"
    assert result["done"] == 100 and len(sim.sojourn) == 100  # each task finished once, none lost
    assert all(r.running == 0 and r.removed is not None for r in sim.replicas if r.terminating)


def test_under_steady_load_list_length_alone_leaves_a_backlog_the_in_flight_trigger_does_not() -> None:
    workers, scaler = small(down_window_s=120.0, max_replicas=10)  # ~25 in flight: 4-5 replicas of 8 suffice
    load = Load(burst=0, rate=5.0, duration_s=1200.0, latency=Latency(4.0, 8.0), horizon_s=3600)
    results = simulate(load, workers, scaler, seed=7)
    list_only, with_in_flight, sqs = results.values()
    # List only: LLEN ~0 while everything runs, so it shrinks to the minimum, then a backlog forms (sawtooth)
    assert list_only["steady"]["min_replicas"] == 1
    assert list_only["steady"]["share_of_time_list_nonempty"] > 0.1
    # Counting the work in flight holds the fleet steady with (almost) no backlog
    for steady in (with_in_flight["steady"], sqs["steady"]):
        assert steady["min_replicas"] >= 4 and steady["max_replicas"] - steady["min_replicas"] <= 2
        assert steady["share_of_time_list_nonempty"] < 0.02


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    workers, scaler = small()
    load = Load(burst=200, latency=Latency(3.0, 9.0), horizon_s=3600)
    first = simulate(load, workers, scaler, seed=5)
    again = simulate(load, workers, scaler, seed=5)
    assert [r["drain_s"] for r in first.values()] == [r["drain_s"] for r in again.values()]
