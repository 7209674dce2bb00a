"""``make outage``: the model server SIGKILLed for two minutes under a steady load, this worker beside llm-engine's.

Side by side in one run, per pool: the forwarder (intake paused and tasks held in place while the model is away,
``forwarder.model_outage``) and the bench's bare Celery worker on llm-engine's retry settings
(``BARE_LLM_ENGINE_RETRIES=1``: a connection error retried 3 times, a fixed 180 s apart, intake never paused).
Each worker has its own queue and its own model process on its own port; all the models are SIGKILLed at the
same moment and started again on their ports ``--outage`` seconds later, while tasks keep arriving at ``--rate``
per second. Every second the bench samples each worker's completed, failed, waiting (taken, not finished:
held, running or parked as a retry) and queue depth.

Reported per worker: failed tasks, duplicate model calls (a request id the model received more than once, from
the models' request logs), and the extra latency of the tasks the outage caught. JSON and a timeline PNG under
bench/results/ (``outage.json``, ``outage.png``).

Run: ``python -m bench.outage [--outage 120] [--rate 2] [--pools gevent,prefork] [--quick]``; the 10 min outage of
bench/results/outage-600s.*: ``make outage OUTAGE_ARGS="--outage 600"`` (about 20 min: llm-engine's retries run on).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.servers import ServerProcess
from bench.workers import BenchWorker
from devtools.demo import producer as make_producer
from devtools.servers import RedisServer, worker_env

RESULTS = Path(__file__).resolve().parent / "results"
TASK_NAME = "ml_serve.celery_service.exec_func"
DEFAULT_OUTAGE = 120.0
PROGRAMS = {"forwarder": ("forwarder", {}), "llm-engine retries": ("bare", {"BARE_LLM_ENGINE_RETRIES": "1"})}


@dataclass
class Run:
    """One worker under test: its queue, model, request log, the tasks sent and the timeline sampled."""

    label: str
    pool: str
    program: str
    queue: str
    log: Path
    model: ServerProcess
    worker: BenchWorker | None = None
    sent: dict[str, float] = field(default_factory=dict)  # task id -> wall time sent
    numbers: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)


def start_model(port: int | None, log: Path) -> ServerProcess:
    model = ServerProcess("model", 0.0, str(log), ready_path="/readyz")
    if port is not None:
        model.port = port  # started again on the same port, as a restarted container
    return model.start()


def sample(run: Run, results: redis.Redis, broker: redis.Redis, t: float) -> None:
    pending = [i for i in run.sent if i not in run.final]
    for start in range(0, len(pending), 500):
        chunk = pending[start:start + 500]
        for task_id, raw in zip(chunk, results.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True):
            meta = json.loads(raw) if raw else None
            if meta and meta.get("status") in ("SUCCESS", "FAILURE"):
                run.final[task_id] = meta
    done = collections.Counter(m["status"] for m in run.final.values())
    depth = int(broker.llen(run.queue))
    run.timeline.append({"t": round(t, 1), "completed": done["SUCCESS"], "failed": done["FAILURE"], "depth": depth,
                         "waiting": len(run.sent) - len(run.final) - depth})


def finished_at(meta: dict[str, Any]) -> float:
    done = datetime.fromisoformat(meta["date_done"])
    return (done if done.tzinfo else done.replace(tzinfo=UTC)).timestamp()


def summarize(run: Run, outage_start: float, outage_end: float) -> dict[str, Any]:
    seen = collections.Counter(run.log.read_text().split()) if run.log.exists() else collections.Counter()
    latency = {i: finished_at(m) - run.sent[i] for i, m in run.final.items() if m["status"] == "SUCCESS"}
    before = [s for i, s in latency.items() if run.sent[i] + s < outage_start]
    caught = [s for i, s in latency.items() if run.sent[i] < outage_end and run.sent[i] + s >= outage_start]
    baseline = statistics.median(before) if before else 0.0
    return {
        "label": run.label, "pool": run.pool, "sent": len(run.sent),
        "succeeded": sum(m["status"] == "SUCCESS" for m in run.final.values()),
        "failed": sum(m["status"] == "FAILURE" for m in run.final.values()),
        "no_outcome": len(run.sent) - len(run.final),
        "duplicate_model_calls": sum(n - 1 for n in seen.values() if n > 1),
        "requests_seen_twice_or_more": sum(1 for n in seen.values() if n > 1),
        "latency_before_median_s": round(baseline, 3),
        "caught": len(caught),
        "caught_extra_latency_median_s": round(statistics.median(caught) - baseline, 1) if caught else None,
        "caught_extra_latency_p95_s": round(sorted(caught)[int(0.95 * (len(caught) - 1))] - baseline, 1) if caught else None,
        "caught_extra_latency_max_s": round(max(caught) - baseline, 1) if caught else None,
    }


def run_outage(pools: list[str], outage: float, rate: float, before: float, after: float, settle: float) -> dict[str, Any]:
    redis_server = RedisServer().start()
    temp = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    runs: list[Run] = []
    try:
        broker_url, results_url = f"{redis_server.url}/0", f"{redis_server.url}/1"
        for pool in pools:
            for label, (program, _env) in PROGRAMS.items():
                log = temp / f"{pool}-{program}.log"
                runs.append(Run(label, pool, program, f"outage-{uuid.uuid4().hex[:8]}", log, start_model(None, log)))
        for run in runs:
            env = worker_env(CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=results_url, CELERY_QUEUE=run.queue,
                             CELERY_WORKER_POOL=run.pool, CELERY_WORKER_CONCURRENCY="16" if run.pool == "gevent" else "4",
                             FORWARDER_MODEL_URL=f"{run.model.url}/predict",
                             FORWARDER_HEALTHCHECK_URL=f"{run.model.url}/readyz", FORWARDER_METRICS="0",
                             **PROGRAMS[run.label][1])
            run.worker = BenchWorker(env, run.program).start()
        producer = make_producer(broker_url, results_url)
        results = redis.Redis.from_url(results_url)
        broker = redis.Redis.from_url(broker_url)
        t0 = time.time()
        outage_start, outage_end = t0 + before, t0 + before + outage
        stop_sending = outage_end + after
        killed = restarted = False
        n = 0
        next_send = next_sample = t0
        while True:
            now = time.time()
            if not killed and now >= outage_start:
                for run in runs:
                    run.model.process.kill()  # type: ignore[union-attr]  (SIGKILL: every connection drops)
                killed = True
                print(f"  model servers SIGKILLed at t={now - t0:.0f} s", file=sys.stderr)
            if killed and not restarted and now >= outage_end:
                for run in runs:
                    run.model = start_model(run.model.port, run.log)
                restarted = True
                print(f"  model servers back at t={time.time() - t0:.0f} s", file=sys.stderr)
            if now < stop_sending and now >= next_send:
                for run in runs:
                    task = producer.send_task(TASK_NAME, args=[{"args": {"id": n}}, datetime.now(), False], queue=run.queue)
                    run.sent[task.id] = time.time()
                n += 1
                next_send += 1 / rate
            if now >= next_sample:
                for run in runs:
                    sample(run, results, broker, now - t0)
                next_sample += 1.0
                all_done = all(len(r.final) == len(r.sent) for r in runs)
                if now >= stop_sending and (all_done or now >= stop_sending + settle):
                    break
            time.sleep(0.02)
        summary = [summarize(run, outage_start, outage_end) for run in runs]
        producer.close()
        return {"outage_s": outage, "rate_per_s": rate, "outage_start_s": before, "outage_end_s": before + outage,
                "summary": summary,
                "timelines": {f"{r.pool} / {r.label}": r.timeline for r in runs}}
    finally:
        for run in runs:
            if run.worker is not None:
                run.worker.stop(timeout=30)
            run.model.stop()
        redis_server.stop()


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timelines = data["timelines"]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 3.2 * len(timelines)), sharex=True, squeeze=False)
    for ax, (label, timeline) in zip(axes[:, 0], timelines.items(), strict=True):
        t = [p["t"] for p in timeline]
        for key, style in (("completed", "-"), ("failed", "-"), ("waiting", "--"), ("depth", ":")):
            ax.plot(t, [p[key] for p in timeline], style, label="queue depth" if key == "depth" else key)
        ax.axvspan(data["outage_start_s"], data["outage_end_s"], color="red", alpha=0.08, label="model down")
        row = next(s for s in data["summary"] if f"{s['pool']} / {s['label']}" == label)
        ax.set_title(f"{label}: {row['failed']} failed, {row['duplicate_model_calls']} duplicate model calls, "
                     f"caught tasks +{row['caught_extra_latency_median_s']} s median", fontsize=10)
        ax.set_ylabel("tasks")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle(f"Model server SIGKILLed for {data['outage_s']:g} s at {data['rate_per_s']:g} tasks/s", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=DEFAULT_OUTAGE, help="seconds the model stays down "
                        "(results: outage.json/png for the default, outage-<N>s.json/png otherwise)")
    parser.add_argument("--rate", type=float, default=2.0, help="tasks sent per second to each worker")
    parser.add_argument("--pools", default="gevent,prefork")
    parser.add_argument("--quick", action="store_true", help="a 20 s outage, gevent only (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    outage, pools = (20.0, ["gevent"]) if args.quick else (args.outage, args.pools.split(","))
    # Settle: llm-engine's settings retry 180 s apart, three times: a task caught at the end can take 540 s more.
    data = run_outage(pools, outage, args.rate, before=20.0, after=20.0, settle=660.0)
    data["meta"] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "pools": pools}
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    name = "outage" if outage == DEFAULT_OUTAGE or args.quick else f"outage-{outage:g}s"  # other lengths beside it
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out / f"{name}.png")
    for row in data["summary"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
