"""The gateways' exception root, and how a handled exception lets go of the frames it holds."""

from __future__ import annotations

import traceback


class GatewayError(Exception):
    """Root of every error a gateway raises on purpose: an outside service failed in an expected way."""


def release_exception(exc: BaseException | None) -> None:
    """Free what an exception holds once it has been handled (logged, stored, retried).

    A traceback keeps every frame it passed through alive, with their locals (a request, a model
    answer, a response buffer), and ``raise Other(...) from exc`` leaves a cycle that only a late
    gen-2 collection frees. This clears the finished frames of the exception and of every exception
    chained to it (``__cause__``, ``__context__``) and drops the tracebacks; frames still running (the
    caller's) are left alone. Celery's own ``traceback_clear`` covers only the outermost traceback.
    """
    pending = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)
