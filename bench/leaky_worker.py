"""Negative control for the soak: the forwarder with llm-engine's per-put Firehose client, as it was before.

Every ``put_record`` builds a new boto3 session, calls STS AssumeRole and builds a new Firehose client
(through the real gateway's own pure ``build_firehose_client``, so only the caching differs), then
drops it: the pattern that grew prefork children until the pod was OOM-killed. The soak must show a
clearly larger RSS slope for this worker than for the real one.

Run: ``python -m bench.leaky_worker`` with the forwarder's environment; it then runs ``python -m forwarder``.
"""

from forwarder.pool_bootstrap import bootstrap

bootstrap()  # gevent patch first, before anything below imports a socket

import runpy  # noqa: E402
from typing import Any  # noqa: E402

from gateways import firehose  # noqa: E402


class PerCallBuild:
    """Stands in for the gateway's ``CachedClient``: builds a client on every ``get`` and keeps none."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self.builds = 0

    def get(self) -> Any:
        self.builds += 1
        client, _expiry = self._build()
        return client

    def close(self) -> None:
        pass


_original_init = firehose.FirehoseGateway.__init__


def _leaky_init(self: firehose.FirehoseGateway, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    cache = self.client_cache
    build = getattr(cache, "_build", None)
    if build is None:
        raise RuntimeError("gateways.firehose.FirehoseGateway.client_cache has no _build: update bench.leaky_worker")
    self.client_cache = PerCallBuild(build)  # type: ignore[assignment]


firehose.FirehoseGateway.__init__ = _leaky_init  # type: ignore[method-assign]

runpy.run_module("forwarder", run_name="__main__", alter_sys=True)
