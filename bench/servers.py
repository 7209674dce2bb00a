"""The servers a benchmark run needs, each in its own process so none shares the GIL with the bench client.

- Redis-protocol server: ``devtools.servers.RedisServer`` (already a subprocess).
- Model servers: ``devtools.servers.serve_model_forever``, one process per latency.
- moto (STS, S3, Firehose): ``moto.server.ThreadedMotoServer``; a Firehose stream with an S3 destination.
- Callback receiver: answers 200 to every POST and counts them (``GET /count``).
- Trace agent: takes ddtrace's trace payloads and drops them, so a worker can trace as in production.

``python -m bench.servers model PORT DELAY | moto PORT | receiver PORT | trace-agent PORT`` runs one of them in the foreground
until SIGTERM; ``Stack`` starts the lot and stops it again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from devtools.servers import RedisServer, free_port, serve_model_forever, wait_for

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
#: Dummy credentials: moto accepts any, and nothing can reach real AWS with them.
AWS_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing"}
ROLE_ARN = "arn:aws:iam::123456789012:role/bench-forwarder-logging"


class ServerProcess:
    """``python -m bench.servers <kind> <args>`` as a subprocess, ready once its HTTP port answers."""

    def __init__(self, kind: str, *args: Any, ready_path: str = "/") -> None:
        self.port = free_port()
        self.kind = kind
        self.args = [str(a) for a in args]
        self.ready_path = ready_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        command = [sys.executable, "-m", "bench.servers", self.kind, str(self.port), *self.args]
        # Output to a file, not the bench's terminal (moto logs every request it serves).
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.kind}-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(self._answers, 30, f"{self.kind} server on port {self.port}", interval=0.1)
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.kind} server exited with {self.process.returncode}")
        try:
            requests.get(self.url + self.ready_path, timeout=1)
            return True
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)


class Stack:
    """Redis, model servers by latency, moto (with a Firehose stream) and a callback receiver for one run."""

    def __init__(self) -> None:
        self.redis = RedisServer()
        self.models: dict[float, ServerProcess] = {}
        self.moto = ServerProcess("moto", ready_path="/moto-api/")
        self.receiver = ServerProcess("receiver", ready_path="/count")
        self.trace_agent = ServerProcess("trace-agent", ready_path="/info")
        self.stream = f"bench-{uuid.uuid4().hex[:8]}"
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Stack:
        self.redis.start()
        self.moto.start()
        self.receiver.start()
        create_stream(self.moto.url, self.stream, self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.receiver, self.moto, self.trace_agent, *self.models.values()):
            server.stop()
        self.redis.stop()

    def async_model(self, delay: float) -> ServerProcess:
        """A fresh asyncio model server (its own counts) answering after ``delay`` seconds; the caller stops it."""
        return ServerProcess("async-model", delay, ready_path="/readyz").start()

    def model_url(self, delay: float) -> str:
        """The model server answering after ``delay`` seconds (started on first use)."""
        if delay not in self.models:
            self.models[delay] = ServerProcess("model", delay, ready_path="/readyz").start()
        return self.models[delay].url

    def trace_env(self) -> dict[str, str]:
        """Worker environment for tracing as in production (on, every span sent), to a local agent (started on first use)."""
        if self.trace_agent.process is None:
            self.trace_agent.start()
        return {"DD_TRACE_ENABLED": "true", "DD_TRACE_AGENT_URL": self.trace_agent.url, "DD_SERVICE": "bench", "DD_ENV": "bench"}

    def aws_env(self) -> dict[str, str]:
        return {**AWS_CREDENTIALS, "AWS_ENDPOINT_URL": self.moto.url, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}

    def callbacks_received(self) -> int:
        return int(requests.get(self.receiver.url + "/count", timeout=5).json()["count"])


def create_stream(moto_url: str, stream: str, bucket: str) -> None:
    """A DirectPut Firehose stream delivering to an S3 bucket (moto writes one object per put)."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    session.client("s3", endpoint_url=moto_url).create_bucket(Bucket=bucket)
    session.client("firehose", endpoint_url=moto_url).create_delivery_stream(
        DeliveryStreamName=stream,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose",
            "BucketARN": f"arn:aws:s3:::{bucket}",
            "Prefix": f"{stream}/",
        },
    )


# ------------------------------------------------------------------------------ foreground servers


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive answers stall ~40 ms (Nagle + delayed ACK)
    count = 0
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            type(self).count += 1
        self._send(b'{"ok": true}')

    def do_GET(self) -> None:
        self._send(json.dumps({"count": type(self).count}).encode())

    def _send(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _TraceAgent(_Receiver):
    """Accepts any trace payload (PUT or POST, v0.4 or v0.5) and drops it; ``/info`` advertises nothing."""

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(b'{"rate_by_service": {}}')

    do_POST = do_PUT

    def do_GET(self) -> None:
        self._send(b"{}")


def _serve_receiver(port: int, handler: type[_Receiver] = _Receiver) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.shutdown()


def _serve_moto(port: int) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait
    if kind == "model":
        serve_model_forever(port, float(argv[2]), argv[3] if len(argv) > 3 else None)
    elif kind == "async-model":
        import asyncio

        from bench.model_async import serve

        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # asyncio handles them
        asyncio.run(serve(port, float(argv[2])))
    elif kind == "moto":
        _serve_moto(port)
    elif kind == "receiver":
        _serve_receiver(port)
    elif kind == "trace-agent":
        _serve_receiver(port, _TraceAgent)
    else:
        raise SystemExit(f"unknown server {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
