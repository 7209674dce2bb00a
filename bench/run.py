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
- scale: gevent at concurrency 32 to 1,024 against an asyncio model of 1 s (and 5 s at 1,024), 4 x
  concurrency tasks each, prefork at 32 and 64 as the memory reference: throughput against the physical
  limit (concurrency / latency), RSS and USS, CPU per 1,000 tasks, requests the model saw twice, ack and
  pool errors in the log; the model is first measured alone with as many connections.
- sizing: what a pod needs: prefork at concurrency 1, 2, 4 and gevent at 1, 64, 256, each under ddtrace-run
  (the production launch, tracing on) and without, after a warm-up against a 100 ms model: memory in MiB (RSS,
  USS, PSS summed over the processes, each prefork child's RSS) and the time from launch to the ready line,
  3 repetitions, medians; fits per pool and ddtrace-run's cost per process (``bench.sizing``).
- cost: what each part costs a task (``bench.cost``): bare Celery, the forwarder with everything off, each
  extension alone, the defaults and everything on, both pools (gevent 16, prefork 4) against a 50 ms model,
  alternated over rounds, medians: tasks/s, CPU ms per task, peak RSS, ratios against bare Celery.
- soak: 20,000 tasks with the callback and logging hooks on, per pool; worker RSS sampled as tasks
  complete, slope in MB per 1,000 tasks after the first 2,000. Negative control: ``bench.leaky_worker``
  (a Firehose client built per put). Also prefork with MALLOC_ARENA_MAX=2 and with jemalloc.

Outputs: bench/results/<section>.json and <section>.png, plus summary.md (``--quick``: under
bench/results/quick/). Numbers from one shared 2-core machine: compare within a run.

This module: the command line, the ``Plan`` and the sections. ``bench.workers``: the worker variants and how
they are launched; ``bench.measure``: measuring one worker, the machine's description; ``bench.plots``: the
PNGs; ``bench.report``: summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from bench import cost
from bench.measure import ROOT, machine, measure, slope_per_1000
from bench.plots import plot
from bench.report import summary
from bench.servers import ROLE_ARN, Stack
from bench.sizing import MIB, ddtrace_extra, figures, footprint, medians
from bench.workers import JEMALLOC, OVERHEAD_PROGRAMS, Variant

RESULTS = ROOT / "bench" / "results"
SECTIONS = ("pools", "overhead", "cost", "soak", "scale", "sizing")


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
    scale_gevent: tuple[tuple[int, float], ...] = ((32, 1.0), (128, 1.0), (256, 1.0), (512, 1.0), (1024, 1.0),
                                                  (1024, 5.0))  # (concurrency, model seconds)
    scale_prefork: tuple[int, ...] = (32, 64)  # the memory reference
    scale_waves: int = 4  # tasks = waves x concurrency
    sizing_prefork: tuple[int, ...] = (1, 2, 4)
    sizing_gevent: tuple[int, ...] = (1, 64, 256)
    sizing_reps: int = 3
    sizing_model_delay: float = 0.1
    sizing_waves: int = 4  # warm-up tasks = max(sizing_min_tasks, waves x concurrency)
    sizing_min_tasks: int = 20
    cost_tasks: int = 600  # per variant and round (bench.cost)
    cost_rounds: int = 3


QUICK = Plan(
    pool_concurrency=(4, 32), pool_seconds=3.0, overhead_tasks=250, overhead_reps=1, soak_tasks=800,
    soak_warmup=200, soak_sample_every=50, leaky_tasks=200, leaky_retained_tasks=100,
    scale_gevent=((32, 1.0), (256, 1.0)), scale_prefork=(32,), sizing_prefork=(1, 4), sizing_gevent=(1, 64),
    sizing_reps=1, cost_tasks=150, cost_rounds=1,
)


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


def run_scale(stack: Stack, plan: Plan) -> dict[str, Any]:
    """gevent at rising concurrency against a model of fixed latency: the physical limit is concurrency / latency."""
    from bench.model_async import capacity

    rows, alone = [], []
    top = max(c for c, _ in plan.scale_gevent)
    configs = [("gevent", c, d, "forwarder") for c, d in plan.scale_gevent]
    # The ceiling of any Celery worker on this machine: a bare Celery task doing the same POST, at the top.
    configs += [("gevent", top, 1.0, "bare")] + [("prefork", c, 1.0, "forwarder") for c in plan.scale_prefork]
    for pool, concurrency, delay, program in configs:
        model = stack.async_model(delay)
        try:
            if pool == "gevent" and concurrency == top and program == "forwarder":
                # The model alone, with as many keep-alive clients as the worker has slots: never the bottleneck.
                served = capacity(model.url + "/predict", concurrency, 3 * delay)
                alone.append({"connections": concurrency, "delay_s": delay, "requests_per_s": served,
                              "ratio_of_limit": served / (concurrency / delay)})
                log(f"scale: model alone, {concurrency} connections, {delay:g} s: {served:.0f} req/s "
                    f"({served / (concurrency / delay):.3f} of the limit)")
            label = f"{pool}-{concurrency}-{delay:g}s" + ("-bare" if program == "bare" else "")
            variant = Variant(label, program=program, pool=pool, concurrency=concurrency)
            # Tasks finish in waves of ``concurrency``: count from the end of the first wave to the end of the
            # last, so a worker at the physical limit measures exactly concurrency / latency.
            tasks = plan.scale_waves * concurrency
            result = measure(stack, variant, tasks, model.url, window=(concurrency, tasks))
            stats = requests.get(model.url + "/stats", timeout=10).json()
        finally:
            model.stop()
        limit = concurrency / delay
        rss = result["memory_mb"]["rss"]
        result.update(concurrency=concurrency, model_delay_s=delay, limit_tasks_per_s=limit,
                      ratio_of_limit=result["tasks_per_s"] / limit, rss_per_in_flight_mb=rss / concurrency,
                      cpu_s_per_1000=(result["cpu_ms_per_task"] or 0.0), model_requests=stats["total"],
                      model_duplicates=stats["duplicates"], model_peak_in_flight=stats["peak_in_flight"])
        rows.append(result)
        log(f"scale {variant.label}: {result['tasks_per_s']:.1f} of {limit:.0f} tasks/s ({result['ratio_of_limit']:.3f}), "
            f"RSS {rss:.0f} MB, USS {result['memory_mb']['uss']:.0f} MB, {result['cpu_s_per_1000']:.2f} CPU s/1000, "
            f"duplicates {stats['duplicates']}, pool errors {result['pool_errors']}")
    ours = next((r for r in rows if r["variant"]["label"] == f"gevent-{top}-1s"), None)
    bare = next((r for r in rows if r["variant"]["label"] == f"gevent-{top}-1s-bare"), None)
    vs_bare = ours["tasks_per_s"] / bare["tasks_per_s"] if ours and bare and bare["tasks_per_s"] else None
    if vs_bare is not None:
        log(f"scale: at {top} in flight the forwarder runs {vs_bare:.2f}x a bare Celery task's tasks/s "
            f"(bare: {bare['ratio_of_limit']:.3f} of the limit, the machine's Celery ceiling)")
    return {"rows": rows, "model_alone": alone, "forwarder_vs_bare_at_top": vs_bare,
            "target": "at 1,024 in flight: >= 0.6 of the physical limit (issue 23), under 150 MB, each request seen "
                      "once; the bare row is the ceiling of a Celery worker on this machine"}


def run_sizing(stack: Stack, plan: Plan) -> dict[str, Any]:
    """Memory and start-up per configuration, with and without ddtrace-run, interleaved and rotated per repetition."""
    configs = [("prefork", c) for c in plan.sizing_prefork] + [("gevent", c) for c in plan.sizing_gevent]
    model = stack.async_model(plan.sizing_model_delay)
    rows = []
    try:
        for rep in range(plan.sizing_reps):
            for pool, concurrency in configs:
                for ddtrace in (True, False) if rep % 2 == 0 else (False, True):
                    label = f"{pool}-{concurrency}{'-ddtrace' if ddtrace else ''}"
                    # MALLOC_ARENA_MAX=2 as the Dockerfile sets it (the bench scrubs it from its own environment).
                    variant = Variant(label, pool=pool, concurrency=concurrency, ddtrace=ddtrace,
                                      env={"MALLOC_ARENA_MAX": "2"})
                    tasks = max(plan.sizing_min_tasks, plan.sizing_waves * concurrency)
                    row = footprint(stack, variant, tasks, model.url)
                    row["rep"] = rep
                    rows.append(row)
                    log(f"sizing {label} #{rep + 1}: ready {row['ready_s']:.2f} s, RSS {row['rss_mib']:.1f} / "
                        f"USS {row['uss_mib']:.1f} / PSS {row['pss_mib']:.1f} MiB over {row['processes']} processes"
                        + (f", child RSS max {row['child_rss_max_mib']:.1f} MiB" if row["child_rss_max_mib"] else ""))
    finally:
        model.stop()
    groups = medians(rows)
    ready_at = {"prefork": max(plan.sizing_prefork), "gevent": plan.sizing_gevent[min(1, len(plan.sizing_gevent) - 1)]}
    return {
        "figures": figures(groups, ready_at),
        "measurements": {"groups": groups, "ddtrace_extra": ddtrace_extra(groups), "rows": rows},
        "meta": {
            "units": f"MiB ({MIB} bytes) for every memory figure, although the keys say _mb; seconds for ready times",
            "figures": "pss_mb/rss_mb fits under ddtrace-run (the production launch): prefork total = prefork_main + "
                       "concurrency x prefork_child; gevent total = gevent_base + concurrency x gevent_slot. "
                       "ddtrace_per_process: what ddtrace-run adds per process (subtract it for a launch without). "
                       "child_rss_max_mb: largest prefork child RSS seen after warm-up under ddtrace-run. "
                       f"ready_seconds: median launch-to-ready-line time under ddtrace-run at prefork {ready_at['prefork']}"
                       f" / gevent {ready_at['gevent']} (polled every 0.1 s).",
            "model_delay_s": plan.sizing_model_delay,
            "tracing": "ddtrace-run runs with DD_TRACE_ENABLED=true, spans sent to a local agent that drops them; "
                       "telemetry and remote configuration off (bench default); MALLOC_ARENA_MAX=2 as in the Dockerfile",
        },
    }


def run_cost(stack: Stack, plan: Plan) -> dict[str, Any]:
    """Each part's cost per task against bare Celery, both pools (``bench.cost``)."""
    return cost.run_cost(stack, cost.CostPlan(tasks=plan.cost_tasks, rounds=plan.cost_rounds), log)


def run_sections(sections: Iterable[str], plan: Plan, meta: dict[str, Any], out: Path) -> None:
    with Stack() as stack:
        for section in sections:
            data = RUNNERS[section](stack, plan)
            data["meta"] = {**data.get("meta", {}), **meta, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                            "loadavg_end": os.getloadavg()}
            (out / f"{section}.json").write_text(json.dumps(data, indent=1, default=str))
            plot(section, data, out / f"{section}.png")


RUNNERS: dict[str, Callable[[Stack, Plan], dict[str, Any]]] = {
    "pools": run_pools, "overhead": run_overhead, "cost": run_cost, "soak": run_soak, "scale": run_scale, "sizing": run_sizing,
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
