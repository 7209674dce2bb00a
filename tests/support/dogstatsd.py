"""A DogStatsD stand-in: a UDP listener on 127.0.0.1 that parses every packet a worker sends."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devtools.servers import wait_for

__all__ = ["Agent", "Packet", "agent", "statsd_env"]


@dataclass(frozen=True)
class Packet:
    name: str
    value: float
    kind: str
    tags: frozenset[str]

    @classmethod
    def parse(cls, line: str) -> Packet:
        head, *fields = line.split("|")
        name, _, value = head.rpartition(":")
        tags = next((field[1:].split(",") for field in fields[1:] if field.startswith("#")), [])
        return cls(name, float(value), fields[0], frozenset(tags))


class Agent:
    """A DogStatsD stand-in: every packet received on 127.0.0.1:<port>, parsed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.packets: list[Packet] = []
        self.datagrams = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams += 1
            self.bytes += len(data)
            self.packets += [Packet.parse(line) for line in data.decode().splitlines() if line]

    def named(self, name: str, *tags: str) -> list[Packet]:
        return [p for p in list(self.packets) if p.name == name and set(tags) <= p.tags]

    def total(self, name: str, *tags: str) -> float:
        return sum(p.value for p in self.named(name, *tags))

    def wait(self, name: str, total: float, *tags: str, timeout: float = 20) -> None:
        wait_for(lambda: self.total(name, *tags) >= total, timeout,
                 f"{name} {tags} >= {total}; got {sorted({p.name for p in self.packets})}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def agent() -> Iterator[Agent]:
    listener = Agent()
    yield listener
    listener.close()


def statsd_env(port: int) -> dict[str, str]:
    """A worker's environment for the agent on ``port``, with unified service tags and an endpoint identity."""
    return {"DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(port), "DD_ENV": "test",
            "DD_SERVICE": "forwarder-test", "DD_VERSION": "1.2.3",
            "FORWARDER_ENDPOINT_ID": "end-1", "FORWARDER_ENDPOINT_NAME": "my-endpoint"}
