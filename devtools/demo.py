"""``make demo`` (``python -m devtools.demo``): the whole flow on this machine, with nothing to set up.

Starts a Redis-protocol server, the example model server and a callback endpoint, launches the worker as
production does (``python -m forwarder``), and sends tasks exactly as llm-engine's gateway sends them: some
that succeed, one the model answers 422 (stored as a result with its status code, as llm-engine does), and
one whose answer is not JSON (a FAILURE with llm-engine's error payload). Then it shows what a user meets:
the stored results, the callbacks the endpoint received, the worker's task lines and summary line, and
``probe ready`` passing; and ends with one short table. Everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from typing import Any

from celery import Celery

from devtools.servers import CallbackServer, ModelServer, RedisServer, WorkerProcess, wait_for, worker_env
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME

QUEUE = "demo-endpoint"
#: Request ids the example model answers differently.
REJECTED_ID, GARBAGE_ID = "bad-request", "not-json"


def producer(broker: str, backend: str) -> Celery:
    """A bare Celery app, as llm-engine's gateway builds one, to send tasks and read results."""
    app = Celery("producer", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


def send(  # noqa: ANN201
    app: Celery, request: Any, task_name: str = TASK_NAME, queue: str = QUEUE, arrival: datetime | None = None,
    **options: Any,
):
    """Send one request the way llm-engine does: [request, arrival datetime (default: now), return_pickled]
    (``options``: to ``send_task``, e.g. ``headers``)."""
    arrival = datetime.now() if arrival is None else arrival
    return app.send_task(task_name, args=[request, arrival, False], kwargs={}, queue=queue, expires=86400,
                         **options)


def stored_meta(app: Celery, task_id: str) -> dict[str, Any]:
    """The result meta as stored (what llm-engine's gateway reads), not Celery's rebuilt exception."""
    raw = app.backend.get(app.backend.get_key_for_task(task_id))
    return json.loads(raw) if raw else {}


def lines_with(output: str, marker: str) -> list[str]:
    return [line for line in output.splitlines() if marker in line]


def summary_total(output: str, key: str) -> int:
    total = 0
    for line in lines_with(output, "forwarder summary: "):
        for field in line.split("forwarder summary: ", 1)[1].split():
            name, _, value = field.partition("=")
            if name == key and value.isdigit():
                total += int(value)
    return total


def run_demo(pool: str = "prefork", tasks: int = 8) -> int:
    """Run the demo end to end; returns 0 when every outcome is the one expected."""
    began = time.monotonic()
    redis, model, callbacks = RedisServer().start(), ModelServer().start(), CallbackServer().start()
    model.behaviour.delay = 0.05
    model.behaviour.status_by_id[REJECTED_ID] = 422  # the model refuses this request
    model.behaviour.mode_by_id[GARBAGE_ID] = "text"  # the model answers something that is not JSON
    env = worker_env(
        CELERY_WORKER_POOL=pool,
        CELERY_BROKER_URL=f"{redis.url}/0",
        CELERY_RESULT_BACKEND=f"{redis.url}/1",
        CELERY_QUEUE=QUEUE,
        CELERY_WORKER_CONCURRENCY="4",
        FORWARDER_MODEL_URL=f"{model.url}/predict",
        FORWARDER_HEALTHCHECK_URL=f"{model.url}/readyz",
        FORWARDER_HOOKS="callback",
        FORWARDER_CALLBACK_URL=f"{callbacks.url}/done",
        FORWARDER_CALLBACK_ALLOWED_HOSTS="127.0.0.1",  # the demo's endpoint is local (refused by default)
        FORWARDER_SUMMARY_INTERVAL="1",
    )
    worker = WorkerProcess(env)
    print(f"demo: redis-protocol server {redis.url}, model server {model.url}, callbacks {callbacks.url}, pool {pool}")
    checks: list[tuple[str, str, bool]] = []
    app: Celery | None = None
    try:
        worker.start(timeout=60)
        print(f"demo: worker ready (pid {worker.pid}) in {time.monotonic() - began:.1f} s")
        app = producer(f"{redis.url}/0", f"{redis.url}/1")
        good = max(1, tasks - 2)
        sent = [(TASK_NAME if n % 4 != 3 else LEGACY_TASK_NAME, {"args": {"id": n, "prompt": f"hello {n}"}})
                for n in range(good)]
        sent += [(TASK_NAME, {"args": {"id": REJECTED_ID}}), (TASK_NAME, {"args": {"id": GARBAGE_ID}})]
        print(f"demo: sending {len(sent)} tasks to queue {QUEUE!r} as llm-engine does")
        results = [(name, send(app, request, name)) for name, request in sent]

        for _, result in results:
            result.get(timeout=60, propagate=False)
        # The hooks run after the stored result is final (a failure's llm-engine meta included)
        wait_for(lambda: len(callbacks.bodies) >= len(sent), 20, "a callback per task")

        print("\n== stored results (what llm-engine's gateway reads)")
        states: Counter[str] = Counter()
        for name, result in results:
            meta = stored_meta(app, result.id)
            states[meta.get("status", "?")] += 1
            short = name.rsplit(".", 1)[-1]
            if meta.get("status") == "SUCCESS":
                print(f"  {result.id[:8]} {short:>9} SUCCESS status_code={meta['result']['status_code']}: "
                      f"{meta['result']['result'][:60]}")
            else:
                failure = meta.get("result") or {}
                payload = json.loads(failure.get("custom") or "{}")
                print(f"  {result.id[:8]} {short:>9} {meta.get('status')} {failure.get('exc_type')}, custom: "
                      f"error={payload.get('error', '')[:45]!r}… "
                      f"error_metadata={payload.get('error_metadata', '').splitlines()[0]!r}+trace")
        codes = Counter(stored_meta(app, r.id).get("result", {}).get("status_code") for _, r in results)
        checks += [
            ("successes stored", f"{codes[200]}/{good}", codes[200] == good),
            ("model 4xx stored as a result", f"status_code 422: {codes[422]}", codes[422] == 1),
            ("failure with llm-engine's error payload", f"FAILURE: {states['FAILURE']}", states["FAILURE"] == 1
             and all("error_metadata" in json.loads((stored_meta(app, r.id).get("result") or {}).get("custom") or "{}")
                     for _, r in results if stored_meta(app, r.id).get("status") == "FAILURE")),
        ]

        print("\n== callbacks received by the caller's endpoint")
        for body in callbacks.bodies:
            state = body.get("state", "SUCCESS")
            detail = body.get("error", "")[:50] if state == "FAILURE" else f"status_code={body.get('status_code')}"
            print(f"  {str(body.get('task_id'))[:8]} {state} {detail}")
        checks.append(("callbacks received", f"{len(callbacks.bodies)}/{len(sent)}", len(callbacks.bodies) == len(sent)))

        wait_for(lambda: len(lines_with(worker.output, "task finished: ")) >= len(sent), 20, "a line per task")
        wait_for(lambda: summary_total(worker.output, "done") + summary_total(worker.output, "failed") >= len(sent),
                 10, "summary lines covering every task")
        print("\n== the worker's log: one line per task, and the summary line")
        shown = ("state", "model_status_code", "model_duration_ms", "total_duration_ms", "error_type")
        for line in lines_with(worker.output, "task finished: "):
            fields = dict(field.partition("=")[::2] for field in line.split("task finished: ", 1)[1].split())
            print(f"  task finished: task_id={fields.get('task_id', '')[:8]}… "
                  + " ".join(f"{key}={fields.get(key)}" for key in shown))
        summary = [line for line in lines_with(worker.output, "forwarder summary: ") if " done=0 " not in line]
        print("  " + summary[-1].split("] ", 1)[-1])
        checks.append(("task lines", str(len(lines_with(worker.output, "task finished: "))), True))
        checks.append(("summary line", "done+failed=" + str(summary_total(worker.output, "done")
                                                             + summary_total(worker.output, "failed")), True))

        probe = subprocess.run([sys.executable, "-m", "forwarder", "probe", "ready"], env=worker.env,
                               capture_output=True, text=True, timeout=30)
        print(f"\n== python -m forwarder probe ready: exit {probe.returncode}: {(probe.stdout + probe.stderr).strip()}")
        checks.append(("probe ready", f"exit {probe.returncode}", probe.returncode == 0))
    finally:
        if app is not None:
            app.close()
        code = worker.stop()
        model.stop()
        callbacks.stop()
        redis.stop()
    memory_note = f"worker exit {code}, servers stopped, {time.monotonic() - began:.1f} s in all"
    width = max(len(name) for name, _, _ in checks)
    print(f"\n{'what':<{width}}  {'seen':<22} ok")
    for name, seen, ok in checks:
        print(f"{name:<{width}}  {seen:<22} {'yes' if ok else 'NO'}")
    print(f"demo: {memory_note}")
    return 0 if all(ok for _, _, ok in checks) and code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m devtools.demo [--pool prefork|gevent] [--tasks N]``."""
    parser = argparse.ArgumentParser(prog="python -m devtools.demo", description="run the whole flow locally on "
                                     "embedded servers (a source checkout's dev tooling, never in the image)")
    parser.add_argument("--pool", choices=("prefork", "gevent"), default="prefork")
    parser.add_argument("--tasks", type=int, default=8, help="sample tasks to send (default 8)")
    args = parser.parse_args(argv)
    return run_demo(pool=args.pool, tasks=args.tasks)


if __name__ == "__main__":
    raise SystemExit(main())
