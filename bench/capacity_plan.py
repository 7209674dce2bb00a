"""Capacity plan: replicas, concurrency, CPU and memory a workload needs, per pool, from the measured figures.

``plan(rps, latency_s, payload_bytes, pool)`` applies Little's law and the sizing fits; docs/CAPACITY.md states
the model, and ``python -m bench.capacity --plan``/``--examples`` prints its tables. What is MEASURED is read from
bench/results/*.json (``measured``); what is MODELLED is the ``Policy``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------ measured inputs


def measured() -> dict[str, Any]:
    """The project's own measurements this module uses, read from bench/results (each with its source).

    Returns memory fits (MiB, under ddtrace-run), ready times (s), the gevent CPU ceiling (tasks/s per process)
    and CPU ms per task per pool. A missing file is an error: these numbers are not to be guessed.
    """
    sizing = json.loads((RESULTS / "sizing.json").read_text())
    scale = json.loads((RESULTS / "scale.json").read_text())
    gevent = [r for r in scale["rows"] if r["variant"]["pool"] == "gevent"]
    prefork = [r for r in scale["rows"] if r["variant"]["pool"] == "prefork"]
    return {
        "pss_mib": sizing["figures"]["pss_mb"],
        "rss_mib": sizing["figures"]["rss_mb"],
        "child_rss_max_mib": sizing["figures"]["child_rss_max_mb"],
        "ready_s": sizing["figures"]["ready_seconds"],
        "gevent_ceiling_tasks_per_s": max(r["tasks_per_s"] for r in gevent),
        "cpu_ms_per_task": {"gevent": statistics.median(r["cpu_s_per_1000"] for r in gevent),
                            "prefork": statistics.median(r["cpu_s_per_1000"] for r in prefork)},
        "sources": {"sizing": f"bench/results/sizing.json (git {sizing['meta']['machine']['git']})",
                    "scale": f"bench/results/scale.json (git {scale['meta']['machine']['git']})"},
    }


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Policy:
    """MODELLED choices of the plan (not measurements): change them with the arguments of ``plan``."""

    utilisation: float = 0.7  # target busy fraction of the slots, and of one gevent process's CPU ceiling
    max_concurrency: tuple[tuple[str, int], ...] = (("gevent", 1024), ("prefork", 32))  # the largest measured
    min_replicas: int = 2  # availability: a rollout or a lost node never takes every slot
    payload_copies: float = 3.0  # copies of request + answer a task holds at its peak (bytes, text, parsed JSON)
    memory_margin: float = 1.3  # limit = margin x estimate: allocator slack, a GC cycle late, a fat answer


def plan(rps: float, latency_s: float, payload_bytes: int, pool: str, policy: Policy = Policy(),
         inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replicas, concurrency, CPU and memory for ``rps`` tasks/s of ``latency_s`` (use a high percentile).

    Little's law: in flight = rps x latency. Slots = in flight / utilisation. Replicas: enough for the slots at
    the largest concurrency measured, for gevent also enough processes that each stays under utilisation x
    its measured CPU ceiling, and at least ``min_replicas``. Memory per replica is the sizing fit (PSS, under
    ddtrace-run) plus the payloads its slots can hold.
    """
    from forwarder.pools import pool_sizes

    m = measured() if inputs is None else inputs
    in_flight = rps * latency_s
    slots = math.ceil(in_flight / policy.utilisation)
    max_c = dict(policy.max_concurrency)[pool]
    replicas = max(policy.min_replicas, math.ceil(slots / max_c))
    if pool == "gevent":
        replicas = max(replicas, math.ceil(rps / (policy.utilisation * m["gevent_ceiling_tasks_per_s"])))
    concurrency = math.ceil(slots / replicas)
    pss = m["pss_mib"]
    base = (pss["gevent_base"] + concurrency * pss["gevent_slot"] if pool == "gevent"
            else pss["prefork_main"] + concurrency * pss["prefork_child"])
    payload = concurrency * payload_bytes * policy.payload_copies / MIB
    per_replica = base + payload
    return {
        "pool": pool, "rps": rps, "latency_s": latency_s, "payload_bytes": payload_bytes,
        "in_flight": in_flight, "slots": slots, "replicas": replicas, "concurrency": concurrency,
        "rps_per_replica": rps / replicas,
        "cpu_cores_per_replica": rps / replicas * m["cpu_ms_per_task"][pool] / 1000,
        "memory_mib": {"worker": base, "payload": payload, "per_replica": per_replica,
                       "limit_per_replica": policy.memory_margin * per_replica,
                       "total": replicas * per_replica},
        "open_files_per_replica": pool_sizes(pool, concurrency).open_files,
        "processes_per_replica": 1 if pool == "gevent" else concurrency + 1,
    }


def plan_table(rows: Iterable[dict[str, Any]]) -> str:
    """Markdown: one row per plan."""
    lines = ["| pool | rps | latency s | in flight | slots | replicas | concurrency | tasks/s per replica "
             "| CPU cores per replica | worker MiB | payload MiB | per replica MiB | limit MiB | total MiB | open files |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["memory_mib"]
        lines.append(f"| {r['pool']} | {r['rps']:g} | {r['latency_s']:g} | {r['in_flight']:,.0f} | {r['slots']:,} "
                     f"| {r['replicas']} | {r['concurrency']} | {r['rps_per_replica']:.1f} "
                     f"| {r['cpu_cores_per_replica']:.3f} | {mem['worker']:,.0f} | {mem['payload']:,.0f} "
                     f"| {mem['per_replica']:,.0f} | {mem['limit_per_replica']:,.0f} | {mem['total']:,.0f} "
                     f"| {r['open_files_per_replica']:,} |")
    return "\n".join(lines)


#: docs/CAPACITY.md's worked examples: (requests/s, p95 latency s, request + answer bytes).
EXAMPLES = ((10.0, 30.0, 64 * 1024), (1000.0, 2.0, 64 * 1024))
