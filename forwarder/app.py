"""``build_app(settings)``: the Celery app a forwarder needs, with both task names; no I/O."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from forwarder import tasks
from forwarder.settings import Settings
from gateways.model_server import ModelConnectionError

#: Seconds to open a connection to Redis (broker and results) before failing over to a retry.
REDIS_CONNECT_TIMEOUT = 5.0
#: Seconds a Redis read may block; above the broker's 1 s BRPOP so polling never trips it.
REDIS_SOCKET_TIMEOUT = 30.0
#: A result store that fails (connection reset, S3 5xx or timeout) is retried this many times, with full-jitter
#: backoff from 0.2 s up to 5 s (Celery's result_backend_always_retry), before the task is handed back.
RESULT_STORE_RETRIES = 5
RESULT_STORE_BACKOFF_MS = (200, 5000)
#: The Redis result backend's own reconnect loop inside each store (Celery's default: 20 tries, ~20 s).
REDIS_RESULT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
#: AWS SQS endpoints: sqs.<region>.amazonaws.com[.cn], VPC endpoints ...sqs.<region>.vpce.amazonaws.com,
#: and the legacy <region>.queue.amazonaws.com.
_SQS_HOST = re.compile(
    r"(?:^|\.)sqs\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.(?:vpce\.)?amazonaws\.com(?:\.cn)?$"
    r"|^(?P<legacy>[a-z]{2}(?:-[a-z]+)+-\d+)\.queue\.amazonaws\.com(?:\.cn)?$"
)


def build_app(settings: Settings) -> Celery:
    """A Celery app configured for forwarding, with both task names registered."""
    app = Celery("forwarder", set_as_current=True)
    app.conf.update(celery_config(settings))
    # Not through result_backend: Celery lets os.environ["CELERY_RESULT_BACKEND"] (the variable this worker
    # is configured by) win over the app's configuration. backend_cls wins over both.
    app.backend_cls = result_backend_class(settings)
    register_tasks(app, settings)
    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a production forwarder."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # JSON only: a pickle message could run code in the worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the result is stored, and hand the message back if the process running it dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        # Reserve little more than the slots can run: replicas share the queue, yet no slot idles.
        "worker_prefetch_multiplier": settings.effective_prefetch_multiplier,
        # One result backend (one connection pool / S3 client) per process, not per greenlet.
        "result_backend_thread_safe": True,
        # Publishing (retries) from every slot at once; sizes from forwarder.pools.
        "broker_pool_limit": settings.pools.broker_pool_limit,
        # A store that blips is retried (both backends: Redis connection errors, and S3's through
        # gateways.s3_backend.exception_safe_to_retry); one that stays down makes tasks.CheckedRequest hand
        # the message back instead of acking a task whose outcome nobody can read.
        "result_backend_always_retry": True,
        "result_backend_max_retries": RESULT_STORE_RETRIES,
        "result_backend_base_sleep_between_retries_ms": RESULT_STORE_BACKOFF_MS[0],
        "result_backend_max_sleep_between_retries_ms": RESULT_STORE_BACKOFF_MS[1],
        "task_default_queue": settings.queue,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
    }
    if settings.broker_is_sqs:
        # Remote control needs a broadcast queue per worker (CreateQueue on SQS), which kombu refuses
        # once queues are predefined; events would need their own queues too.
        config["worker_enable_remote_control"] = False
        config["worker_send_task_events"] = False
        from gateways.sqs_transport import TRANSPORT_PATH

        # kombu's SQS transport, but prefork resumes polling as soon as a slot frees (see the module).
        config["broker_transport"] = TRANSPORT_PATH
    elif settings.broker_url.startswith("redis://"):
        from gateways.redis_transport import TRANSPORT_PATH as REDIS_TRANSPORT_PATH

        # kombu's Redis transport, but a message taken from the queue is never only on the wire (see the
        # module). rediss:// keeps kombu's own: an explicit transport would lose kombu's TLS default.
        config["broker_transport"] = REDIS_TRANSPORT_PATH
    if settings.result_backend.startswith("s3://"):
        # Read by gateways.s3_backend (see result_backend_class); the endpoint is boto3's own
        # AWS_ENDPOINT_URL, the credentials boto3's default chain.
        config["s3_max_pool_connections"] = settings.pools.per_process_clients
        if settings.aws_region:
            config["s3_region"] = settings.aws_region
    if settings.result_backend.startswith(("redis://", "rediss://")):
        config.update(
            result_backend_transport_options={"retry_policy": REDIS_RESULT_RETRY_POLICY},
            redis_max_connections=settings.pools.result_connections,
            redis_socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            redis_socket_timeout=REDIS_SOCKET_TIMEOUT,
            redis_retry_on_timeout=True,
            redis_socket_keepalive=True,
        )
    return config


def result_backend_class(settings: Settings) -> str:
    """The backend Celery must use instead of the one its URL names (``forwarder.result_backends``).

    As ``<class path>+<url>``, which Celery splits into the class to import and the URL to give it; only
    this app is affected. For s3://bucket/prefix: one S3 client per process, built lazily in that process.
    """
    from forwarder.result_backends import backend_class

    return backend_class(settings.result_backend)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for Redis or SQS."""
    if settings.broker_is_sqs:
        # Predefined: kombu neither lists nor creates queues, and refuses any queue not named here. The
        # worker consumes CELERY_QUEUE's entry (llm-engine: the queue's own name). The endpoint is
        # boto3's own AWS_ENDPOINT_URL; the region AWS_REGION if set, else boto3's chain
        # (AWS_DEFAULT_REGION), and an AWS queue URL's own region wins for its queue.
        queue: dict[str, Any] = {"url": settings.sqs_queue_url}
        queue_region = sqs_queue_region(settings.sqs_queue_url)
        if queue_region:
            queue["region"] = queue_region
        predefined = {settings.queue: queue}
        url_name = sqs_queue_name(settings.sqs_queue_url)
        if url_name and url_name != settings.queue:
            # Acks and retries look the queue up by the name the producer routed to (llm-engine: the
            # SQS queue's own name). Were only CELERY_QUEUE defined, and another name, every ack would
            # raise UndefinedQueueException and the message come back after its visibility timeout,
            # again and again.
            predefined[url_name] = queue
        options: dict[str, Any] = {
            "predefined_queues": predefined,
            # Short polling by default (0, as llm-engine): a long poll still open when a worker exits
            # (warm shutdown, rolling restart) can be handed the next message, which then stays
            # invisible until the queue's VisibilityTimeout (hours in production). Whole seconds: boto3
            # rejects a float, even 0.0. An empty poll waits polling_interval (default 1 s) before the
            # next, a non-empty one is followed at once: an idle worker picks a task up within about a
            # second (median ~0.5 s measured) for about one ReceiveMessage a second (one poller per
            # worker: the main process under prefork).
            "wait_time_seconds": settings.sqs_wait_time_seconds,
            "polling_interval": settings.sqs_polling_interval,
            # Unused with predefined queues (the queue's own VisibilityTimeout applies).
            "visibility_timeout": settings.visibility_timeout,
            # kombu's boto3 client (acks are DeleteMessage calls, one per slot at once under gevent).
            "client-config": {"max_pool_connections": settings.pools.broker_connections},
        }
        if settings.aws_region:
            options["region"] = settings.aws_region
        return options
    return {
        "visibility_timeout": settings.visibility_timeout,
        # kombu's pool for acks and bookkeeping raises when full ("Couldn't ack"): one per acking slot.
        "max_connections": settings.pools.broker_connections,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "socket_timeout": REDIS_SOCKET_TIMEOUT,
        "socket_keepalive": True,
    }


def sqs_queue_name(url: str) -> str:
    """The queue's name: the last path segment of its URL."""
    return urlsplit(url).path.rstrip("/").rpartition("/")[2]


def sqs_queue_region(url: str) -> str | None:
    """The region in an AWS SQS queue URL (``https://sqs.us-west-2.amazonaws.com/...``), else None."""
    host = urlsplit(url).hostname or ""
    match = _SQS_HOST.search(host)
    if match is None:
        return None
    return match.group("region") or match.group("legacy")


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register the forward task under llm-engine's two names, with bounded retries."""
    for name in tasks.TASK_NAMES:
        app.task(
            name=name,
            base=tasks.ForwardTask,
            track_started=True,
            autoretry_for=(ModelConnectionError,),
            max_retries=settings.retry_max,
            retry_backoff=settings.retry_backoff,
            retry_backoff_max=settings.retry_backoff_max,
            retry_jitter=True,
        )(tasks.exec_func)
