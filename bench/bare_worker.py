"""The baseline for the overhead benchmark: a bare Celery worker doing the forwarder's core job, nothing more.

One task under llm-engine's task name POSTs ``request["args"]`` to the model with one pooled
``requests.Session`` per process and returns ``{"result": <model JSON as a string>, "status_code": N}``.
With ``FORWARDER_HOOKS`` containing ``logging`` it also puts one JSON record per task on
``FIREHOSE_STREAM_NAME`` through one boto3 client per process. No validation, no retries, no hook runner,
no redaction, no readiness wait, no failure meta, no ``task_track_started``/``task_acks_late``.

Same knobs as the forwarder where they decide throughput: pool, concurrency, queue, broker/backend,
JSON, prefetch (1 per slot for prefork, 2 for gevent, as the forwarder), ``result_backend_thread_safe``
(without it gevent builds a backend per task), no mingle/gossip, fair scheduling, INFO logging.

Run: ``python -m bench.bare_worker`` with the forwarder's environment variables.
"""

import os

if os.environ.get("CELERY_WORKER_POOL", "prefork") == "gevent":  # before anything imports a socket
    from gevent import monkey

    monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

import requests  # noqa: E402
from celery import Celery, signals  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402

TASK_NAME = "ml_serve.celery_service.exec_func"
READY_LINE = "bare worker ready"

env = os.environ
POOL = env.get("CELERY_WORKER_POOL", "prefork")
CONCURRENCY = int(env.get("CELERY_WORKER_CONCURRENCY", "4"))
MODEL_URL = env.get("FORWARDER_MODEL_URL", "http://localhost:5005/predict")
STREAM = env.get("FIREHOSE_STREAM_NAME", "") if "logging" in env.get("FORWARDER_HOOKS", "") else ""
logger = logging.getLogger("bare")

app = Celery("bare", broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=env["CELERY_QUEUE"],
    worker_prefetch_multiplier=int(env.get("CELERY_WORKER_PREFETCH_MULTIPLIER") or (2 if POOL == "gevent" else 1)),
    result_backend_thread_safe=True,
    worker_hijack_root_logger=True,
    worker_redirect_stdouts=False,
)
# Diagnostics: BARE_MIRROR=track_started,acks_late turns on the forwarder's reliability settings one by one.
_mirror = {name.strip() for name in env.get("BARE_MIRROR", "").split(",") if name.strip()}
if "track_started" in _mirror:
    app.conf.task_track_started = True
if "acks_late" in _mirror:
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)
#: BARE_LLM_ENGINE_RETRIES=1: llm-engine's forwarder's retry settings (``make outage``): late acks, STARTED stored,
#: and a connection error retried by Celery's defaults, 3 times a fixed 180 s apart, the worker taking new
#: messages all along.
LLM_ENGINE_RETRIES = env.get("BARE_LLM_ENGINE_RETRIES", "") == "1"
if LLM_ENGINE_RETRIES:
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, task_track_started=True)
_task_options: dict[str, Any] = {"autoretry_for": (requests.ConnectionError,)} if LLM_ENGINE_RETRIES else {}

_lock = threading.Lock()
_clients: dict[str, Any] = {}
_pid = os.getpid()


def _client(name: str) -> Any:
    """One client of each kind per process, built on first use (so prefork children build their own)."""
    global _pid
    if _pid != os.getpid():
        _clients.clear()
        _pid = os.getpid()
    client = _clients.get(name)
    if client is None:
        with _lock:
            client = _clients.get(name)
            if client is None:
                client = _clients[name] = _build(name)
    return client


def _build(name: str) -> Any:
    if name == "http":
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_maxsize=CONCURRENCY))
        return session
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("firehose", config=Config(max_pool_connections=max(10, CONCURRENCY)))


@app.task(name=TASK_NAME, **_task_options)
def exec_func(request: Any, arrival: Any = None, *args: Any, **kwargs: Any) -> Any:
    body = request.get("args", request)
    response = _client("http").post(MODEL_URL, json=body, timeout=(5, 600))  # noqa: S113
    result = {"result": json.dumps(response.json()), "status_code": response.status_code}
    if STREAM:
        record = {
            "EMITTED_AT": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "REQUEST_BODY": json.dumps(request),
            "RESPONSE_BODY": {**result, "task_id": exec_func.request.id},
        }
        _client("firehose").put_record(DeliveryStreamName=STREAM, Record={"Data": json.dumps(record).encode() + b"\n"})
    return result


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    logger.info("%s: pool=%s concurrency=%d pid=%d", READY_LINE, POOL, CONCURRENCY, os.getpid())


if __name__ == "__main__":
    worker = app.Worker(
        pool=POOL, concurrency=CONCURRENCY, queues=[env["CELERY_QUEUE"]], loglevel=env.get("CELERY_LOG_LEVEL", "INFO"),
        optimization="fair", without_mingle=True, without_gossip=True,
    )
    worker.start()
    raise SystemExit(worker.exitcode or 0)
