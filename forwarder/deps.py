"""The collaborators a task needs, built once per process from the settings (no I/O at build time).

``install`` runs in the worker's main process before the pool starts; prefork children inherit the
objects by fork, and every network client inside them is a ``CachedClient``, which a child rebuilds
for itself on first use (never the parent's sockets or credentials).
"""

from __future__ import annotations

from dataclasses import dataclass

from forwarder.hooks import HookRunner, build_hooks
from forwarder.model_client import ModelClient
from forwarder.settings import Settings


@dataclass(frozen=True)
class Deps:
    """What tasks use: settings, the model client and the hook runner."""

    settings: Settings
    model: ModelClient
    hooks: HookRunner


_current: Deps | None = None


def build_deps(settings: Settings) -> Deps:
    """Build the task collaborators (cheap: clients connect lazily)."""
    model = ModelClient(
        settings.model_url,
        settings.healthcheck_url,
        connect_timeout=settings.model_connect_timeout,
        read_timeout=settings.model_read_timeout,
        pool_size=settings.concurrency,
    )
    return Deps(settings=settings, model=model, hooks=build_hooks(settings))


def install(deps: Deps) -> None:
    """Make ``deps`` the ones tasks in this process use."""
    global _current
    _current = deps


def current() -> Deps:
    """The installed collaborators; raises if the worker was not set up through ``cli``."""
    if _current is None:
        raise RuntimeError("forwarder dependencies are not installed (start the worker with python -m forwarder)")
    return _current
