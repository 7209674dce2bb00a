"""Post-inference hooks: small one-method objects run in order after a task's result is stored.

A hook failure is logged with the hook's name and counted; it never changes the stored result, never
fails the task and never stops the worker. Each hook gets its own copy of the response.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from forwarder import tracing
from gateways.errors import release_exception

logger = logging.getLogger(__name__)

#: The outcomes hooks run for (Celery's state names).
SUCCESS, FAILURE = "SUCCESS", "FAILURE"


class Hook(Protocol):
    """One post-inference hook."""

    name: str

    def __call__(
        self, request: Mapping[str, Any], response: dict[str, Any], task_id: str, state: str = SUCCESS
    ) -> None:
        """Act on one finished task (``state``: SUCCESS or FAILURE). ``response`` already carries ``task_id``
        (for a failure: llm-engine's error payload); raise to report failure."""


class HookRunner:
    """Runs every configured hook for a finished task, isolating each failure."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = tuple(hooks)
        #: Per hook name: "<name>.attempt", "<name>.success", "<name>.failure" (this process).
        self.counts: Counter[str] = Counter()

    def run(self, request: Any, response: Any, task_id: str, state: str = SUCCESS) -> None:
        """Run each hook once; log and count, never raise."""
        if not self.hooks:
            return
        request_map = request if isinstance(request, Mapping) else {}
        for hook in self.hooks:
            body = copy.deepcopy(response) if isinstance(response, dict) else {"result": response}
            body["task_id"] = task_id
            self.counts[f"{hook.name}.attempt"] += 1
            with tracing.step(tracing.HOOK, task_id, resource=hook.name) as span:
                outcome = self._run_one(hook, request_map, body, task_id, state)
                tracing.tag(span, **{"forwarder.hook.outcome": outcome})

    def _run_one(self, hook: Hook, request: Mapping[str, Any], body: dict[str, Any], task_id: str, state: str) -> str:
        """Run one hook; returns "success" or "failure" (logged and counted, never raised)."""
        try:
            hook(request, body, task_id, state)
        except Exception as exc:
            failures = self.counts[f"{hook.name}.failure"] = self.counts[f"{hook.name}.failure"] + 1
            # No traceback logged or kept: the message names the cause; releasing it frees its frames.
            logger.warning(
                "hook %s failed for task %s: %s: %s (failures in this process: %d of %d)",
                hook.name, task_id, type(exc).__name__, exc, failures, self.counts[f"{hook.name}.attempt"],
            )
            release_exception(exc)
            return "failure"
        self.counts[f"{hook.name}.success"] += 1
        return "success"

    def close(self) -> None:
        """Release what the hooks hold (clients are closed by the process-wide client cache)."""
