"""An asyncio model server for the scale bench: thousands of keep-alive connections in one thread.

``python -m bench.model_async PORT DELAY``: ``POST /predict`` answers ``{"echo": <body>}`` after DELAY
seconds; ``GET /readyz`` answers 200; ``GET /stats`` answers ``{"total", "duplicates", "peak_in_flight"}``,
where a duplicate is a request whose ``id`` was already seen (the bench's tasks each carry a unique one).
``capacity(url, connections, seconds)`` measures the server alone: the throughput it sustains with that
many keep-alive clients, to show it is never the bottleneck of a worker measurement.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

STATE: dict[str, Any] = {"seen": Counter(), "total": 0, "in_flight": 0, "peak": 0}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST":
                payload = await _predict(body, delay)
            elif path.startswith("/stats"):
                seen = STATE["seen"]
                payload = json.dumps({"total": STATE["total"], "duplicates": sum(c - 1 for c in seen.values() if c > 1),
                                      "peak_in_flight": STATE["peak"]}).encode()
            else:
                payload = b'{"ready": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _predict(body: bytes, delay: float) -> bytes:
    request = json.loads(body or b"null")
    STATE["total"] += 1
    STATE["in_flight"] += 1
    STATE["peak"] = max(STATE["peak"], STATE["in_flight"])
    if isinstance(request, dict) and "id" in request:
        STATE["seen"][str(request["id"])] += 1
    try:
        await asyncio.sleep(delay)
    finally:
        STATE["in_flight"] -= 1
    return json.dumps({"echo": request, "model": "async-example"}).encode()


async def serve(port: int, delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, delay), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


async def _client(host: str, port: int, path: str, until: float, done: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    body = b'{"x": 1}'
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    while time.monotonic() < until:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        done[0] += 1
    writer.close()


def capacity(url: str, connections: int, seconds: float) -> float:
    """Requests/s the server sustains alone with ``connections`` keep-alive clients for ``seconds``."""
    parts = urlsplit(url)

    async def run() -> float:
        done = [0]
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(_client(parts.hostname or "127.0.0.1", parts.port or 80, parts.path, until, done)
                               for _ in range(connections)))
        return done[0] / (time.monotonic() - started)

    return asyncio.run(run())


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])))
