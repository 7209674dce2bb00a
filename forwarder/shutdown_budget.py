"""How long a warm shutdown may take: the floor of a pod's ``terminationGracePeriodSeconds``.

On SIGTERM the worker stops taking messages and waits for every running task to finish: the model's answer,
the result store, the hooks, the ack. Kubernetes SIGKILLs it when the grace period ends, and a task cut there
runs again elsewhere after the visibility timeout. So the grace period must cover the longest task that may
have just started when SIGTERM arrives. The parts, each bounded by a setting or a constant of this worker:

- model: ``FORWARDER_MODEL_CONNECT_TIMEOUT`` + ``FORWARDER_MODEL_READ_TIMEOUT`` (the read timeout bounds each
  silence, not a slow streamed answer: use your longest task if it is longer);
- result store: ``app.RESULT_STORE_RETRIES`` tries with backoff capped at 5 s, rounded up to 30 s;
- callback hook (when on): ``FORWARDER_CALLBACK_RETRIES`` attempts of ``FORWARDER_CALLBACK_TIMEOUT`` each, and
  the backoff between them (0.5 s, doubling, at most 30 s);
- logging hook (when on): one Firehose put, botocore's 3 attempts within the AWS client's timeouts, 15 s;
- a margin for the ack, joining prefork children, process exit and a slow node: 50 s.

``python -m forwarder check`` prints the total for the environment it is given; deploy/ states it and
tests/test_deploy.py checks the manifests against it.
"""

from __future__ import annotations

import math

from forwarder.settings import Settings
from gateways.callback import BACKOFF_INITIAL, BACKOFF_MAX

RESULT_STORE_SECONDS = 30
FIREHOSE_SECONDS = 15
MARGIN_SECONDS = 50


def grace_period_parts(settings: Settings) -> dict[str, int]:
    """Seconds each part of a warm shutdown may take (see the module docstring), by part name; their sum is the
    smallest ``terminationGracePeriodSeconds`` that lets every warm shutdown finish."""
    parts = {
        "model": math.ceil(settings.model_connect_timeout + settings.model_read_timeout),
        "result_store": RESULT_STORE_SECONDS,
    }
    if "callback" in settings.hooks:
        attempts = settings.callback_attempts
        backoff = sum(min(BACKOFF_MAX, BACKOFF_INITIAL * 2**n) for n in range(attempts - 1))
        parts["callback"] = math.ceil(attempts * settings.callback_timeout + backoff)
    if "logging" in settings.hooks:
        parts["logging"] = FIREHOSE_SECONDS
    parts["margin"] = MARGIN_SECONDS
    return parts

