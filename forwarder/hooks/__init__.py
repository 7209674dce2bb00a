"""Post-inference hooks: small one-method objects run in order after a task's result is stored.

A hook failure is logged with the hook's name and counted; it never changes the stored result, never
fails the task and never stops the worker. Each hook gets its own copy of the response.

A hook that returns False had nothing to do (the callback hook with no URL): it is counted as skipped,
not as a success (llm-engine counts it as a success). An optional observer hears every attempt and its
outcome (``forwarder.extensions.metrics`` turns them into metrics); this package imports no metrics.

This module holds the interface and the runner; each hook is one module beside it: ``callback`` (POST the
response to the caller's URL) and ``firehose_log`` (the ``logging`` hook: one Firehose record per task).
``forwarder.deps`` builds them by name from FORWARDER_HOOKS.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from forwarder import tracing
from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: The outcomes hooks run for (Celery's state names).
SUCCESS, FAILURE = "SUCCESS", "FAILURE"

#: ``observer(hook_name, event, error_type)``; event: "attempt", "success", "skipped" or "failure"
#: (``error_type``: the exception's class name for a failure, else "").
HookObserver = Callable[[str, str, str], None]


class Hook(Protocol):
    """One post-inference hook."""

    name: str

    def __call__(
        self, request: Mapping[str, Any], response: dict[str, Any], task_id: str, state: str = SUCCESS
    ) -> bool | None:
        """Act on one finished task (``state``: SUCCESS or FAILURE). ``response`` already carries ``task_id``
        (for a failure: llm-engine's error payload); raise to report failure, return False when there was
        nothing to deliver (skipped)."""


class HookRunner:
    """Runs every configured hook for a finished task, isolating each failure."""

    def __init__(self, hooks: Sequence[Hook], observer: HookObserver | None = None) -> None:
        self.hooks = tuple(hooks)
        #: Per hook name: "<name>.attempt", "<name>.success", "<name>.skipped", "<name>.failure" (this process).
        self.counts: Counter[str] = Counter()
        self.observers: list[HookObserver] = [observer] if observer is not None else []

    def observe(self, observer: HookObserver) -> None:
        """Add an observer of every hook attempt and outcome (it must not raise; if it does, it is logged)."""
        self.observers.append(observer)

    def run(self, request: Any, response: Any, task_id: str, state: str = SUCCESS) -> None:
        """Run each hook once; log and count, never raise."""
        if not self.hooks:
            return
        request_map = request if isinstance(request, Mapping) else {}
        for hook in self.hooks:
            body = copy.deepcopy(response) if isinstance(response, dict) else {"result": response}
            body["task_id"] = task_id
            self.counts[f"{hook.name}.attempt"] += 1
            self._tell(hook.name, "attempt")
            with tracing.step(tracing.HOOK, task_id, resource=hook.name) as span:
                outcome = self._run_one(hook, request_map, body, task_id, state)
                tracing.tag(span, **{"forwarder.hook.outcome": outcome})

    def _run_one(self, hook: Hook, request: Mapping[str, Any], body: dict[str, Any], task_id: str, state: str) -> str:
        """Run one hook; returns "success", "skipped" or "failure" (logged, counted and observed, never raised)."""
        try:
            delivered = hook(request, body, task_id, state)
        except Exception as exc:
            self._tell(hook.name, "failure", type(exc).__name__)
            failures = self.counts[f"{hook.name}.failure"] = self.counts[f"{hook.name}.failure"] + 1
            # No traceback logged or kept: the message names the cause; releasing it frees its frames.
            logger.warning(
                "hook %s failed for task %s: %s: %s (failures in this process: %d of %d)",
                hook.name, task_id, type(exc).__name__, exc, failures, self.counts[f"{hook.name}.attempt"],
            )
            release_exception(exc)
            return "failure"
        outcome = "skipped" if delivered is False else "success"
        self.counts[f"{hook.name}.{outcome}"] += 1
        self._tell(hook.name, outcome)
        return outcome

    def _tell(self, name: str, event: str, error_type: str = "") -> None:
        for observer in self.observers:
            try:
                observer(name, event, error_type)
            except Exception as exc:  # an observer must not change what the hooks do
                logger.warning("hook observer failed: %s: %s", type(exc).__name__, exc)
                release_exception(exc)

    def close(self) -> None:
        """Release what the hooks hold (clients are closed by the process-wide client cache)."""
