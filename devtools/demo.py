"""``python -m forwarder demo``: the whole flow on this machine, with nothing to set up.

Starts a Redis-protocol server and the example model server, launches the worker as production does
(``python -m forwarder``), sends sample tasks exactly as llm-engine's gateway sends them, prints each
stored result and a summary, then shuts everything down.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from celery import Celery

from devtools.servers import ModelServer, RedisServer, WorkerProcess, worker_env
from forwarder.tasks import LEGACY_TASK_NAME, TASK_NAME

QUEUE = "demo-endpoint"


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


def run_demo(pool: str = "prefork", tasks: int = 8) -> int:
    """Run the demo end to end; returns 0 when every task succeeded."""
    redis = RedisServer().start()
    model = ModelServer().start()
    model.behaviour.delay = 0.05
    env = worker_env(
        CELERY_WORKER_POOL=pool,
        CELERY_BROKER_URL=f"{redis.url}/0",
        CELERY_RESULT_BACKEND=f"{redis.url}/1",
        CELERY_QUEUE=QUEUE,
        CELERY_WORKER_CONCURRENCY="4",
        FORWARDER_MODEL_URL=f"{model.url}/predict",
        FORWARDER_HEALTHCHECK_URL=f"{model.url}/readyz",
    )
    worker = WorkerProcess(env)
    print(f"demo: redis-protocol server {redis.url}, model server {model.url}, pool {pool}")
    try:
        worker.start(timeout=60)
        print(f"demo: worker ready (pid {worker.pid}); sending {tasks} tasks to queue {QUEUE!r}")
        app = producer(f"{redis.url}/0", f"{redis.url}/1")
        started = time.monotonic()
        results = []
        for index in range(tasks):
            name = LEGACY_TASK_NAME if index % 4 == 3 else TASK_NAME
            results.append((name, send(app, {"args": {"id": index, "prompt": f"hello {index}"}}, name)))
        ok = 0
        for name, result in results:
            value = result.get(timeout=60)
            ok += result.status == "SUCCESS"
            print(f"  {result.id[:8]} {name.rsplit('.', 1)[-1]:>9} {result.status}: {value}")
        elapsed = time.monotonic() - started
        memory = worker.memory()
        print(
            f"demo: {ok}/{tasks} tasks succeeded in {elapsed:.2f} s; worker memory "
            f"{memory['rss']:.0f} MB RSS over {memory['processes']:.0f} process(es)"
        )
        app.close()
        return 0 if ok == tasks else 1
    finally:
        code = worker.stop()
        print(f"demo: worker stopped (exit {code}); servers stopped")
        model.stop()
        redis.stop()
