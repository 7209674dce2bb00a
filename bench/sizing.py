"""Sizing: what one worker pod needs (memory after a warm-up, start-up time), under ``ddtrace-run`` and without.

Memory is in MiB (1024 x 1024 bytes, the unit of Kubernetes' ``Mi``), per process and summed over the worker's
processes, in two measures that answer two questions:
- PSS (shared pages split between the processes sharing them): what the container's memory cgroup charges,
  so what a pod's memory request and limit must cover;
- RSS of one prefork child: what Celery compares with ``CELERY_WORKER_MAX_MEMORY_PER_CHILD`` (KiB).

A fit per pool turns the measurements into a formula: prefork ``main + concurrency x child``, gevent
``base + concurrency x slot``; the difference with and without ``ddtrace-run``, per process, is what tracing
costs. Start-up is from the process's launch to its ready line (the worker consumes from then on).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterable
from typing import Any

import psutil

from bench.measure import Completions, queue_tasks
from bench.servers import Stack
from bench.workers import BenchWorker, Variant, worker_environment

MIB = 1024 * 1024
MEASURES = ("rss", "uss", "pss")


def snapshot(worker: BenchWorker) -> dict[str, Any]:
    """Each process's RSS, USS and PSS in MiB (the main process first), and their sums."""
    processes = []
    for process in worker.processes():
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        processes.append({key: getattr(info, key) / MIB for key in MEASURES})
    return {"processes": processes, **{key: sum(p[key] for p in processes) for key in MEASURES}}


def footprint(stack: Stack, variant: Variant, tasks: int, model_url: str) -> dict[str, Any]:
    """Start a fresh worker on ``tasks`` queued tasks; its ready time, and its memory while busy and after.

    Memory is sampled with half the tasks done (every slot busy) and once all are done (warm: every child has
    run tasks); the sample with the larger PSS sum is kept. The worker is killed afterwards, as in bench.measure.
    """
    queue = f"sizing-{uuid.uuid4().hex[:10]}"
    queue_tasks(stack, queue, tasks)
    completions = Completions(f"{stack.redis.url}/1")
    worker = BenchWorker(worker_environment(stack, variant, queue, model_url), variant.program, ddtrace=variant.ddtrace)
    samples = []
    try:
        launched = time.monotonic()
        worker.start(timeout=90)
        ready_s = time.monotonic() - launched
        deadline = time.monotonic() + 60 + tasks / 5
        half = False
        while completions.count < tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{variant.label}: {completions.count}/{tasks} tasks done")
            if not half and completions.count >= tasks // 2:
                samples.append(snapshot(worker))
                half = True
            time.sleep(0.02)
        time.sleep(0.5)  # the last acks and result writes
        samples.append(snapshot(worker))
    finally:
        worker.kill()
        completions.close()
    worker.log_path.unlink(missing_ok=True)
    kept = max(samples, key=lambda s: s["pss"])
    children = [p for s in samples for p in s["processes"][1:]]
    return {
        "variant": variant.label, "pool": variant.pool, "concurrency": variant.concurrency, "ddtrace": variant.ddtrace,
        "tasks": tasks, "failures": completions.failures, "ready_s": ready_s,
        **{f"{key}_mib": kept[key] for key in MEASURES},
        "processes": len(kept["processes"]), "main_mib": kept["processes"][0],
        "child_rss_max_mib": max((c["rss"] for c in children), default=None),
    }


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ``ys`` against ``xs``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def medians(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (pool, concurrency, ddtrace): the median of its repetitions' sums and ready times."""
    groups: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["pool"], row["concurrency"], row["ddtrace"]), []).append(row)
    return [
        {"pool": pool, "concurrency": concurrency, "ddtrace": ddtrace, "reps": len(reps),
         "processes": reps[0]["processes"],
         **{key: statistics.median(r[key] for r in reps) for key in ("ready_s", "rss_mib", "uss_mib", "pss_mib")},
         "ready_s_all": [r["ready_s"] for r in reps],
         "child_rss_max_mib": max((r["child_rss_max_mib"] for r in reps if r["child_rss_max_mib"]), default=None)}
        for (pool, concurrency, ddtrace), reps in sorted(groups.items())
    ]


def ddtrace_extra(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: what ddtrace-run adds to the memory sums, in total and per process."""
    plain = {(g["pool"], g["concurrency"]): g for g in groups if not g["ddtrace"]}
    return [
        {"pool": on["pool"], "concurrency": on["concurrency"], "processes": on["processes"],
         **{f"{m}_mib": on[f"{m}_mib"] - off[f"{m}_mib"] for m in MEASURES},
         **{f"{m}_mib_per_process": (on[f"{m}_mib"] - off[f"{m}_mib"]) / on["processes"] for m in MEASURES}}
        for on in groups if on["ddtrace"] and (off := plain.get((on["pool"], on["concurrency"])))
    ]


def figures(groups: list[dict[str, Any]], ready_at: dict[str, int]) -> dict[str, Any]:
    """The fits: prefork main + per child, gevent base + per slot (under ddtrace-run), ddtrace-run per process.

    ddtrace-run's cost per process is the least-squares slope, through the origin, of each configuration's
    extra memory under ddtrace-run against its number of processes.
    """
    def pick(pool: str, ddtrace: bool) -> list[dict[str, Any]]:
        return [g for g in groups if g["pool"] == pool and g["ddtrace"] == ddtrace]

    out: dict[str, Any] = {}
    for measure in ("pss", "rss"):
        key = f"{measure}_mib"
        pre_main, pre_child = line([g["concurrency"] for g in pick("prefork", True)], [g[key] for g in pick("prefork", True)])
        gev_base, gev_slot = line([g["concurrency"] for g in pick("gevent", True)], [g[key] for g in pick("gevent", True)])
        pairs = [(e["processes"], e[key]) for e in ddtrace_extra(groups)]
        per_process = sum(n * extra for n, extra in pairs) / sum(n * n for n, _ in pairs)
        out[f"{measure}_mb"] = {"prefork_main": pre_main, "prefork_child": pre_child, "gevent_base": gev_base,
                                "gevent_slot": gev_slot, "ddtrace_per_process": per_process}
    out["child_rss_max_mb"] = max(g["child_rss_max_mib"] for g in pick("prefork", True))
    out["ready_seconds"] = {pool: next(g["ready_s"] for g in pick(pool, True) if g["concurrency"] == concurrency)
                            for pool, concurrency in ready_at.items()}
    return {name: _rounded(value) for name, value in out.items()}


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value
