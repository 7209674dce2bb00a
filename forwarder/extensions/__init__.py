"""Everything the worker runs around a task and around a process, in order: the one place to look.

What happens to one message, start to end:

1. The consumer decodes it; ``tasks.CheckedRequest`` refuses a malformed body (stores a FAILURE when
   the task id is known) instead of letting it crash the consumer.
2. ``before_task`` of each extension below, in list order (one may hand the message back).
3. The task body (``tasks.exec_func``): plan the request, POST it to the model (``model_attempts``: held in
   place while the model server is away, ``model_outage``), shape the result; Celery stores it (SUCCESS,
   or FAILURE, or schedules a RETRY).
4. ``ForwardTask.after_return`` (SUCCESS or FAILURE): llm-engine's failure meta, then the
   post-inference hooks (``hooks.HookRunner``: callback, logging), then ``after_task`` of each extension
   in reverse order.
5. ``task_done`` of each extension in reverse order, for every outcome (Celery's ``task_postrun``).
6. Celery acks the message (late acks: only now); ``tasks.CheckedRequest.acknowledge`` retries a broker
   blip with backoff (``forwarder.acks``) instead of losing the ack, and settles a message whose channel a
   reconnect closed through the new one (``extensions.reconnect``).

Around each process: ``install`` (once, before the worker is built), ``process_start`` (main process
and each prefork child), ``process_ready`` (once consuming), ``process_stop``. See ``base.Extension``.
Before any of it, ``cli`` checks the open-file limit against the concurrency, and every connection pool
is sized from it in one place (``forwarder.pools``).

Adding a concern: one module in this package, one line in ``default_extensions``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from forwarder.extensions.base import Extension, Extensions
from forwarder.extensions.close_clients import CloseClients
from forwarder.extensions.delivery_cap import CapDeliveries
from forwarder.extensions.expiry import ExpireOldRequests
from forwarder.extensions.memory_debug import MemoryDebug
from forwarder.extensions.metrics import TaskMetrics
from forwarder.extensions.model_outage import PauseIntakeWhileModelAway
from forwarder.extensions.probes import HealthProbes
from forwarder.extensions.ready_line import ReadyLine
from forwarder.extensions.reconnect import AdoptReconnects
from forwarder.extensions.redelivery import RedeliverySweep
from forwarder.extensions.release_exceptions import ReleaseExceptions
from forwarder.extensions.secret_logs import KeepSecretsOutOfLogs
from forwarder.extensions.shutdown_handback import HandBackOnShutdown
from forwarder.extensions.summary import Summary
from forwarder.extensions.task_log import TaskLog
from forwarder.extensions.trace_errors import FlagFailuresInTrace
from forwarder.hooks import HookRunner
from forwarder.model_outage import ModelOutage
from gateways.firehose import FirehoseGateway

__all__ = ["Extension", "Extensions", "default_extensions"]


def default_extensions(
    hooks: HookRunner | None = None,
    firehose: Sequence[FirehoseGateway] = (),
    outage: ModelOutage | None = None,
    model_ready: Callable[[], tuple[bool, str]] | None = None,
) -> Extensions:
    """The worker's extensions, outermost first (``after_task``/``task_done``/``process_stop`` run last to first).

    What some of them observe or act on is handed over here (``forwarder.deps`` builds it): the hook runner and
    the Firehose gateways behind it (metrics), the shared model-outage state (metrics, intake control) and the
    model's readiness check (the outage watcher). Without them those parts stay off (extensions alone, in tests).
    """
    return Extensions(
        [
            KeepSecretsOutOfLogs(),  # credential loggers at INFO+, refused messages without contents
            ReleaseExceptions(),  # last word on every task: free the frames its exception holds
            TaskLog(),  # JSON or text log format; one line per finished task (its clock starts first)
            CloseClients(),  # process stop: close every cached client
            MemoryDebug(),  # FORWARDER_MEMORY_DEBUG: per-process tracing and dumps; else SIGUSR2 ignored
            TaskMetrics(hooks, firehose, outage),  # DogStatsD: every attempt (refused ones too), outcomes, hooks, saturation, RSS
            Summary(),  # FORWARDER_SUMMARY_INTERVAL: a log line of counts, in flight and model p50/p99
            RedeliverySweep(),  # Redis broker: restore a dead worker's unacked messages every few seconds
            AdoptReconnects(),  # Redis broker: after a reconnect, settle late acks on the new channel, strand nothing
            ReadyLine(),  # "forwarder ready: ..." once consuming
            HealthProbes(),  # files for `probe live|ready`: a heartbeat from the consumer's loop, ready/stopping marks
            PauseIntakeWhileModelAway(outage, model_ready),  # model server away: no intake, taken tasks wait in place (model_outage)
            FlagFailuresInTrace(),  # ddtrace: a failed task's span is an error
            ExpireOldRequests(),  # FORWARDER_REQUEST_TTL: a request that waited too long: stored FAILURE, unrun
            CapDeliveries(),  # a message whose deliveries all killed their worker: refused, stored FAILURE
            HandBackOnShutdown(),  # warm shutdown: requeue, unrun, a task that would start now
        ]
    )
