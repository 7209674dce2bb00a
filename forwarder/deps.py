"""What a task uses, built from the settings in one place, once per process (no I/O at build time).

This is the only module that turns settings into gateways: the gateways take plain arguments and know
nothing of ``Settings``. ``install`` runs in the worker's main process before the pool starts; prefork
children inherit the objects by fork, and every network client inside them is a ``CachedClient``, which
a child rebuilds for itself on first use (never the parent's sockets or credentials).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from forwarder.extensions import Extensions, default_extensions
from forwarder.hooks import Hook, HookRunner
from forwarder.hooks.callback import CallbackHook
from forwarder.hooks.firehose_log import LoggingHook
from forwarder.model_attempts import RetryPolicy
from forwarder.model_outage import ModelOutage
from forwarder.settings import Settings
from gateways.callback import CallbackClient
from gateways.firehose import FirehoseGateway
from gateways.model_server import ModelClient
from gateways.webhook_signing import WebhookSigner, parse_secrets


@dataclass(frozen=True)
class Deps:
    """What tasks use: settings, the model client and how it is called, the hook runner and the extensions.

    ``outage`` is shared memory (``forwarder.model_outage``): built here, before prefork forks its children,
    so the main process and every child see one state.
    """

    settings: Settings
    model: ModelClient
    outage: ModelOutage
    retry_policy: RetryPolicy
    hooks: HookRunner
    extensions: Extensions


_current: Deps | None = None


def build_deps(settings: Settings) -> Deps:
    """Build the task collaborators (cheap: clients connect lazily).

    The extensions get what they observe or act on here, as they are built: they never reach back for it.
    """
    model = model_client(settings)
    outage = ModelOutage(settings.model_outage_max)
    hooks = HookRunner([build_hook(name, settings) for name in settings.hooks])
    return Deps(
        settings=settings,
        model=model,
        outage=outage,
        retry_policy=retry_policy(settings),
        hooks=hooks,
        extensions=default_extensions(hooks, firehose_gateways(hooks), outage, model.is_ready),
    )


def model_client(settings: Settings) -> ModelClient:
    """The model server's client: FORWARDER_MODEL_URL, FORWARDER_HEALTHCHECK_URL, their timeouts and
    FORWARDER_MAX_RESPONSE_BYTES."""
    return ModelClient(
        settings.model_url,
        settings.healthcheck_url,
        connect_timeout=settings.model_connect_timeout,
        read_timeout=settings.model_read_timeout,
        pool_size=settings.pools.model_connections,
        max_response_bytes=settings.max_response_bytes,
    )


def retry_policy(settings: Settings) -> RetryPolicy:
    """Statuses retried in place (FORWARDER_RETRY_STATUSES), as often and as far apart as FORWARDER_RETRY_*."""
    return RetryPolicy(
        statuses=frozenset(settings.retry_statuses),
        retries=settings.retry_max,
        backoff=settings.retry_backoff,
        backoff_max=settings.retry_backoff_max,
    )


def build_hook(name: str, settings: Settings) -> Hook:
    """One post-inference hook by name (names were validated with the settings)."""
    if name == "callback":
        return callback_hook(settings)
    if name == "logging":
        return logging_hook(settings)
    raise ValueError(f"unknown hook {name!r}")


def callback_hook(settings: Settings) -> CallbackHook:
    """The callback hook as configured by FORWARDER_CALLBACK_*."""
    client = CallbackClient(
        timeout=settings.callback_timeout,
        attempts=settings.callback_attempts,
        allowed_hosts=settings.callback_allowed_hosts,
        pool_size=settings.pools.per_process_clients,
        signer=callback_signer(settings),
    )
    has_default = bool(settings.callback_username or settings.callback_password)
    return CallbackHook(
        client,
        default_url=settings.callback_url,
        default_auth=(settings.callback_username, settings.callback_password) if has_default else None,
        user_id=settings.endpoint_user_id,
    )


def callback_signer(settings: Settings) -> WebhookSigner | None:
    """The callbacks' signer for FORWARDER_CALLBACK_SIGNING_SECRET (validated with the settings); None when unset."""
    keys = parse_secrets(settings.callback_signing_secret)
    return WebhookSigner(keys) if keys else None


def firehose_gateway(settings: Settings) -> FirehoseGateway:
    """The Firehose gateway for FIREHOSE_STREAM_NAME and its role, session, leeway and pool settings."""
    return FirehoseGateway(
        settings.firehose_stream_name,
        role_arn=settings.firehose_role_arn,
        session_duration=settings.firehose_session_duration,
        leeway=timedelta(seconds=settings.firehose_refresh_leeway),
        max_pool_connections=settings.firehose_pool_size,
    )


def logging_hook(settings: Settings) -> LoggingHook:
    """The logging hook for the configured stream and endpoint identity."""
    return LoggingHook(
        firehose_gateway(settings),
        endpoint_id=settings.endpoint_id,
        endpoint_name=settings.endpoint_name,
        endpoint_type=settings.endpoint_type,
        bundle_id=settings.bundle_id,
        labels=settings.labels,
    )


def firehose_gateways(runner: HookRunner) -> list[FirehoseGateway]:
    """The Firehose gateways behind ``runner``'s hooks (for observers such as the metrics)."""
    return [hook.gateway for hook in runner.hooks if isinstance(hook, LoggingHook)]


def install(deps: Deps) -> None:
    """Make ``deps`` the ones tasks in this process use."""
    global _current
    _current = deps


def current() -> Deps:
    """The installed collaborators; raises if the worker was not set up through ``cli``."""
    if _current is None:
        raise RuntimeError("forwarder dependencies are not installed (start the worker with python -m forwarder)")
    return _current
