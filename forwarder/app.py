"""``build_app(settings)``: the Celery app a forwarder needs, with both task names; no I/O."""

from __future__ import annotations

from typing import Any

from celery import Celery

from forwarder import tasks
from forwarder.errors import ModelConnectionError
from forwarder.settings import Settings

#: Seconds to open a connection to Redis (broker and results) before failing over to a retry.
REDIS_CONNECT_TIMEOUT = 5.0
#: Seconds a Redis read may block; above the broker's 1 s BRPOP so polling never trips it.
REDIS_SOCKET_TIMEOUT = 30.0


def build_app(settings: Settings) -> Celery:
    """A Celery app configured for forwarding, with both task names registered."""
    app = Celery("forwarder", set_as_current=True)
    app.conf.update(celery_config(settings))
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
        # Reserve one message per slot: replicas share the queue, yet no slot idles.
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # One result backend (one connection pool / S3 client) per process, not per greenlet.
        "result_backend_thread_safe": True,
        "task_default_queue": settings.queue,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": broker_transport_options(settings),
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
    }
    if settings.broker_is_sqs:
        # Remote control needs a broadcast queue per worker; on SQS that means CreateQueue calls.
        config["worker_enable_remote_control"] = False
        config["worker_send_task_events"] = False
    if settings.result_backend.startswith(("redis://", "rediss://")):
        config.update(
            redis_socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            redis_socket_timeout=REDIS_SOCKET_TIMEOUT,
            redis_retry_on_timeout=True,
            redis_socket_keepalive=True,
        )
    return config


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for Redis or SQS."""
    if settings.broker_is_sqs:
        return {
            "predefined_queues": {settings.queue: {"url": settings.sqs_queue_url}},
            "wait_time_seconds": settings.sqs_wait_time_seconds,
            "polling_interval": settings.sqs_polling_interval,
            "visibility_timeout": settings.visibility_timeout,
        }
    return {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "socket_timeout": REDIS_SOCKET_TIMEOUT,
        "socket_keepalive": True,
    }


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
