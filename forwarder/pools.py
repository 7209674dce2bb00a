"""How big every connection pool is, from one place: the pool kind and the concurrency decide.

Each pool either holds every task that can use it at once, plus a margin, or blocks (the model's) rather
than raising. What uses each one at once, read in each library's source:

- Broker, Redis: kombu's Redis channel keeps one ``redis.ConnectionPool`` (``max_connections``, 10 by
  default) for every command but BRPOP: acks, the unacked bookkeeping, the redelivery sweep. It raises
  ``MaxConnectionsError`` when full, which kombu turns into "Couldn't ack" (the message then runs again
  after the visibility timeout). gevent: every greenlet acks for itself, so up to ``concurrency`` at once.
  prefork: only the main process acks, one at a time from its event loop.
- Broker, SQS: kombu's boto3 client (``client-config``; botocore's pool, 10 by default, discards extra
  connections rather than raising). gevent: up to ``concurrency`` deletes (acks) at once.
- ``broker_pool_limit``: Celery's pool of broker connections for publishing (a retry publishes the
  retried task); it blocks when empty. gevent: up to ``concurrency`` retries at once.
- Redis results (``redis_max_connections``): one ``redis.ConnectionPool`` per process
  (``result_backend_thread_safe``), raising when full. gevent: every greenlet stores (STARTED, then the
  outcome); prefork: a child stores for its one task.
- Model, callback, Firehose, S3: one pool per process each (``CachedClient``), used by the process's
  tasks: ``concurrency`` of them under gevent, one per prefork child. The model's blocks when full, so a
  worker never opens more sockets to the model than it has tasks in flight.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

#: Connections kept beyond the tasks that can use a pool at once (redelivery sweep, readiness, a reconnect).
MARGIN = 8
#: The libraries' own default pool sizes: never go below them.
LIBRARY_DEFAULT = 10
#: File descriptors per in-flight task (broker, result store, model socket), and for the process itself
#: (listening pipes, log files, shared libraries, the hub, the ddtrace writer).
FDS_PER_TASK = 3
FDS_BASE = 64


@dataclass(frozen=True)
class PoolSizes:
    """The size of each pool the worker holds (see the module docstring for who uses each)."""

    #: Tasks one process runs at once: the concurrency under gevent, one per prefork child.
    tasks_per_process: int
    broker_connections: int
    broker_pool_limit: int
    result_connections: int
    model_connections: int
    per_process_clients: int
    open_files: int


def pool_sizes(pool: str, concurrency: int) -> PoolSizes:
    """The sizing rule, for ``pool`` ("prefork" or "gevent") and ``concurrency`` slots."""
    if pool == "gevent":
        # One process: every slot is a greenlet of it, each with its own ack, store, model call and hooks.
        per_process = concurrency
        acking = concurrency
    else:
        # prefork: each child runs one task at a time; the main process consumes and acks them all in turn.
        per_process = 1
        acking = 1
    return PoolSizes(
        tasks_per_process=per_process,
        broker_connections=max(LIBRARY_DEFAULT, acking + MARGIN),
        broker_pool_limit=max(LIBRARY_DEFAULT, per_process + MARGIN),
        result_connections=max(LIBRARY_DEFAULT, per_process + MARGIN),
        model_connections=per_process,
        per_process_clients=max(LIBRARY_DEFAULT, per_process + MARGIN),
        # The whole worker's need under gevent; prefork's main process holds a pipe pair and a socket per
        # child, and each child is far below it.
        open_files=FDS_PER_TASK * concurrency + FDS_BASE,
    )


def ensure_open_files(needed: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit when it is below ``needed``; returns what was done.

    Raises:
        ValueError: even the hard limit is below ``needed`` (the message names both numbers).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ValueError(
            f"needs about {needed} open files for its concurrency, but the hard limit (ulimit -Hn) is {hard}: "
            "raise it, or lower the concurrency"
        )
    target = needed if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return f"open-file limit raised from {soft} to {target} (needed about {needed})"
