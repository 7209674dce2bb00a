"""Close the process's cached clients (model and callback sessions, Firehose, S3) when it stops."""

from __future__ import annotations

from forwarder.extensions.base import Extension
from gateways.cached_client import close_all


class CloseClients(Extension):
    """Every ``CachedClient`` of the process is closed at its shutdown (sockets released cleanly)."""

    def process_stop(self) -> None:
        close_all()
