"""Negative control for the soak: the forwarder with llm-engine's per-put Firehose client, as it was before.

Every ``put_record`` builds a new boto3 session, calls STS AssumeRole and builds a new Firehose client
(through the real gateway's own pure ``build_firehose_client``, so only the caching differs), then
drops it: the pattern that grew prefork children until the pod was OOM-killed.

``LEAKY_RETAIN=1`` adds how such clients were kept alive: each put's client comes from an ``lru_cache`` on
a method of a per-put object (ruff's B019, which the real code is linted against). The cache lives on the
class and holds every instance, so every session and client stays reachable, as botocore < 1.31's
``lru_cache`` on ``EndpointProvider.resolve_endpoint`` held sessions (boto/boto3#3614), but unbounded.
On the pinned botocore only this variant grows without bound; the plain per-put build is a step (see
bench/README.md). The soak shows both next to the real worker.

Run: ``python -m bench.leaky_worker`` with the forwarder's environment; it then runs ``python -m forwarder``.
"""

from forwarder.pool_bootstrap import bootstrap

bootstrap()  # gevent patch first, before anything below imports a socket

import functools  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
from typing import Any  # noqa: E402

from gateways import firehose  # noqa: E402

RETAIN = os.environ.get("LEAKY_RETAIN") == "1"


class PerPutClient:
    """One put's client, "cached" the wrong way: the method cache keeps ``self`` (and the client) forever."""

    def __init__(self, build: Any) -> None:
        self._build = build

    @functools.cache  # noqa: B019 -- the bug this control reproduces
    def client(self) -> Any:
        return self._build()[0]


class PerCallBuild:
    """Stands in for the gateway's ``CachedClient``: builds a client on every ``get`` and keeps none
    (with ``LEAKY_RETAIN=1``: keeps every one, through ``PerPutClient``)."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self.builds = 0

    def get(self) -> Any:
        self.builds += 1
        if RETAIN:
            return PerPutClient(self._build).client()
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
